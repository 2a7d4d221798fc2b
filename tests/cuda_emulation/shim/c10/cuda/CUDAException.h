// Emulation shim for c10/cuda/CUDAException.h: the error checks the kernel glue uses, raising
// as c10's do, with the emulator's account of what went wrong appended.
#pragma once

#include <c10/util/Exception.h>

#include "emulation.h"

#define C10_CUDA_CHECK(EXPR)                                                                    \
  do {                                                                                          \
    const cudaError_t focal_emu_error = EXPR;                                                   \
    TORCH_CHECK(focal_emu_error == cudaSuccess, "CUDA error: ", cudaGetErrorString(focal_emu_error), \
                " [CUDA emulation: ", ::focal_emu::last_error_detail(), "]");                   \
  } while (0)

#define C10_CUDA_KERNEL_LAUNCH_CHECK() C10_CUDA_CHECK(cudaGetLastError())
