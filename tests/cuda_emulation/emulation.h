// The CUDA language and the slice of the CUDA runtime that the kernel files of csrc/cuda use,
// for the host: the kernel sources compile unchanged with g++ and run on the CPU under CUDA's
// execution model (runtime.cpp). Include this before the kernel sources.
//
// - Blocks run one after another; the threads of a block run as fibers, so __syncthreads is a
//   real barrier and warp shuffles exchange values between lanes that are all waiting at them.
// - __shared__ variables are statics (one instance, reused by each block in turn), tagged so that
//   the runtime finds them in the module's symbol table and fills them with NaN bytes (0xff)
//   before every block: a read before a write shows.
// - Misuse that the CUDA programming guide or the PTX ISA leave undefined (a barrier not reached
//   by the whole block, a shuffle that reads a lane outside its mask, a bad width, a deadlock)
//   stops the grid with an error that names the kernel instance, block and thread.
// - CUDA_KERNEL_ASSERT prints as on a GPU and leaves a sticky cudaErrorAssert.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

#define FOCAL_CUDA_EMULATION 1

// ---- The language ----------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
// A code-generation hint the emulator needs no copy of (and glibc's headers spell
// __attribute__((__noinline__)), which a non-empty definition would break).
#define __noinline__
#define __launch_bounds__(...)
// The abi tag puts "focal_emu_shared" into the variable's symbol: how the runtime finds it.
#define __shared__ static __attribute__((abi_tag("focal_emu_shared")))

struct uint3 {
  unsigned x, y, z;
};

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

// Set by the runtime before it resumes each thread.
extern uint3 threadIdx;
extern uint3 blockIdx;
extern dim3 blockDim;
extern dim3 gridDim;
constexpr int warpSize = 32;

// ---- The runtime API -------------------------------------------------------------------------
enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDevice = 101,
  cudaErrorLaunchOutOfResources = 701,
  cudaErrorAssert = 710,
  cudaErrorLaunchFailure = 719,
};
using cudaError = cudaError_t;

enum cudaDeviceAttr : int {
  cudaDevAttrMaxThreadsPerBlock = 1,
  cudaDevAttrMultiProcessorCount = 16,
};

struct CUstream_st;
using cudaStream_t = CUstream_st*;

cudaError_t cudaGetDevice(int* device);
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attribute, int device);
cudaError_t cudaGetLastError();
cudaError_t cudaPeekAtLastError();
const char* cudaGetErrorString(cudaError_t error);

namespace focal_emu {

// ---- Synchronisation, called from inside a kernel -----------------------------------------------
void sync_threads(const char* file, int line);
void sync_warp(unsigned mask, const char* file, int line);

enum class ShuffleMode : int { Index, Up, Down, Xor };
// The value (up to 8 bytes, as raw bits) of the lane that `mode` and `operand` select.
std::uint64_t shuffle(ShuffleMode mode, unsigned mask, std::uint64_t bits, int operand, int width,
                      const char* file, int line);

template <typename T>
T shuffle_value(ShuffleMode mode, unsigned mask, T value, int operand, int width, const char* file,
                int line) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8,
                "warp shuffles move values of up to 8 bytes");
  std::uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  bits = shuffle(mode, mask, bits, operand, width, file, line);
  std::memcpy(&value, &bits, sizeof(T));
  return value;
}

// CUDA_KERNEL_ASSERT's failure: prints as the GPU does, leaves the sticky cudaErrorAssert and
// stops the grid. Out of line and cold, as on the device.
[[noreturn]] __attribute__((cold, noinline)) void assert_fail(const char* condition, const char* file,
                                                              int line, const char* function);

// ---- Launches ----------------------------------------------------------------------------------
// One kernel instance (a kernel template with its template arguments), as the registry knows it.
struct KernelInstance;
KernelInstance& register_instance(const char* pretty_function);
using KernelThunk = void (*)(const void* params);
void launch(KernelInstance& instance, dim3 grid, dim3 block, cudaStream_t stream, KernelThunk run,
            const void* params);
// The text of the error the last failed launch or API call left, for C10_CUDA_CHECK's message.
const char* last_error_detail();

template <auto Kernel>
struct Launch;

// FOCAL_LAUNCH(grid, block, stream, kernel)(arguments...): as kernel<<<grid, block, 0, stream>>>.
// The arguments are converted to the kernel's parameter types and copied once, like a launch's
// parameter buffer; every thread then receives its own copy.
template <typename... Params, void (*Kernel)(Params...)>
struct Launch<Kernel> {
  dim3 grid;
  dim3 block;
  cudaStream_t stream;

  Launch(dim3 grid_, dim3 block_, cudaStream_t stream_) : grid(grid_), block(block_), stream(stream_) {}

  template <typename... Args>
  void operator()(Args&&... args) const {
    const std::tuple<std::decay_t<Params>...> params(std::forward<Args>(args)...);
    launch(registered, grid, block, stream, &run, &params);
  }

 private:
  static void run(const void* params) {
    std::apply(Kernel, *static_cast<const std::tuple<std::decay_t<Params>...>*>(params));
  }
  static const char* name() { return __PRETTY_FUNCTION__; }
  // Registered when the module loads: the registry lists every instance the host code can launch.
  static inline KernelInstance& registered = register_instance(name());
};

}  // namespace focal_emu

#define FOCAL_LAUNCH(grid, block, stream, ...) \
  ::focal_emu::Launch<&__VA_ARGS__>(grid, block, stream)

// ---- Intrinsics ----------------------------------------------------------------------------------
// __builtin_FILE/__builtin_LINE as default arguments name the call site, for error messages and
// for checking that a block's threads wait at the same barrier.
inline void __syncthreads(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  focal_emu::sync_threads(file, line);
}

inline void __syncwarp(unsigned mask = 0xffffffffu, const char* file = __builtin_FILE(),
                       int line = __builtin_LINE()) {
  focal_emu::sync_warp(mask, file, line);
}

template <typename T>
T __shfl_sync(unsigned mask, T var, int src_lane, int width = warpSize,
              const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return focal_emu::shuffle_value(focal_emu::ShuffleMode::Index, mask, var, src_lane, width, file,
                                  line);
}

template <typename T>
T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize,
                 const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return focal_emu::shuffle_value(focal_emu::ShuffleMode::Up, mask, var, static_cast<int>(delta),
                                  width, file, line);
}

template <typename T>
T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize,
                   const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return focal_emu::shuffle_value(focal_emu::ShuffleMode::Down, mask, var, static_cast<int>(delta),
                                  width, file, line);
}

template <typename T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = warpSize,
                  const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return focal_emu::shuffle_value(focal_emu::ShuffleMode::Xor, mask, var, lane_mask, width, file,
                                  line);
}

// PTX's vprintf system call, which the kernel source reaches through inline assembly to print
// arguments already in memory: each conversion of format takes the next argument, aligned to its
// size, from the buffer at arguments. Only %lld (and %%) are emulated, the one conversion the
// kernels use; any other stops the grid rather than be misread.
void vprintf_from(const char* format, const void* arguments);

// PTX rcp.approx.ftz.f32, which the kernel source reaches through inline assembly the host
// compiler cannot take: 1 / v within 1 ulp, subnormal inputs and results flushed to zero with
// their sign (PTX ISA). Emulated no better than that: the rounded reciprocal moved by 1 ulp, up or
// down with the low bit of v, so that code using it must hold with the whole documented error.
inline float rcp_approx_ftz(float v) {
  const auto flush = [](float f) { return std::fpclassify(f) == FP_SUBNORMAL ? std::copysign(0.0f, f) : f; };
  const float reciprocal = 1.0f / flush(v);
  if (!std::isfinite(reciprocal) || reciprocal == 0.0f) {
    return reciprocal;
  }
  std::uint32_t bits = 0;
  std::memcpy(&bits, &v, sizeof(bits));
  return flush(std::nextafter(reciprocal, (bits & 1u) ? HUGE_VALF : -HUGE_VALF));
}

// PTX ex2.approx.f32: 2^v within 2 ulp (CUDA's exp2f, which is this instruction, is documented
// to 2 ulp), subnormal results kept or, with .ftz, flushed to zero. Emulated no better: the
// rounded power moved by 2 ulp, up or down with the low bit of v.
template <bool kFlushSubnormals>
inline float ex2_approx(float v) {
  float power = static_cast<float>(std::exp2(static_cast<double>(v)));
  if (kFlushSubnormals && std::fpclassify(power) == FP_SUBNORMAL) {
    return 0.0f;
  }
  if (!std::isfinite(power) || power == 0.0f) {
    return power;
  }
  std::uint32_t bits = 0;
  std::memcpy(&bits, &v, sizeof(bits));
  for (int step = 0; step < 2; ++step) {
    power = std::nextafter(power, (bits & 1u) ? HUGE_VALF : 0.0f);
  }
  return power;
}

// c10's host definition calls __assert_fail, which would abort the process.
#undef CUDA_KERNEL_ASSERT
#define CUDA_KERNEL_ASSERT(cond)                                         \
  if (C10_UNLIKELY(!(cond))) {                                           \
    ::focal_emu::assert_fail(#cond, __FILE__, __LINE__, __func__);       \
  }
