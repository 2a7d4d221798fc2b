"""Pure-PyTorch sigmoid focal loss with the semantics of focal_cuda.sigmoid_focal_loss.

The tests' oracle and the documentation of what the kernels compute. It is composed of ordinary
PyTorch ops (so autograd differentiates it, twice if asked), builds the one-hot targets that the
kernels never materialise, and computes in float32, or float64 for float64 tensors, like the
kernels. Its autograd gradient inherits the weak spot of the composite form: NaN where q == 0
exactly and 0 < gamma < 1; the kernels' analytic gradient is finite there.
"""

from typing import Optional

import torch

REDUCTIONS = ("none", "mean", "sum")


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
    (no loss, and not counted in the mean).
    """
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
        valid = valid.unsqueeze(-1).to(math_dtype)
    else:
        t = targets.to(math_dtype)
    t = t * (1 - label_smoothing) + label_smoothing / 2
    # CE = BCE-with-logits = t * softplus(-x) + (1 - t) * softplus(x), with softplus(v) as
    # logaddexp(v, 0): torch's binary_cross_entropy_with_logits forms log(1 + exp(-|x|))
    # without log1p, and F.softplus turns linear past |v| = 20; both lose digits there.
    zero = torch.zeros_like(x)
    ce = t * torch.logaddexp(-x, zero) + (1 - t) * torch.logaddexp(x, zero)
    q = t * torch.sigmoid(-x) + (1 - t) * torch.sigmoid(x)  # 1 - p_t, without cancellation
    loss = q.pow(gamma) * ce
    if alpha is not None and alpha >= 0:
        loss = (alpha * t + (1 - alpha) * (1 - t)) * loss
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
