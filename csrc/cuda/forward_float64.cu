// The forward kernels of float64 inputs (forward.cuh), with floating targets and with class
// labels: a file per inputs dtype, which a build compiles in parallel with the others.
#include "forward.cuh"

void focal::cuda::forward_float64(const ForwardArgs& args) {
  forward_with_inputs<double, false>(args);
}

void focal::cuda::forward_float64_labels(const ForwardArgs& args) {
  forward_with_inputs<double, true>(args);
}
