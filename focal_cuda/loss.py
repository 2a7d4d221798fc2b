"""The public sigmoid focal loss: argument checks, then the fused op."""

import math
import numbers

import torch

from . import _ops


def _check_tensor(value, name):
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise ValueError(
            f"{name} must be a floating-point tensor (float16, bfloat16, float32 or float64), "
            f"got {value.dtype}"
        )


def _checked_alpha(alpha):
    if alpha is None:
        return -1.0
    if isinstance(alpha, numbers.Real) and not isinstance(alpha, bool):
        if alpha == -1 or 0 <= alpha <= 1:
            return float(alpha)
    raise ValueError(f"alpha must be in [0, 1], or -1 or None to disable the weighting, got {alpha!r}")


def _checked_gamma(gamma):
    if isinstance(gamma, numbers.Real) and not isinstance(gamma, bool):
        if 0 <= gamma < math.inf:
            return float(gamma)
    raise ValueError(f"gamma must be a finite number >= 0, got {gamma!r}")


def _checked_reduction(reduction):
    if isinstance(reduction, str) and reduction in _ops.REDUCTION_CODES:
        return _ops.REDUCTION_CODES[reduction]
    raise ValueError(f"reduction must be one of 'none', 'mean', 'sum', got {reduction!r}")


def sigmoid_focal_loss(inputs, targets, alpha=0.25, gamma=2.0, reduction="none"):
    """Sigmoid focal loss (Lin et al., RetinaNet), fused with its gradient in one kernel pass.

    A drop-in for ``torchvision.ops.sigmoid_focal_loss``, equivalent to
    ``focal_cuda.reference.sigmoid_focal_loss``::

        p = sigmoid(inputs)
        ce = binary_cross_entropy_with_logits(inputs, targets, reduction="none")
        q = targets * sigmoid(-inputs) + (1 - targets) * p          # 1 - p_t
        alpha_t = alpha * targets + (1 - alpha) * (1 - targets)     # 1 if alpha is -1/None
        loss = alpha_t * q ** gamma * ce, then reduced

    Args:
        inputs: logits, a float16/bfloat16/float32/float64 tensor of any shape and strides.
        targets: same shape as ``inputs``, floating, in [0, 1] (soft targets allowed).
        alpha: weight of the positive class in [0, 1]; -1 or None switches the weighting off.
        gamma: focusing exponent >= 0, fractional values included.
        reduction: ``"none"`` (loss per element), ``"mean"`` (over all elements) or ``"sum"``.

    Returns:
        The loss, in the dtype PyTorch promotion gives ``inputs`` and ``targets`` (float32 for
        16-bit operands under ``torch.autocast``, as torchvision's is there); the shape of
        ``inputs`` for ``"none"``, else 0-d. Differentiable with respect to ``inputs`` and
        ``targets``; the gradient is computed in the forward pass only when one of them
        requires grad, and is finite for every gamma >= 0 and every finite logit.
    """
    _check_tensor(inputs, "inputs")
    _check_tensor(targets, "targets")
    if inputs.shape != targets.shape:
        raise ValueError(
            f"targets must have the same shape as inputs, got {list(inputs.shape)} and "
            f"{list(targets.shape)}"
        )
    if inputs.device != targets.device:
        raise ValueError(
            f"targets must be on the same device as inputs, got {inputs.device} and {targets.device}"
        )
    if torch.is_autocast_enabled(inputs.device.type) and torch.result_type(inputs, targets) in (
        torch.float16,
        torch.bfloat16,
    ):
        # Autocast computes BCE-with-logits in float32, so torchvision's loss comes out float32
        # there. Same result dtype here, from float32 targets (a copy of the targets only: the
        # kernels read the 16-bit logits directly, and always compute in float32).
        targets = targets.float()
    grad_enabled = torch.is_grad_enabled()
    loss, _, _ = _ops.sigmoid_focal_loss_forward(
        inputs,
        targets,
        _checked_alpha(alpha),
        _checked_gamma(gamma),
        _checked_reduction(reduction),
        grad_enabled and inputs.requires_grad,
        grad_enabled and targets.requires_grad,
    )
    return loss
