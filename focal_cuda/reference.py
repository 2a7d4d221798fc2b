"""Pure-PyTorch sigmoid focal loss with the semantics of focal_cuda.sigmoid_focal_loss.

The tests' oracle and the documentation of what the kernels compute. It is composed of ordinary
PyTorch ops (so autograd differentiates it, twice if asked) and computes in float32, or float64
for float64 tensors, like the kernels. Its autograd gradient inherits the weak spot of the
composite form: NaN where q == 0 exactly and 0 < gamma < 1; the kernels' analytic gradient is
finite there.
"""

import torch
import torch.nn.functional as F

REDUCTIONS = ("none", "mean", "sum")


def sigmoid_focal_loss(inputs, targets, alpha=0.25, gamma=2.0, reduction="none"):
    """Focal loss of Lin et al.: alpha_t * (1 - p_t)^gamma * BCE(sigmoid(inputs), targets)."""
    out_dtype = torch.result_type(inputs, targets)
    math_dtype = torch.float64 if out_dtype == torch.float64 else torch.float32
    x = inputs.to(math_dtype)
    t = targets.to(math_dtype)
    ce = F.binary_cross_entropy_with_logits(x, t, reduction="none")
    q = t * torch.sigmoid(-x) + (1 - t) * torch.sigmoid(x)  # 1 - p_t, without cancellation
    loss = q.pow(gamma) * ce
    if alpha is not None and alpha >= 0:
        loss = (alpha * t + (1 - alpha) * (1 - t)) * loss
    if reduction == "mean":
        loss = loss.mean()
    elif reduction == "sum":
        loss = loss.sum()
    elif reduction != "none":
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return loss.to(out_dtype)
