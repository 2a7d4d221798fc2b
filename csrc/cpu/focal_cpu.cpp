// Chooses, once, the CPU kernels built for the best instruction set this machine supports, as
// PyTorch itself reports it (so ATEN_CPU_CAPABILITY=avx2 or =default also steers these kernels).
#include <ATen/Version.h>

#include "focal.h"

namespace focal::cpu {

#define FOCAL_DECLARE_CPU_KERNELS(ISA)             \
  namespace ISA {                                  \
  void forward(const ForwardArgs& args);           \
  void backward(const BackwardArgs& args);         \
  void softmax_forward(const SoftmaxArgs& args);   \
  }

FOCAL_DECLARE_CPU_KERNELS(DEFAULT)
#ifdef FOCAL_HAVE_CPU_AVX2
FOCAL_DECLARE_CPU_KERNELS(AVX2)
#endif
#ifdef FOCAL_HAVE_CPU_AVX512
FOCAL_DECLARE_CPU_KERNELS(AVX512)
#endif

namespace {

struct Kernels {
  const char* isa;
  void (*forward)(const ForwardArgs&);
  void (*backward)(const BackwardArgs&);
  void (*softmax_forward)(const SoftmaxArgs&);
};

const Kernels& kernels() {
  static const Kernels chosen = [] {
    const std::string capability = at::get_cpu_capability();
#ifdef FOCAL_HAVE_CPU_AVX512
    if (capability == "AVX512") {
      return Kernels{"AVX512", AVX512::forward, AVX512::backward, AVX512::softmax_forward};
    }
#endif
#ifdef FOCAL_HAVE_CPU_AVX2
    if (capability == "AVX512" || capability == "AVX2") {
      return Kernels{"AVX2", AVX2::forward, AVX2::backward, AVX2::softmax_forward};
    }
#endif
    return Kernels{"DEFAULT", DEFAULT::forward, DEFAULT::backward, DEFAULT::softmax_forward};
  }();
  return chosen;
}

}  // namespace

void forward(const ForwardArgs& args) { kernels().forward(args); }

void backward(const BackwardArgs& args) { kernels().backward(args); }

void softmax_forward(const SoftmaxArgs& args) { kernels().softmax_forward(args); }

std::string active_isa() { return kernels().isa; }

}  // namespace focal::cpu
