// Emulation shim for c10/cuda/CUDAStream.h: launches run synchronously on the one default stream.
#pragma once

#include <c10/core/Device.h>

#include "emulation.h"

namespace c10::cuda {

struct CUDAStream {
  cudaStream_t stream() const { return nullptr; }
  operator cudaStream_t() const { return stream(); }
};

inline CUDAStream getCurrentCUDAStream(c10::DeviceIndex = -1) { return {}; }

}  // namespace c10::cuda
