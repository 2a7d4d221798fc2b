// The forward kernels of bfloat16 inputs with class labels (forward.cuh). The 16-bit dtypes'
// kernels take longest to compile: one file per kind of targets, which a build compiles in
// parallel with the others.
#include "forward.cuh"

void focal::cuda::forward_bfloat16_labels(const DeviceForwardArgs& args, const LaunchPlace& place) {
  forward_with_inputs<c10::BFloat16, true>(args, place);
}
