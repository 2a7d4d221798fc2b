"""The one path of derivatives beyond first-order eager ones: create_graph=True, torch.func
transforms (grad, vmap, jacrev, jacfwd, hessian, ...) and torch.autograd.forward_ad.

All of them take the reference formula (focal_cuda.reference), whose differentiable torch ops
autograd and torch.func differentiate, batch and push tangents through to any order, as they
do any composite: first derivatives that must be differentiable again are its vector-Jacobian
product; under a transform, or for operands that carry forward-mode tangents, the loss itself
is computed by it.
"""

import torch

from . import _ops, reference


def reference_loss(inputs, targets, weight, scores, arguments):
    """The loss as the reference formula computes it for the op's scalar arguments (from form
    on); in float32 where the op's loss is (16-bit operands under autocast)."""
    form, coefficients, reduction, ignore_index, label_smoothing, float32_loss, _ = arguments
    x, t = _ops.loss_operands(inputs, targets, float32_loss)
    return reference.family_loss(form, x, t, coefficients, reference.REDUCTIONS[reduction], weight,
                                 ignore_index, label_smoothing, scores)


def checked_reference_loss(inputs, targets, weight, scores, arguments):
    """reference_loss after the checks the op makes, the labels' included: the loss of the paths
    that run no kernel."""
    _ops.check_forward_arguments(inputs, targets, weight, scores, *arguments)
    if not targets.is_floating_point():
        # check_forward_arguments refuses labels with 0-d inputs: there is a last dimension.
        targets = _ops.check_labels(targets, inputs.shape[-1], arguments[3], True)
    return reference_loss(inputs, targets, weight, scores, arguments)


def differentiable_gradients(ctx, grad_loss, needed):
    """What _ops.gradients returns, (d/dinputs, d/d(targets or scores), d/dweight) for the needed
    ones, as the reference formula's vector-Jacobian product (differentiable again), from what
    _ops.save_for_gradients saved."""
    x, t, weight, scores, *_ = ctx.saved_tensors

    def loss_of(x_, target_, weight_):
        t_, scores_ = (target_, None) if scores is None else (t, target_)
        return reference_loss(x_, t_, weight_, scores_, ctx.arguments)

    return reference_vjp(loss_of, (x, t if scores is None else scores, weight), needed, grad_loss)


def reference_vjp(loss_of, operands, needed, grad_loss):
    """The vector-Jacobian product of loss_of(*operands) with grad_loss: its gradient for each
    needed operand (None for the others), differentiable again."""
    wrt = [operand for operand, need in zip(operands, needed) if need]

    def loss_of_needed(*differentiated):
        values = iter(differentiated)
        return loss_of(*(next(values) if need else operand for operand, need in zip(operands, needed)))

    _, vjp = torch.func.vjp(loss_of_needed, *wrt)
    grads = iter(vjp(grad_loss))
    return tuple(next(grads) if need else None for need in needed)
