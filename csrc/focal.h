// What the device-agnostic op layer (focal_ops.cpp) hands to the CPU and CUDA kernels.
#pragma once

#include <ATen/core/Tensor.h>

#include <string>
#include <type_traits>

#include "focal_math.h"

namespace focal {

// How the weight tensor is indexed: the kernels read it without materialising its broadcast.
enum class WeightKind : int {
  None,     // no weight (all ones)
  Element,  // one weight per element of inputs
  Row,      // one weight per row (all leading dimensions), shared by the classes
  Class,    // one weight per class (last dimension), shared by the rows
};

// All tensors contiguous, shapes and dtypes already checked, outputs allocated by the caller.
// inputs is seen as rows x classes (classes = its last dimension, 1 for a 0-d tensor).
struct ForwardArgs {
  at::Tensor inputs;
  at::Tensor targets;  // floating, inputs' numel; or int64 class labels, one per row
  bool labels;         // targets holds class labels: class c of row r is positive iff label == c
  at::Tensor scores;   // labels only, optional: one target per row for its labelled class (the
                       // others get 0), in the math dtype; undefined: 1
  int64_t classes;
  int64_t ignore_index;  // label of rows that contribute nothing (labels only)
  at::Tensor weight;     // in the math dtype of the loss (float64 for a float64 loss, else
                         // float32), indexed per weight_kind; or undefined
  WeightKind weight_kind;
  LossForm form;
  double alpha;  // < 0: no alpha weighting (focal loss, FL*); VFL: the negatives' weight
  double gamma;  // the modulating exponent (FL, QFL's beta, VFL), or FL*'s gamma
  double beta;   // FL*'s beta
  double label_smoothing;
  Reduction reduction;
  at::Tensor loss;             // inputs' shape for Reduction::None, else 0-d
  at::Tensor grad_inputs;      // undefined when not requested; dloss/dinputs, unscaled
  at::Tensor grad_targets;     // undefined when not requested; dloss/dtargets, unscaled
  at::Tensor grad_scores;      // undefined when not requested; dloss/dscores per row, unscaled,
                               // in the math dtype, zero-filled by the caller (the kernels
                               // write the rows whose label is a class)
  at::Tensor unweighted_loss;  // undefined when not requested; the loss before the weight
  at::Tensor count;            // 0-d int64: the elements not ignored, the divisor of the mean
};

// out = saved_grad * grad_output, elementwise or with one grad_output value for all; divided by
// *divisor (a 0-d int64 tensor on the device: the mean's count) when divisor is defined, with
// a zero count giving zero.
struct BackwardArgs {
  at::Tensor grad_output;  // one element when grad_output_is_scalar, else saved_grad's numel
  bool grad_output_is_scalar;
  at::Tensor saved_grad;
  at::Tensor divisor;
  at::Tensor out;  // saved_grad's dtype and numel
};

// The softmax focal loss's operands: inputs seen as (N, C, S), S the positions of a sample (the
// product of the dimensions after the class dimension, 1 for (N, C)), element (n, c, s) at
// n * batch_stride + c * class_stride + s * position_stride, so that NCHW and channels-last maps
// are read where they lie. Per-position tensors are contiguous in (n, s) order; per-element
// outputs have the inputs' strides. Shapes, dtypes and labels already checked.
struct SoftmaxArgs {
  at::Tensor inputs;  // floating
  int64_t batch;      // N
  int64_t classes;    // C >= 1
  int64_t positions;  // S
  int64_t batch_stride;
  int64_t class_stride;
  int64_t position_stride;
  at::Tensor labels;         // int64 per position, or undefined (probabilities are given)
  at::Tensor probabilities;  // the math dtype and the inputs' strides, or undefined (labels)
  int64_t ignore_index;
  at::Tensor weight;  // per class, in the math dtype (float64 for float64 inputs, else float32),
                      // or undefined
  double alpha;       // < 0: none (1)
  double gamma;
  double label_smoothing;
  Reduction reduction;
  at::Tensor loss;             // math dtype: per position for Reduction::None, else 0-d
  at::Tensor grad_inputs;      // saved dtype of inputs; undefined when not requested
  at::Tensor grad_targets;     // math dtype, d(loss)/d(probabilities); undefined when not requested
  at::Tensor unweighted_loss;  // math dtype, the per-class loss before the weight; or undefined
  at::Tensor divisor;          // 0-d float64: the mean's divisor (the weight of the labels not
                               // ignored, or N * S for probabilities)
};

// Turns a GammaMode into the template argument of a kernel: fn(std::integral_constant<GammaMode,
// mode>), instantiated for the modes the caller has kernels for (kModes) and no others.
template <GammaMode... kModes, typename Fn>
void dispatch_gamma_mode(GammaMode mode, Fn&& fn) {
  const bool dispatched =
      ((mode == kModes && (fn(std::integral_constant<GammaMode, kModes>{}), true)) || ...);
  TORCH_INTERNAL_ASSERT(dispatched, "no kernel for gamma mode ", static_cast<int>(mode));
}

// fn(std::true_type{}) or fn(std::false_type{}): a run-time flag as a template argument.
template <typename Fn>
void dispatch_flag(bool flag, Fn&& fn) {
  if (flag) {
    fn(std::true_type{});
  } else {
    fn(std::false_type{});
  }
}

namespace cpu {
void forward(const ForwardArgs& args);
void backward(const BackwardArgs& args);
void softmax_forward(const SoftmaxArgs& args);
// The instruction set whose kernels run on this machine ("AVX512", "AVX2" or "DEFAULT").
std::string active_isa();
}  // namespace cpu

#ifdef FOCAL_WITH_CUDA
namespace cuda {
// Whether the CUDA kernels read this (saved or inputs, targets or grad_output) dtype pair as it
// is; other pairs are first converted to their promoted dtype.
bool reads_dtype_pair(at::ScalarType first, at::ScalarType second);
void forward(const ForwardArgs& args);
void backward(const BackwardArgs& args);
void softmax_forward(const SoftmaxArgs& args);
// forward for inputs of each dtype, with floating targets and with labels, defined in
// forward_<dtype>.cu (the 16-bit dtypes' labels in forward_<dtype>_labels.cu), so that a build
// compiles them in parallel.
void forward_float16(const ForwardArgs& args);
void forward_float16_labels(const ForwardArgs& args);
void forward_bfloat16(const ForwardArgs& args);
void forward_bfloat16_labels(const ForwardArgs& args);
void forward_float32(const ForwardArgs& args);
void forward_float32_labels(const ForwardArgs& args);
void forward_float64(const ForwardArgs& args);
void forward_float64_labels(const ForwardArgs& args);
}  // namespace cuda
#endif

}  // namespace focal
