"""The public functions' autograd in eager mode: one torch.autograd.Function around either
loss's fused forward.

FusedFocalLoss is the one path of first-order gradients in eager mode: the fused forward (from
C++ directly when _ops.plain_eager, else through the dispatcher, for modes and subclasses), the
loss its only output, backward the saved gradient scaled. Gradients that must be differentiable
again (create_graph) go through focal_cuda._higher_order, as do torch.func transforms and
forward-mode AD; torch.compile and TorchScript call the registered op, and a call without
gradient the op alone: see focal_cuda/loss.py.
"""

import torch

from . import _ops


class FusedFocalLoss(torch.autograd.Function):
    """apply(operand_gradients, arguments, fused_forward, *operands) -> the loss, for either loss:
    operands the forward op's tensors (inputs, targets, weight, ...), arguments its scalar
    arguments after them, fused_forward the op or the C++ function behind it, and
    operand_gradients(ctx, grad_loss, needs) the loss's gradients for the operands
    (_ops.operand_gradients, _softmax.gradients)."""

    # forward takes ctx, with no setup_context, and returns the loss alone: with setup_context,
    # apply binds the arguments to forward's signature and takes functorch's path on every
    # call, which cost ~20 us of a small step (bench/NOTES.md).
    @staticmethod
    def forward(ctx, operand_gradients, arguments, fused_forward, *operands):
        output = fused_forward(*operands, *arguments)
        _ops.save_for_gradients(ctx, operands, output, arguments, gradients_private=True)
        ctx.operand_gradients = operand_gradients
        return output[0]

    @staticmethod
    def backward(ctx, grad_loss):
        # None for operand_gradients, arguments and fused_forward, which come before the operands.
        return (None, None, None, *ctx.operand_gradients(ctx, grad_loss, ctx.needs_input_grad[3:]))
