// The pybind11 module of the CUDA emulation: the real op layer running on the emulated kernels,
// direct entries into the kernel glue (outputs placed anywhere, misaligned included), and the
// controls of the emulated device.
#include <torch/extension.h>

#include "focal.h"
#include "focal_ops.h"
#include "runtime.h"

namespace focal::cpu {
// The op layer references the CPU kernels, but in this module every tensor takes its CUDA path
// (emulated_ops.cpp).
void forward(const ForwardArgs&) { TORCH_INTERNAL_ASSERT(false, "the emulation harness reached the CPU kernels"); }
void backward(const BackwardArgs&) { TORCH_INTERNAL_ASSERT(false, "the emulation harness reached the CPU kernels"); }
void softmax_forward(const SoftmaxArgs&) { TORCH_INTERNAL_ASSERT(false, "the emulation harness reached the CPU kernels"); }
}  // namespace focal::cpu

void add_self_tests(pybind11::module& module);  // self_test.cpp
at::Tensor device_reciprocal(const at::Tensor& values);  // emulated_kernels.cpp
at::Tensor device_pow(const at::Tensor& bases, double exponent);  // emulated_kernels.cpp

namespace {

// The runtime's per-instance records as a dict: instance name -> value.
template <typename T>
pybind11::dict by_instance(const std::vector<std::pair<std::string, T>>& records) {
  pybind11::dict result;
  for (const auto& [name, value] : records) {
    result[pybind11::str(name)] = value;
  }
  return result;
}

// focal::cuda::forward with outputs the caller allocated (and may have placed misaligned).
void forward_into(const at::Tensor& inputs, const at::Tensor& targets,
                  const std::optional<at::Tensor>& weight, int64_t weight_kind, double alpha,
                  double gamma, double label_smoothing, int64_t reduction, int64_t ignore_index,
                  const at::Tensor& loss, const std::optional<at::Tensor>& grad_inputs,
                  const std::optional<at::Tensor>& grad_targets,
                  const std::optional<at::Tensor>& unweighted_loss, const at::Tensor& count) {
  focal::ForwardArgs args;
  args.inputs = inputs;
  args.targets = targets;
  args.labels = !targets.is_floating_point();
  args.classes = inputs.dim() == 0 ? 1 : inputs.size(-1);
  args.ignore_index = ignore_index;
  args.weight = weight.value_or(at::Tensor());
  args.weight_kind = static_cast<focal::WeightKind>(weight_kind);
  args.form = focal::LossForm::Focal;
  args.coefficients.alpha = alpha;
  args.coefficients.gamma = gamma;
  args.label_smoothing = label_smoothing;
  args.reduction = static_cast<focal::Reduction>(reduction);
  args.loss = loss;
  args.grad_inputs = grad_inputs.value_or(at::Tensor());
  args.grad_targets = grad_targets.value_or(at::Tensor());
  args.unweighted_loss = unweighted_loss.value_or(at::Tensor());
  args.count = count;
  focal::cuda::forward(args);
}

void backward_into(const at::Tensor& grad_output, bool grad_output_is_scalar, const at::Tensor& saved_grad,
                   const std::optional<at::Tensor>& divisor, const at::Tensor& out) {
  focal::BackwardArgs args;
  args.grad_output = grad_output;
  args.grad_output_is_scalar = grad_output_is_scalar;
  args.saved_grad = saved_grad;
  args.divisor = divisor.value_or(at::Tensor());
  args.out = out;
  focal::cuda::backward(args);
}

focal_emu::Schedule schedule_named(const std::string& name) {
  if (name == "forward") return focal_emu::Schedule::Forward;
  if (name == "reverse") return focal_emu::Schedule::Reverse;
  if (name == "shuffled") return focal_emu::Schedule::Shuffled;
  TORCH_CHECK_VALUE(false, "schedule must be 'forward', 'reverse' or 'shuffled', got '", name, "'");
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "focal_cuda's CUDA kernels and op layer on the emulated device (tests/cuda_emulation)";
  using pybind11::arg;
  m.def("sigmoid_focal_loss_forward", &focal::sigmoid_focal_loss_forward, arg("inputs"), arg("targets"),
        arg("weight"), arg("scores"), arg("form"), arg("coefficients"), arg("reduction"),
        arg("ignore_index"), arg("label_smoothing"), arg("float32_loss"), arg("outputs"));
  m.def("softmax_focal_loss_forward", &focal::softmax_focal_loss_forward, arg("inputs"), arg("targets"),
        arg("weight"), arg("coefficients"), arg("reduction"), arg("ignore_index"),
        arg("label_smoothing"), arg("float32_loss"), arg("outputs"));
  m.def("sigmoid_focal_loss_backward", &focal::sigmoid_focal_loss_backward, arg("grad_output"),
        arg("saved_grad"), arg("count"), arg("reduction"));
  m.def("sigmoid_focal_loss_backward_", &focal::sigmoid_focal_loss_backward_, arg("grad_output"),
        arg("saved_grad"), arg("count"), arg("reduction"));
  m.def("forward_into", &forward_into, arg("inputs"), arg("targets"), arg("weight"), arg("weight_kind"),
        arg("alpha"), arg("gamma"), arg("label_smoothing"), arg("reduction"), arg("ignore_index"),
        arg("loss"), arg("grad_inputs"), arg("grad_targets"), arg("unweighted_loss"), arg("count"));
  m.def("backward_into", &backward_into, arg("grad_output"), arg("grad_output_is_scalar"),
        arg("saved_grad"), arg("divisor"), arg("out"));
  m.def("reads_dtype_pair", &focal::cuda::reads_dtype_pair);
  m.def("device_reciprocal", &device_reciprocal, arg("values"),
        "The CUDA kernels' float32 reciprocal, elementwise.");
  m.def("device_pow", &device_pow, arg("bases"), arg("exponent"),
        "The CUDA kernels' float64 pow, elementwise.");
  m.def("set_schedule", [](const std::string& name, uint64_t seed) {
    focal_emu::set_schedule(schedule_named(name), seed);
  }, arg("name"), arg("seed") = 0);
  m.def("set_multiprocessor_count", &focal_emu::set_multiprocessor_count);
  m.def("multiprocessor_count", &focal_emu::multiprocessor_count);
  m.def("multiprocessor_queries", &focal_emu::multiprocessor_queries);
  m.def("kernel_instances", [] { return by_instance(focal_emu::kernel_instances()); },
        "Every kernel instance the module can launch -> how often it was launched.");
  m.def("last_grids", [] { return by_instance(focal_emu::last_grids()); },
        "Every kernel instance -> the blocks of its latest launch (0: never launched).");
  m.def("reset_launch_counts", &focal_emu::reset_launch_counts);
  m.def("reset_device", &focal_emu::reset_device, "Clears a device-side assert's sticky error.");
  m.def("shared_variable_count", &focal_emu::shared_variable_count);
  add_self_tests(m);
}
