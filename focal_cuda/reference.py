"""Pure-PyTorch losses with the semantics of focal_cuda's: the focal loss and its family.

The tests' oracle and the documentation of what the kernels compute. Composed of ordinary
PyTorch ops (so autograd differentiates them, twice if asked), they build the one-hot targets
that the kernels never materialise, and compute in float32, or float64 for float64 tensors,
like the kernels. A modulating power's derivative is taken as 0 where its base is 0 exactly
(_power), as the kernels' analytic gradients take it.
"""

from typing import Optional

import torch

REDUCTIONS = ("none", "mean", "sum")
# The op's codes of the forms (csrc/focal_math.h LossForm).
FORMS = {"focal": 0, "star": 1, "quality": 2, "varifocal": 3}
# Each form's coefficients, in the order the op takes them (csrc/focal_ops.h), by code.
FORM_COEFFICIENTS = {
    FORMS["focal"]: ("alpha", "gamma"),
    FORMS["star"]: ("alpha", "gamma", "beta"),
    FORMS["quality"]: ("beta",),
    FORMS["varifocal"]: ("alpha", "gamma"),
}


def _power(base, exponent):
    """base ** exponent. For an exponent in (0, 1) its derivative at base 0 is infinite, and
    autograd's product with the base's own zero slope (a saturated logit, p == t) is NaN where
    the loss's derivative is finite: there the power is a constant 0, differentiated as one."""
    if not 0 < exponent < 1:
        return base.pow(exponent)
    at_zero = base == 0
    nonzero = torch.where(at_zero, torch.ones_like(base), base)
    return torch.where(at_zero, torch.zeros_like(base), nonzero.pow(exponent))


def family_scalars(form, coefficients):
    """family_loss's alpha, gamma and beta from the op's coefficients of form."""
    named = dict(zip(FORM_COEFFICIENTS[form], coefficients))
    if form == FORMS["quality"]:
        return dict(alpha=None, gamma=named["beta"], beta=0.0)
    return dict(alpha=named["alpha"], gamma=named["gamma"], beta=named.get("beta", 0.0))


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
    """Focal loss of Lin et al.: weight * alpha_t * (1 - p_t)^gamma * BCE(sigmoid(inputs), t).

    Integer targets are class labels over the last dimension of inputs (C classes): label c
    makes class c positive, label C is background (all negative), ignore_index drops the row
    (no loss, and not counted in the mean). A pair (labels, scores) gives class c the target
    scores[row] instead of 1 (every function of the family takes the same targets).
    """
    return family_loss(FORMS["focal"], inputs, targets, alpha, gamma, 0.0, reduction, weight,
                       ignore_index, label_smoothing)


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
    """FL* of Lin et al. (appendix A): alpha_t * softplus(-(gamma * (2t - 1) * x + beta)) / gamma."""
    return family_loss(FORMS["star"], inputs, targets, alpha, gamma, beta, reduction, weight,
                       ignore_index, label_smoothing)


def quality_focal_loss(
    inputs: torch.Tensor,
    targets: torch.Tensor,
    beta: float = 2.0,
    reduction: str = "mean",
    weight: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Quality focal loss of Li et al. (GFL): BCE(sigmoid(inputs), t) * |t - sigmoid(inputs)|^beta."""
    return family_loss(FORMS["quality"], inputs, targets, None, beta, 0.0, reduction, weight,
                       ignore_index, 0.0)


def varifocal_loss(
    inputs: torch.Tensor,
    targets: torch.Tensor,
    alpha: float = 0.75,
    gamma: float = 2.0,
    reduction: str = "mean",
    weight: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Varifocal loss of Zhang et al.: BCE(sigmoid(inputs), t) * (t if t > 0, else
    alpha * |sigmoid(inputs) - t|^gamma)."""
    return family_loss(FORMS["varifocal"], inputs, targets, alpha, gamma, 0.0, reduction, weight,
                       ignore_index, 0.0)


def family_loss(form, inputs, targets, alpha, gamma, beta, reduction, weight, ignore_index,
                label_smoothing, scores=None):
    """The loss of form (a FORMS code) with the op's arguments: gamma is the modulating
    exponent (QFL's beta) or FL*'s gamma, beta FL*'s beta, alpha VFL's weight of negatives.
    targets: floating, integer labels, or a pair (labels, scores) (or the labels and scores)."""
    if isinstance(targets, (tuple, list)):
        targets, scores = targets
    labels = not targets.is_floating_point()
    out_dtype = inputs.dtype if labels else torch.result_type(inputs, targets)
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
        t = ((targets.unsqueeze(-1) == classes_range) & valid.unsqueeze(-1)).to(math_dtype)
        if scores is not None:
            t = t * scores.to(math_dtype).unsqueeze(-1)
        valid = valid.unsqueeze(-1).to(math_dtype)
    else:
        t = targets.to(math_dtype)
    t = t * (1 - label_smoothing) + label_smoothing / 2
    zero = torch.zeros_like(x)
    alpha_t = None
    if alpha is not None and alpha >= 0 and form in (FORMS["focal"], FORMS["star"]):
        alpha_t = alpha * t + (1 - alpha) * (1 - t)
    if form == FORMS["star"]:
        loss = torch.logaddexp(-(gamma * (2 * t - 1) * x + beta), zero) / gamma
    else:
        # CE = BCE-with-logits = t * softplus(-x) + (1 - t) * softplus(x), with softplus(v) as
        # logaddexp(v, 0): torch's binary_cross_entropy_with_logits forms log(1 + exp(-|x|))
        # without log1p, and F.softplus turns linear past |v| = 20; both lose digits there.
        ce = t * torch.logaddexp(-x, zero) + (1 - t) * torch.logaddexp(x, zero)
        if form == FORMS["focal"]:
            q = t * torch.sigmoid(-x) + (1 - t) * torch.sigmoid(x)  # 1 - p_t, without cancellation
            loss = _power(q, gamma) * ce
        else:
            distance = ((1 - t) * torch.sigmoid(x) - t * torch.sigmoid(-x)).abs()  # |p - t|
            modulation = _power(distance, gamma)
            if form == FORMS["varifocal"]:
                modulation = torch.where(t > 0, t, alpha * modulation)
            loss = modulation * ce
    if alpha_t is not None:
        loss = alpha_t * loss
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

    reduced as F.cross_entropy reduces (the mean over labels divides by their summed weight).
    Its autograd gradient is NaN where p_c == 1 exactly and 0 < gamma < 1; the kernel's is not.
    """
    dim = 0 if inputs.dim() == 1 else 1
    classes = inputs.shape[dim]
    math_dtype = torch.float64 if inputs.dtype == torch.float64 else torch.float32
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
    log_p = torch.log_softmax(x, dim)
    focal = -log_p if gamma == 0 else -_power(1 - log_p.exp(), gamma) * log_p
    q = q * (1 - label_smoothing) + label_smoothing / classes
    if valid is not None:
        q = q * valid.unsqueeze(dim)
    terms = q * focal if class_weight is None else q * class_weight * focal
    loss = terms.sum(dim) * (1.0 if alpha is None else alpha)
    if reduction == "mean":
        if valid is None:
            loss = loss.sum() / loss.numel()
        else:
            label_weight = valid.to(math_dtype)
            if class_weight is not None:
                picked = weight.to(math_dtype)[torch.where(valid, labels, 0)]
                label_weight = label_weight * picked
            loss = loss.sum() / label_weight.sum()  # NaN for nothing counted, as F.cross_entropy
    elif reduction == "sum":
        loss = loss.sum()
    elif reduction != "none":
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return loss.to(inputs.dtype)
