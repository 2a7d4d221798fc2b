"""The public function's autograd: two torch.autograd.Functions around the fused forward.

EagerFunction is the one path of first-order gradients in eager mode: the fused forward (from
C++ directly when _ops.plain_eager, else through the dispatcher, for modes and subclasses), the
loss its only output, backward the saved gradient scaled. TransformableFunction is the path of
torch.func transforms (grad, vmap, jacrev, jacfwd, hessian) and torch.autograd.forward_ad: its
forward/setup_context/backward are the op's own autograd formulas (focal_cuda._ops); on top it
has a forward-mode rule (jvp) built from the derivatives the fused forward computes, and a
vmap rule generated from the op's. Derivatives that must be differentiable again go through
focal_cuda._higher_order. torch.compile and TorchScript call the registered op instead, and a
call without gradient the op alone: see focal_cuda/loss.py.
"""

import inspect

import torch

from . import _higher_order, _ops

_NONE = _ops.REDUCTION_CODES["none"]


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


def transformable_loss(inputs, targets, weight, scores, form, coefficients, *arguments):
    """The loss of TransformableFunction for the op's arguments."""
    return TransformableFunction.apply(inputs, targets, weight, scores, form, *arguments, *coefficients)[0]


def op_arguments(arguments):
    """The op's arguments from a Function's that end in the coefficients, spread: functorch
    flattens a list argument into its items, which its vmap over a jvp rule then miscounts
    against the arguments (jacfwd of jacfwd)."""
    *operands, form, reduction, ignore_index, label_smoothing, float32_loss, outputs = arguments[:10]
    return (*operands, form, list(arguments[10:]), reduction, ignore_index, label_smoothing,
            float32_loss, outputs)


class TransformableFunction(torch.autograd.Function):
    """apply(inputs, targets, weight, scores, form, reduction, ignore_index, label_smoothing,
    float32_loss, outputs, *coefficients) -> the outputs of
    focal_cuda::sigmoid_focal_loss_forward (op_arguments); only the loss is differentiable."""

    # The forward calls an op with a vmap rule, and setup_context, backward and jvp use ops
    # that vmap supports: functorch can batch the whole Function.
    generate_vmap_rule = True

    @staticmethod
    def forward(*arguments):
        # One variadic parameter: apply binds the arguments to this signature on every call
        # (for setup_context), and binding one parameter costs far less than binding eleven.
        return _ops.forward(*op_arguments(arguments))

    @staticmethod
    def setup_context(ctx, inputs, output):
        _ops.forward_setup_context(ctx, op_arguments(inputs), output)
        # The public function keeps only the loss: backward is the gradients' only user.
        ctx.gradients_private = True
        ctx.save_for_forward(*inputs[:4], *output[1:])
        ctx.num_inputs = len(inputs)

    @staticmethod
    def backward(ctx, grad_loss, *grads_of_saved_outputs):
        grads = _ops.forward_backward(ctx, grad_loss, *grads_of_saved_outputs)
        return grads[:4] + (None,) * (ctx.num_inputs - 4)

    @staticmethod
    def jvp(ctx, inputs_tangent, targets_tangent, weight_tangent, scores_tangent, *_):
        # d(loss) = dL/dx . dx + dL/dt . dt + (loss before weight) . dw, summed for "sum",
        # divided by the count for "mean"; with scores, dL/dscores . dscores at each row's
        # labelled element. The derivatives come from one more fused pass, through
        # Derivatives, so that an outer transform can differentiate them again.
        _refuse_forward_over_forward()
        x, t, weight, scores, _, _, _, count = ctx.saved_tensors
        form, coefficients, reduction, ignore_index, label_smoothing, float32_loss, _ = ctx.arguments
        if scores is not None:
            targets_tangent = scores_tangent
        tangents = (inputs_tangent, targets_tangent, weight_tangent)
        derivatives = _higher_order.Derivatives.apply(
            x, t, weight, scores, form, ignore_index, label_smoothing, float32_loss,
            *(tangent is not None for tangent in tangents), *coefficients,
        )
        loss_dtype = _ops.loss_dtype(x, t, float32_loss)
        math_dtype = torch.float64 if loss_dtype == torch.float64 else torch.float32
        total = None
        for index, (tangent, derivative) in enumerate(zip(tangents, derivatives)):
            if tangent is not None:
                term = derivative.to(math_dtype) * tangent.to(math_dtype)
                if index == 1 and scores is not None:  # per row: onto the labelled class
                    classes = torch.arange(x.shape[-1], device=x.device)
                    term = (t.unsqueeze(-1) == classes).to(math_dtype) * term.unsqueeze(-1)
                total = term if total is None else total + term
        if reduction != _NONE:
            total = _ops.mean_scale(total.sum(), count, reduction)
        return (total.to(loss_dtype), None, None, None, None)


# A stored signature saves inspect.signature rebuilding it for apply's binding on every call.
TransformableFunction.forward.__signature__ = inspect.signature(TransformableFunction.forward)


def _refuse_forward_over_forward():
    """Inside an autograd.Function's jvp rule PyTorch drops the tangents of an enclosing
    forward-mode transform: jacfwd(jacfwd(f)) would be silently 0. Refuse it instead."""
    from torch._C._functorch import TransformType
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    forward_levels = [i for i in retrieve_all_functorch_interpreters() if i.key() == TransformType.Jvp]
    if len(forward_levels) > 1:
        raise RuntimeError(
            "focal_cuda.sigmoid_focal_loss does not support forward-over-forward "
            "differentiation (e.g. jacfwd(jacfwd(f))): PyTorch drops the outer tangent inside an "
            "autograd.Function's jvp rule. Use torch.func.hessian (forward-over-reverse) or "
            "jacrev(jacrev(f))."
        )
