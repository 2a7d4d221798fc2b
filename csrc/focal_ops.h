// The operations the Python package wraps as torch.library custom ops (see focal_cuda/_ops.py).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>
#include <vector>

namespace focal {

// The per-element outputs a forward op computes besides the loss: a mask of these bits in its
// `outputs` argument. Outputs not requested are undefined tensors (None in Python; the custom
// ops, whose schemas return tensors, make them empty: focal_cuda/_ops.py).
constexpr int64_t kGradInputs = 1;      // d(elementwise loss)/d(inputs)
constexpr int64_t kGradTargets = 2;     // d(elementwise loss)/d(floating targets, or scores)
constexpr int64_t kUnweightedLoss = 4;  // the elementwise loss before the weight: d(loss)/d(weight)

// Sigmoid focal loss, or another form of its family (form: focal::LossForm's code), in one
// pass. targets: floating, of inputs' shape; or integer class labels of shape
// inputs.shape[:-1] (label C = classes means background, ignore_index ignores the row).
// weight: optional, broadcastable to inputs. scores: with integer labels only, optional,
// floating, of the labels' shape: the target of the labelled class of each row (the others 0;
// without scores, 1); then kGradTargets is d(loss)/d(scores), of the scores' shape.
// coefficients: the form's, in the order and ranges of its row of focal_math.h's
// kFormSignatures (ValueError, named as the public functions name them, for anything else;
// an alpha of range UnitOrOff is -1 for no weighting). label_smoothing in [0, 1), 0 for the
// forms whose row takes none. Returns
//   (loss, grad_inputs, grad_targets, unweighted_loss, count):
// loss has inputs' shape for reduction None (0), else is 0-d (Mean 1, Sum 2); its dtype is the
// promoted dtype of inputs and floating targets (inputs' dtype with labels), or float32 where
// that is 16-bit and float32_loss. The gradients are unscaled, laid out as inputs where floating
// targets share their dense layout (else contiguous), in the dtype of what they differentiate; unweighted_loss has the loss dtype; float32 instead of float16 for all three,
// so that a loss scale applied in backward cannot meet values float16 already flushed. count
// is a 0-d int64 tensor on the inputs' device: the elements not ignored, the mean's divisor.
// No argument has a default: the public functions' (focal_cuda/loss.py) are the only ones.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> sigmoid_focal_loss_forward(
    const at::Tensor& inputs, const at::Tensor& targets, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& scores, int64_t form, const std::vector<double>& coefficients,
    int64_t reduction, int64_t ignore_index, double label_smoothing, bool float32_loss,
    int64_t outputs);

// sigmoid_focal_loss_forward's checks that read no data: dtypes, shapes, devices, the form's
// scalars (ValueError). The forward runs them first; the ops' fake kernel runs them on fake and
// meta tensors, whose shapes may be symbolic (they are read as SymInts).
void check_forward_arguments(const at::Tensor& inputs, const at::Tensor& targets,
                             const std::optional<at::Tensor>& weight,
                             const std::optional<at::Tensor>& scores, int64_t form,
                             const std::vector<double>& coefficients, int64_t reduction,
                             int64_t ignore_index, double label_smoothing, bool float32_loss,
                             int64_t outputs);

// The backward ops' checks that read no data: dtypes, devices, shapes, the reduction code. The
// ops run them first; their fake kernels run them on fake and meta tensors (sizes as SymInts).
void check_backward_arguments(const at::Tensor& grad_output, const at::Tensor& saved_grad,
                              const at::Tensor& count, int64_t reduction);

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
// coefficients (alpha, gamma): alpha >= 0 or -1 for None (1), gamma >= 0; label_smoothing in
// [0, 1). Returns (loss, grad_inputs, grad_targets, unweighted_loss, divisor): loss per
// position (reduction None) or 0-d, in the inputs' dtype (float32 for 16-bit inputs when
// float32_loss); d(elementwise loss)/d(inputs, probabilities), unscaled, in their saved dtypes
// (sigmoid_focal_loss_forward's); unweighted_loss, of inputs' shape in the math dtype, each
// class's loss before its weight; divisor, 0-d float64: the mean's divisor (the weight of the
// labels not ignored, or the number of positions). outputs: as sigmoid_focal_loss_forward's.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> softmax_focal_loss_forward(
    const at::Tensor& inputs, const at::Tensor& targets, const std::optional<at::Tensor>& weight,
    const std::vector<double>& coefficients, int64_t reduction, int64_t ignore_index,
    double label_smoothing, bool float32_loss, int64_t outputs);

// The CPU forwards' label check (the op layer's), on its own for the paths that compute without
// them (the reference formula under torch.func and forward-mode AD): every label (any integer
// dtype) names one of classes (with_background: or classes itself) or is ignore_index, else
// ValueError. CPU labels only.
void check_cpu_labels(const at::Tensor& labels, int64_t classes, int64_t ignore_index,
                      bool with_background);

// The softmax focal loss's coefficients and label smoothing (ValueError); part of
// check_softmax_arguments, which the modules run when they are built.
void check_softmax_options(const std::vector<double>& coefficients, double label_smoothing);

// softmax_focal_loss_forward's checks that read no data, for its fake kernel too.
void check_softmax_arguments(const at::Tensor& inputs, const at::Tensor& targets,
                             const std::optional<at::Tensor>& weight,
                             const std::vector<double>& coefficients, int64_t reduction,
                             int64_t ignore_index, double label_smoothing, bool float32_loss,
                             int64_t outputs);

}  // namespace focal
