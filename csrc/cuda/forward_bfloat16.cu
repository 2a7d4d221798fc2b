// The forward kernels for bfloat16 inputs (forward.cuh), in a file of their own: a build compiles
// each inputs dtype's kernels in parallel.
#include "forward.cuh"

void focal::cuda::forward_bfloat16(const ForwardArgs& args) {
  forward_with_inputs<at::BFloat16>(args);
}
