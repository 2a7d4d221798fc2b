// What the device-agnostic op layer (focal_ops.cpp) hands to the CPU and CUDA kernels
// (focal_args.h's operands, holding at::Tensor), and their entry points.
#pragma once

#include <ATen/core/Tensor.h>

#include <string>

#include "focal_args.h"

namespace focal {

using ForwardArgs = ForwardArgsOf<at::Tensor>;
using SoftmaxArgs = SoftmaxArgsOf<at::Tensor>;

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
}  // namespace cuda
#endif

}  // namespace focal
