// csrc/cuda/focal_cuda.cu, unchanged, compiled by the host compiler for the emulated device.
// FOCAL_EMULATED_KERNEL_SOURCE names another copy (the mutation check plants bugs in one).
#include "emulation.h"

#ifdef FOCAL_EMULATED_KERNEL_SOURCE
#include FOCAL_EMULATED_KERNEL_SOURCE
#else
#include "cuda/focal_cuda.cu"
#endif
