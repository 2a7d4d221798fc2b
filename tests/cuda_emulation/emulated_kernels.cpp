// csrc/cuda's kernel files, unchanged, compiled by the host compiler for the emulated device as
// one translation unit. The include path may put a copy of csrc before csrc itself (the
// mutation check plants bugs in one).
#include "emulation.h"

#include "cuda/focal_cuda.cu"
#include "cuda/forward_bfloat16.cu"
#include "cuda/forward_bfloat16_labels.cu"
#include "cuda/forward_float16.cu"
#include "cuda/forward_float16_labels.cu"
#include "cuda/forward_float32.cu"
#include "cuda/forward_float64.cu"
#include "cuda/softmax.cu"

// A device math function applied value by value (DeviceMath, as the kernels call it), for a
// test of its accuracy on its own (harness.cpp). name and argument name the caller in errors.
template <typename T, typename Function>
at::Tensor elementwise(const at::Tensor& values, const char* name, const char* argument,
                       Function function) {
  const at::ScalarType dtype = c10::CppTypeToScalarType<T>::value;
  TORCH_CHECK(values.scalar_type() == dtype && values.is_contiguous(), name, ": ", argument,
              " must be a contiguous ", dtype, " tensor, got ", values.scalar_type(),
              values.is_contiguous() ? "" : " (not contiguous)");
  at::Tensor result = at::empty(values.sizes(), values.options());
  const T* in = values.const_data_ptr<T>();
  T* out = result.mutable_data_ptr<T>();
  for (int64_t i = 0; i < values.numel(); ++i) {
    out[i] = function(in[i]);
  }
  return result;
}

// The float32 reciprocal: the GPU's estimate and one Newton step.
at::Tensor device_reciprocal(const at::Tensor& values) {
  return elementwise<float>(values, "device_reciprocal", "values",
                            [](float v) { return focal::cuda::DeviceMath<float>::reciprocal(v); });
}

// The float64 pow: focal_math.h's pow_double.
at::Tensor device_pow(const at::Tensor& bases, double exponent) {
  return elementwise<double>(bases, "device_pow", "bases", [exponent](double base) {
    return focal::cuda::DeviceMath<double>::pow(base, exponent);
  });
}
