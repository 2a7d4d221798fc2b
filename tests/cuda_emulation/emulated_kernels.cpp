// csrc/cuda/focal_cuda.cu, unchanged, compiled by the host compiler for the emulated device.
// FOCAL_EMULATED_KERNEL_SOURCE names another copy (the mutation check plants bugs in one).
#include "emulation.h"

#ifdef FOCAL_EMULATED_KERNEL_SOURCE
#include FOCAL_EMULATED_KERNEL_SOURCE
#else
#include "cuda/focal_cuda.cu"
#endif

// The kernels' float32 reciprocal (DeviceMath: the GPU's estimate and one Newton step), value by
// value, for a test of its accuracy on its own (harness.cpp).
at::Tensor device_reciprocal(const at::Tensor& values) {
  TORCH_CHECK(values.scalar_type() == at::kFloat && values.is_contiguous(),
              "device_reciprocal: values must be a contiguous float32 tensor, got ",
              values.scalar_type(), values.is_contiguous() ? "" : " (not contiguous)");
  at::Tensor result = at::empty(values.sizes(), values.options());
  const float* in = values.const_data_ptr<float>();
  float* out = result.mutable_data_ptr<float>();
  for (int64_t i = 0; i < values.numel(); ++i) {
    out[i] = focal::cuda::DeviceMath<float>::reciprocal(in[i]);
  }
  return result;
}

// The kernels' float64 pow (DeviceMath: focal_math.h's pow_double), value by value, for a test
// of its accuracy on its own (harness.cpp).
at::Tensor device_pow(const at::Tensor& bases, double exponent) {
  TORCH_CHECK(bases.scalar_type() == at::kDouble && bases.is_contiguous(),
              "device_pow: bases must be a contiguous float64 tensor, got ",
              bases.scalar_type(), bases.is_contiguous() ? "" : " (not contiguous)");
  at::Tensor result = at::empty(bases.sizes(), bases.options());
  const double* in = bases.const_data_ptr<double>();
  double* out = result.mutable_data_ptr<double>();
  for (int64_t i = 0; i < bases.numel(); ++i) {
    out[i] = focal::cuda::DeviceMath<double>::pow(in[i], exponent);
  }
  return result;
}
