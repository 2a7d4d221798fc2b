// Emulation shim for c10/cuda/CUDAGuard.h: the tensors of the emulation live on the host, so the
// guard takes the emulated current device (set_multiprocessor_count picks it) as theirs.
#pragma once

#include <c10/core/Device.h>
#include <c10/cuda/CUDAException.h>

namespace c10::cuda {

struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {
    int index = 0;
    C10_CUDA_CHECK(cudaGetDevice(&index));  // as cudaSetDevice, fails while an error is sticky
    device_ = c10::Device(c10::DeviceType::CUDA, static_cast<c10::DeviceIndex>(index));
  }
  CUDAGuard(const CUDAGuard&) = delete;
  CUDAGuard& operator=(const CUDAGuard&) = delete;
  c10::Device current_device() const { return device_; }

 private:
  c10::Device device_{c10::DeviceType::CUDA, 0};
};

}  // namespace c10::cuda
