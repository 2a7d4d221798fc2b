// What the CUDA kernel files share: the tensors and launch place the host glue (focal_cuda.cu)
// hands them, the launch macro, the block and grid sizes, the math and packed-load types, and
// the dispatch over the dtype pairs the kernels read. Only c10's light headers: no ATen.
#pragma once

#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/FunctionRef.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "focal_args.h"

// Every launch goes through this macro so that the CUDA emulation (tests/cuda_emulation), which
// runs this very source on the CPU, can put its own launcher in place of <<<>>>.
#ifndef FOCAL_LAUNCH
#define FOCAL_LAUNCH(grid, block, stream, ...) __VA_ARGS__<<<grid, block, 0, stream>>>
#endif

namespace focal::cuda {

// The SM count of a device, asked of the driver once per device rather than on every launch: for
// small inputs the launch overhead is the whole cost. (ATen's cached device properties need
// headers, cuBLAS and cuSPARSE, that a bare toolkit may lack.)
int multiprocessor_count(c10::DeviceIndex device);

// A tensor as the kernel files see it: its memory, dtype and size. The data accessors check the
// dtype as at::Tensor's do, and only a tensor the glue made writable (an output) hands out
// mutable memory.
class DeviceTensor {
 public:
  DeviceTensor() = default;
  DeviceTensor(const void* data, c10::ScalarType dtype, int64_t numel, bool writable)
      : data_(data), dtype_(dtype), numel_(numel), writable_(writable) {}

  bool defined() const { return dtype_ != c10::ScalarType::Undefined; }
  c10::ScalarType scalar_type() const { return dtype_; }
  int64_t numel() const { return numel_; }

  template <typename T>
  const T* const_data_ptr() const {
    check_dtype<T>();
    return static_cast<const T*>(data_);
  }
  template <typename T>
  T* mutable_data_ptr() const {
    check_dtype<T>();
    TORCH_INTERNAL_ASSERT(writable_, "focal_cuda: a kernel asked to write one of its inputs");
    return static_cast<T*>(const_cast<void*>(data_));
  }

 private:
  template <typename T>
  void check_dtype() const {
    TORCH_INTERNAL_ASSERT(dtype_ == c10::CppTypeToScalarType<T>::value, "focal_cuda: a ", dtype_,
                          " tensor read as ", c10::CppTypeToScalarType<T>::value);
  }

  const void* data_ = nullptr;
  c10::ScalarType dtype_ = c10::ScalarType::Undefined;
  int64_t numel_ = 0;
  bool writable_ = false;
};

using DeviceForwardArgs = ForwardArgsOf<DeviceTensor>;
using DeviceSoftmaxArgs = SoftmaxArgsOf<DeviceTensor>;

// Where a kernel file launches: the device (already current), its current stream, and
// partials(blocks): scratch memory on it for the per-block partials of a reduction over the
// grids the kernel file chose, kPartialBytes for each of `blocks`; asked once per entry call.
struct LaunchPlace {
  c10::DeviceIndex device;
  cudaStream_t stream;
  c10::function_ref<void*(int64_t blocks)> partials;
};

// A block's partials: a count (int64) or divisor (double), and a sum (double).
constexpr int64_t kPartialBytes = 16;

// The kernel files' entry points, which the glue calls on the device of the inputs. forward for
// inputs of each dtype, with floating targets and with labels, defined in forward_<dtype>.cu (the
// 16-bit dtypes' labels in forward_<dtype>_labels.cu), so that a build compiles them in parallel.
void forward_float16(const DeviceForwardArgs& args, const LaunchPlace& place);
void forward_float16_labels(const DeviceForwardArgs& args, const LaunchPlace& place);
void forward_bfloat16(const DeviceForwardArgs& args, const LaunchPlace& place);
void forward_bfloat16_labels(const DeviceForwardArgs& args, const LaunchPlace& place);
void forward_float32(const DeviceForwardArgs& args, const LaunchPlace& place);
void forward_float32_labels(const DeviceForwardArgs& args, const LaunchPlace& place);
void forward_float64(const DeviceForwardArgs& args, const LaunchPlace& place);
void forward_float64_labels(const DeviceForwardArgs& args, const LaunchPlace& place);
// softmax.cu: the softmax focal loss's forward.
void launch_softmax_forward(const DeviceSoftmaxArgs& args, const LaunchPlace& place);

namespace {

constexpr int kThreads = 256;
// Resident blocks per SM the grid of a kernel is sized for; its __launch_bounds__ hold ptxas to
// it (64 registers a thread for 4 blocks on sm_90), so the grid is one wave.
constexpr int kMaxBlocksPerSM = 4;

template <typename T>
using math_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Elements per thread per iteration: 16 bytes of inputs.
template <typename T>
constexpr int pack_size() {
  return 16 / sizeof(T) < 2 ? 2 : 16 / sizeof(T);
}

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// Whether ptr may be read and written in packs of `pack` T (null: nothing to read or write).
template <typename T>
bool is_aligned_for_pack(const void* ptr, int pack) {
  return ptr == nullptr || reinterpret_cast<std::uintptr_t>(ptr) % (sizeof(T) * pack) == 0;
}

// A grid-stride loop's first item, this thread's index in the grid, and its stride, the grid's
// threads: 64-bit, so that neither wraps past 2^31 items.
__device__ __forceinline__ int64_t grid_thread() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ int64_t grid_threads() {
  return static_cast<int64_t>(gridDim.x) * blockDim.x;
}

// Blocks for work_items grid-stride items on device, for a kernel of blocks_per_sm resident
// blocks per SM (its launch bounds: kMaxBlocksPerSM but where stated): one wave at most.
inline int grid_size(int64_t work_items, c10::DeviceIndex device,
                     int blocks_per_sm = kMaxBlocksPerSM) {
  const int64_t wanted = (work_items + kThreads - 1) / kThreads;
  const int64_t resident = static_cast<int64_t>(multiprocessor_count(device)) * blocks_per_sm;
  return static_cast<int>(std::max<int64_t>(1, std::min(wanted, resident)));
}

// Calls fn(first_t{}, second_t{}) for the floating dtype pairs the kernels read directly: equal
// dtypes, and 16-bit inputs (or saved gradients) with float32 targets (or grad_output), the
// pair mixed-precision training produces. Returns false for any other pair.
template <typename Fn>
bool dispatch_dtype_pair(c10::ScalarType first, c10::ScalarType second, Fn&& fn) {
  using c10::BFloat16;
  using c10::Half;
  if (first == second) {
    switch (first) {
      case c10::kHalf: fn(Half{}, Half{}); return true;
      case c10::kBFloat16: fn(BFloat16{}, BFloat16{}); return true;
      case c10::kFloat: fn(float{}, float{}); return true;
      case c10::kDouble: fn(double{}, double{}); return true;
      default: return false;
    }
  }
  if (second == c10::kFloat && first == c10::kHalf) {
    fn(Half{}, float{});
    return true;
  }
  if (second == c10::kFloat && first == c10::kBFloat16) {
    fn(BFloat16{}, float{});
    return true;
  }
  return false;
}

}  // namespace
}  // namespace focal::cuda
