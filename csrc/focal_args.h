// What the op layer (focal_ops.cpp) hands to the CPU and CUDA kernels, over the type that holds
// a tensor: at::Tensor in the op layer and the CPU kernels (focal.h), cuda::DeviceTensor in the
// CUDA kernel files (cuda/launch.cuh), which compile without ATen's headers: those took ~20 of a
// kernel file's ~35 s (bench/NOTES.md).
#pragma once

#include <c10/util/Exception.h>

#include <cstdint>
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

// The most classes the CUDA label kernels take: they count classes in 32 bits, and a class
// plus a grid stride's classes must fit.
inline constexpr int64_t kMaxCudaLabelClasses = int64_t{1} << 30;
// The most classes the CPU softmax kernel takes below float64: it compares class numbers in
// its float32 lanes, exact up to 2^24 (float64's lanes hold every class count that fits memory).
inline constexpr int64_t kMaxCpuFloatSoftmaxClasses = int64_t{1} << 24;

// All tensors contiguous, shapes and dtypes already checked, outputs allocated by the caller.
// inputs is seen as rows x classes (classes = its last dimension, 1 for a 0-d tensor).
template <typename Tensor>
struct ForwardArgsOf {
  Tensor inputs;
  Tensor targets;  // floating, inputs' numel; or int64 class labels, one per row
  bool labels;     // targets holds class labels: class c of row r is positive iff label == c
  Tensor scores;   // labels only, optional: one target per row for its labelled class (the
                   // others get 0), in the math dtype; undefined: 1
  int64_t classes;
  int64_t ignore_index;  // label of rows that contribute nothing (labels only)
  Tensor weight;         // in the math dtype of the loss (float64 for a float64 loss, else
                         // float32), indexed per weight_kind; or undefined
  WeightKind weight_kind;
  LossForm form;
  FormScalars coefficients;  // the form's, by role (focal_math.h)
  double label_smoothing;
  Reduction reduction;
  Tensor loss;             // inputs' shape for Reduction::None, else 0-d
  Tensor grad_inputs;      // undefined when not requested; dloss/dinputs, unscaled
  Tensor grad_targets;     // undefined when not requested; dloss/dtargets, unscaled
  Tensor grad_scores;      // undefined when not requested; dloss/dscores per row, unscaled,
                           // in the math dtype, zero-filled by the caller (the kernels
                           // write the rows whose label is a class)
  Tensor unweighted_loss;  // undefined when not requested; the loss before the weight
  Tensor count;            // 0-d int64: the elements not ignored, the divisor of the mean

  // The same operands over another tensor type: read(tensor) for each tensor the kernels read,
  // write(tensor) for each they write.
  template <typename Read, typename Write>
  auto with_tensors(Read read, Write write) const {
    ForwardArgsOf<decltype(read(inputs))> args;
    args.inputs = read(inputs);
    args.targets = read(targets);
    args.labels = labels;
    args.scores = read(scores);
    args.classes = classes;
    args.ignore_index = ignore_index;
    args.weight = read(weight);
    args.weight_kind = weight_kind;
    args.form = form;
    args.coefficients = coefficients;
    args.label_smoothing = label_smoothing;
    args.reduction = reduction;
    args.loss = write(loss);
    args.grad_inputs = write(grad_inputs);
    args.grad_targets = write(grad_targets);
    args.grad_scores = write(grad_scores);
    args.unweighted_loss = write(unweighted_loss);
    args.count = write(count);
    return args;
  }
};

// The softmax focal loss's operands: inputs seen as (N, C, S), S the positions of a sample (the
// product of the dimensions after the class dimension, 1 for (N, C)), element (n, c, s) at
// n * batch_stride + c * class_stride + s * position_stride, so that NCHW and channels-last maps
// are read where they lie. Per-position tensors are contiguous in (n, s) order; per-element
// outputs have the inputs' strides. Shapes, dtypes and labels already checked.
template <typename Tensor>
struct SoftmaxArgsOf {
  Tensor inputs;      // floating
  int64_t batch;      // N
  int64_t classes;    // C >= 1
  int64_t positions;  // S
  int64_t batch_stride;
  int64_t class_stride;
  int64_t position_stride;
  Tensor labels;         // int64 per position, or undefined (probabilities are given)
  Tensor probabilities;  // the math dtype and the inputs' strides, or undefined (labels)
  int64_t ignore_index;
  Tensor weight;  // per class, in the math dtype (float64 for float64 inputs, else float32),
                  // or undefined
  double alpha;   // < 0: none (1)
  double gamma;
  double label_smoothing;
  Reduction reduction;
  Tensor loss;             // math dtype: per position for Reduction::None, else 0-d
  Tensor grad_inputs;      // saved dtype of inputs; undefined when not requested
  Tensor grad_targets;     // math dtype, d(loss)/d(probabilities); undefined when not requested
  Tensor unweighted_loss;  // math dtype, the per-class loss before the weight; or undefined
  Tensor divisor;          // 0-d float64: the mean's divisor (the weight of the labels not
                           // ignored, or N * S for probabilities)

  // The same operands over another tensor type: read(tensor) for each tensor the kernels read,
  // write(tensor) for each they write.
  template <typename Read, typename Write>
  auto with_tensors(Read read, Write write) const {
    SoftmaxArgsOf<decltype(read(inputs))> args;
    args.inputs = read(inputs);
    args.batch = batch;
    args.classes = classes;
    args.positions = positions;
    args.batch_stride = batch_stride;
    args.class_stride = class_stride;
    args.position_stride = position_stride;
    args.labels = read(labels);
    args.probabilities = read(probabilities);
    args.ignore_index = ignore_index;
    args.weight = read(weight);
    args.alpha = alpha;
    args.gamma = gamma;
    args.label_smoothing = label_smoothing;
    args.reduction = reduction;
    args.loss = write(loss);
    args.grad_inputs = write(grad_inputs);
    args.grad_targets = write(grad_targets);
    args.unweighted_loss = write(unweighted_loss);
    args.divisor = write(divisor);
    return args;
  }
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

}  // namespace focal
