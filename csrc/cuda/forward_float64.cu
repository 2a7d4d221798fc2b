// The forward kernels of float64 inputs (forward.cuh), with floating targets and with class
// labels: a file per inputs dtype, which a build compiles in parallel with the others.
#include "forward.cuh"

void focal::cuda::forward_float64(const DeviceForwardArgs& args, const LaunchPlace& place) {
  forward_with_inputs<double, false>(args, place);
}

void focal::cuda::forward_float64_labels(const DeviceForwardArgs& args, const LaunchPlace& place) {
  forward_with_inputs<double, true>(args, place);
}
