// The forward kernels for float32 inputs (forward.cuh), in a file of their own: a build compiles
// each inputs dtype's kernels in parallel.
#include "forward.cuh"

void focal::cuda::forward_float32(const ForwardArgs& args) {
  forward_with_inputs<float>(args);
}
