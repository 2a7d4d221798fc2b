"""The softmax focal loss's op and autograd.

focal_cuda::softmax_focal_loss_forward is a torch.library custom op (fake kernel, registered
autograd) for torch.compile, opcheck and the dispatcher's modes; eager calls go through
focal_cuda._function.FusedFocalLoss with gradients() below. Both take their first-order
gradients from what the fused forward saved, scaled by the backward op the sigmoid losses use
(csrc/focal_ops.h), and higher-order ones from the reference formula
(focal_cuda.reference.softmax_focal_loss).
"""

from typing import List, Optional, Tuple

import torch

from . import _C, _higher_order, _ops, reference

_NONE = _ops.REDUCTION_CODES["none"]
_MEAN = _ops.REDUCTION_CODES["mean"]
_FUNCTION = "softmax_focal_loss"  # what a caller of the op without the gradients should call


@torch.library.custom_op("focal_cuda::softmax_focal_loss_forward", mutates_args=())
def softmax_focal_loss_forward(
    inputs: torch.Tensor,
    targets: torch.Tensor,
    weight: Optional[torch.Tensor],
    coefficients: List[float],
    reduction: int,
    ignore_index: int,
    label_smoothing: float,
    float32_loss: bool,
    outputs: int,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, dloss/dinputs, dloss/dtargets, each class's loss before its weight, the mean's
    divisor) in one pass (csrc/focal_ops.h); coefficients (alpha, gamma), alpha -1 for None;
    gradients unscaled; outputs as _ops.outputs_mask, those not requested empty."""
    loss, *per_element, divisor = _C.softmax_focal_loss_forward(
        inputs, targets, weight, coefficients, reduction, ignore_index, label_smoothing,
        float32_loss, outputs,
    )
    return (loss, *_ops.with_empty_for_none(inputs, per_element, _per_element_dtypes(inputs, targets)),
            divisor)


def read_in_place(inputs):
    """Whether the kernels read inputs where they lie, and so lay the per-element outputs out as
    the inputs are: contiguous, channels-last, or (N, C) of either order; other layouts are
    copied to contiguous first (csrc/focal_ops.cpp, as_batched)."""
    return (inputs.is_contiguous()
            or inputs.dim() == 2 and inputs.t().is_contiguous()
            or inputs.dim() == 4 and inputs.is_contiguous(memory_format=torch.channels_last)
            or inputs.dim() == 5 and inputs.is_contiguous(memory_format=torch.channels_last_3d))


def class_dim(inputs):
    """The classes' dimension: 1, or 0 for unbatched (C) inputs."""
    return 0 if inputs.dim() == 1 else 1


def _math_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


@softmax_focal_loss_forward.register_fake
def _(inputs, targets, weight, coefficients, reduction, ignore_index, label_smoothing,
      float32_loss, outputs):
    _C.check_softmax_arguments(inputs, targets, weight, coefficients, reduction, ignore_index,
                               label_smoothing, float32_loss, outputs)
    dtype = inputs.dtype
    if float32_loss and dtype in _ops.SIXTEEN_BIT_DTYPES:
        dtype = torch.float32
    positions = list(inputs.shape)
    del positions[class_dim(inputs)]
    loss = inputs.new_empty(positions if reduction == _NONE else (), dtype=dtype)

    def per_element(requested, dtype_):
        if not requested:
            return inputs.new_empty((0,), dtype=dtype_)
        if read_in_place(inputs):
            return torch.empty_like(inputs, dtype=dtype_)
        return inputs.new_empty(inputs.shape, dtype=dtype_)

    requests = (_ops.GRAD_INPUTS, _ops.GRAD_TARGETS, _ops.UNWEIGHTED_LOSS)
    return (loss, *(per_element(outputs & request, dtype_) for request, dtype_ in
                    zip(requests, _per_element_dtypes(inputs, targets))),
            inputs.new_empty((), dtype=torch.float64))


def _per_element_dtypes(inputs, targets):
    """The dtypes of the forward's d(loss)/d(inputs), d(loss)/d(targets) and each class's loss
    before its weight."""
    return (_ops.saved_dtype(inputs.dtype), _ops.saved_dtype(targets.dtype),
            _math_dtype(inputs.dtype))


def forward_setup_context(ctx, inputs, output):
    # Only the loss is differentiable; the other outputs carry what backward needs.
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)
    _ops.save_for_gradients(ctx, inputs[:3], output, inputs[3:], gradients_private=False)


def forward_backward(ctx, grad_loss, *_grads_of_saved_outputs):
    return gradients(ctx, grad_loss, ctx.needs_input_grad[:3]) + (None,) * 6


def gradients(ctx, grad_loss, needed):
    """(d/dinputs, d/dtargets, d/dweight) of the loss for the needed ones: the saved gradients
    scaled by grad_loss; with create_graph (or under torch.func), the reference formula's,
    differentiable again."""
    if grad_loss is None:
        return None, None, None
    if torch.is_grad_enabled():
        return _differentiable_gradients(ctx, grad_loss, needed)
    x, t, weight, saved_grad_inputs, saved_grad_targets, unweighted, divisor = ctx.saved_tensors
    reduction = ctx.arguments[1]
    dim = class_dim(x)
    if reduction == _NONE and not t.is_floating_point():
        # An ignored position's gradients are 0 whatever grad_loss holds there (the NaN of a
        # later 0 / 0, say), as F.cross_entropy's: selected, not multiplied by the saved 0.
        ignored = t.long() == ctx.arguments[2]  # in int64: a narrow dtype would wrap ignore_index
        grad_loss = grad_loss.masked_fill(ignored, 0)
    grad_inputs = grad_targets = grad_weight = None
    if needed[0]:
        saved = _ops.saved_or_error(saved_grad_inputs, "inputs", _FUNCTION)
        grad_inputs = _scaled(ctx, grad_loss, saved, divisor, reduction, dim).to(x.dtype)
    if needed[1]:
        saved = _ops.saved_or_error(saved_grad_targets, "targets", _FUNCTION)
        grad_targets = _scaled(ctx, grad_loss, saved, divisor, reduction, dim).to(t.dtype)
    if needed[2]:
        unweighted = _ops.saved_or_error(unweighted, "weight", _FUNCTION)
        grad_weight = _weight_gradient(ctx, grad_loss, unweighted, t, weight, divisor, dim)
    return grad_inputs, grad_targets, grad_weight


def _scaled(ctx, grad_loss, saved, divisor, reduction, dim):
    """saved d(loss)/d(.) times grad_loss: per position for "none" (spread over the classes),
    else one value (divided by the divisor for the mean) through the backward op; written into
    saved where this backward is its last use."""
    if reduction == _NONE:
        scale = grad_loss.unsqueeze(dim)
        return saved.mul_(scale) if _ops.last_use_of_saved(ctx, saved) else saved * scale
    return _ops._scaled_saved_grad(ctx, grad_loss, saved, divisor, reduction)


def _weight_gradient(ctx, grad_loss, unweighted, targets, weight, divisor, dim):
    """d(loss)/d(weight[c]): each class's loss before its weight, summed over the positions
    (times grad_loss). A mean over labels divides by their summed weight, which the weight
    changes too: d(S / W)/d(w_c) = (S_c - (S / W) n_c) / W, n_c the labels of class c counted."""
    reduction = ctx.arguments[1]
    math_dtype = unweighted.dtype
    others = [d for d in range(unweighted.dim()) if d != dim]

    def summed_over_positions(values):  # sum(dim=[]) would sum everything
        return values.sum(others) if others else values

    if reduction == _NONE:
        return summed_over_positions(unweighted * grad_loss.to(math_dtype).unsqueeze(dim)).to(weight.dtype)
    per_class = summed_over_positions(unweighted)
    if reduction == _MEAN:
        if not targets.is_floating_point():
            # Labels counted per class by a scatter of fixed shape: nothing waits for the device.
            labels = targets.reshape(-1).long()
            counted = (labels != ctx.arguments[2]).to(math_dtype)  # ignore_index
            label_counts = torch.zeros_like(per_class).index_add_(
                0, labels.clamp(0, weight.shape[0] - 1), counted)
            mean = (per_class * weight.to(math_dtype)).sum() / divisor.to(math_dtype)
            per_class = per_class - mean * label_counts
        return _ops.mean_scale(per_class * grad_loss.to(math_dtype), divisor.to(math_dtype),
                               _MEAN).to(weight.dtype)
    return (per_class * grad_loss.to(math_dtype)).to(weight.dtype)


def _differentiable_gradients(ctx, grad_loss, needed):
    """gradients() as the reference formula's vector-Jacobian product, differentiable again."""
    def loss_of(inputs, targets, weight):
        return reference_loss(inputs, targets, weight, ctx.arguments)

    return _higher_order.reference_vjp(loss_of, ctx.saved_tensors[:3], needed, grad_loss)


def checked_reference_loss(inputs, targets, weight, arguments):
    """reference_loss after the checks the op makes, the labels' included: the loss of the paths
    that run no kernel."""
    _ops.check_softmax_arguments(inputs, targets, weight, *arguments)
    if not targets.is_floating_point():
        ignore_index = arguments[2]
        targets = _ops.check_labels(targets, inputs.shape[class_dim(inputs)], ignore_index, False)
    return reference_loss(inputs, targets, weight, arguments)


def reference_loss(inputs, targets, weight, arguments):
    """reference.softmax_loss with the op's arguments; in float32 where the op's loss was
    (16-bit inputs under autocast)."""
    (alpha, gamma), reduction, ignore_index, label_smoothing, float32_loss, _ = arguments
    if float32_loss and inputs.dtype in _ops.SIXTEEN_BIT_DTYPES:
        inputs = inputs.float()
        targets = targets.float() if targets.is_floating_point() else targets
    return reference.softmax_loss(
        inputs, targets, None if alpha < 0 else alpha, gamma, reference.REDUCTIONS[reduction],
        weight, ignore_index, label_smoothing,
    )


softmax_focal_loss_forward.register_autograd(forward_backward, setup_context=forward_setup_context)
