// The operations the Python package wraps as torch.library custom ops (see focal_cuda/_ops.py).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace focal {

// Sigmoid focal loss, or another form of its family (form: focal::LossForm's code), in one
// pass. targets: floating, of inputs' shape; or integer class labels
// of shape inputs.shape[:-1] (label C = classes means background, ignore_index ignores the
// row). weight: optional, broadcastable to inputs. Returns
//   (loss, grad_inputs, grad_targets, unweighted_loss, count):
// loss has inputs' shape for reduction None (0), else is 0-d (Mean 1, Sum 2); its dtype is the
// promoted dtype of inputs and floating targets (inputs' dtype with labels), or float32 when
// float32_loss. The gradients are d(elementwise loss)/d(inputs, targets), unscaled, contiguous,
// in the dtype of what they differentiate; unweighted_loss (d loss/d weight, elementwise) has
// the loss dtype; float32 instead of float16 for all three, so that a loss scale applied in
// backward cannot meet values float16 already flushed. Outputs not requested are empty 1-d
// tensors. count is a 0-d int64 tensor on the
// inputs' device: the elements not ignored, the mean's divisor.
// Per form (ValueError for anything else): focal loss: alpha in [0, 1] or -1, gamma >= 0;
// FL*: alpha likewise, gamma > 0 its gamma, beta its beta; QFL: gamma its beta >= 0, alpha -1;
// VFL: alpha >= 0 the negatives' weight, gamma >= 0. beta is 0 but for FL*, label_smoothing 0
// for QFL and VFL (their targets are already soft scores).
// scores: with integer labels only, optional, floating, of the labels' shape: the target of the
// labelled class of each row (the others 0; without scores, 1). Then grad_targets is
// d(loss)/d(scores), of the scores' shape, and the loss has the inputs' dtype as with labels.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> sigmoid_focal_loss_forward(
    const at::Tensor& inputs, const at::Tensor& targets, const std::optional<at::Tensor>& weight,
    double alpha, double gamma, int64_t reduction, int64_t ignore_index, double label_smoothing,
    bool float32_loss, bool compute_grad_inputs, bool compute_grad_targets,
    bool compute_unweighted_loss, int64_t form = 0, double beta = 0.0,
    const std::optional<at::Tensor>& scores = std::nullopt);

// The form's scalar arguments as sigmoid_focal_loss_forward takes them (above; ValueError, the
// argument named as the public functions name it). Part of check_forward_arguments; the
// modules run it when they are built.
void check_form_arguments(int64_t form, double alpha, double gamma, double beta,
                          double label_smoothing);

// sigmoid_focal_loss_forward's checks that read no data: dtypes, shapes, devices, the form's
// scalars (ValueError). The forward runs them first; the ops' fake kernel runs them on fake and
// meta tensors, whose shapes may be symbolic (they are read as SymInts).
void check_forward_arguments(const at::Tensor& inputs, const at::Tensor& targets,
                             const std::optional<at::Tensor>& weight, double alpha, double gamma,
                             int64_t reduction, int64_t ignore_index, double label_smoothing,
                             bool float32_loss, bool compute_grad_inputs, bool compute_grad_targets,
                             bool compute_unweighted_loss, int64_t form = 0, double beta = 0.0,
                             const std::optional<at::Tensor>& scores = std::nullopt);

// saved_grad * grad_output (elementwise for reduction None, else one value), divided by count
// for Mean (zero where count is 0): the backward of both forwards (count: the sigmoid's int64
// count, or the softmax's float64 divisor).
at::Tensor sigmoid_focal_loss_backward(const at::Tensor& grad_output, const at::Tensor& saved_grad,
                                       const at::Tensor& count, int64_t reduction);

// The same, written into saved_grad: for a backward that is the saved gradient's last use.
void sigmoid_focal_loss_backward_(const at::Tensor& grad_output, const at::Tensor& saved_grad,
                                  const at::Tensor& count, int64_t reduction);

// Softmax focal loss in one pass: inputs (N, C, d1, ...) or (C) logits, the classes along
// dimension 1 (0 for (C)); targets class indices of the other dimensions' shape (ignore_index
// ignores a position) or class probabilities of inputs' shape; weight optional, one per class;
// alpha -1 for None (1). Returns (loss, grad_inputs, grad_targets, unweighted_loss, divisor):
// loss per position (reduction None) or 0-d, in the inputs' dtype (float32 for 16-bit inputs
// when float32_loss); d(elementwise loss)/d(inputs, probabilities), unscaled, in their saved
// dtypes (sigmoid_focal_loss_forward's); unweighted_loss, of inputs' shape in the math dtype,
// each class's loss before its weight; divisor, 0-d float64: the mean's divisor (the weight of
// the labels not ignored, or the number of positions). Outputs not requested are empty 1-d.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> softmax_focal_loss_forward(
    const at::Tensor& inputs, const at::Tensor& targets, const std::optional<at::Tensor>& weight,
    double alpha, double gamma, int64_t reduction, int64_t ignore_index, double label_smoothing,
    bool float32_loss, bool compute_grad_inputs, bool compute_grad_targets,
    bool compute_unweighted_loss);

// The softmax focal loss's scalar options (ValueError; alpha -1 for None); part of
// check_softmax_arguments, which the modules run when they are built.
void check_softmax_options(double alpha, double gamma, double label_smoothing);

// softmax_focal_loss_forward's checks that read no data, for its fake kernel too.
void check_softmax_arguments(const at::Tensor& inputs, const at::Tensor& targets,
                             const std::optional<at::Tensor>& weight, double alpha, double gamma,
                             int64_t reduction, int64_t ignore_index, double label_smoothing,
                             bool float32_loss, bool compute_grad_inputs, bool compute_grad_targets,
                             bool compute_unweighted_loss);

}  // namespace focal
