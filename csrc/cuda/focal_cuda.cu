// The CUDA entry points of the op layer, the one CUDA file that sees ATen: the forwards, which
// make the inputs' device current, allocate the reductions' scratch the kernel files ask for
// and hand them (forward_<dtype>[_labels].cu, softmax.cu) their operands as DeviceTensors; and
// the backward that scales the saved gradient by grad_output, kernel and all.
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAMacros.h>
#include <c10/cuda/CUDAStream.h>

#include <array>
#include <atomic>

#include "focal.h"
#include "launch.cuh"

namespace focal::cuda {

int multiprocessor_count(c10::DeviceIndex device) {
  static std::array<std::atomic<int>, C10_COMPILE_TIME_MAX_GPUS> counts{};  // 0: not asked yet
  TORCH_INTERNAL_ASSERT(device >= 0 && device < C10_COMPILE_TIME_MAX_GPUS,
                        "focal_cuda: CUDA device index ", static_cast<int>(device));
  int count = counts[device].load(std::memory_order_relaxed);
  if (count == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
    counts[device].store(count, std::memory_order_relaxed);  // threads racing here store the same
  }
  return count;
}

namespace {

// out = saved * grad_output [/ divisor]; grad_output is one value in math_t<s_t> when
// kScalarGrad; divisor (the mean's count) is null for none/sum, and a zero count gives zero.
// out may be saved itself (no __restrict__ on them): each element is read, then written, by
// one thread.
template <typename s_t, typename g_t, bool kScalarGrad, int kPack>
__global__ void __launch_bounds__(kThreads, kMaxBlocksPerSM)
    focal_backward_kernel(const s_t* saved, const g_t* __restrict__ grad_output,
                          const int64_t* __restrict__ divisor, int64_t n, s_t* out) {
  using S = math_t<s_t>;
  // With kScalarGrad the whole factor, else the one each element's grad_output is scaled by.
  const S scale =
      static_cast<S>(backward_factor(kScalarGrad ? static_cast<double>(grad_output[0]) : 1.0, divisor));
  // In place with a factor of 1 (a sum's loss.backward(), or a sum among losses), the saved
  // gradient already is the answer. Decided on the device: the host would have to wait for it.
  if (kScalarGrad && scale == S(1) && out == saved) {
    return;
  }
  auto element = [&](int64_t i, s_t saved_value) {
    const S factor = kScalarGrad ? scale : static_cast<S>(grad_output[i]) * scale;
    return static_cast<s_t>(static_cast<S>(saved_value) * factor);
  };
  const int64_t thread = grid_thread();
  const int64_t num_threads = grid_threads();
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

}  // namespace

bool reads_dtype_pair(at::ScalarType first, at::ScalarType second) {
  return dispatch_dtype_pair(first, second, [](auto, auto) {});
}

namespace {

DeviceTensor readable(const at::Tensor& tensor) {
  return tensor.defined() ? DeviceTensor(tensor.const_data_ptr(), tensor.scalar_type(), tensor.numel(), false)
                          : DeviceTensor();
}

DeviceTensor writable(const at::Tensor& tensor) {
  return tensor.defined() ? DeviceTensor(tensor.mutable_data_ptr(), tensor.scalar_type(), tensor.numel(), true)
                          : DeviceTensor();
}

// Calls launch(place) with the device of inputs current, its current stream, and the partials'
// scratch allocated as the kernel file asks. The scratch is freed once the launches are queued:
// the caching allocator hands it out again only to the stream's later work.
template <typename Launch>
void launch_on_device_of(const at::Tensor& inputs, Launch&& launch) {
  const c10::cuda::CUDAGuard device_guard(inputs.device());
  at::Tensor scratch;
  const auto partials = [&](int64_t blocks) {
    scratch = at::empty({blocks * kPartialBytes}, inputs.options().dtype(at::kByte));
    return scratch.mutable_data_ptr();
  };
  launch(LaunchPlace{device_guard.current_device().index(), c10::cuda::getCurrentCUDAStream(),
                     partials});
}

}  // namespace

void forward(const ForwardArgs& args) {
  using Entry = void (*)(const DeviceForwardArgs&, const LaunchPlace&);
  Entry entry = nullptr;
  switch (args.inputs.scalar_type()) {
    case at::kHalf: entry = args.labels ? forward_float16_labels : forward_float16; break;
    case at::kBFloat16: entry = args.labels ? forward_bfloat16_labels : forward_bfloat16; break;
    case at::kFloat: entry = args.labels ? forward_float32_labels : forward_float32; break;
    case at::kDouble: entry = args.labels ? forward_float64_labels : forward_float64; break;
    default:
      TORCH_INTERNAL_ASSERT(false, "focal_cuda: inputs of dtype ", args.inputs.scalar_type(),
                            " reached the CUDA forward");
  }
  const DeviceForwardArgs device_args = args.with_tensors(readable, writable);
  launch_on_device_of(args.inputs, [&](const LaunchPlace& place) { entry(device_args, place); });
}

void softmax_forward(const SoftmaxArgs& args) {
  const DeviceSoftmaxArgs device_args = args.with_tensors(readable, writable);
  launch_on_device_of(args.inputs, [&](const LaunchPlace& place) { launch_softmax_forward(device_args, place); });
}

void backward(const BackwardArgs& args) {
  const c10::cuda::CUDAGuard device_guard(args.out.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t n = args.out.numel();

  const bool dispatched = dispatch_dtype_pair(
      args.saved_grad.scalar_type(), args.grad_output.scalar_type(), [&](auto s_value, auto g_value) {
        using s_t = decltype(s_value);
        using g_t = decltype(g_value);
        constexpr int kPack = pack_size<s_t>();
        const s_t* saved = args.saved_grad.const_data_ptr<s_t>();
        const g_t* grad_output = args.grad_output.const_data_ptr<g_t>();
        const int64_t* divisor = args.divisor.defined() ? args.divisor.const_data_ptr<int64_t>() : nullptr;
        s_t* out = args.out.mutable_data_ptr<s_t>();
        const bool packed = is_aligned_for_pack<s_t>(saved, kPack) &&
                            is_aligned_for_pack<s_t>(out, kPack);
        const int grid = grid_size(packed ? n / kPack : n, device_guard.current_device().index());
        dispatch_flag(args.grad_output_is_scalar, [&](auto scalar_flag) {
          constexpr bool kScalarGrad = decltype(scalar_flag)::value;
          // The op layer hands a scalar grad_output over in the math type of saved_grad, so
          // (16-bit, 16-bit) pairs never launch with one: no instances for them.
          if constexpr (kScalarGrad && !std::is_same_v<g_t, math_t<s_t>>) {
            TORCH_INTERNAL_ASSERT(false, "focal_cuda: a scalar grad_output of dtype ",
                                  args.grad_output.scalar_type(), " reached the CUDA backward");
          } else if (packed) {
            FOCAL_LAUNCH(grid, kThreads, stream, focal_backward_kernel<s_t, g_t, kScalarGrad, kPack>)(
                saved, grad_output, divisor, n, out);
          } else {
            FOCAL_LAUNCH(grid, kThreads, stream, focal_backward_kernel<s_t, g_t, kScalarGrad, 1>)(
                saved, grad_output, divisor, n, out);
          }
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
  TORCH_INTERNAL_ASSERT(dispatched, "focal_cuda: dtype pair ", args.saved_grad.scalar_type(), ", ",
                        args.grad_output.scalar_type(), " reached the CUDA backward unconverted");
}

}  // namespace focal::cuda
