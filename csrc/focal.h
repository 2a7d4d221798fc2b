// What the device-agnostic op layer (focal_ops.cpp) hands to the CPU and CUDA kernels.
#pragma once

#include <ATen/core/Tensor.h>

#include <string>
#include <type_traits>

#include "focal_math.h"

namespace focal {

// All tensors contiguous, shapes and dtypes already checked, outputs allocated by the caller.
struct ForwardArgs {
  at::Tensor inputs;
  at::Tensor targets;  // same numel as inputs
  double alpha;        // < 0: no alpha weighting
  double gamma;
  Reduction reduction;
  at::Tensor loss;          // inputs' shape for Reduction::None, else 0-d
  at::Tensor grad_inputs;   // undefined when not requested; dloss/dinputs, unscaled
  at::Tensor grad_targets;  // undefined when not requested; dloss/dtargets, unscaled
};

// out = saved_grad * scale * grad_output, elementwise or with one grad_output value for all.
struct BackwardArgs {
  at::Tensor grad_output;      // one element when grad_output_is_scalar, else saved_grad's numel
  bool grad_output_is_scalar;
  at::Tensor saved_grad;
  double scale;                // 1/N for Reduction::Mean, else 1
  at::Tensor out;              // saved_grad's dtype and numel
};

// Turns the run-time choices that shape a kernel's inner loop into template arguments:
// fn(std::integral_constant<GammaMode, ...>, std::bool_constant<grad_inputs>,
//    std::bool_constant<grad_targets>).
template <typename Fn>
void dispatch_focal_variant(double gamma, bool grad_inputs, bool grad_targets, Fn&& fn) {
  auto with_gamma = [&](auto gamma_mode_constant) {
    if (grad_inputs && grad_targets) {
      fn(gamma_mode_constant, std::true_type{}, std::true_type{});
    } else if (grad_inputs) {
      fn(gamma_mode_constant, std::true_type{}, std::false_type{});
    } else if (grad_targets) {
      fn(gamma_mode_constant, std::false_type{}, std::true_type{});
    } else {
      fn(gamma_mode_constant, std::false_type{}, std::false_type{});
    }
  };
  if (gamma_mode(gamma) == GammaMode::Two) {
    with_gamma(std::integral_constant<GammaMode, GammaMode::Two>{});
  } else {
    with_gamma(std::integral_constant<GammaMode, GammaMode::General>{});
  }
}

namespace cpu {
void forward(const ForwardArgs& args);
void backward(const BackwardArgs& args);
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
}  // namespace cuda
#endif

}  // namespace focal
