// csrc/focal_ops.cpp, the real op layer, compiled so that the harness's tensors (CPU tensors,
// the emulated device's memory) take its CUDA path: every tensor answers is_cuda() with true and
// is_cpu() with false. Labels are then checked by the kernels' device-side assert, as on a GPU.
#include <ATen/ATen.h>

#include <limits>

#include "focal.h"
#include "focal_ops.h"

#define is_cuda defined
#define is_cpu is_meta
#include "focal_ops.cpp"
