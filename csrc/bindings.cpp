// pybind11 module focal_cuda._C: the ops, their checks and what the build contains.
#include <torch/csrc/Exceptions.h>
#include <torch/extension.h>

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

// kOp called as torch's own Python bindings call theirs (torch/csrc/Exceptions.h): the kernels
// run without the GIL, so that Python threads can compute losses concurrently; an error unwinds
// out of that scope first (the GIL is held again), and torch's handler turns it into the Python
// exception with the GIL held, warnings included. torch's errors and the standard exceptions
// then never reach pybind11's translation of C++ exceptions across modules (only pybind11's own
// exception types, which it handles itself), and no Python state is touched without the GIL.
// kKeepGil: for checks that may compare symbolic sizes, which call into Python.
template <auto kOp, bool kKeepGil = false>
struct Bound;

template <typename Result, typename... Args, Result (*kOp)(Args...), bool kKeepGil>
struct Bound<kOp, kKeepGil> {
  static Result call(Args... args) {
    HANDLE_TH_ERRORS
    std::optional<pybind11::gil_scoped_release> no_gil;
    if constexpr (!kKeepGil) {
      no_gil.emplace();
    }
    return kOp(std::forward<Args>(args)...);
    END_HANDLE_TH_ERRORS_PYBIND
  }
};

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
        m.def("sigmoid_focal_loss_forward", &Bound<&focal::sigmoid_focal_loss_forward>::call,
              parameters...,
              "Fused sigmoid focal loss: (loss, dloss/dinputs, dloss/dtargets, loss before "
              "weight, count), gradients unscaled.");
        m.def("check_forward_arguments", &Bound<&focal::check_forward_arguments, true>::call,
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
        m.def("softmax_focal_loss_forward", &Bound<&focal::softmax_focal_loss_forward>::call,
              parameters...,
              "Fused softmax focal loss: (loss, dloss/dinputs, dloss/dtargets, loss before "
              "weight, the mean's divisor), gradients unscaled.");
        m.def("check_softmax_arguments", &Bound<&focal::check_softmax_arguments, true>::call,
              parameters..., "softmax_focal_loss_forward's checks that read no data.");
      },
      softmax_parameters);
  m.def("check_softmax_options", &Bound<&focal::check_softmax_options, true>::call,
        pybind11::arg("coefficients"), pybind11::arg("label_smoothing"),
        "The softmax focal loss's scalar options checked as its forward checks them.");
  // The outputs mask's bits (csrc/focal_ops.h).
  m.attr("GRAD_INPUTS") = focal::kGradInputs;
  m.attr("GRAD_TARGETS") = focal::kGradTargets;
  m.attr("UNWEIGHTED_LOSS") = focal::kUnweightedLoss;
  m.def("sigmoid_focal_loss_backward", &Bound<&focal::sigmoid_focal_loss_backward>::call,
        pybind11::arg("grad_output"), pybind11::arg("saved_grad"), pybind11::arg("count"),
        pybind11::arg("reduction"), "saved_grad scaled by grad_output (divided by count for mean).");
  m.def("sigmoid_focal_loss_backward_", &Bound<&focal::sigmoid_focal_loss_backward_>::call,
        pybind11::arg("grad_output"), pybind11::arg("saved_grad"), pybind11::arg("count"),
        pybind11::arg("reduction"), "sigmoid_focal_loss_backward, written into saved_grad.");
  m.def("build_info", &build_info, "What this build of focal_cuda contains.");
}
