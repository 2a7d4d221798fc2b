// What the CUDA kernel files share: the launch macro, the block and grid sizes, the math and
// packed-load types, and the dispatch over the dtype pairs the kernels read.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAMacros.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "focal.h"

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
bool dispatch_dtype_pair(at::ScalarType first, at::ScalarType second, Fn&& fn) {
  using at::BFloat16;
  using at::Half;
  if (first == second) {
    switch (first) {
      case at::kHalf: fn(Half{}, Half{}); return true;
      case at::kBFloat16: fn(BFloat16{}, BFloat16{}); return true;
      case at::kFloat: fn(float{}, float{}); return true;
      case at::kDouble: fn(double{}, double{}); return true;
      default: return false;
    }
  }
  if (second == at::kFloat && first == at::kHalf) {
    fn(Half{}, float{});
    return true;
  }
  if (second == at::kFloat && first == at::kBFloat16) {
    fn(BFloat16{}, float{});
    return true;
  }
  return false;
}

}  // namespace
}  // namespace focal::cuda
