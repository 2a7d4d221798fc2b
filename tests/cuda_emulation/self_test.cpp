// Kernels that test the emulator itself against the CUDA programming guide and the PTX ISA:
// shuffles, barriers, __shared__ memory, schedules, errors. tests/test_cuda_emulator.py calls
// them and states what a GPU does.
#include <torch/extension.h>

#include "emulation.h"
#include "runtime.h"
#include <c10/cuda/CUDAException.h>  // the emulation shim (include path)

namespace {

constexpr int kThreads = 64;  // two warps

// out[lane] = the shuffled value of `in` (lane * 100 + 7) for each lane of one warp of `threads`.
__global__ void shuffle_kernel(int64_t* out, int mode, unsigned mask, int operand, int width,
                               int threads_that_exit) {
  const int lane = threadIdx.x;
  if (lane >= static_cast<int>(blockDim.x) - threads_that_exit) {
    return;
  }
  const int64_t value = lane * 100 + 7;
  switch (static_cast<focal_emu::ShuffleMode>(mode)) {
    case focal_emu::ShuffleMode::Index: out[lane] = __shfl_sync(mask, value, operand, width); break;
    case focal_emu::ShuffleMode::Up: out[lane] = __shfl_up_sync(mask, value, operand, width); break;
    case focal_emu::ShuffleMode::Down: out[lane] = __shfl_down_sync(mask, value, operand, width); break;
    case focal_emu::ShuffleMode::Xor: out[lane] = __shfl_xor_sync(mask, value, operand, width); break;
  }
}

// Every thread writes its slot of shared memory, then reads its neighbour's: correct with the
// barrier under every schedule; without it the result depends on the order the threads run in.
__global__ void neighbour_kernel(float* out, bool barrier) {
  __shared__ float slots[kThreads];
  slots[threadIdx.x] = static_cast<float>(blockIdx.x * 1000 + threadIdx.x);
  if (barrier) {
    __syncthreads();
  }
  out[blockIdx.x * blockDim.x + threadIdx.x] = slots[(threadIdx.x + 1) % blockDim.x];
}

// Block b reads its shared memory before writing it: poisoned for every block, so block 1 does
// not see what block 0 left.
__global__ void read_before_write_kernel(float* out) {
  __shared__ float leftover[kThreads];
  out[blockIdx.x * blockDim.x + threadIdx.x] = leftover[threadIdx.x];
  leftover[threadIdx.x] = 1.0f;
}

// The order in which threads first run: slot k holds the k-th thread to start.
__global__ void arrival_kernel(int64_t* order, int64_t* next) {
  order[(*next)++] = blockIdx.x * blockDim.x + threadIdx.x;
}

__global__ void grid_stride_kernel(int64_t* visits, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    visits[i] += 1;
  }
}

__global__ void divergent_barrier_kernel() {
  if (threadIdx.x < 16) {
    __syncthreads();
  } else {
    __syncthreads();
  }
}

__global__ void exited_barrier_kernel() {
  if (threadIdx.x % 2 == 1) {
    return;
  }
  __syncthreads();
}

// Lane 5 waits at the block barrier while the rest of its warp waits for it in a shuffle.
__global__ void deadlock_kernel(int64_t* out) {
  if (threadIdx.x == 5) {
    __syncthreads();
  }
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, static_cast<int64_t>(threadIdx.x), 1);
}

__global__ void mismatched_shuffle_kernel(int64_t* out) {
  const int64_t value = threadIdx.x;
  out[threadIdx.x] = threadIdx.x % 2 == 0 ? __shfl_down_sync(0xffffffffu, value, 1)
                                          : __shfl_xor_sync(0xffffffffu, value, 1);
}

// Legal on sm_70 and later: lanes 4 and 5 meet at a __syncwarp of their own while the rest of
// the warp already waits in a shuffle they join afterwards.
__global__ void partial_syncwarp_kernel(int64_t* out) {
  if (threadIdx.x == 4 || threadIdx.x == 5) {
    __syncwarp(0x30u);
  }
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, static_cast<int64_t>(threadIdx.x), 1);
}

__global__ void syncwarp_kernel(int64_t* out) {
  __shared__ int64_t slots[32];
  slots[threadIdx.x] = threadIdx.x;
  __syncwarp();
  out[threadIdx.x] = slots[31 - threadIdx.x];
}

__global__ void assert_kernel(int64_t* out, int64_t bad_block, int64_t bad_thread) {
  out[blockIdx.x * blockDim.x + threadIdx.x] = 1;
  CUDA_KERNEL_ASSERT(!(blockIdx.x == bad_block && threadIdx.x == bad_thread));
}

__global__ void printf_kernel() {
  if (threadIdx.x == 3) {
    printf("hello from block %u thread %u\n", blockIdx.x, threadIdx.x);
  }
}

__global__ void fault_kernel(int64_t* null_pointer, int64_t bad_block, int64_t bad_thread) {
  if (blockIdx.x == bad_block && threadIdx.x == bad_thread) {
    null_pointer[0] = 1;
  }
}

void check_launch() { C10_CUDA_KERNEL_LAUNCH_CHECK(); }

int64_t* data(const at::Tensor& tensor) {
  TORCH_CHECK(tensor.scalar_type() == at::kLong && tensor.is_contiguous(), "self test: int64 contiguous tensor");
  return tensor.data_ptr<int64_t>();
}

}  // namespace

void add_self_tests(pybind11::module& module) {
  auto m = module.def_submodule("self_test", "Kernels that test the emulator (tests/test_cuda_emulator.py).");
  using pybind11::arg;
  m.def("shuffle", [](const at::Tensor& out, int mode, unsigned mask, int operand, int width,
                      int threads, int threads_that_exit) {
    FOCAL_LAUNCH(1, threads, nullptr, shuffle_kernel)(data(out), mode, mask, operand, width, threads_that_exit);
    check_launch();
  }, arg("out"), arg("mode"), arg("mask"), arg("operand"), arg("width"), arg("threads") = 32,
     arg("threads_that_exit") = 0);
  m.def("neighbour", [](const at::Tensor& out, int blocks, bool barrier) {
    TORCH_CHECK(out.scalar_type() == at::kFloat && out.numel() == blocks * kThreads);
    FOCAL_LAUNCH(blocks, kThreads, nullptr, neighbour_kernel)(out.data_ptr<float>(), barrier);
    check_launch();
  });
  m.def("read_before_write", [](const at::Tensor& out, int blocks) {
    TORCH_CHECK(out.scalar_type() == at::kFloat && out.numel() == blocks * kThreads);
    FOCAL_LAUNCH(blocks, kThreads, nullptr, read_before_write_kernel)(out.data_ptr<float>());
    check_launch();
  });
  m.def("arrival", [](const at::Tensor& order, int blocks, int threads) {
    int64_t next = 0;
    FOCAL_LAUNCH(blocks, threads, nullptr, arrival_kernel)(data(order), &next);
    check_launch();
  });
  m.def("grid_stride", [](const at::Tensor& visits, int blocks, int threads) {
    FOCAL_LAUNCH(blocks, threads, nullptr, grid_stride_kernel)(data(visits), visits.numel());
    check_launch();
  });
  m.def("launch", [](const std::string& name, const at::Tensor& out, std::vector<int64_t> grid,
                     std::vector<int64_t> block, int64_t bad_block, int64_t bad_thread) {
    TORCH_CHECK(grid.size() == 3 && block.size() == 3, "grid and block: 3 numbers each");
    const dim3 g(grid[0], grid[1], grid[2]);
    const dim3 b(block[0], block[1], block[2]);
    if (name == "divergent_barrier") {
      FOCAL_LAUNCH(g, b, nullptr, divergent_barrier_kernel)();
    } else if (name == "exited_barrier") {
      FOCAL_LAUNCH(g, b, nullptr, exited_barrier_kernel)();
    } else if (name == "deadlock") {
      FOCAL_LAUNCH(g, b, nullptr, deadlock_kernel)(data(out));
    } else if (name == "mismatched_shuffle") {
      FOCAL_LAUNCH(g, b, nullptr, mismatched_shuffle_kernel)(data(out));
    } else if (name == "partial_syncwarp") {
      FOCAL_LAUNCH(g, b, nullptr, partial_syncwarp_kernel)(data(out));
    } else if (name == "syncwarp") {
      FOCAL_LAUNCH(g, b, nullptr, syncwarp_kernel)(data(out));
    } else if (name == "assert") {
      FOCAL_LAUNCH(g, b, nullptr, assert_kernel)(data(out), bad_block, bad_thread);
    } else if (name == "printf") {
      FOCAL_LAUNCH(g, b, nullptr, printf_kernel)();
    } else if (name == "fault") {
      FOCAL_LAUNCH(g, b, nullptr, fault_kernel)(nullptr, bad_block, bad_thread);
    } else {
      TORCH_CHECK_VALUE(false, "no self-test kernel named ", name);
    }
    check_launch();
  }, arg("name"), arg("out"), arg("grid"), arg("block"), arg("bad_block") = -1, arg("bad_thread") = -1);
}
