"""The extension's ops as torch.library custom ops, with fake kernels and autograd formulas.

Registered this way, the fused kernels work in eager mode, under torch.compile(fullgraph=True)
and under torch.library.opcheck. Codes for `reduction`: 0 none, 1 mean, 2 sum.
"""

from typing import Tuple

import torch

from . import _C, reference

REDUCTION_CODES = {"none": 0, "mean": 1, "sum": 2}
_REDUCTION_NAMES = {code: name for name, code in REDUCTION_CODES.items()}


@torch.library.custom_op("focal_cuda::sigmoid_focal_loss_forward", mutates_args=())
def sigmoid_focal_loss_forward(
    inputs: torch.Tensor,
    targets: torch.Tensor,
    alpha: float,
    gamma: float,
    reduction: int,
    compute_grad_inputs: bool,
    compute_grad_targets: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, dloss/dinputs, dloss/dtargets) in one pass; gradients unscaled, or empty."""
    return _C.sigmoid_focal_loss_forward(
        inputs, targets, alpha, gamma, reduction, compute_grad_inputs, compute_grad_targets
    )


@sigmoid_focal_loss_forward.register_fake
def _(inputs, targets, alpha, gamma, reduction, compute_grad_inputs, compute_grad_targets):
    loss_dtype = torch.result_type(inputs, targets)
    loss = inputs.new_empty(inputs.shape if reduction == 0 else (), dtype=loss_dtype)
    grad_inputs = inputs.new_empty(inputs.shape if compute_grad_inputs else (0,))
    grad_targets = targets.new_empty(targets.shape if compute_grad_targets else (0,))
    return loss, grad_inputs, grad_targets


@torch.library.custom_op("focal_cuda::sigmoid_focal_loss_backward", mutates_args=())
def sigmoid_focal_loss_backward(
    grad_output: torch.Tensor, saved_grad: torch.Tensor, reduction: int
) -> torch.Tensor:
    """saved_grad * grad_output (times 1/N for mean), without recomputing the loss."""
    return _C.sigmoid_focal_loss_backward(grad_output, saved_grad, reduction)


@sigmoid_focal_loss_backward.register_fake
def _(grad_output, saved_grad, reduction):
    return saved_grad.new_empty(saved_grad.shape)


def _forward_setup_context(ctx, inputs, output):
    x, t, alpha, gamma, reduction, _, _ = inputs
    _, grad_inputs, grad_targets = output
    # The gradients are outputs only to carry them to backward; they are not differentiable,
    # and autograd must not materialise full-size zero gradients for them.
    ctx.mark_non_differentiable(grad_inputs, grad_targets)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, t, grad_inputs, grad_targets)
    ctx.alpha, ctx.gamma, ctx.reduction = alpha, gamma, reduction


def _saved_or_error(saved, like, name):
    if saved.shape != like.shape:
        raise RuntimeError(
            f"focal_cuda: backward needs d(loss)/d({name}), but the forward op was called with "
            f"compute_grad_{name}=False; call focal_cuda.sigmoid_focal_loss instead of the op"
        )
    return saved


def _forward_backward(ctx, grad_loss, _grad_of_grad_inputs, _grad_of_grad_targets):
    x, t, saved_grad_inputs, saved_grad_targets = ctx.saved_tensors
    needs_x, needs_t = ctx.needs_input_grad[:2]
    if grad_loss is None:
        return (None,) * 7
    if torch.is_grad_enabled():
        # create_graph=True: higher derivatives through the differentiable reference formula.
        return _differentiable_grads(ctx, x, t, grad_loss, needs_x, needs_t) + (None,) * 5
    grad_inputs = grad_targets = None
    if needs_x:
        saved = _saved_or_error(saved_grad_inputs, x, "inputs")
        grad_inputs = sigmoid_focal_loss_backward(grad_loss, saved, ctx.reduction)
    if needs_t:
        saved = _saved_or_error(saved_grad_targets, t, "targets")
        grad_targets = sigmoid_focal_loss_backward(grad_loss, saved, ctx.reduction)
    return grad_inputs, grad_targets, None, None, None, None, None


def _differentiable_grads(ctx, x, t, grad_loss, needs_x, needs_t):
    wrt = [tensor for tensor, needed in ((x, needs_x), (t, needs_t)) if needed]
    loss = reference.sigmoid_focal_loss(
        x, t, ctx.alpha, ctx.gamma, _REDUCTION_NAMES[ctx.reduction]
    )
    grads = iter(torch.autograd.grad(loss, wrt, grad_loss, create_graph=True))
    return (next(grads) if needs_x else None, next(grads) if needs_t else None)


sigmoid_focal_loss_forward.register_autograd(
    _forward_backward, setup_context=_forward_setup_context
)


def _backward_setup_context(ctx, inputs, output):
    grad_output, saved_grad, reduction = inputs
    ctx.save_for_backward(grad_output, saved_grad)
    ctx.reduction = reduction


def _backward_backward(ctx, grad_of_out):
    # out = saved_grad * grad_output * scale, with grad_output broadcast when it is one value.
    grad_output, saved_grad = ctx.saved_tensors
    scale = 1.0 / saved_grad.numel() if ctx.reduction == 1 else 1.0
    grad_of_grad_output = grad_of_saved = None
    if ctx.needs_input_grad[0]:
        product = grad_of_out * saved_grad * scale
        if ctx.reduction != 0:
            product = product.sum().reshape(grad_output.shape)
        grad_of_grad_output = product.to(grad_output.dtype)
    if ctx.needs_input_grad[1]:
        grad_of_saved = (grad_of_out * grad_output * scale).to(saved_grad.dtype)
    return grad_of_grad_output, grad_of_saved, None


sigmoid_focal_loss_backward.register_autograd(
    _backward_backward, setup_context=_backward_setup_context
)
