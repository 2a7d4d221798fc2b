// CUDA kernels: the fused forward (loss and gradients in one pass over inputs and targets) and
// the backward that scales the saved gradient by grad_output.
//
// Grid-stride loops over packs of elements (16-byte loads of the inputs where every pointer is
// aligned, one element at a time otherwise), 64-bit indices, math in float (double for float64)
// through focal_math.h. Reductions write one partial sum per block and a one-block kernel adds
// them in a fixed order: no floating-point atomics, so results are bitwise reproducible.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>

#include "focal.h"

namespace focal::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxBlocksPerSM = 2048 / kThreads;

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

template <typename T, int N>
bool is_aligned_for_pack(const void* ptr) {
  return ptr == nullptr || reinterpret_cast<std::uintptr_t>(ptr) % alignof(Pack<T, N>) == 0;
}

int grid_size(int64_t work_items) {
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  int sm_count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, device));
  const int64_t wanted = (work_items + kThreads - 1) / kThreads;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(wanted, sm_count * kMaxBlocksPerSM)));
}

// Sum over the block, combined in a fixed order; the result is valid in thread 0.
template <typename A>
__device__ A block_sum(A value) {
  __shared__ A warp_sums[kThreads / 32];
  for (int offset = 16; offset > 0; offset /= 2) {
    value += __shfl_down_sync(0xffffffffu, value, offset);
  }
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  if (lane == 0) {
    warp_sums[warp] = value;
  }
  __syncthreads();
  if (warp == 0) {
    value = lane < kThreads / 32 ? warp_sums[lane] : A(0);
    for (int offset = kThreads / 64; offset > 0; offset /= 2) {
      value += __shfl_down_sync(0xffffffffu, value, offset);
    }
  }
  return value;
}

// The loss takes the targets' dtype: in every pair read directly it is the promoted dtype.
template <typename x_t, typename t_t, GammaMode kGamma, bool kGradInputs, bool kGradTargets,
          bool kElementwise, int kPack>
__global__ void __launch_bounds__(kThreads)
    focal_forward_kernel(const x_t* __restrict__ inputs, const t_t* __restrict__ targets, int64_t n,
                         FocalCoeffs<math_t<x_t>> coeffs, t_t* __restrict__ loss,
                         math_t<x_t>* __restrict__ block_sums, x_t* __restrict__ grad_inputs,
                         t_t* __restrict__ grad_targets) {
  using S = math_t<x_t>;
  S sum(0);
  auto element = [&](x_t x, t_t t, t_t& loss_out, x_t& grad_inputs_out, t_t& grad_targets_out) {
    const auto terms = focal_terms<ScalarMath<S>, kGamma, kGradInputs, kGradTargets>(
        static_cast<S>(x), static_cast<S>(t), coeffs);
    sum += terms.loss;
    loss_out = static_cast<t_t>(terms.loss);
    grad_inputs_out = static_cast<x_t>(terms.grad_inputs);
    grad_targets_out = static_cast<t_t>(terms.grad_targets);
  };

  const int64_t thread = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t num_threads = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t num_packs = n / kPack;
  for (int64_t pack = thread; pack < num_packs; pack += num_threads) {
    const auto xs = reinterpret_cast<const Pack<x_t, kPack>*>(inputs)[pack];
    const auto ts = reinterpret_cast<const Pack<t_t, kPack>*>(targets)[pack];
    Pack<t_t, kPack> losses;
    Pack<x_t, kPack> grads_inputs;
    Pack<t_t, kPack> grads_targets;
#pragma unroll
    for (int k = 0; k < kPack; ++k) {
      element(xs.v[k], ts.v[k], losses.v[k], grads_inputs.v[k], grads_targets.v[k]);
    }
    if constexpr (kElementwise) {
      reinterpret_cast<Pack<t_t, kPack>*>(loss)[pack] = losses;
    }
    if constexpr (kGradInputs) {
      reinterpret_cast<Pack<x_t, kPack>*>(grad_inputs)[pack] = grads_inputs;
    }
    if constexpr (kGradTargets) {
      reinterpret_cast<Pack<t_t, kPack>*>(grad_targets)[pack] = grads_targets;
    }
  }
  // The last n % kPack elements (fewer than the threads of one block).
  const int64_t tail = num_packs * kPack + thread;
  if (tail < n) {
    t_t loss_value;
    x_t grad_inputs_value;
    t_t grad_targets_value;
    element(inputs[tail], targets[tail], loss_value, grad_inputs_value, grad_targets_value);
    if constexpr (kElementwise) {
      loss[tail] = loss_value;
    }
    if constexpr (kGradInputs) {
      grad_inputs[tail] = grad_inputs_value;
    }
    if constexpr (kGradTargets) {
      grad_targets[tail] = grad_targets_value;
    }
  }

  if constexpr (!kElementwise) {
    sum = block_sum(sum);
    if (threadIdx.x == 0) {
      block_sums[blockIdx.x] = sum;
    }
  }
}

// One block adds the per-block sums in a fixed order, in double, and divides (mean) on device.
template <typename S, typename out_t>
__global__ void __launch_bounds__(kThreads)
    finish_sum_kernel(const S* __restrict__ block_sums, int num_blocks, double divisor,
                      out_t* __restrict__ out) {
  double sum = 0;
  for (int i = threadIdx.x; i < num_blocks; i += kThreads) {
    sum += static_cast<double>(block_sums[i]);
  }
  sum = block_sum(sum);
  if (threadIdx.x == 0) {
    *out = static_cast<out_t>(sum / divisor);
  }
}

// out = saved * grad_output * scale; grad_output is one value in math_t<s_t> when kScalarGrad.
template <typename s_t, typename g_t, bool kScalarGrad, int kPack>
__global__ void __launch_bounds__(kThreads)
    focal_backward_kernel(const s_t* __restrict__ saved, const g_t* __restrict__ grad_output,
                          math_t<s_t> scale, int64_t n, s_t* __restrict__ out) {
  using S = math_t<s_t>;
  const S uniform_factor = kScalarGrad ? static_cast<S>(grad_output[0]) * scale : scale;
  auto element = [&](int64_t i, s_t saved_value) {
    const S factor = kScalarGrad ? uniform_factor : static_cast<S>(grad_output[i]) * scale;
    return static_cast<s_t>(static_cast<S>(saved_value) * factor);
  };
  const int64_t thread = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t num_threads = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t num_packs = n / kPack;
  for (int64_t pack = thread; pack < num_packs; pack += num_threads) {
    const auto saved_values = reinterpret_cast<const Pack<s_t, kPack>*>(saved)[pack];
    Pack<s_t, kPack> results;
#pragma unroll
    for (int k = 0; k < kPack; ++k) {
      results.v[k] = element(pack * kPack + k, saved_values.v[k]);
    }
    reinterpret_cast<Pack<s_t, kPack>*>(out)[pack] = results;
  }
  const int64_t tail = num_packs * kPack + thread;
  if (tail < n) {
    out[tail] = element(tail, saved[tail]);
  }
}

// Calls fn(first_t{}, second_t{}) for the dtype pairs the kernels read directly: equal dtypes,
// and 16-bit inputs (or saved gradients) with float32 targets (or grad_output), the pair that
// mixed-precision training produces. Returns false for any other pair.
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

template <typename T>
T* data_or_null(const at::Tensor& tensor) {
  return tensor.defined() ? tensor.mutable_data_ptr<T>() : nullptr;
}

}  // namespace

bool reads_dtype_pair(at::ScalarType first, at::ScalarType second) {
  return dispatch_dtype_pair(first, second, [](auto, auto) {});
}

void forward(const ForwardArgs& args) {
  const c10::cuda::CUDAGuard device_guard(args.inputs.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t n = args.inputs.numel();
  const bool elementwise = args.reduction == Reduction::None;
  TORCH_INTERNAL_ASSERT(args.loss.scalar_type() == args.targets.scalar_type());

  const bool dispatched = dispatch_dtype_pair(
      args.inputs.scalar_type(), args.targets.scalar_type(), [&](auto x_value, auto t_value) {
        using x_t = decltype(x_value);
        using t_t = decltype(t_value);
        using S = math_t<x_t>;
        constexpr int kPack = pack_size<x_t>();
        const x_t* inputs = args.inputs.const_data_ptr<x_t>();
        const t_t* targets = args.targets.const_data_ptr<t_t>();
        t_t* loss = elementwise ? args.loss.mutable_data_ptr<t_t>() : nullptr;
        x_t* grad_inputs = data_or_null<x_t>(args.grad_inputs);
        t_t* grad_targets = data_or_null<t_t>(args.grad_targets);
        const bool packed =
            is_aligned_for_pack<x_t, kPack>(inputs) && is_aligned_for_pack<t_t, kPack>(targets) &&
            is_aligned_for_pack<t_t, kPack>(loss) && is_aligned_for_pack<x_t, kPack>(grad_inputs) &&
            is_aligned_for_pack<t_t, kPack>(grad_targets);
        const int grid = grid_size(packed ? n / kPack : n);
        at::Tensor block_sums;
        if (!elementwise) {
          block_sums = at::empty({grid}, args.inputs.options().dtype(c10::CppTypeToScalarType<S>::value));
        }
        S* block_sums_ptr = elementwise ? nullptr : block_sums.mutable_data_ptr<S>();
        const FocalCoeffs<S> coeffs(args.alpha, args.gamma);

        dispatch_focal_variant(
            args.gamma, grad_inputs != nullptr, grad_targets != nullptr,
            [&](auto gamma_mode, auto grad_inputs_flag, auto grad_targets_flag) {
              constexpr GammaMode kGamma = decltype(gamma_mode)::value;
              constexpr bool kGradInputs = decltype(grad_inputs_flag)::value;
              constexpr bool kGradTargets = decltype(grad_targets_flag)::value;
              auto launch = [&](auto elementwise_flag, auto pack_constant) {
                focal_forward_kernel<x_t, t_t, kGamma, kGradInputs, kGradTargets,
                                     decltype(elementwise_flag)::value,
                                     decltype(pack_constant)::value>
                    <<<grid, kThreads, 0, stream>>>(inputs, targets, n, coeffs, loss,
                                                    block_sums_ptr, grad_inputs, grad_targets);
                C10_CUDA_KERNEL_LAUNCH_CHECK();
              };
              auto with_pack = [&](auto elementwise_flag) {
                if (packed) {
                  launch(elementwise_flag, std::integral_constant<int, kPack>{});
                } else {
                  launch(elementwise_flag, std::integral_constant<int, 1>{});
                }
              };
              if (elementwise) {
                with_pack(std::true_type{});
              } else {
                with_pack(std::false_type{});
              }
            });

        if (!elementwise) {
          const double divisor = args.reduction == Reduction::Mean ? static_cast<double>(n) : 1.0;
          finish_sum_kernel<S, t_t><<<1, kThreads, 0, stream>>>(
              block_sums_ptr, grid, divisor, args.loss.mutable_data_ptr<t_t>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
      });
  TORCH_INTERNAL_ASSERT(dispatched, "focal_cuda: dtype pair ", args.inputs.scalar_type(), ", ",
                        args.targets.scalar_type(), " reached the CUDA forward unconverted");
}

void backward(const BackwardArgs& args) {
  const c10::cuda::CUDAGuard device_guard(args.out.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t n = args.out.numel();

  const bool dispatched = dispatch_dtype_pair(
      args.saved_grad.scalar_type(), args.grad_output.scalar_type(), [&](auto s_value, auto g_value) {
        using s_t = decltype(s_value);
        using g_t = decltype(g_value);
        using S = math_t<s_t>;
        constexpr int kPack = pack_size<s_t>();
        const s_t* saved = args.saved_grad.const_data_ptr<s_t>();
        const g_t* grad_output = args.grad_output.const_data_ptr<g_t>();
        s_t* out = args.out.mutable_data_ptr<s_t>();
        const bool packed = is_aligned_for_pack<s_t, kPack>(saved) &&
                            is_aligned_for_pack<s_t, kPack>(out);
        const int grid = grid_size(packed ? n / kPack : n);
        const S scale = static_cast<S>(args.scale);
        auto launch = [&](auto scalar_flag, auto pack_constant) {
          focal_backward_kernel<s_t, g_t, decltype(scalar_flag)::value,
                                decltype(pack_constant)::value>
              <<<grid, kThreads, 0, stream>>>(saved, grad_output, scale, n, out);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        };
        auto with_pack = [&](auto scalar_flag) {
          if (packed) {
            launch(scalar_flag, std::integral_constant<int, kPack>{});
          } else {
            launch(scalar_flag, std::integral_constant<int, 1>{});
          }
        };
        if (args.grad_output_is_scalar) {
          with_pack(std::true_type{});
        } else {
          with_pack(std::false_type{});
        }
      });
  TORCH_INTERNAL_ASSERT(dispatched, "focal_cuda: dtype pair ", args.saved_grad.scalar_type(), ", ",
                        args.grad_output.scalar_type(), " reached the CUDA backward unconverted");
}

}  // namespace focal::cuda
