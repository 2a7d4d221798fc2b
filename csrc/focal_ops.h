// The operations the Python package wraps as torch.library custom ops (see focal_cuda/_ops.py).
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace focal {

// Sigmoid focal loss in one pass. Returns (loss, grad_inputs, grad_targets): loss has inputs'
// shape for reduction None (0), else is 0-d (Mean 1, Sum 2), in the promoted dtype of inputs
// and targets; the gradients are d(elementwise loss)/d(inputs, targets), unscaled, contiguous,
// in the dtype of inputs and targets, or empty 1-d tensors when not requested.
std::tuple<at::Tensor, at::Tensor, at::Tensor> sigmoid_focal_loss_forward(
    const at::Tensor& inputs, const at::Tensor& targets, double alpha, double gamma,
    int64_t reduction, bool compute_grad_inputs, bool compute_grad_targets);

// saved_grad * grad_output (elementwise for reduction None, else one value), times 1/N for Mean.
at::Tensor sigmoid_focal_loss_backward(const at::Tensor& grad_output, const at::Tensor& saved_grad,
                                       int64_t reduction);

}  // namespace focal
