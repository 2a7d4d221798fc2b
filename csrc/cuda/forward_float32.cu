// The forward kernels of float32 inputs (forward.cuh), with floating targets and with class
// labels: a file per inputs dtype, which a build compiles in parallel with the others.
#include "forward.cuh"

void focal::cuda::forward_float32(const DeviceForwardArgs& args, const LaunchPlace& place) {
  forward_with_inputs<float, false>(args, place);
}

void focal::cuda::forward_float32_labels(const DeviceForwardArgs& args, const LaunchPlace& place) {
  forward_with_inputs<float, true>(args, place);
}
