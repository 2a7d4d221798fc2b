// pybind11 module focal_cuda._C: the ops, their checks and what the build contains.
#include <ATen/record_function.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/Exceptions.h>
// pybind11 with torch's type casters (Tensor, ScalarType, ...): what <torch/extension.h> includes
// for bindings, without the C++ frontend (torch/all.h), which took 60% of this file's compile.
#include <torch/csrc/utils/pybind.h>

#include <optional>
#include <tuple>
#include <utility>

#include "focal.h"
#include "focal_ops.h"

#ifdef FOCAL_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
  info["version"] = FOCAL_CUDA_VERSION_STR;
#ifdef FOCAL_WITH_CUDA
  info["cuda"] = true;
  info["cuda_version"] = std::to_string(CUDART_VERSION / 1000) + "." +
                         std::to_string(CUDART_VERSION % 1000 / 10);
#else
  info["cuda"] = false;
  info["cuda_version"] = pybind11::none();
#endif
  info["cuda_arch_list"] = FOCAL_CUDA_ARCH_LIST;
  info["cpu_isas"] = FOCAL_CPU_ISAS;
  info["cpu_active_isa"] = focal::cpu::active_isa();
  return info;
}

// What thread_dispatch_keys reports: the dispatch keys this thread adds to every op call,
// beyond c10's defaults.
constexpr int kFunctorchTransform = 1;  // torch.func's (grad, vmap, jvp, ...)
constexpr int kOtherKeys = 2;           // Python dispatch modes, the legacy vmap of batched grads

// Private (c10/core/impl/LocalDispatchKeySet.h): one read of the thread's included keys tells
// Python whether a direct call of the kernels would bypass something the dispatcher serves.
int thread_dispatch_keys() {
  const auto added =
      c10::impl::tls_local_dispatch_key_set().included_ - c10::default_included_set;
  const auto functorch = added.has(c10::DispatchKey::FuncTorchDynamicLayerFrontMode);
  const auto transform_keys = c10::DispatchKeySet(
      {c10::DispatchKey::FuncTorchDynamicLayerFrontMode,
       c10::DispatchKey::FuncTorchDynamicLayerBackMode});
  const auto others = added - transform_keys;
  return (functorch ? kFunctorchTransform : 0) | (others.empty() ? 0 : kOtherKeys);
}

// kOp called as torch's own Python bindings call theirs (torch/csrc/Exceptions.h): the kernels
// run without the GIL, so that Python threads can compute losses concurrently; an error unwinds
// out of that scope first (the GIL is held again), and torch's handler turns it into the Python
// exception with the GIL held, warnings included. torch's errors and the standard exceptions
// then never reach pybind11's translation of C++ exceptions across modules (only pybind11's own
// exception types, which it handles itself), and no Python state is touched without the GIL.
// kKeepGil: for checks that may compare symbolic sizes, which call into Python.
// kProfiledName: the profiler's record of a call, with its arguments, on every path that runs
// the kernels (an eager call that skips the dispatcher has no record of the op's); a
// thread-local flag test when nothing profiles.
template <auto kOp, const char* kProfiledName = nullptr, bool kKeepGil = false>
struct Bound;

template <typename Result, typename... Args, Result (*kOp)(Args...), const char* kProfiledName,
          bool kKeepGil>
struct Bound<kOp, kProfiledName, kKeepGil> {
  static Result call(Args... args) {
    HANDLE_TH_ERRORS
    std::optional<pybind11::gil_scoped_release> no_gil;
    if constexpr (!kKeepGil) {
      no_gil.emplace();
    }
    if constexpr (kProfiledName != nullptr) {
      // The arguments are converted only when a profiler records shapes.
      RECORD_FUNCTION(kProfiledName, std::vector<c10::IValue>{c10::IValue(args)...});
      return kOp(std::forward<Args>(args)...);
    } else {
      return kOp(std::forward<Args>(args)...);
    }
    END_HANDLE_TH_ERRORS_PYBIND
  }
};

// The kernels' entry points as the profiler names them.
constexpr char kSigmoidForward[] = "focal_cuda._C.sigmoid_focal_loss_forward";
constexpr char kSoftmaxForward[] = "focal_cuda._C.softmax_focal_loss_forward";
constexpr char kBackward[] = "focal_cuda._C.sigmoid_focal_loss_backward";
constexpr char kBackwardInPlace[] = "focal_cuda._C.sigmoid_focal_loss_backward_";

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "focal_cuda kernels; use focal_cuda.sigmoid_focal_loss, not these directly.";
  // Each forward's parameters, which its checks take too; no defaults (csrc/focal_ops.h).
  const auto forward_parameters = std::make_tuple(
      pybind11::arg("inputs"), pybind11::arg("targets"), pybind11::arg("weight"),
      pybind11::arg("scores"), pybind11::arg("form"), pybind11::arg("coefficients"),
      pybind11::arg("reduction"), pybind11::arg("ignore_index"), pybind11::arg("label_smoothing"),
      pybind11::arg("float32_loss"), pybind11::arg("outputs"));
  std::apply(
      [&](const auto&... parameters) {
        m.def("sigmoid_focal_loss_forward",
              &Bound<&focal::sigmoid_focal_loss_forward, kSigmoidForward>::call,
              parameters...,
              "Fused sigmoid focal loss: (loss, dloss/dinputs, dloss/dtargets, loss before "
              "weight, count), gradients unscaled.");
        m.def("check_forward_arguments",
              &Bound<&focal::check_forward_arguments, nullptr, true>::call,
              parameters...,
              "sigmoid_focal_loss_forward's checks that read no data (dtypes, shapes, devices, "
              "scalars), for its fake kernel: fake and meta tensors, symbolic shapes.");
      },
      forward_parameters);
  const auto softmax_parameters = std::make_tuple(
      pybind11::arg("inputs"), pybind11::arg("targets"), pybind11::arg("weight"),
      pybind11::arg("coefficients"), pybind11::arg("reduction"), pybind11::arg("ignore_index"),
      pybind11::arg("label_smoothing"), pybind11::arg("float32_loss"), pybind11::arg("outputs"));
  std::apply(
      [&](const auto&... parameters) {
        m.def("softmax_focal_loss_forward",
              &Bound<&focal::softmax_focal_loss_forward, kSoftmaxForward>::call,
              parameters...,
              "Fused softmax focal loss: (loss, dloss/dinputs, dloss/dtargets, loss before "
              "weight, the mean's divisor), gradients unscaled.");
        m.def("check_softmax_arguments",
              &Bound<&focal::check_softmax_arguments, nullptr, true>::call,
              parameters..., "softmax_focal_loss_forward's checks that read no data.");
      },
      softmax_parameters);
  m.def("check_softmax_options", &Bound<&focal::check_softmax_options, nullptr, true>::call,
        pybind11::arg("coefficients"), pybind11::arg("label_smoothing"),
        "The softmax focal loss's scalar options checked as its forward checks them.");
  m.def("check_cpu_labels", &Bound<&focal::check_cpu_labels>::call, pybind11::arg("labels"),
        pybind11::arg("classes"), pybind11::arg("ignore_index"), pybind11::arg("with_background"),
        "The forwards' label check on CPU labels (ValueError), for paths without the kernels.");
  // The outputs mask's bits (csrc/focal_ops.h).
  m.attr("GRAD_INPUTS") = focal::kGradInputs;
  m.attr("GRAD_TARGETS") = focal::kGradTargets;
  m.attr("UNWEIGHTED_LOSS") = focal::kUnweightedLoss;
  m.def("sigmoid_focal_loss_backward", &Bound<&focal::sigmoid_focal_loss_backward, kBackward>::call,
        pybind11::arg("grad_output"), pybind11::arg("saved_grad"), pybind11::arg("count"),
        pybind11::arg("reduction"), "saved_grad scaled by grad_output (divided by count for mean).");
  m.def("sigmoid_focal_loss_backward_",
        &Bound<&focal::sigmoid_focal_loss_backward_, kBackwardInPlace>::call,
        pybind11::arg("grad_output"), pybind11::arg("saved_grad"), pybind11::arg("count"),
        pybind11::arg("reduction"), "sigmoid_focal_loss_backward, written into saved_grad.");
  m.def("check_backward_arguments",
        &Bound<&focal::check_backward_arguments, nullptr, true>::call, pybind11::arg("grad_output"),
        pybind11::arg("saved_grad"), pybind11::arg("count"), pybind11::arg("reduction"),
        "The backward ops' checks that read no data, for their fake kernels.");
  m.def("build_info", &build_info, "What this build of focal_cuda contains.");
  m.def("thread_dispatch_keys", &thread_dispatch_keys,
        "The dispatch keys this thread adds to op calls: FUNCTORCH_TRANSFORM | OTHER_DISPATCH_KEYS "
        "bits, 0 in plain eager mode.");
  m.attr("FUNCTORCH_TRANSFORM") = kFunctorchTransform;
  m.attr("OTHER_DISPATCH_KEYS") = kOtherKeys;
}
