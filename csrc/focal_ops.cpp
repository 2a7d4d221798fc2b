// Device-agnostic layer of the ops: argument checks, dtype/layout preparation, output
// allocation, then the CPU or CUDA kernels.
#include "focal_ops.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <charconv>
#include <cmath>
#include <iterator>
#include <limits>
#include <numeric>
#include <string>
#include <vector>

#include "focal.h"

namespace focal {
namespace {

constexpr const char* kRebuildWithCuda =
    "focal_cuda was built without its CUDA kernels (see focal_cuda.backends()). Rebuild it "
    "against a CUDA build of torch with the CUDA toolkit present: "
    "FORCE_CUDA=1 pip install --no-build-isolation --force-reinstall --no-deps .";

// A dtype as Python writes it (torch.int64), for messages read in Python.
std::string python_name(at::ScalarType dtype) {
  return "torch." + std::string(c10::getDtypeNames(dtype).first);
}

// The kernels read strided memory: not a sparse, mkldnn or other layout.
void check_strided(const at::Tensor& tensor, const char* name) {
  TORCH_CHECK_VALUE(tensor.layout() == at::kStrided, name,
                    " must be a strided (dense) tensor, got layout ", tensor.layout());
  // A nested tensor of the strided layout has no sizes() to check the rest against.
  TORCH_CHECK_VALUE(!tensor.is_nested(), name, " must be a strided (dense) tensor, got a nested tensor");
}

// The floating dtypes the kernels compute in (isFloatingType would admit float8 too).
bool is_kernel_floating(at::ScalarType dtype) {
  return dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat || dtype == at::kDouble;
}

void check_floating(const at::Tensor& tensor, const char* name) {
  check_strided(tensor, name);
  TORCH_CHECK_VALUE(is_kernel_floating(tensor.scalar_type()), name,
                    " must be a floating-point tensor (float16, bfloat16, float32 or float64), got ",
                    python_name(tensor.scalar_type()));
}

// Targets: class labels of an integer dtype whose values int64 holds (uint64's upper half would
// wrap to negative labels, ignore_index among them), or floating of a dtype the kernels compute
// in; expected: what the loss calls the two.
void check_targets(const at::Tensor& targets, bool labels, const char* expected) {
  check_strided(targets, "targets");
  const at::ScalarType dtype = targets.scalar_type();
  TORCH_CHECK_VALUE(labels ? dtype != at::kUInt64 : is_kernel_floating(dtype), "targets must be ",
                    expected, "; integer dtypes int8 to int64 and uint8 to uint32, floating "
                    "float16, bfloat16, float32 or float64; got ", python_name(dtype));
}

void check_device(const at::Tensor& tensor, const char* name) {
  TORCH_CHECK(tensor.is_cpu() || tensor.is_cuda(), name,
              " must be a CPU or CUDA tensor (what focal_cuda runs on), got one on ", tensor.device());
#ifndef FOCAL_WITH_CUDA
  TORCH_CHECK(!tensor.is_cuda(), name, " is a CUDA tensor, but ", kRebuildWithCuda);
#endif
}

void check_same_device(const at::Tensor& tensor, const at::Tensor& inputs, const char* name) {
  TORCH_CHECK_VALUE(tensor.device() == inputs.device(), name, " must be on inputs' device (",
                    inputs.device(), "), got one on ", tensor.device());
}

// Whether weight broadcasts to inputs (sizes read as SymInts: see check_forward_arguments).
bool broadcasts_to(const at::Tensor& weight, const at::Tensor& inputs) {
  const auto shape = inputs.sym_sizes();
  if (weight.dim() > inputs.dim()) {
    return false;
  }
  for (int64_t d = 1; d <= weight.dim(); ++d) {
    const auto& size = weight.sym_size(-d);
    // Size-oblivious: a data-dependent size (rows picked by a mask) is taken as not 1 without a
    // guard, which torch.compile could not place on it.
    const bool one = TORCH_GUARD_SIZE_OBLIVIOUS(size.sym_eq(1));
    if (!one && size != shape[shape.size() - d]) {
      return false;
    }
  }
  return true;
}

// Whether tensor has the shape of inputs without its last (class) dimension: the shape of class
// labels or of a per-row weight, and so the likely intent behind a shape error.
bool has_rows_shape(const at::Tensor& tensor, const at::Tensor& inputs) {
  return inputs.dim() >= 1 && tensor.sym_sizes() == inputs.sym_sizes().slice(0, inputs.dim() - 1);
}

Reduction checked_reduction(int64_t reduction) {
  TORCH_CHECK_VALUE(reduction >= 0 && reduction <= 2,
                    "reduction must be 0 (none), 1 (mean) or 2 (sum), got ", reduction);
  return static_cast<Reduction>(reduction);
}

void check_outputs(int64_t outputs) {
  TORCH_CHECK_VALUE(outputs >= 0 && outputs <= (kGradInputs | kGradTargets | kUnweightedLoss),
                    "outputs must be a mask of GRAD_INPUTS (1), GRAD_TARGETS (2) and "
                    "UNWEIGHTED_LOSS (4), got ", outputs);
}

at::ScalarType math_dtype(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

// The dtype of what the forward saves for backward (gradients, the loss before the weight):
// float32 for float16, whose range would flush small values before backward multiplies them
// by a loss scale; the dtype itself otherwise (bfloat16 has float32's range).
at::ScalarType saved_dtype(at::ScalarType dtype) {
  return dtype == at::kHalf ? at::kFloat : dtype;
}

// The loss's dtype, from the one torch's promotion gives: float32 for 16-bit operands under
// autocast (float32_loss), as torchvision's and F.cross_entropy's results are there.
at::ScalarType result_dtype(at::ScalarType promoted, bool float32_loss) {
  return float32_loss && (promoted == at::kHalf || promoted == at::kBFloat16) ? at::kFloat
                                                                              : promoted;
}

// The loss of no element: torch's mean of nothing is NaN, its sum 0; nothing counted.
void fill_result_of_nothing(at::Tensor& loss, at::Tensor& count, Reduction mode) {
  count.fill_(0);
  if (mode != Reduction::None) {
    loss.fill_(mode == Reduction::Mean ? std::numeric_limits<double>::quiet_NaN() : 0.0);
  }
}

// As F.cross_entropy's with class probabilities: floating targets name no row to ignore, so a
// non-negative ignore_index (255, a config's) is refused rather than silently doing nothing.
void check_ignore_index(bool labels, int64_t ignore_index, const char* labels_are,
                        const char* floating_are) {
  TORCH_CHECK_VALUE(labels || ignore_index < 0, "ignore_index applies to ", labels_are, "; with ",
                    floating_are, " it must be negative (the default, -100), got ", ignore_index);
}

// Every label must name a class (0..C-1), the background (C, for the sigmoid losses: with_background)
// or be ignore_index. Checked on CPU only, by one read of the labels (int64, contiguous) in place
// of tensor ops, whose dispatch cost more than the loss of a small input: on CUDA the kernel
// asserts, so that the host never waits for the device.
void check_labels_on_cpu(const at::Tensor& labels, int64_t classes, int64_t ignore_index,
                         bool with_background) {
  if (!labels.is_cpu()) {
    return;
  }
  const int64_t* values = labels.const_data_ptr<int64_t>();
  std::atomic<int64_t> first_bad{std::numeric_limits<int64_t>::max()};
  at::parallel_for(0, labels.numel(), 1 << 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t label = values[i];
      if ((label < 0 || label >= classes + with_background) && label != ignore_index) {
        int64_t seen = first_bad.load();
        while (i < seen && !first_bad.compare_exchange_weak(seen, i)) {
        }
        return;
      }
    }
  });
  if (first_bad.load() == std::numeric_limits<int64_t>::max()) {
    return;
  }
  const int64_t value = values[first_bad.load()];
  TORCH_CHECK_VALUE(with_background || classes != 1, "targets holds the class label ", value,
                    "; inputs have one class along their class dimension, so the only valid labels "
                    "are 0 and ignore_index (", ignore_index, "), and the softmax is 1 and the loss "
                    "0 everywhere: a two-class classifier wants 2 logits (or sigmoid_focal_loss on "
                    "one)");
  TORCH_CHECK_VALUE(with_background, "targets holds the class label ", value, "; valid labels are 0 "
                    "to ", classes - 1, " (the ", classes, " classes along inputs' class dimension) "
                    "and ignore_index (", ignore_index, ")");
  TORCH_CHECK_VALUE(classes > 0, "targets holds the class label ", value, "; inputs' last "
                    "dimension (the classes) is 0, so the only valid labels are 0 (background) "
                    "and ignore_index (", ignore_index, ")");
  TORCH_CHECK_VALUE(false, "targets holds the class label ", value, "; valid labels are 0 to ",
                    classes - 1, " (the ", classes, " classes of inputs' last dimension), ",
                    classes, " (background) and ignore_index (", ignore_index, ")");
}

// The weight as the kernels read it: per class, per row or per element, in the dtype the
// kernels compute in (float32, or float64 for a float64 loss), contiguous. Only a weight that
// varies along both rows and classes without covering every element (e.g. (A, C) for inputs
// (N, A, C)) is materialised at full size.
std::pair<WeightKind, at::Tensor> weight_for_kernels(const at::Tensor& weight,
                                                     const at::Tensor& inputs,
                                                     at::ScalarType dtype) {
  const auto shape = inputs.sizes();
  const at::Tensor expanded = weight.to(dtype).expand(shape);
  if (expanded.numel() == 0) {  // nothing to weigh: the views below would reach past its storage
    return {WeightKind::Element, expanded.contiguous()};
  }
  const int64_t rank = expanded.dim();
  const int64_t classes = rank == 0 ? 1 : shape.back();
  const bool varies_with_class = rank > 0 && classes > 1 && expanded.stride(-1) != 0;
  bool varies_with_row = false;
  for (int64_t d = 0; d + 1 < rank; ++d) {
    varies_with_row = varies_with_row || (shape[d] > 1 && expanded.stride(d) != 0);
  }
  if (!varies_with_row) {
    const at::Tensor per_class = expanded.as_strided(
        {classes}, {varies_with_class ? expanded.stride(-1) : 0}, expanded.storage_offset());
    return {WeightKind::Class, per_class.contiguous()};
  }
  if (!varies_with_class) {
    const auto leading = rank - 1;
    const at::Tensor per_row = expanded.as_strided(
        shape.slice(0, leading), expanded.strides().slice(0, leading), expanded.storage_offset());
    return {WeightKind::Row, per_row.contiguous()};
  }
  return {WeightKind::Element, expanded.contiguous()};
}

// Whether the kernels read this pair of floating dtypes as it is: always on CPU; on CUDA a fixed
// set (equal dtypes, 16-bit with float32).
bool reads_directly(const at::Tensor& first, const at::Tensor& second) {
#ifdef FOCAL_WITH_CUDA
  return !first.is_cuda() || cuda::reads_dtype_pair(first.scalar_type(), second.scalar_type());
#else
  return true;
#endif
}

// The pair as the kernels can read it: unchanged, or both converted to the promoted dtype
// (rare: mixed precision on CUDA other than 16-bit inputs with float32 targets).
std::pair<at::Tensor, at::Tensor> readable_pair(const at::Tensor& first, const at::Tensor& second) {
  if (reads_directly(first, second)) {
    return {first, second};
  }
  const auto promoted = at::result_type(first, second);
  return {first.to(promoted), second.to(promoted)};
}

// Floating targets make the loss elementwise, so the kernels may take the dimensions in any
// order: inputs laid out densely but not contiguously (channels-last, a transposed matrix), and
// targets laid out alike, are read in place through the permutation of their dimensions that is
// contiguous, and the per-element outputs take the inputs' strides, as torch's elementwise ops
// give a dense layout (the fake kernel, focal_cuda/_ops.py keeps_layout, follows the same rule,
// step for step). Empty where the kernels read contiguous tensors (copies, if the inputs are not).
std::vector<int64_t> in_place_order(const at::Tensor& inputs, const at::Tensor& targets) {
  if (inputs.is_contiguous() || targets.strides() != inputs.strides()) {
    return {};
  }
  std::vector<int64_t> order(inputs.dim());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return inputs.stride(a) > inputs.stride(b); });
  return inputs.permute(order).is_contiguous() ? order : std::vector<int64_t>{};
}

// tensor in dtype, converted only where it is not (a same-dtype to() is still a dispatch);
// undefined stays undefined.
at::Tensor in_dtype(const at::Tensor& tensor, at::ScalarType dtype) {
  return !tensor.defined() || tensor.scalar_type() == dtype ? tensor : tensor.to(dtype);
}

void run_forward(const ForwardArgs& args) {
#ifdef FOCAL_WITH_CUDA
  if (args.inputs.is_cuda()) {
    cuda::forward(args);
    return;
  }
#endif
  cpu::forward(args);
}

void run_backward(const BackwardArgs& args) {
#ifdef FOCAL_WITH_CUDA
  if (args.out.is_cuda()) {
    cuda::backward(args);
    return;
  }
#endif
  cpu::backward(args);
}

// "(alpha, gamma)": the signature's coefficients as the messages name them.
std::string coefficient_names(const FormSignature& signature) {
  std::string names = "(";
  for (int i = 0; i < signature.count; ++i) {
    names += std::string(i > 0 ? ", " : "") + signature.coefficients[i].name;
  }
  return names + ")";
}

// A number as Python's repr writes it, as the user wrote it: the shortest digits that read back
// exactly (a stream's six print alpha=1.0000001 as 1, inside the range it broke), positional
// from 1e-4 to 1e16 (-100000.0, not -1e+05), scientific beyond (1e+39).
std::string python_float(double value) {
  if (std::isnan(value)) {
    return "nan";
  }
  if (std::isinf(value)) {
    return value > 0 ? "inf" : "-inf";
  }
  const double magnitude = std::abs(value);
  const bool positional = magnitude == 0.0 || (magnitude >= 1e-4 && magnitude < 1e16);
  char text[64];
  const auto end = std::to_chars(text, text + sizeof(text), value,
                                 positional ? std::chars_format::fixed
                                            : std::chars_format::scientific).ptr;
  std::string written(text, end);
  return positional && written.find('.') == std::string::npos ? written + ".0" : written;
}

// The coefficients' number and ranges (focal_math.h's table), and the label smoothing.
void check_signature(const FormSignature& signature, const std::vector<double>& coefficients,
                     double label_smoothing) {
  // float32's largest: the kernels' math type for every dtype but float64 (focal_math.h).
  constexpr double kMax = std::numeric_limits<float>::max();
  // Message parts as functions: TORCH_CHECK evaluates its message only when the check fails, and
  // this runs on every call.
  const auto largest = [] { return python_float(kMax) + " (float32's largest)"; };
  const size_t count = coefficients.size();
  TORCH_CHECK_VALUE(count == static_cast<size_t>(signature.count), "the ", signature.name,
                    " takes the coefficients ", coefficient_names(signature), ", got ", count,
                    count == 1 ? " value" : " values");
  for (int i = 0; i < signature.count; ++i) {
    const char* name = signature.coefficients[i].name;
    const double value = coefficients[i];
    const auto got = [value] { return ", got " + python_float(value); };
    switch (signature.coefficients[i].range) {
      case CoefficientRange::UnitOrOff:
        TORCH_CHECK_VALUE(value == -1.0 || (value >= 0.0 && value <= 1.0), name,
                          " must be in [0, 1], or -1 or None to disable the weighting", got());
        break;
      case CoefficientRange::NonNegative:
        TORCH_CHECK_VALUE(value >= 0.0 && value <= kMax, name, " must be >= 0 and at most ",
                          largest(), got());
        break;
      case CoefficientRange::NonNegativeOrOff:
        TORCH_CHECK_VALUE(value == -1.0 || (value >= 0.0 && value <= kMax), name,
                          " must be >= 0 and at most ", largest(), ", or None (or -1) for 1", got());
        break;
      case CoefficientRange::Positive:
        TORCH_CHECK_VALUE(value > 0.0 && value <= kMaxGamma, name, " must be in (0, ",
                          static_cast<int64_t>(kMaxGamma), "]", got());
        break;
      case CoefficientRange::Finite:
        TORCH_CHECK_VALUE(std::abs(value) <= kMax, name, " must be a number of magnitude at most ",
                          largest(), got());
        break;
      case CoefficientRange::Exponent:
        TORCH_CHECK_VALUE(value >= 0.0 && value <= kMaxGamma, name, " must be in [0, ",
                          static_cast<int64_t>(kMaxGamma), "]", got());
        break;
      case CoefficientRange::Flag:
        TORCH_CHECK_VALUE(value == 0.0 || value == 1.0, name, " must be 0 or 1 (False or True)",
                          got());
        break;
    }
  }
  TORCH_CHECK_VALUE(label_smoothing >= 0.0 && label_smoothing < 1.0,
                    "label_smoothing must be in [0, 1), got ", python_float(label_smoothing));
  TORCH_CHECK_VALUE(label_smoothing == 0.0 || signature.smoothable,
                    "label_smoothing must be 0 for the ", signature.name,
                    ", whose targets are soft scores already, got ", python_float(label_smoothing));
}

constexpr int64_t kForms = static_cast<int64_t>(std::size(kFormSignatures));

// "0 (focal loss), 1 (FL*), ... or 3 (varifocal loss)".
std::string form_codes() {
  std::string codes;
  for (int64_t form = 0; form < kForms; ++form) {
    codes += (form == 0 ? "" : form + 1 == kForms ? " or " : ", ") + std::to_string(form) + " (" +
             kFormSignatures[form].name + ")";
  }
  return codes;
}

// The form's coefficients and label smoothing as sigmoid_focal_loss_forward takes them.
void check_form_arguments(int64_t form, const std::vector<double>& coefficients,
                          double label_smoothing) {
  TORCH_CHECK_VALUE(form >= 0 && form < kForms, "form must be ", form_codes(), ", got ", form);
  check_signature(kFormSignatures[form], coefficients, label_smoothing);
}

}  // namespace

void check_cpu_labels(const at::Tensor& labels, int64_t classes, int64_t ignore_index,
                      bool with_background) {
  const at::ScalarType dtype = labels.scalar_type();
  TORCH_CHECK_VALUE(labels.is_cpu() && at::isIntegralType(dtype, /*includeBool=*/false) &&
                        dtype != at::kUInt64,  // whose upper half would wrap to negative labels
                    "labels must be a CPU tensor of an integer dtype int8 to int64 or uint8 to "
                    "uint32, got ", python_name(dtype), " on ", labels.device());
  check_labels_on_cpu(labels.to(at::kLong).contiguous(), classes, ignore_index, with_background);
}

void check_forward_arguments(const at::Tensor& inputs, const at::Tensor& targets,
                             const std::optional<at::Tensor>& weight,
                             const std::optional<at::Tensor>& scores, int64_t form,
                             const std::vector<double>& coefficients, int64_t reduction,
                             int64_t ignore_index, double label_smoothing,
                             bool /*float32_loss*/, int64_t outputs) {
  check_outputs(outputs);
  check_floating(inputs, "inputs");
  check_same_device(targets, inputs, "targets");
  const bool labels = at::isIntegralType(targets.scalar_type(), /*includeBool=*/false);
  check_targets(targets, labels, "a floating-point tensor, or an integer tensor of class labels");
  check_ignore_index(labels, ignore_index, "integer targets (class labels)", "floating targets");
  const bool has_scores = scores.has_value() && scores->defined();
  if (has_scores) {
    TORCH_CHECK_VALUE(labels, "scores go with integer targets (class labels), as in a (labels, "
                      "scores) pair; got targets of dtype ", python_name(targets.scalar_type()));
    check_floating(*scores, "scores");
    check_same_device(*scores, inputs, "scores");
    TORCH_CHECK_VALUE(scores->sym_sizes() == targets.sym_sizes(),
                      "scores must have the shape of the class labels, ", targets.sym_sizes(),
                      ", got ", scores->sym_sizes());
  }
  if (labels) {
    TORCH_CHECK_VALUE(inputs.dim() >= 1, "integer targets (class labels) need inputs with a class "
                      "dimension, its last; got 0-d inputs");
    const auto rows_shape = inputs.sym_sizes().slice(0, inputs.dim() - 1);
    TORCH_CHECK_VALUE(targets.sym_sizes() == rows_shape,
                      "integer targets (class labels) must have the shape of inputs without its "
                      "last (class) dimension, ", rows_shape, ", got ", targets.sym_sizes(),
                      targets.sym_sizes() == inputs.sym_sizes()
                          ? " (one-hot or soft targets must be a floating-point tensor, got " +
                                python_name(targets.scalar_type()) + ": targets.float())"
                          : std::string());
    TORCH_CHECK_VALUE((outputs & kGradTargets) == 0 || has_scores,
                      "integer targets (class labels) have no gradient (scores may have one)");
  } else {
    TORCH_CHECK_VALUE(inputs.sym_sizes() == targets.sym_sizes(),
                      "targets must have the shape of inputs, ", inputs.sym_sizes(), ", got ",
                      targets.sym_sizes(),
                      has_rows_shape(targets, inputs)
                          ? " (class labels of that shape must be an integer tensor, got " +
                                python_name(targets.scalar_type()) + ")"
                          : std::string());
  }
  if (weight.has_value() && weight->defined()) {
    check_floating(*weight, "weight");
    check_same_device(*weight, inputs, "weight");
    TORCH_CHECK_VALUE(broadcasts_to(*weight, inputs),
                      "weight must be broadcastable to the shape of inputs, ", inputs.sym_sizes(),
                      ", got ", weight->sym_sizes(),
                      has_rows_shape(*weight, inputs)
                          ? " (a weight per row needs a last dimension of size 1: "
                            "weight.unsqueeze(-1))"
                          : "");
  }
  check_form_arguments(form, coefficients, label_smoothing);
  checked_reduction(reduction);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> sigmoid_focal_loss_forward(
    const at::Tensor& inputs, const at::Tensor& targets, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& scores, int64_t form, const std::vector<double>& coefficients,
    int64_t reduction, int64_t ignore_index, double label_smoothing, bool float32_loss,
    int64_t outputs) {
  check_forward_arguments(inputs, targets, weight, scores, form, coefficients, reduction,
                          ignore_index, label_smoothing, float32_loss, outputs);
  check_device(inputs, "inputs");
  const bool labels = at::isIntegralType(targets.scalar_type(), /*includeBool=*/false);
  const bool has_scores = scores.has_value() && scores->defined();
  const auto loss_form = static_cast<LossForm>(form);
  const auto mode = static_cast<Reduction>(reduction);

  ForwardArgs args;
  args.labels = labels;
  args.classes = inputs.dim() == 0 ? 1 : inputs.size(-1);
  TORCH_CHECK_VALUE(!labels || !inputs.is_cuda() || args.classes <= kMaxCudaLabelClasses,
                    "with class labels on CUDA, inputs' last dimension (the classes) must be at "
                    "most ", kMaxCudaLabelClasses, ", got ", args.classes);
  args.ignore_index = ignore_index;
  args.form = loss_form;
  args.coefficients = form_scalars(kFormSignatures[form], coefficients.data());
  args.label_smoothing = label_smoothing;
  args.reduction = mode;

  // Floating targets have inputs' shape (checked), so torch's promotion is the dtypes' alone.
  const at::ScalarType promoted =
      labels ? inputs.scalar_type() : c10::promoteTypes(inputs.scalar_type(), targets.scalar_type());
  const at::ScalarType loss_dtype = result_dtype(promoted, float32_loss);
  // Autocast's float32 result: float32 targets give it (only the targets are converted).
  const at::Tensor floating_targets =
      labels || loss_dtype == promoted ? targets : targets.to(at::kFloat);
  if (labels) {
    args.inputs = inputs.contiguous();
    args.targets = targets.to(at::kLong).contiguous();  // before any comparison: no wrapping
    check_labels_on_cpu(args.targets, args.classes, ignore_index, /*with_background=*/true);
    if (has_scores) {
      args.scores = scores->to(math_dtype(loss_dtype)).contiguous();
    }
  }
  std::vector<int64_t> order;  // in_place_order's permutation, or empty
  if (!labels) {
    order = in_place_order(inputs, targets);  // as given: autocast's conversion keeps strides
    const auto read = [&](const at::Tensor& tensor) {
      return order.empty() ? tensor.contiguous() : tensor.permute(order);
    };
    std::tie(args.inputs, args.targets) = readable_pair(read(inputs), read(floating_targets));
    args.classes = args.inputs.dim() == 0 ? 1 : args.inputs.size(-1);
  }
  args.weight_kind = WeightKind::None;
  if (weight.has_value() && weight->defined()) {
    at::Tensor aligned = *weight;
    if (!order.empty()) {  // broadcast from the right first, then permuted as the inputs are
      std::vector<int64_t> shape(inputs.dim() - weight->dim(), 1);
      shape.insert(shape.end(), weight->sizes().begin(), weight->sizes().end());
      aligned = weight->reshape(shape).permute(order);
    }
    std::tie(args.weight_kind, args.weight) =
        weight_for_kernels(aligned, args.inputs, math_dtype(loss_dtype));
  }

  const auto& x = args.inputs;
  // A per-element output: in the inputs' layout, seen by the kernels through order, or
  // contiguous.
  const auto per_element = [&](const at::TensorOptions& options) {
    return order.empty() ? at::empty(x.sizes(), options)
                         : at::empty_strided(inputs.sizes(), inputs.strides(), options).permute(order);
  };
  const auto loss_options = x.options().dtype(loss_dtype);
  args.loss = mode == Reduction::None ? per_element(loss_options) : at::empty({}, loss_options);
  if ((outputs & kGradInputs) != 0) {
    args.grad_inputs = per_element(x.options().dtype(saved_dtype(x.scalar_type())));
  }
  if ((outputs & kGradTargets) != 0 && labels) {
    args.grad_scores = at::zeros(args.scores.sizes(), args.scores.options());
  } else if ((outputs & kGradTargets) != 0) {
    args.grad_targets =
        per_element(args.targets.options().dtype(saved_dtype(args.targets.scalar_type())));
  }
  if ((outputs & kUnweightedLoss) != 0) {
    args.unweighted_loss = per_element(loss_options.dtype(saved_dtype(loss_dtype)));
  }
  args.count = at::empty({}, x.options().dtype(at::kLong));

  if (x.numel() == 0) {
    fill_result_of_nothing(args.loss, args.count, mode);
  } else {
    run_forward(args);
  }

  // Outputs not requested stay undefined (None); one computed in a converted dtype goes back to
  // the saved dtype of what it differentiates; per-element ones read through order are given
  // back the inputs' dimension order.
  std::vector<int64_t> inverse(order.size());
  for (size_t d = 0; d < order.size(); ++d) {
    inverse[order[d]] = static_cast<int64_t>(d);
  }
  const auto restored = [&](const at::Tensor& output) {
    return !order.empty() && output.defined() && output.dim() > 0 ? output.permute(inverse) : output;
  };
  auto finish = [&](const at::Tensor& output, const at::Tensor& like) {
    return in_dtype(restored(output), saved_dtype(like.scalar_type()));
  };
  const at::Tensor grad_targets = has_scores ? finish(args.grad_scores, *scores)
                                            : finish(args.grad_targets, targets);
  return {restored(args.loss), finish(args.grad_inputs, inputs), grad_targets,
          finish(args.unweighted_loss, args.loss), args.count};
}

namespace {

// values (of dense's shape) laid out in dense's memory order, copied only where they are not.
at::Tensor in_memory_order_of(const at::Tensor& dense, const at::Tensor& values) {
  if (values.strides() == dense.strides()) {
    return values;
  }
  return at::empty_like(dense, values.options()).copy_(values);
}

}  // namespace

void check_backward_arguments(const at::Tensor& grad_output, const at::Tensor& saved_grad,
                              const at::Tensor& count, int64_t reduction) {
  check_floating(grad_output, "grad_output");
  check_floating(saved_grad, "saved_grad");
  TORCH_CHECK(grad_output.device() == saved_grad.device() && count.device() == saved_grad.device(),
              "grad_output, saved_grad and count must be on one device, got ", grad_output.device(),
              ", ", saved_grad.device(), " and ", count.device());
  // Any dense layout (the softmax loss saves its gradient in the inputs' strides): the kernels
  // read it, grad_output and out as flat arrays in the same memory order.
  TORCH_CHECK(saved_grad.is_non_overlapping_and_dense(),
              "saved_grad must be dense, as the forward ops return it, got sizes ",
              saved_grad.sym_sizes(), " and strides ", saved_grad.sym_strides());
  TORCH_CHECK(count.sym_numel() == 1 &&
                  (count.scalar_type() == at::kLong || count.scalar_type() == at::kDouble),
              "count must be the 0-d int64 (or float64, the softmax loss's) tensor the forward op "
              "returns, got ", python_name(count.scalar_type()), " of shape ", count.sym_sizes());
  if (checked_reduction(reduction) == Reduction::None) {
    TORCH_CHECK(grad_output.sym_sizes() == saved_grad.sym_sizes(),
                "grad_output must have the shape of the loss, ", saved_grad.sym_sizes(), ", got ",
                grad_output.sym_sizes());
  } else {
    TORCH_CHECK(grad_output.sym_numel() == 1,
                "grad_output of a reduced loss must have one element, got shape ",
                grad_output.sym_sizes());
  }
}

namespace {

// Checks the backward's arguments and fills args but for out. grad_output is read as it is
// where the kernels can; otherwise it is converted (saved_grad too when not in_place).
BackwardArgs prepare_backward(const at::Tensor& grad_output, const at::Tensor& saved_grad,
                              const at::Tensor& count, int64_t reduction, bool in_place) {
  check_backward_arguments(grad_output, saved_grad, count, reduction);
  check_device(saved_grad, "saved_grad");
  const Reduction mode = static_cast<Reduction>(reduction);
  const int64_t n = saved_grad.numel();

  BackwardArgs args;
  // A float64 count is a weighted mean's divisor: folded into grad_output below.
  const bool weighted_mean = mode == Reduction::Mean && count.scalar_type() == at::kDouble;
  // Scalars reshaped, viewed or converted only when they need it: each ATen call costs a
  // dispatch, a noticeable share of a small step's backward.
  const at::Tensor scalar_count = count.dim() == 0 ? count : count.reshape({});
  if (mode == Reduction::Mean && !weighted_mean) {
    args.divisor = scalar_count;
  }
  if (mode == Reduction::None) {
    // An expanded scalar (e.g. from loss.sum().backward()) is read as the one value it is.
    bool expanded_scalar = n > 0;
    for (const auto stride : grad_output.strides()) {
      expanded_scalar = expanded_scalar && stride == 0;
    }
    args.grad_output_is_scalar = expanded_scalar || n == 1;
  } else {
    args.grad_output_is_scalar = true;
  }
  args.saved_grad = saved_grad;
  if (args.grad_output_is_scalar) {
    // One value, taken in the math type of saved_grad (float64 or float32): read as it is.
    at::Tensor value = grad_output.dim() == 0
                           ? grad_output
                           : grad_output.as_strided({}, {}, grad_output.storage_offset());
    if (weighted_mean) {  // zero where nothing counted (a weight sum may be negative)
      value = at::where(scalar_count != 0, value / scalar_count, at::zeros_like(scalar_count));
    }
    const auto dtype = math_dtype(saved_grad.scalar_type());
    args.grad_output = value.scalar_type() == dtype ? value : value.to(dtype);
  } else if (in_place) {
    // saved_grad stays as it is; an unreadable grad_output is taken in its math type.
    args.grad_output = in_memory_order_of(saved_grad, grad_output);
    if (!reads_directly(saved_grad, args.grad_output)) {
      args.grad_output = args.grad_output.to(math_dtype(saved_grad.scalar_type()));
    }
  } else {
    std::tie(args.saved_grad, args.grad_output) =
        readable_pair(saved_grad, in_memory_order_of(saved_grad, grad_output));
  }
  return args;
}

}  // namespace

at::Tensor sigmoid_focal_loss_backward(const at::Tensor& grad_output, const at::Tensor& saved_grad,
                                       const at::Tensor& count, int64_t reduction) {
  BackwardArgs args = prepare_backward(grad_output, saved_grad, count, reduction, false);
  args.out = at::empty_like(args.saved_grad);
  if (args.out.numel() > 0) {
    run_backward(args);
  }
  return args.out.to(saved_grad.scalar_type());
}

void sigmoid_focal_loss_backward_(const at::Tensor& grad_output, const at::Tensor& saved_grad,
                                  const at::Tensor& count, int64_t reduction) {
  BackwardArgs args = prepare_backward(grad_output, saved_grad, count, reduction, true);
  args.out = saved_grad;  // each element is read, then written, by the same thread
  if (args.out.numel() > 0) {
    run_backward(args);
  }
}

namespace {

// The class dimension: 1, or 0 for unbatched (C) inputs, as F.cross_entropy takes them.
int64_t class_dim(const at::Tensor& inputs) { return inputs.dim() == 1 ? 0 : 1; }

// The positions' shape: inputs' without the class dimension dim.
std::vector<c10::SymInt> positions_shape(const at::Tensor& inputs, int64_t dim) {
  std::vector<c10::SymInt> shape(inputs.sym_sizes().begin(), inputs.sym_sizes().end());
  shape.erase(shape.begin() + dim);
  return shape;
}

// What softmax targets of the wrong shape were likely meant to be, for the error message only:
// a one-hot integer tensor meant as probabilities, floating class indices (F.cross_entropy
// refuses them too), or class indices that kept a class dimension of size 1 ((N, 1, H, W) masks).
std::string softmax_target_shape_hint(const at::Tensor& inputs, const at::Tensor& targets,
                                      int64_t dim, bool class_indices) {
  const auto positions = positions_shape(inputs, dim);
  std::vector<c10::SymInt> one_class(inputs.sym_sizes().begin(), inputs.sym_sizes().end());
  one_class[dim] = 1;
  const auto shape = targets.sym_sizes();
  const std::string dtype = python_name(targets.scalar_type());
  if (class_indices && shape == inputs.sym_sizes()) {
    return " (class probabilities must be a floating-point tensor, got " + dtype + ")";
  }
  if (!class_indices && shape == c10::SymIntArrayRef(positions)) {
    return " (class indices must be an integer tensor, got " + dtype + ")";
  }
  if (shape == c10::SymIntArrayRef(one_class)) {
    return " (class indices without the class dimension of size 1: targets.squeeze(" +
           std::to_string(dim) + ")" + (class_indices ? "" : ".long()") + ")";
  }
  return "";
}

// inputs as (N, C, S) (see SoftmaxArgs), read where they lie in the layouts the kernels index
// directly: contiguous (NCHW), channels-last (NHWC, NDHWC) and (N, C) of either order;
// any other layout is copied to contiguous. The per-element outputs take the strides of what
// the kernels read, so that they are the inputs' own in those layouts (the fake kernel,
// focal_cuda/_softmax.py, follows the same rule). position_stride: that of a sample's positions.
at::Tensor as_batched(const at::Tensor& inputs, int64_t& position_stride) {
  const at::Tensor x = inputs.dim() == 1 ? inputs.unsqueeze(0) : inputs;
  position_stride = 1;
  if (x.is_contiguous() || (x.dim() == 2 && x.t().is_contiguous())) {
    return x;
  }
  if ((x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast)) ||
      (x.dim() == 5 && x.is_contiguous(at::MemoryFormat::ChannelsLast3d))) {
    position_stride = x.size(1);  // the classes lie innermost
    return x;
  }
  return x.contiguous();
}

}  // namespace

void check_softmax_options(const std::vector<double>& coefficients, double label_smoothing) {
  check_signature(kSoftmaxSignature, coefficients, label_smoothing);
}

void check_softmax_arguments(const at::Tensor& inputs, const at::Tensor& targets,
                             const std::optional<at::Tensor>& weight,
                             const std::vector<double>& coefficients, int64_t reduction,
                             int64_t ignore_index, double label_smoothing,
                             bool /*float32_loss*/, int64_t outputs) {
  check_outputs(outputs);
  check_floating(inputs, "inputs");
  TORCH_CHECK_VALUE(inputs.dim() >= 1, "inputs must have a class dimension (shape (C), (N, C) or "
                    "(N, C, d1, ...)), got a 0-d tensor");
  const int64_t dim = class_dim(inputs);
  TORCH_CHECK_VALUE(TORCH_GUARD_SIZE_OBLIVIOUS(inputs.sym_size(dim).sym_ne(0)),
                    "inputs must have at least one class along dimension ", dim, ", got shape ",
                    inputs.sym_sizes());
  check_same_device(targets, inputs, "targets");
  const bool labels = at::isIntegralType(targets.scalar_type(), /*includeBool=*/false);
  check_targets(targets, labels,
                "class indices (an integer tensor) or class probabilities (a floating-point tensor)");
  check_ignore_index(labels, ignore_index, "class-index targets", "class-probability targets");
  if (labels) {
    const auto position_shape = positions_shape(inputs, dim);
    TORCH_CHECK_VALUE(targets.sym_sizes() == c10::SymIntArrayRef(position_shape),
                      "class-index targets must have the shape of inputs without its class "
                      "dimension ", dim, ", ", c10::SymIntArrayRef(position_shape), ", got ",
                      targets.sym_sizes(), softmax_target_shape_hint(inputs, targets, dim, true));
    TORCH_CHECK_VALUE((outputs & kGradTargets) == 0, "class-index targets have no gradient");
  } else {
    TORCH_CHECK_VALUE(targets.sym_sizes() == inputs.sym_sizes(),
                      "class-probability targets must have the shape of inputs, ",
                      inputs.sym_sizes(), ", got ", targets.sym_sizes(),
                      softmax_target_shape_hint(inputs, targets, dim, false));
  }
  if (weight.has_value() && weight->defined()) {
    check_floating(*weight, "weight");
    check_same_device(*weight, inputs, "weight");
    TORCH_CHECK_VALUE(weight->dim() == 1 && weight->sym_size(0) == inputs.sym_size(dim),
                      "weight must have one value per class, shape (", inputs.sym_size(dim),
                      "), got ", weight->sym_sizes());
  }
  check_softmax_options(coefficients, label_smoothing);
  checked_reduction(reduction);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> softmax_focal_loss_forward(
    const at::Tensor& inputs, const at::Tensor& targets, const std::optional<at::Tensor>& weight,
    const std::vector<double>& coefficients, int64_t reduction, int64_t ignore_index,
    double label_smoothing, bool float32_loss, int64_t outputs) {
  check_softmax_arguments(inputs, targets, weight, coefficients, reduction, ignore_index,
                          label_smoothing, float32_loss, outputs);
  check_device(inputs, "inputs");
  const bool labels = !targets.is_floating_point();
  SoftmaxArgs args;
  const at::Tensor x = as_batched(inputs, args.position_stride);
  args.inputs = x;
  args.batch = x.size(0);
  args.classes = x.size(1);
  args.positions = 1;
  for (int64_t d = 2; d < x.dim(); ++d) {
    args.positions *= x.size(d);
  }
  args.batch_stride = x.stride(0);
  args.class_stride = x.stride(1);
  TORCH_CHECK_VALUE(!x.is_cpu() || x.scalar_type() == at::kDouble ||
                        args.classes <= kMaxCpuFloatSoftmaxClasses,
                    "on CPU, inputs of dtype ", python_name(x.scalar_type()), " may have at most ",
                    kMaxCpuFloatSoftmaxClasses, " classes (float32's exact integers; float64 "
                    "inputs may have more), got ", args.classes);
  args.ignore_index = ignore_index;
  const FormScalars scalars = form_scalars(kSoftmaxSignature, coefficients.data());
  args.alpha = scalars.alpha;
  args.gamma = scalars.gamma;
  args.label_smoothing = label_smoothing;
  args.reduction = static_cast<Reduction>(reduction);

  const auto math = math_dtype(x.scalar_type());
  const auto like_inputs = [&](at::ScalarType dtype) {
    return at::empty_strided(x.sizes(), x.strides(), x.options().dtype(dtype));
  };
  if (labels) {
    args.labels = targets.to(at::kLong).contiguous();  // before any comparison: no wrapping
    check_labels_on_cpu(args.labels, args.classes, ignore_index, /*with_background=*/false);
  } else {
    // In the math dtype: 16-bit logits must not round float32 probabilities.
    const at::Tensor t = (inputs.dim() == 1 ? targets.unsqueeze(0) : targets).to(math);
    args.probabilities = t.strides() == x.strides() ? t : like_inputs(math).copy_(t);
  }
  if (weight.has_value() && weight->defined()) {
    args.weight = weight->to(math).contiguous();
  }
  const int64_t num_positions = args.batch * args.positions;
  // "none": the positions' losses in the shape the op returns, not a view a user could not
  // write to (autograd forbids in-place changes of a Function's view outputs).
  std::vector<int64_t> loss_shape;
  if (args.reduction == Reduction::None) {
    loss_shape = inputs.sizes().vec();
    loss_shape.erase(loss_shape.begin() + class_dim(inputs));
  }
  args.loss = at::empty(loss_shape, x.options().dtype(math));
  if ((outputs & kGradInputs) != 0) {
    args.grad_inputs = like_inputs(saved_dtype(x.scalar_type()));
  }
  if ((outputs & kGradTargets) != 0) {
    args.grad_targets = like_inputs(math);
  }
  if ((outputs & kUnweightedLoss) != 0) {
    args.unweighted_loss = like_inputs(math);
  }
  args.divisor = at::empty({}, x.options().dtype(at::kDouble));

  if (num_positions == 0) {
    fill_result_of_nothing(args.loss, args.divisor, args.reduction);
  } else {
#ifdef FOCAL_WITH_CUDA
    if (x.is_cuda()) {
      cuda::softmax_forward(args);
    } else
#endif
    {
      cpu::softmax_forward(args);
    }
  }

  // The outputs in the inputs' shape and the dtypes the autograd formulas expect: the loss in the
  // inputs' dtype (float32 for 16-bit inputs under autocast), the target gradient in the saved
  // dtype of the targets; outputs not requested undefined (None).
  const at::ScalarType loss_dtype = result_dtype(inputs.scalar_type(), float32_loss);
  const auto shaped = [&](const at::Tensor& output, at::ScalarType dtype) {
    return in_dtype(output.defined() && inputs.dim() == 1 ? output.squeeze(0) : output, dtype);
  };
  return {in_dtype(args.loss, loss_dtype), shaped(args.grad_inputs, saved_dtype(inputs.scalar_type())),
          shaped(args.grad_targets, saved_dtype(targets.scalar_type())),
          shaped(args.unweighted_loss, math), args.divisor};
}

}  // namespace focal
