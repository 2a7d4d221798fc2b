"""Pure-PyTorch losses with the semantics of focal_cuda's: the focal loss and its family (the
public functions check class labels with the fused functions' check, _ops.check_labels).

The tests' oracle and the documentation of what the kernels compute. Composed of ordinary
PyTorch ops (so autograd differentiates them, twice if asked), they build the one-hot targets
that the kernels never materialise, and compute in float32, or float64 for float64 tensors,
like the kernels. A modulating power's derivative is taken as 0 where its base is 0 exactly
(power), as the kernels' analytic gradients take it.

Each form of the sigmoid family is written once, in focal_cuda.loss: its public function and
its terms (the elementwise loss in the building blocks below), which it registers here when the
package is imported (FAMILY is empty before); family_loss adds what the forms share (labels,
smoothing, validity, weight, reduction), and focal_cuda.reference.<function name> is each
public function so computed, made from its signature (type checkers see the public functions'
signatures, not these twins').
"""

import inspect
from typing import Callable, Dict, NamedTuple, Optional, Tuple

import torch

REDUCTIONS = ("none", "mean", "sum")


class Form(NamedTuple):
    """A member of the sigmoid family, as focal_cuda.loss declares it (register_form)."""

    key: str  # its short name: "focal", "star", ...
    code: int  # the op's code of the form (csrc/focal_math.h LossForm)
    coefficients: Tuple[str, ...]  # the op's coefficients of the form, in the op's order
    terms: Callable[..., torch.Tensor]  # terms(x, t, *coefficients): the elementwise loss
    function: Callable[..., torch.Tensor]  # the public fused function


# The family by code, and the codes by short name: filled by focal_cuda.loss, whose declaration
# of a form (its function, its terms) is the only place a form is written in Python.
FAMILY: Dict[int, Form] = {}
FORMS: Dict[str, int] = {}
# name -> the reference function of focal_cuda.<name> (module __getattr__ below).
_REFERENCE_FUNCTIONS: Dict[str, Callable[..., torch.Tensor]] = {}


def register_form(key, code, terms, function):
    """Adds function, the public fused loss of form code, to the family: its coefficients are
    terms' parameters after (x, t), and focal_cuda.reference.<its name> becomes the same
    function computed by terms in PyTorch operations."""
    coefficients = tuple(inspect.signature(terms).parameters)[2:]
    parameters = inspect.signature(function).parameters
    taken = [(code in FAMILY, f"code {code}"), (key in FORMS, f"key {key!r}"),
             (function.__name__ in _REFERENCE_FUNCTIONS, f"name {function.__name__!r}")]
    for is_taken, what in taken:
        if is_taken:
            raise ValueError(f"register_form: the family has a form of {what} already")
    if not set(coefficients) <= set(parameters):
        raise ValueError(f"register_form: {function.__name__}'s parameters must include its terms' "
                         f"coefficients {coefficients}, got {tuple(parameters)}")
    FAMILY[code] = Form(key, code, coefficients, terms, function)
    FORMS[key] = code
    _REFERENCE_FUNCTIONS[function.__name__] = _reference_function(FAMILY[code])


def _reference_function(member):
    signature = inspect.signature(member.function)

    def reference_function(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        options = bound.arguments
        targets, scores = options["targets"], None
        if isinstance(targets, (tuple, list)):
            targets, scores = targets
        inputs = options["inputs"]
        if not targets.is_floating_point():
            _check_labels(targets, inputs.shape[-1], options["ignore_index"], with_background=True)
        return family_loss(member.code, inputs, targets,
                           [options[name] for name in member.coefficients], options["reduction"],
                           options["weight"], options["ignore_index"],
                           options.get("label_smoothing", 0.0), scores)

    reference_function.__name__ = reference_function.__qualname__ = member.function.__name__
    reference_function.__signature__ = signature
    reference_function.__doc__ = (
        f"focal_cuda.{member.function.__name__} in PyTorch operations; its elementwise loss, "
        f"before validity and weight: {inspect.cleandoc(member.terms.__doc__ or '')}")
    return reference_function


def __getattr__(name: str) -> Callable[..., torch.Tensor]:
    """focal_cuda.reference.sigmoid_focal_loss, .sigmoid_focal_loss_star, ...: each function of
    the family in PyTorch operations, with the public function's signature and defaults."""
    try:
        return _REFERENCE_FUNCTIONS[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


def __dir__():
    return sorted(list(globals()) + list(_REFERENCE_FUNCTIONS))


# The building blocks of the forms' terms (focal_cuda.loss), with p = sigmoid(x):


def power(base, exponent):
    """base ** exponent. For an exponent that is not a whole number some derivative at base 0 is
    infinite (the first for exponents in (0, 1), the second in (1, 2), ...), and autograd's
    product with the base's own zero slope (a saturated logit, p == t) is NaN where the loss's
    derivative is finite: there the power is a constant 0, differentiated as one."""
    if float(exponent).is_integer():
        return base.pow(exponent)
    at_zero = base == 0
    nonzero = torch.where(at_zero, torch.ones_like(base), base)
    return torch.where(at_zero, torch.zeros_like(base), nonzero.pow(exponent))


def _sigmoids(x):
    """(sigmoid(x), sigmoid(-x)) from e = exp(-|x|): 1 / (1 + e) and e / (1 + e). Autograd's
    derivatives of these keep their relative accuracy in the tails, where torch.sigmoid's,
    p (1 - p) with 1 - p rounded to 0 (x > 17 in float32), are 0."""
    upper, e = _decay(x)
    big = 1 / (1 + e)
    small = e * big
    return torch.where(upper, big, small), torch.where(upper, small, big)


def _softpluses(v):
    """(softplus(v), softplus(-v)) = (max(v, 0), max(-v, 0)) + log1p(exp(-|v|)). F.softplus
    turns linear past v = 20, torch's binary_cross_entropy_with_logits forms log(1 + exp(-|x|))
    without log1p, and logaddexp(v, 0)'s second derivative is NaN past |v| ~ 89 (float32)."""
    upper, e = _decay(v)
    zero = torch.zeros_like(v)
    tail = torch.log1p(e)
    return torch.where(upper, v, zero) + tail, torch.where(upper, zero, -v) + tail


def _decay(v):
    """(v >= 0, exp(-|v|)), the latter's derivative at 0 that of exp(-v), as the formulas above
    take their v >= 0 forms there (abs's derivative at 0 is 0)."""
    upper = v >= 0
    return upper, torch.exp(torch.where(upper, -v, v))


def softplus(v):
    """log(1 + exp(v)), accurate, with accurate derivatives (_softpluses)."""
    return _softpluses(v)[0]


def bce_with_logits(x, t):
    """Binary cross-entropy of sigmoid(x) against t: t * softplus(-x) + (1 - t) * softplus(x)."""
    plus, minus = _softpluses(x)
    return t * minus + (1 - t) * plus


def one_minus_p_t(x, t):
    """1 - p_t = t * (1 - p) + (1 - t) * p, without cancellation."""
    p, one_minus_p = _sigmoids(x)
    return t * one_minus_p + (1 - t) * p


def distance(x, t):
    """|p - t|, without cancellation."""
    p, one_minus_p = _sigmoids(x)
    return ((1 - t) * p - t * one_minus_p).abs()


def alpha_t(alpha, t):
    """alpha for the positive class, 1 - alpha for the negative: alpha * t + (1 - alpha) *
    (1 - t); 1 when alpha is None or negative (the op's -1), or NaN."""
    return 1.0 if alpha is None or not alpha >= 0 else alpha * t + (1 - alpha) * (1 - t)


def _check_labels(labels, classes, ignore_index, with_background):
    """The fused functions' label check (focal_cuda._ops.check_labels: a ValueError on CPU, a
    device-side assertion on CUDA), for the public functions here, which a label that names no
    class would otherwise give a loss computed as if it named none."""
    from . import _ops  # here, not at import: _ops imports this module

    _ops.check_labels(labels, classes, ignore_index, with_background)


def family_loss(form, inputs, targets, coefficients, reduction, weight, ignore_index,
                label_smoothing, scores=None):
    """The loss of form (a FORMS code) with the op's arguments: coefficients the form's own in
    the op's order (FAMILY[form].coefficients; alpha -1 or None for none). targets: floating,
    or integer labels (over the last dimension's classes: label C is background, ignore_index
    drops the row) with optional scores, each labelled class's target instead of 1."""
    labels = not targets.is_floating_point()
    out_dtype = inputs.dtype if labels else torch.promote_types(inputs.dtype, targets.dtype)
    math_dtype = torch.float64 if out_dtype == torch.float64 else torch.float32
    x = inputs.to(math_dtype)
    valid = None
    if labels:
        classes = inputs.shape[-1]
        targets = targets.long()  # compare in int64: narrower labels must not wrap ignore_index
        valid = targets != ignore_index
        # One-hot by comparison (not F.one_hot, whose range check vmap cannot batch): ignored
        # rows and the background C match no class.
        classes_range = torch.arange(classes, device=targets.device)
        labelled = (targets.unsqueeze(-1) == classes_range) & valid.unsqueeze(-1)
        t = labelled.to(math_dtype)
        if scores is not None:  # selected: a background or ignored row's score is never read
            t = torch.where(labelled, scores.to(math_dtype).unsqueeze(-1), torch.zeros_like(t))
        valid = valid.unsqueeze(-1).to(math_dtype)
    else:
        t = targets.to(math_dtype)
    t = t * (1 - label_smoothing) + label_smoothing / 2
    loss = FAMILY[form].terms(x, t, *coefficients)
    if valid is not None:
        loss = loss * valid
    if weight is not None:
        loss = loss * weight.to(math_dtype)
    if reduction == "mean":
        if valid is None:
            loss = loss.sum() / loss.numel()
        else:  # over the elements not ignored; NaN, with zero gradients, when none is left
            count = valid.sum() * inputs.shape[-1]
            mean = loss.sum() / count.clamp_min(1)
            loss = torch.where(count > 0, mean, torch.full_like(mean, float("nan")))
    elif reduction == "sum":
        loss = loss.sum()
    elif reduction != "none":
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return loss.to(out_dtype)


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
    """The softmax focal loss of focal_cuda.softmax_focal_loss, in PyTorch operations: with
    p = softmax(inputs) over the classes (dimension 1, or 0 for (C) inputs) and q the targets as
    F.cross_entropy takes them (labels one-hot, smoothed to (1 - eps) q + eps / C),

        loss = -alpha * sum_c weight[c] * q_c * (1 - p_c) ** gamma * log(p_c),

    alpha None (or the op's -1) being 1, reduced as F.cross_entropy reduces (the mean over labels
    divides by their summed weight).
    Its second derivatives are NaN for a gamma below 2 that is not a whole number where
    (1 - p_c)^(gamma - 2) overflows short of 1 - p_c = 0 (a margin of ~60 in float32 at gamma
    0.5), as the sigmoid family's are.
    """
    if not targets.is_floating_point():
        _check_labels(targets, inputs.shape[0 if inputs.dim() == 1 else 1], ignore_index,
                      with_background=False)
    return softmax_loss(inputs, targets, alpha, gamma, reduction, weight, ignore_index,
                        label_smoothing)


def softmax_loss(inputs, targets, alpha, gamma, reduction, weight, ignore_index, label_smoothing):
    """softmax_focal_loss without its label check, for the paths that made it (the fused
    function's reference-formula paths, _softmax.checked_reference_loss)."""
    dim = 0 if inputs.dim() == 1 else 1
    classes = inputs.shape[dim]
    # Probabilities of another dtype: the loss in the dtype the two promote to.
    out_dtype = torch.promote_types(inputs.dtype, targets.dtype) if targets.is_floating_point() else inputs.dtype
    math_dtype = torch.float64 if out_dtype == torch.float64 else torch.float32
    x = inputs.to(math_dtype)
    class_shape = [1] * inputs.dim()
    class_shape[dim] = classes
    class_weight = None if weight is None else weight.to(math_dtype).reshape(class_shape)
    valid = None
    if targets.is_floating_point():
        q = targets.to(math_dtype)
    else:
        labels = targets.long()  # compare in int64: narrower labels must not wrap ignore_index
        valid = labels != ignore_index
        classes_range = torch.arange(classes, device=inputs.device).reshape(class_shape)
        q = ((labels.unsqueeze(dim) == classes_range) & valid.unsqueeze(dim)).to(math_dtype)
        # An ignored position is computed at logits 0, selected rather than multiplied by 0:
        # whatever it holds (inf, NaN) leaves no trace in the loss or any derivative.
        x = torch.where(valid.unsqueeze(dim), x, torch.zeros_like(x))
    log_p = _log_softmax(x, dim)
    if gamma == 0:
        focal = -log_p
    else:
        # A class of -inf logits (masked) has log p = -inf: the modulating factor's derivative
        # (0 there) meets it through a finite stand-in, so that it gives 0, not 0 * inf = NaN;
        # the rest, 0 wherever log p is finite, carries the infinite loss.
        modulating = power(-torch.expm1(log_p), gamma)  # 1 - p, exact as p -> 1
        finite_log_p = log_p.clamp_min(torch.finfo(math_dtype).min)
        focal = -modulating * finite_log_p - modulating.detach() * (log_p - finite_log_p)
    q = q * (1 - label_smoothing) + label_smoothing / classes
    if valid is not None:
        q = q * valid.unsqueeze(dim)
    terms = q * focal if class_weight is None else q * class_weight * focal
    if valid is not None:  # labels: a class without target adds nothing, a masked one (-inf) too
        terms = torch.where(q != 0, terms, torch.zeros_like(terms))
    loss = terms.sum(dim) * (1.0 if alpha is None or alpha < 0 else alpha)  # the op's -1 is None
    if valid is not None:  # selected, so that no grad_output of an ignored position reaches a derivative
        loss = torch.where(valid, loss, torch.zeros_like(loss))
    if reduction == "mean":
        if valid is None:
            loss = loss.sum() / loss.numel()
        else:
            label_weight = valid.to(math_dtype)
            if class_weight is not None:
                picked = weight.to(math_dtype)[torch.where(valid, labels, 0)]
                label_weight = label_weight * picked
            divisor = label_weight.sum()
            # NaN or inf for a divisor of 0, as F.cross_entropy's, but no gradient, as the kernels'.
            total = loss.sum()
            safe = torch.where(divisor != 0, divisor, torch.ones_like(divisor))
            loss = torch.where(divisor != 0, total / safe, (total / divisor).detach())
    elif reduction == "sum":
        loss = loss.sum()
    elif reduction != "none":
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return loss.to(out_dtype)


def _log_softmax(x, dim):
    """log softmax(x) over dim, relatively accurate where p -> 1: the top logit's log p is
    -log1p(sum of the others' exp(x - top)), which torch.log_softmax rounds to 0 once that sum
    is below the rounding of 1 (a margin of ~17 in float32). Written through the differences
    x - top alone, its derivatives keep their digits too: 1 - p of the top is that sum's share,
    not 1 minus p."""
    top = x.argmax(dim, keepdim=True)
    shifted = x - x.gather(dim, top)
    is_top = torch.arange(x.shape[dim], device=x.device).reshape(
        [-1 if d == dim else 1 for d in range(x.dim())]) == top
    zero = torch.zeros_like(shifted)
    others = torch.where(is_top, zero, shifted.exp()).sum(dim, keepdim=True)
    return torch.where(is_top, zero, shifted) - torch.log1p(others)
