"""The public function's autograd in eager mode: one torch.autograd.Function around the fused
forward.

EagerFunction is the one path of first-order gradients in eager mode: the fused forward (from
C++ directly when _ops.plain_eager, else through the dispatcher, for modes and subclasses), the
loss its only output, backward the saved gradient scaled. Gradients that must be differentiable
again (create_graph) go through focal_cuda._higher_order, as do torch.func transforms and
forward-mode AD; torch.compile and TorchScript call the registered op, and a call without
gradient the op alone: see focal_cuda/loss.py.
"""

import torch

from . import _ops


class EagerFunction(torch.autograd.Function):
    """apply(inputs, targets, weight, scores, arguments, fused_forward) -> the loss, where
    arguments are the op's scalar arguments (from form on) and fused_forward the op
    (focal_cuda::sigmoid_focal_loss_forward) or the C++ function behind it."""

    # forward takes ctx, with no setup_context, and returns the loss alone: with setup_context,
    # apply binds the arguments to forward's signature and takes functorch's path on every
    # call, which cost ~20 us of a small step (bench/NOTES.md).
    @staticmethod
    def forward(ctx, inputs, targets, weight, scores, arguments, fused_forward):
        output = fused_forward(inputs, targets, weight, scores, *arguments)
        _ops.save_for_gradients(ctx, (inputs, targets, weight, scores), output, arguments,
                                gradients_private=True)
        return output[0]

    @staticmethod
    def backward(ctx, grad_loss):
        needs = ctx.needs_input_grad  # with scores, the targets are labels: needs[1] is False
        grad_inputs, grad_targets, grad_weight = _ops.gradients(
            ctx, grad_loss, (needs[0], needs[1] or needs[3], needs[2]))
        grad_scores = grad_targets if needs[3] else None
        return grad_inputs, grad_targets if needs[1] else None, grad_weight, grad_scores, None, None
