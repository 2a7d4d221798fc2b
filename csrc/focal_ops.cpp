// Device-agnostic layer of the ops: argument checks, dtype/layout preparation, output
// allocation, then the CPU or CUDA kernels.
#include "focal_ops.h"

#include <ATen/ATen.h>

#include <limits>

#include "focal.h"

namespace focal {
namespace {

constexpr const char* kRebuildWithCuda =
    "focal_cuda was built without its CUDA kernels (see focal_cuda.backends()). Rebuild it "
    "against a CUDA build of torch with the CUDA toolkit present: "
    "FORCE_CUDA=1 pip install --no-build-isolation --force-reinstall --no-deps .";

void check_floating(const at::Tensor& tensor, const char* name) {
  TORCH_CHECK(at::isFloatingType(tensor.scalar_type()), name,
              " must be a floating-point tensor (float16, bfloat16, float32 or float64), got ",
              tensor.scalar_type());
}

void check_device(const at::Tensor& tensor) {
  TORCH_CHECK(tensor.is_cpu() || tensor.is_cuda(), "focal_cuda runs on CPU and CUDA tensors, got ",
              tensor.device());
#ifndef FOCAL_WITH_CUDA
  TORCH_CHECK(!tensor.is_cuda(), kRebuildWithCuda);
#endif
}

Reduction checked_reduction(int64_t reduction) {
  TORCH_CHECK(reduction >= 0 && reduction <= 2,
              "reduction must be 0 (none), 1 (mean) or 2 (sum), got ", reduction);
  return static_cast<Reduction>(reduction);
}

// CUDA kernels read a fixed set of dtype pairs directly; others are converted to the promoted
// dtype first (rare: mixed precision other than 16-bit inputs with float32 targets).
std::pair<at::Tensor, at::Tensor> readable_pair(const at::Tensor& first, const at::Tensor& second) {
#ifdef FOCAL_WITH_CUDA
  if (first.is_cuda() && !cuda::reads_dtype_pair(first.scalar_type(), second.scalar_type())) {
    const auto promoted = at::result_type(first, second);
    return {first.to(promoted), second.to(promoted)};
  }
#endif
  return {first, second};
}

void run_forward(const ForwardArgs& args) {
#ifdef FOCAL_WITH_CUDA
  if (args.inputs.is_cuda()) {
    cuda::forward(args);
    return;
  }
#endif
  cpu::forward(args);
}

void run_backward(const BackwardArgs& args) {
#ifdef FOCAL_WITH_CUDA
  if (args.out.is_cuda()) {
    cuda::backward(args);
    return;
  }
#endif
  cpu::backward(args);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> sigmoid_focal_loss_forward(
    const at::Tensor& inputs, const at::Tensor& targets, double alpha, double gamma,
    int64_t reduction, bool compute_grad_inputs, bool compute_grad_targets) {
  check_floating(inputs, "inputs");
  check_floating(targets, "targets");
  TORCH_CHECK(inputs.sizes() == targets.sizes(),
              "targets must have the same shape as inputs, got ", inputs.sizes(), " and ",
              targets.sizes());
  TORCH_CHECK(inputs.device() == targets.device(),
              "targets must be on the same device as inputs, got ", inputs.device(), " and ",
              targets.device());
  check_device(inputs);
  TORCH_CHECK(alpha == -1.0 || (alpha >= 0.0 && alpha <= 1.0),
              "alpha must be in [0, 1], or -1 to disable the weighting, got ", alpha);
  TORCH_CHECK(gamma >= 0.0 && gamma < std::numeric_limits<double>::infinity(),
              "gamma must be a finite number >= 0, got ", gamma);
  const Reduction mode = checked_reduction(reduction);

  const auto loss_dtype = at::result_type(inputs, targets);
  const auto [x, t] = readable_pair(inputs.contiguous(), targets.contiguous());
  ForwardArgs args;
  args.inputs = x;
  args.targets = t;
  args.alpha = alpha;
  args.gamma = gamma;
  args.reduction = mode;
  args.loss = mode == Reduction::None ? at::empty(x.sizes(), x.options().dtype(loss_dtype))
                                      : at::empty({}, x.options().dtype(loss_dtype));
  if (compute_grad_inputs) {
    args.grad_inputs = at::empty(x.sizes(), x.options());
  }
  if (compute_grad_targets) {
    args.grad_targets = at::empty(t.sizes(), t.options());
  }

  if (x.numel() == 0) {
    if (mode != Reduction::None) {
      // torch's mean of nothing is NaN, its sum 0.
      args.loss.fill_(mode == Reduction::Mean ? std::numeric_limits<double>::quiet_NaN() : 0.0);
    }
  } else {
    run_forward(args);
  }

  // A gradient computed in a converted dtype goes back to the dtype of what it differentiates.
  auto finish_grad = [](const at::Tensor& grad, const at::Tensor& like) {
    return grad.defined() ? grad.to(like.scalar_type()) : at::empty({0}, like.options());
  };
  return {args.loss, finish_grad(args.grad_inputs, inputs),
          finish_grad(args.grad_targets, targets)};
}

at::Tensor sigmoid_focal_loss_backward(const at::Tensor& grad_output, const at::Tensor& saved_grad,
                                       int64_t reduction) {
  check_floating(grad_output, "grad_output");
  check_floating(saved_grad, "saved_grad");
  TORCH_CHECK(grad_output.device() == saved_grad.device(),
              "grad_output must be on the same device as saved_grad, got ", grad_output.device(),
              " and ", saved_grad.device());
  check_device(saved_grad);
  TORCH_CHECK(saved_grad.is_contiguous(), "saved_grad must be contiguous (as the forward op returns it)");
  const Reduction mode = checked_reduction(reduction);
  const int64_t n = saved_grad.numel();

  BackwardArgs args;
  args.scale = mode == Reduction::Mean ? 1.0 / static_cast<double>(n) : 1.0;
  if (mode == Reduction::None) {
    TORCH_CHECK(grad_output.sizes() == saved_grad.sizes(),
                "grad_output must have the shape of the loss, got ", grad_output.sizes(),
                " and ", saved_grad.sizes());
    // An expanded scalar (e.g. from loss.sum().backward()) is read as the one value it is.
    bool expanded_scalar = n > 0;
    for (const auto stride : grad_output.strides()) {
      expanded_scalar = expanded_scalar && stride == 0;
    }
    args.grad_output_is_scalar = expanded_scalar || n == 1;
  } else {
    TORCH_CHECK(grad_output.numel() == 1,
                "grad_output of a reduced loss must have one element, got shape ",
                grad_output.sizes());
    args.grad_output_is_scalar = true;
  }
  if (args.grad_output_is_scalar) {
    // One value, taken in the math type of saved_grad (float64 or float32): read as it is.
    const auto math_dtype = saved_grad.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    args.saved_grad = saved_grad;
    args.grad_output =
        grad_output.as_strided({}, {}, grad_output.storage_offset()).to(math_dtype);
  } else {
    std::tie(args.saved_grad, args.grad_output) =
        readable_pair(saved_grad, grad_output.contiguous());
  }
  const at::Tensor& saved = args.saved_grad;
  args.out = at::empty(saved.sizes(), saved.options());
  if (n > 0) {
    run_backward(args);
  }
  return args.out.to(saved_grad.scalar_type());
}

}  // namespace focal
