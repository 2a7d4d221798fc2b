"""The public losses and their nn.Modules: the sigmoid focal loss, its family (FL*, quality focal
loss, varifocal loss) and the softmax focal loss; the options converted to what the fused ops
take, and the path to them.

The table of the sigmoid family: each form is declared here once, by its public function
decorated with _family_form (its op code and its terms: its elementwise loss in PyTorch
operations, which focal_cuda.reference computes and the higher-order paths differentiate), and
its module made from that function by _family_module. A new form adds its terms to
csrc/focal_math.h and such a declaration here, and its formulas to the tests that name the
forms one by one (README, "How it works", says which).
"""

import inspect
import numbers
from typing import Callable, NamedTuple, Optional, Tuple, TypeVar

import torch

from . import _ops
from .reference import FORMS, alpha_t, bce_with_logits, distance, one_minus_p_t, power, register_form, softplus
from . import _C
from ._function import FusedFocalLoss
from . import _higher_order, _softmax

# What focal_cuda exports (its __init__ re-exports this list): a new loss form's function and
# module are added here, not there.
__all__ = [
    "sigmoid_focal_loss", "SigmoidFocalLoss", "sigmoid_focal_loss_star", "SigmoidFocalLossStar",
    "quality_focal_loss", "QualityFocalLoss", "varifocal_loss", "VarifocalLoss",
    "softmax_focal_loss", "SoftmaxFocalLoss",
]


_GRAD_INPUTS, _GRAD_TARGETS, _UNWEIGHTED_LOSS = _ops.GRAD_INPUTS, _ops.GRAD_TARGETS, _ops.UNWEIGHTED_LOSS


def _check_tensor(value, name):
    # Only that it is a tensor: what a tensor holds (dtype, shape, device) the op checks, once, in
    # C++ (csrc/focal_ops.cpp, check_forward_arguments), on every path and in the fake kernel.
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")


def _split_targets(targets):
    """(targets, scores): a pair (labels, scores) split, else (targets, None)."""
    if not isinstance(targets, (tuple, list)):
        _check_tensor(targets, "targets")
        return targets, None
    if len(targets) != 2 or not all(isinstance(item, torch.Tensor) for item in targets):
        got = ", ".join(type(item).__name__ for item in targets)
        raise TypeError(
            "targets must be a torch.Tensor, or a (labels, scores) tuple of two tensors, got a "
            f"{type(targets).__name__} of {len(targets)} items ({got})"
        )
    return targets[0], targets[1]


def _real_number(value):
    # The exact types first: an isinstance against the numbers ABCs costs ~0.4 us a call.
    return type(value) in (float, int) or isinstance(value, numbers.Real) and not isinstance(value, bool)


# The scalar options are only converted here, to what the op takes; their ranges the op checks
# (against csrc/focal_math.h's kFormSignatures), naming them as these functions do.


def _as_float(value, name):
    if type(value) is float:  # the common case, first: every call converts three or four
        return value
    if _real_number(value):
        try:
            return float(value)
        except OverflowError:  # an int past float64's range: past every coefficient's too
            raise ValueError(f"{name} must be a real number that float64 holds, got {value!r}") from None
    raise ValueError(f"{name} must be a real number, got {_described(value, name)}")


def _as_flag(value, name):
    """A bool option as the op's coefficient: 1.0 or 0.0."""
    if type(value) is bool:
        return float(value)
    # A tensor by its type only, as _described: no repr, which torch.compile cannot trace.
    got = f"a {type(value).__name__}" if isinstance(value, torch.Tensor) else repr(value)
    raise ValueError(f"{name} must be a bool (True or False), got {got}")


def _described(value, name):
    # A tensor by its kind and shape, not its repr, which torch.compile cannot trace; not
    # converted here, which would read a CUDA tensor back to the host on every call.
    if not isinstance(value, torch.Tensor):
        return repr(value)
    if value.dim() == 0:
        return f"a {type(value).__name__} (float() or int() of a 0-d tensor gives the number)"
    # Hand-written focal losses often take a per-class alpha; F.cross_entropy's third argument is weight.
    per_class = "; per-class factors go in weight=" if name == "alpha" else ""
    return f"a {type(value).__name__} of shape {list(value.shape)} (one number is expected{per_class})"


def _as_alpha(alpha):
    """alpha as the op takes it: None (no weighting) is -1."""
    return -1.0 if alpha is None else _as_float(alpha, "alpha")


_LOWER_THAN_FLOAT64 = (torch.float16, torch.bfloat16, torch.float32)


def _float32_loss(inputs):
    """The op's float32_loss: whether 16-bit inputs give a float32 loss, as under torch.autocast
    (the only dtypes it changes; autocast exists for CPU and CUDA only, not e.g. meta tensors)."""
    return inputs.dtype in _ops.SIXTEEN_BIT_DTYPES and (
        inputs.is_cuda and torch.is_autocast_enabled("cuda")
        or inputs.is_cpu and torch.is_autocast_enabled("cpu"))


def _reduction_code(reduction):
    if isinstance(reduction, str) and reduction in _ops.REDUCTION_CODES:
        return _ops.REDUCTION_CODES[reduction]
    raise ValueError(f"reduction must be one of 'none', 'mean', 'sum', got {reduction!r}")


def _as_index(ignore_index):
    if type(ignore_index) is int or isinstance(ignore_index, numbers.Integral) and not isinstance(ignore_index, bool):
        if -2**63 <= ignore_index < 2**63:  # the op's int64
            return int(ignore_index)
        raise ValueError(f"ignore_index must be an integer in int64's range, got {ignore_index!r}")
    raise ValueError(f"ignore_index must be an integer, got {_described(ignore_index, 'ignore_index')}")


_Function = TypeVar("_Function", bound=Callable[..., torch.Tensor])


def _family_form(key: str, code: int, terms: Callable[..., torch.Tensor]) -> Callable[[_Function], _Function]:
    """Declares the decorated public function the sigmoid family's form key: code its LossForm
    in csrc/focal_math.h, terms(x, t, *coefficients) its elementwise loss before validity and
    weight in PyTorch operations, its parameters after (x, t) the op's coefficients in order."""
    def declare(function: _Function) -> _Function:  # typed: checkers keep the function's signature
        register_form(key, code, terms, function)
        return function
    return declare


def _focal_terms(x, t, alpha, gamma):
    """alpha_t * (1 - p_t) ** gamma * BCE, multiplied left to right as the kernels do."""
    return alpha_t(alpha, t) * power(one_minus_p_t(x, t), gamma) * bce_with_logits(x, t)


@_family_form("focal", 0, _focal_terms)
def sigmoid_focal_loss(
    inputs: torch.Tensor,
    targets: torch.Tensor,
    alpha: Optional[float] = 0.25,
    gamma: float = 2.0,
    reduction: str = "none",
    weight: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Sigmoid focal loss (Lin et al., RetinaNet), fused with its gradient in one kernel pass.

    A drop-in for ``torchvision.ops.sigmoid_focal_loss``, equivalent to
    ``focal_cuda.reference.sigmoid_focal_loss``::

        t = targets * (1 - label_smoothing) + label_smoothing / 2
        ce = binary_cross_entropy_with_logits(inputs, t, reduction="none")
        q = t * sigmoid(-inputs) + (1 - t) * sigmoid(inputs)        # 1 - p_t
        alpha_t = alpha * t + (1 - alpha) * (1 - t)                 # 1 if alpha is -1/None
        loss = weight * alpha_t * q ** gamma * ce, then reduced

    Args:
        inputs: logits, a float16/bfloat16/float32/float64 tensor of any shape and strides.
        targets: either floating, of the shape of ``inputs``, in [0, 1] (soft targets allowed;
            other values continue the formula, as torchvision's);
            or integer class labels of shape ``inputs.shape[:-1]`` over the C classes of the
            last dimension: label c makes class c positive and the others negative, label C is
            background (all negative), ``ignore_index`` drops the row. No one-hot is built.
            Or a pair ``(labels, scores)``, scores floating of the labels' shape: class c of a
            row labelled c gets the target ``scores[row]`` (e.g. an IoU), the others 0, as the
            dense soft target would, without building it; differentiable w.r.t. the scores.
            The loss then has the dtype of ``inputs`` (as with labels). Not under TorchScript.
        alpha: weight of the positive class in [0, 1]; -1 or None switches the weighting off.
        gamma: focusing exponent in [0, 1000], fractional values included.
        reduction: ``"none"`` (loss per element), ``"mean"`` (over the elements not ignored) or
            ``"sum"``.
        weight: optional floating tensor broadcastable to ``inputs`` (per class ``(C,)``, per
            row ``(N, 1)``, per element), multiplying the elementwise loss. Differentiable.
        ignore_index: with integer targets, the label of rows that contribute no loss and no
            gradient and are left out of the mean. With floating targets, which name no row to
            ignore, it must be negative (the default), as ``F.cross_entropy`` requires of class
            probabilities.
        label_smoothing: in [0, 1); targets become ``t * (1 - eps) + eps / 2``.

    Returns:
        The loss: the shape of ``inputs`` for ``"none"``, else 0-d. Its dtype is the one PyTorch
        promotion gives ``inputs`` and floating ``targets`` (the dtype of ``inputs`` with
        labels), float32 for 16-bit operands under ``torch.autocast`` as torchvision's is there.
        Differentiable with respect to ``inputs``, floating ``targets`` and ``weight``; the
        gradients are computed in the forward pass only when needed, and are finite for every
        gamma in [0, 1000] and every finite logit (the one w.r.t. ``targets``, which grows like
        the logit, overflows to inf beyond about 3.4e38 / (gamma + 1), 1.8e308 / (gamma + 1)
        in float64).

    Raises:
        ValueError: an argument outside what is accepted above; on CPU also a label that is not
            a class, the background or ``ignore_index`` (on CUDA a device-side assertion).
        TypeError: inputs, targets or weight not a tensor (targets: nor a (labels, scores) pair).
    """
    if torch.jit.is_scripting():
        return _scripted_sigmoid_focal_loss(inputs, targets, alpha, gamma, reduction, weight,
                                            ignore_index, label_smoothing)
    return _fused_loss(FORMS["focal"], inputs, targets, [_as_alpha(alpha), _as_float(gamma, "gamma")],
                       reduction, weight, ignore_index, label_smoothing)


def _star_terms(x, t, alpha, gamma, beta):
    """alpha_t * (softplus(-(gamma * (2t - 1) * x + beta)) / gamma), the quotient first as in
    the kernels."""
    return alpha_t(alpha, t) * (softplus(-(gamma * (2 * t - 1) * x + beta)) / gamma)


@_family_form("star", 1, _star_terms)
def sigmoid_focal_loss_star(
    inputs: torch.Tensor,
    targets: torch.Tensor,
    alpha: Optional[float] = -1,
    gamma: float = 1.0,
    reduction: str = "none",
    beta: float = 0.0,
    weight: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """FL*, the focal loss's alternative form (Lin et al., appendix A), fused with its gradient.

    fvcore's ``sigmoid_focal_loss_star`` (same signature and defaults, beta = 0 there) plus the
    paper's beta; equivalent to ``focal_cuda.reference.sigmoid_focal_loss_star``::

        t = targets * (1 - label_smoothing) + label_smoothing / 2
        z = gamma * (2 * t - 1) * inputs + beta                     # gamma * x_t + beta
        alpha_t = alpha * t + (1 - alpha) * (1 - t)                 # 1 if alpha is -1/None
        loss = weight * alpha_t * softplus(-z) / gamma, then reduced  # -log(sigmoid(z)) / gamma

    gamma must be > 0. ``targets``, ``weight``, ``ignore_index``, ``label_smoothing``, the
    dtypes and the gradients (w.r.t. inputs, floating targets, weight) as in
    ``sigmoid_focal_loss``. Not scriptable by TorchScript.
    """
    return _fused_loss(FORMS["star"], inputs, targets,
                       [_as_alpha(alpha), _as_float(gamma, "gamma"), _as_float(beta, "beta")],
                       reduction, weight, ignore_index, label_smoothing)


def _quality_terms(x, t, beta):
    """|p - t| ** beta * BCE."""
    return power(distance(x, t), beta) * bce_with_logits(x, t)


@_family_form("quality", 2, _quality_terms)
def quality_focal_loss(
    inputs: torch.Tensor,
    targets: torch.Tensor,
    beta: float = 2.0,
    reduction: str = "mean",
    weight: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Quality focal loss (Li et al. 2020, GFL), fused with its gradient.

    For soft (IoU-quality) targets t in [0, 1]; equivalent to
    ``focal_cuda.reference.quality_focal_loss`` and, element by element, to mmdet's
    ``quality_focal_loss`` (which sums each anchor's classes before it reduces: README)::

        loss = weight * BCE(sigmoid(inputs), t) * |t - sigmoid(inputs)| ** beta, then reduced

    beta in [0, 1000]. ``targets`` (floating, or integer class labels meaning score 1), ``weight``,
    ``ignore_index``, the dtypes and the gradients as in ``sigmoid_focal_loss``; no alpha and no
    label smoothing (the targets are soft scores already). The gradient is finite at saturated
    logits for every beta; for beta < 1 it is unbounded near sigmoid(inputs) == t, as the
    loss's is. Not scriptable by TorchScript.
    """
    return _fused_loss(FORMS["quality"], inputs, targets, [_as_float(beta, "beta")], reduction, weight,
                       ignore_index, 0.0)


def _varifocal_terms(x, t, alpha, gamma, detach_modulation):
    """(t where t > 0, else alpha * |p - t| ** gamma) * BCE, p detached in the modulation when
    detach_modulation."""
    modulated = x.detach() if detach_modulation else x
    return torch.where(t > 0, t, alpha * power(distance(modulated, t), gamma)) * bce_with_logits(x, t)


@_family_form("varifocal", 3, _varifocal_terms)
def varifocal_loss(
    inputs: torch.Tensor,
    targets: torch.Tensor,
    alpha: float = 0.75,
    gamma: float = 2.0,
    reduction: str = "mean",
    weight: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    detach_modulation: bool = False,
) -> torch.Tensor:
    """Varifocal loss (Zhang et al. 2021, VarifocalNet), fused with its gradient.

    For soft (IoU-quality) targets t in [0, 1]: positives (t > 0) are weighted by their score,
    negatives down-weighted focally. Equivalent to ``focal_cuda.reference.varifocal_loss`` and
    mmdet's ``varifocal_loss`` with ``iou_weighted=True``; with ``detach_modulation=True``, to
    RT-DETR's (and the DETRs built on its criterion), whose modulation carries no gradient::

        p = sigmoid(inputs)
        modulation = t if t > 0 else alpha * |p - t| ** gamma   (p detached: detach_modulation)
        loss = weight * BCE(p, t) * modulation, then reduced

    alpha >= 0, gamma in [0, 1000]; detach_modulation a bool (the same loss either way).
    ``targets`` (floating, or integer class labels meaning score 1), ``weight``,
    ``ignore_index``, the dtypes and the gradients as in ``sigmoid_focal_loss``; no label
    smoothing (it would turn every negative into a positive). The loss jumps at t = 0; the
    gradient w.r.t. targets there is the negative branch's. Not scriptable by TorchScript.
    """
    coefficients = [_as_float(alpha, "alpha"), _as_float(gamma, "gamma"),
                    _as_flag(detach_modulation, "detach_modulation")]
    return _fused_loss(FORMS["varifocal"], inputs, targets, coefficients, reduction, weight, ignore_index, 0.0)


def softmax_focal_loss(
    inputs: torch.Tensor,
    targets: torch.Tensor,
    alpha: Optional[float] = None,
    gamma: float = 2.0,
    reduction: str = "mean",
    weight: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Softmax focal loss (the multi-class focal loss of Lin et al.), fused with its gradient.

    ``F.cross_entropy``'s arguments and semantics, with the focal factor: for p = softmax(inputs)
    over the classes and q the targets (one-hot for class indices, smoothed as
    ``F.cross_entropy`` smooths them), equivalent to
    ``focal_cuda.reference.softmax_focal_loss``::

        loss = -alpha * sum_c weight[c] * q_c * (1 - p_c) ** gamma * log(p_c), then reduced

    At gamma 0 with alpha None it is ``F.cross_entropy(inputs, targets, weight, ...)``.

    Args:
        inputs: logits of shape (N, C), (N, C, d1, ..., dk) or (C); float16, bfloat16, float32
            or float64, any strides (NCHW and channels-last maps are read in place).
        targets: class indices of shape (N), (N, d1, ..., dk) or () (any integer dtype but
            uint64), with ``ignore_index``; or class probabilities of the inputs' shape
            (floating, differentiable).
        alpha: a factor on the whole loss (>= 0); None (or -1, as for the sigmoid losses) means 1.
        gamma: focusing exponent in [0, 1000], fractional values included.
        reduction: ``"none"`` (loss per position), ``"mean"`` (over the positions not ignored,
            divided by their summed class weight as ``F.cross_entropy`` does; with
            probabilities, by the number of positions) or ``"sum"``.
        weight: optional per-class weights of shape (C), floating. Differentiable.
        ignore_index: with class indices, the target of positions that contribute nothing; with
            class probabilities it must be negative (the default), as ``F.cross_entropy``
            requires: they name no position to ignore.
        label_smoothing: in [0, 1); q becomes ``q * (1 - eps) + eps / C``.

    Returns:
        The loss: of the targets' (positions') shape for ``"none"``, else 0-d, in the inputs'
        dtype promoted with probability targets' (float32 for 16-bit inputs under
        ``torch.autocast``), as ``F.cross_entropy``'s; ``weight``'s dtype does not change it.
        Differentiable with respect to ``inputs``, probability ``targets`` and ``weight``; the
        gradients are computed in the forward pass, finite for every finite logit and every
        gamma in [0, 1000].

    Raises:
        ValueError: an argument outside what is accepted above; on CPU also a class index
            outside [0, C) that is not ``ignore_index`` (on CUDA a device-side assertion).
        TypeError: inputs, targets or weight not a tensor.
    """
    _check_tensor(inputs, "inputs")
    _check_tensor(targets, "targets")
    if weight is not None:
        _check_tensor(weight, "weight")
    float32_loss = _float32_loss(inputs)
    # Probabilities of another dtype: the loss in the dtype the two promote to, as F.cross_entropy's.
    if targets.dtype == torch.float64 and inputs.dtype in _LOWER_THAN_FLOAT64:
        inputs = inputs.double()
    elif inputs.dtype in _ops.SIXTEEN_BIT_DTYPES and targets.dtype in _LOWER_THAN_FLOAT64:
        float32_loss = float32_loss or targets.dtype != inputs.dtype
    if torch.is_grad_enabled():
        needs = (inputs.requires_grad, targets.requires_grad,
                 weight is not None and weight.requires_grad)
    else:
        needs = (False, False, False)
    outputs = _ops.outputs_mask(*needs)
    arguments = ([_as_alpha(alpha), _as_float(gamma, "gamma")], _reduction_code(reduction),
                 _as_index(ignore_index), _as_float(label_smoothing, "label_smoothing"),
                 float32_loss, outputs)
    return _call(_SOFTMAX_PATHS, (inputs, targets, weight), arguments, targets)


def _fused_loss(form, inputs, targets, coefficients, reduction, weight, ignore_index,
                label_smoothing):
    """Converts the common options and picks the path to the fused op (the form's coefficients
    already converted, in the op's order: see _ops.sigmoid_focal_loss_forward)."""
    _check_tensor(inputs, "inputs")
    targets, scores = _split_targets(targets)
    if weight is not None:
        _check_tensor(weight, "weight")
    # What the op differentiates as the targets: the scores of a pair.
    differentiable_targets = targets if scores is None else scores
    # The op's outputs mask (_ops.outputs_mask), inlined: every call runs this.
    outputs = 0
    if torch.is_grad_enabled():
        if inputs.requires_grad:
            outputs = _GRAD_INPUTS
        if differentiable_targets.requires_grad:
            outputs |= _GRAD_TARGETS
        if weight is not None and weight.requires_grad:
            outputs |= _UNWEIGHTED_LOSS
    arguments = (form, coefficients, _reduction_code(reduction), _as_index(ignore_index),
                 _as_float(label_smoothing, "label_smoothing"), _float32_loss(inputs), outputs)
    return _call(_SIGMOID_PATHS, (inputs, targets, weight, scores), arguments, differentiable_targets)


class _Paths(NamedTuple):
    """One loss's ways to its value, which _call picks from: the sigmoid family's and the
    softmax loss's differ in their operands and functions, not in when each is taken."""
    op: Callable[..., Tuple[torch.Tensor, ...]]  # the custom op, through the dispatcher
    fused: Callable[..., Tuple[torch.Tensor, ...]]  # the C++ function behind it
    gradients: Callable[..., Tuple]  # the operands' gradients, for FusedFocalLoss
    reference: Callable[..., torch.Tensor]  # the reference formula after the op's checks
    check: Callable[..., None]  # the op's argument checks (C++, allowed in compiled graphs)


_SIGMOID_PATHS = _Paths(_ops.sigmoid_focal_loss_forward, _C.sigmoid_focal_loss_forward,
                        _ops.operand_gradients, _higher_order.checked_reference_loss,
                        _ops.check_forward_arguments)
_SOFTMAX_PATHS = _Paths(_softmax.softmax_focal_loss_forward, _C.softmax_focal_loss_forward,
                        _softmax.gradients, _softmax.checked_reference_loss,
                        _ops.check_softmax_arguments)


def _call(paths, tensors, arguments, differentiable_targets):
    """The loss of the op's operands (inputs, targets, weight, ...) and scalar arguments (the
    outputs mask last), by the path for how it is called."""
    # Compiled code calls the op, with its registered autograd: Dynamo traces neither the
    # Function's C++ callable nor the eager probes; the transforms it asks about once, while it
    # traces.
    compiling = torch.compiler.is_compiling()
    tracing = not compiling and torch.jit.is_tracing()
    if not (compiling or tracing) and _ops.plain_eager(tensors):
        if arguments[-1]:
            return FusedFocalLoss.apply(paths.gradients, arguments, paths.fused, *tensors)
        return paths.fused(*tensors, *arguments)[0]
    # The other paths meet the dispatcher, where a jagged nested tensor's own dispatch refuses
    # an op it does not know before the op's checks run: run them first, to name the argument.
    if any(tensor is not None and tensor.layout == torch.jagged for tensor in tensors):
        paths.check(*tensors, *arguments)
    if compiling:
        if not _ops.transforms_active_while_compiling():
            return paths.op(*tensors, *arguments)[0]
    elif tracing:  # the op, whose registered autograd a saved graph keeps
        weight = tensors[2]  # both ops' third operand
        arguments = (*arguments[:-1], _ops.traced_outputs_mask(differentiable_targets, weight))
        return paths.op(*tensors, *arguments)[0]
    # torch.func transforms, compiled or not, and forward-mode AD: the reference formula
    # (focal_cuda/_higher_order.py).
    if compiling or _ops.transforms_active() or _ops.tangents_about(tensors):
        return paths.reference(*tensors, arguments)
    # Modes, subclasses, meta tensors: the same paths through the dispatcher.
    if arguments[-1]:
        return FusedFocalLoss.apply(paths.gradients, arguments, paths.op, *tensors)
    return paths.op(*tensors, *arguments)[0]


def _scripted_sigmoid_focal_loss(
    inputs: torch.Tensor,
    targets: torch.Tensor,
    alpha: Optional[float],
    gamma: float,
    reduction: str,
    weight: Optional[torch.Tensor],
    ignore_index: int,
    label_smoothing: float,
) -> torch.Tensor:
    """The function as TorchScript runs it: the forward op with its own autograd formula (the
    op checks the arguments; the saved gradient is not reused in place). Autocast: TorchScript's
    torch.is_autocast_enabled() reports CUDA autocast only, so a scripted call under CPU
    autocast gives the loss in the dtype of its operands."""
    # TorchScript reads no globals: _ops.REDUCTION_CODES, and the outputs mask's bits.
    codes = {"none": 0, "mean": 1, "sum": 2}
    if reduction not in codes:
        raise ValueError("reduction must be one of 'none', 'mean', 'sum', got '" + reduction + "'")
    grad_enabled = torch.is_grad_enabled()
    outputs = 0
    if grad_enabled and inputs.requires_grad:
        outputs |= 1  # GRAD_INPUTS
    if grad_enabled and targets.requires_grad:
        outputs |= 2  # GRAD_TARGETS
    if grad_enabled and weight is not None and weight.requires_grad:
        outputs |= 4  # UNWEIGHTED_LOSS
    return torch.ops.focal_cuda.sigmoid_focal_loss_forward(
        inputs, targets, weight, None, 0, [-1.0 if alpha is None else alpha, gamma], codes[reduction],
        ignore_index, label_smoothing, torch.is_autocast_enabled(), outputs,
    )[0]


def _check_options(function, **options):
    """A module's options checked when it is built, by a call of its function on meta tensors:
    the function's own conversions and the op's checks, no data. Class labels as targets: every
    option applies to them (ignore_index too, which floating targets refuse unless negative)."""
    function(torch.empty((1, 1), device="meta"), torch.empty((1,), dtype=torch.long, device="meta"),
             **options)


def _module_doc(summary, function):
    """A module's docstring: its summary, then its function's documentation, so that help() on
    the module documents the options (the summary alone under python -OO, which strips the
    function's)."""
    return "\n\n".join(filter(None, [summary, inspect.getdoc(function)]))


class SigmoidFocalLoss(torch.nn.Module):
    alpha: Optional[float]
    gamma: float
    reduction: str
    ignore_index: int
    label_smoothing: float

    def __init__(self, alpha: Optional[float] = 0.25, gamma: float = 2.0, reduction: str = "none",
                 ignore_index: int = -100, label_smoothing: float = 0.0):
        super().__init__()
        _check_options(sigmoid_focal_loss, alpha=alpha, gamma=gamma, reduction=reduction,
                       ignore_index=ignore_index, label_smoothing=label_smoothing)
        # Stored in the types of the annotations, so that TorchScript can script the module.
        self.alpha = None if _as_alpha(alpha) == -1.0 else float(alpha)
        self.gamma = float(gamma)
        self.reduction = reduction
        self.ignore_index = _as_index(ignore_index)
        self.label_smoothing = float(label_smoothing)

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor,
                weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        return sigmoid_focal_loss(inputs, targets, self.alpha, self.gamma, self.reduction, weight,
                                  self.ignore_index, self.label_smoothing)

    def extra_repr(self):
        return (
            f"alpha={self.alpha}, gamma={self.gamma}, reduction={self.reduction!r}, "
            f"ignore_index={self.ignore_index}, label_smoothing={self.label_smoothing}"
        )


SigmoidFocalLoss.__doc__ = _module_doc(
    "``sigmoid_focal_loss`` as a module: ``SigmoidFocalLoss(...)(inputs, targets, weight=None)``.",
    sigmoid_focal_loss)


def _refuse_scripting(module):
    """A module's __prepare_scriptable__, which torch.jit.script calls before it compiles the
    module (or a model holding it): a message that says what to do instead of TorchScript's
    own about the Python inside the function."""
    raise RuntimeError(f"{type(module).__name__} cannot be scripted by TorchScript (of the "
                       "losses, only sigmoid_focal_loss and SigmoidFocalLoss can): use "
                       "torch.compile or torch.jit.trace, or compute the loss outside the "
                       "scripted module")


def _family_module(function, name):
    """The nn.Module of one of the family's functions, made from its signature rather than
    written per form: built with the function's options (its parameters but inputs, targets and
    weight, with their defaults), checked when built (_check_options), and called as
    ``module(inputs, targets, weight=None)``."""
    options = [parameter for parameter in inspect.signature(function).parameters.values()
               if parameter.name not in ("inputs", "targets", "weight")]
    self_parameter = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    init_signature = inspect.Signature([self_parameter] + options)
    names = tuple(option.name for option in options)

    def __init__(self, *args, **kwargs):
        torch.nn.Module.__init__(self)
        try:
            bound = init_signature.bind(self, *args, **kwargs)
        except TypeError as error:  # bind's message names no function
            raise TypeError(f"{name}(): {error}") from None
        bound.apply_defaults()
        values = {option: bound.arguments[option] for option in names}
        _check_options(function, **values)
        for option, value in values.items():
            setattr(self, option, value)

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor,
                weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        return function(inputs, targets, weight=weight, **{option: getattr(self, option) for option in names})

    def extra_repr(self):
        return ", ".join(f"{option}={getattr(self, option)!r}" for option in names)

    __init__.__signature__ = init_signature
    summary = f"``{function.__name__}`` as a module: ``{name}(...)(inputs, targets, weight=None)``."
    namespace = dict(__init__=__init__, forward=forward, extra_repr=extra_repr, __module__=__name__,
                     __qualname__=name, __prepare_scriptable__=_refuse_scripting,
                     __doc__=_module_doc(summary, function))
    return type(name, (torch.nn.Module,), namespace)


SigmoidFocalLossStar = _family_module(sigmoid_focal_loss_star, "SigmoidFocalLossStar")
QualityFocalLoss = _family_module(quality_focal_loss, "QualityFocalLoss")
VarifocalLoss = _family_module(varifocal_loss, "VarifocalLoss")


class SoftmaxFocalLoss(torch.nn.Module):
    alpha: Optional[float]
    gamma: float
    reduction: str
    ignore_index: int
    label_smoothing: float

    def __init__(self, alpha: Optional[float] = None, gamma: float = 2.0, reduction: str = "mean",
                 weight: Optional[torch.Tensor] = None, ignore_index: int = -100,
                 label_smoothing: float = 0.0):
        super().__init__()
        _reduction_code(reduction)
        _C.check_softmax_options([_as_alpha(alpha), _as_float(gamma, "gamma")],
                                 _as_float(label_smoothing, "label_smoothing"))
        if weight is not None:
            # Checked by the op on meta tensors of as many classes as it has values; its shape
            # alone here, where no inputs tell the classes.
            _check_tensor(weight, "weight")
            if weight.dim() != 1 or weight.numel() == 0:
                raise ValueError(f"weight must have one value per class, shape (C) with C >= 1, "
                                 f"got shape {list(weight.shape)}")
            softmax_focal_loss(torch.empty((1, weight.shape[0]), device="meta"),
                               torch.empty((1,), dtype=torch.long, device="meta"),
                               weight=weight.to("meta"))
        self.alpha = None if alpha is None else float(alpha)
        self.gamma = float(gamma)
        self.reduction = reduction
        self.register_buffer("weight", weight)
        self.ignore_index = _as_index(ignore_index)
        self.label_smoothing = float(label_smoothing)

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return softmax_focal_loss(inputs, targets, self.alpha, self.gamma, self.reduction,
                                  self.weight, self.ignore_index, self.label_smoothing)

    def extra_repr(self):
        return (f"alpha={self.alpha}, gamma={self.gamma}, reduction={self.reduction!r}, "
                f"ignore_index={self.ignore_index}, label_smoothing={self.label_smoothing}")

    __prepare_scriptable__ = _refuse_scripting


SoftmaxFocalLoss.__doc__ = _module_doc(
    "``softmax_focal_loss`` as a module: ``SoftmaxFocalLoss(alpha=None, gamma=2.0, "
    "reduction='mean', weight=None, ignore_index=-100, label_smoothing=0.0)(inputs, targets)``, its "
    "options given by name as ``torch.nn.CrossEntropyLoss``'s are (the first positional one is "
    "alpha, not weight); the weight is a buffer, which moves with the module. Not scriptable by "
    "TorchScript (only sigmoid_focal_loss and SigmoidFocalLoss are).", softmax_focal_loss)
