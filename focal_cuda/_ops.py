"""The extension's ops as torch.library custom ops, with fake kernels and autograd formulas.

Registered this way, the fused kernels work in eager mode, under torch.compile(fullgraph=True)
and under torch.library.opcheck.
"""

from typing import List, Optional, Tuple

import torch

from . import _C, _higher_order, reference

# The op's codes: the index in reference.REDUCTIONS (csrc/focal_math.h Reduction).
REDUCTION_CODES = {name: code for code, name in enumerate(reference.REDUCTIONS)}
_MEAN = REDUCTION_CODES["mean"]


# The forward ops' outputs mask (csrc/focal_ops.h): which per-element outputs to compute.
GRAD_INPUTS, GRAD_TARGETS, UNWEIGHTED_LOSS = _C.GRAD_INPUTS, _C.GRAD_TARGETS, _C.UNWEIGHTED_LOSS


def outputs_mask(grad_inputs, grad_targets, unweighted_loss):
    """The outputs argument of a forward op that computes the outputs given as True."""
    return (GRAD_INPUTS if grad_inputs else 0) | (GRAD_TARGETS if grad_targets else 0) | (
        UNWEIGHTED_LOSS if unweighted_loss else 0)


def traced_outputs_mask(differentiable_targets, weight):
    """The outputs a call under torch.jit.trace asks for: the gradient of every floating
    operand, since the graph records the mask as a constant and must neither depend on the grad
    mode (trace's check reruns the function under no_grad) nor fail a later backward."""
    return outputs_mask(True, differentiable_targets.is_floating_point(), weight is not None)


@torch.library.custom_op("focal_cuda::sigmoid_focal_loss_forward", mutates_args=())
def sigmoid_focal_loss_forward(
    inputs: torch.Tensor,
    targets: torch.Tensor,
    weight: Optional[torch.Tensor],
    scores: Optional[torch.Tensor],
    form: int,
    coefficients: List[float],
    reduction: int,
    ignore_index: int,
    label_smoothing: float,
    float32_loss: bool,
    outputs: int,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, dloss/dinputs, dloss/dtargets, loss before weight, count) in one pass.

    form: the loss of the family (a reference.FAMILY code), coefficients its own in its order
    (reference.FAMILY[form].coefficients); outputs: which of the gradients and the loss before
    weight to compute (outputs_mask), the others empty. Gradients are unscaled; count is the number of
    elements not ignored (the mean's divisor), a 0-d int64 tensor on the inputs' device.
    scores: with integer labels, the target of each row's labelled class (else 1); dloss/dtargets
    is then dloss/dscores (csrc/focal_ops.h).
    """
    loss, *per_element, count = _C.sigmoid_focal_loss_forward(
        inputs, targets, weight, scores, form, coefficients, reduction, ignore_index,
        label_smoothing, float32_loss, outputs,
    )
    return (loss, *with_empty_for_none(inputs, per_element, _per_element_dtypes(
        inputs, targets, scores, loss.dtype)), count)


def with_empty_for_none(inputs, per_element, dtypes):
    """The per-element outputs with an empty tensor of its dtype for each the C++ forward did
    not compute (None): the ops' schemas return tensors."""
    return tuple(inputs.new_empty((0,), dtype=dtype) if output is None else output
                 for output, dtype in zip(per_element, dtypes))


# nn.Parameter overrides no torch function: the op sees it as the tensor it is.
_PLAIN_TYPES = frozenset((torch.Tensor, torch.nn.Parameter, type(None)))
# plain_eager's and last_use_of_saved's probes, looked up once: they run in every training step.
_is_compiling = torch.compiler.is_compiling
_has_torch_function = torch.overrides.has_torch_function
# The dispatch keys this thread adds to op calls, 0 in plain eager mode (csrc/bindings.cpp: the
# one private torch API in C++): torch.func's transforms (their wrappers report type Tensor),
# dispatch modes (make_fx, FlopCounterMode, FakeTensorMode) and the legacy vmap of batched
# gradients; each needs the dispatcher.
thread_dispatch_keys = _C.thread_dispatch_keys
_FUNCTORCH_TRANSFORM = _C.FUNCTORCH_TRANSFORM
_forward_ad = torch.autograd.forward_ad


def transforms_active():
    """Whether a torch.func transform (grad, vmap, jvp, ...) is active on this thread."""
    return bool(thread_dispatch_keys() & _FUNCTORCH_TRANSFORM)


# The op layer's argument checks, for the paths that take the reference formula instead of the
# op; in compiled code (allowed in the graph) run on the fake tensors while Dynamo traces, as the
# fake kernels run them.
check_forward_arguments = torch.compiler.allow_in_graph(_C.check_forward_arguments)
check_softmax_arguments = torch.compiler.allow_in_graph(_C.check_softmax_arguments)
# torch.compile of a torch.func transform (torch.compile(torch.func.grad(loss))): Dynamo runs the
# transform on fake tensors while it traces, so the probe answers then, and the answer is the
# traced code's constant (Dynamo guards compiled code on the transforms around it).
transforms_active_while_compiling = torch.compiler.assume_constant_result(transforms_active)


def forward_ad_active():
    # Private: the dual tensors of torch.autograd.forward_ad are plain tensors too; only the
    # level in use tells that tangents may be about.
    return _forward_ad._current_level >= 0


def tangents_about(tensors):
    """Whether any of the tensors (None allowed) is a dual tensor of the forward-mode AD level in
    use; the tensors are asked only while a level is (forward_ad_active)."""
    return forward_ad_active() and any(
        tensor is not None and tensor.is_floating_point()
        and _forward_ad.unpack_dual(tensor).tangent is not None for tensor in tensors)


def plain_eager(tensors):
    """Whether an eager call of tensors (an op's operands, the first a tensor that sets the
    device) may go straight to the C++ functions rather than through the dispatcher, which
    costs tens of microseconds a call in Python: on CPU or CUDA tensors that are plain (or
    parameters, or None), with no dispatch key of a transform or mode, no forward-mode AD
    tangent and no function mode. The caller has ruled out torch.compile and torch.jit.trace
    first: neither must record these probes. (The profiler sees either way: the C++ functions
    record themselves.)"""
    first = tensors[0]
    return (
        not thread_dispatch_keys()
        and not tangents_about(tensors)
        and not _has_torch_function(tensors)  # a function mode (the types are checked below)
        and (first.is_cpu or first.is_cuda)  # not first.device: building one costs ~0.5 us
        and _PLAIN_TYPES.issuperset(map(type, tensors))
    )


# The storage dtypes whose loss float32_loss (autocast) computes in float32 (csrc/focal_ops.cpp).
SIXTEEN_BIT_DTYPES = (torch.float16, torch.bfloat16)


def saved_dtype(dtype):
    """What the forward stores d(loss)/d(.) and the loss before the weight in: float32 for
    float16 (see csrc/focal_ops.h), the dtype itself otherwise."""
    return torch.float32 if dtype == torch.float16 else dtype


def loss_dtype(inputs, targets, float32_loss):
    labels = not targets.is_floating_point()
    dtype = inputs.dtype if labels else torch.promote_types(inputs.dtype, targets.dtype)  # same shapes
    if float32_loss and dtype in SIXTEEN_BIT_DTYPES:
        return torch.float32
    return dtype


@sigmoid_focal_loss_forward.register_fake
def _(inputs, targets, weight, scores, form, coefficients, reduction, ignore_index,
      label_smoothing, float32_loss, outputs):
    # The op's own checks (C++), so that torch.compile and meta tensors reject what eager does.
    _C.check_forward_arguments(inputs, targets, weight, scores, form, coefficients, reduction,
                               ignore_index, label_smoothing, float32_loss, outputs)
    dtype = loss_dtype(inputs, targets, float32_loss)
    shaped_like = _strided_like if keeps_layout(inputs, targets) else _contiguous_like
    loss = (shaped_like(inputs, dtype=dtype) if reduction == REDUCTION_CODES["none"]
            else inputs.new_empty((), dtype=dtype))
    likes = (inputs, targets if scores is None else scores, inputs)
    per_element = (
        shaped_like(like, dtype=dtype_) if outputs & requested else inputs.new_empty((0,), dtype=dtype_)
        for like, requested, dtype_ in zip(likes, (GRAD_INPUTS, GRAD_TARGETS, UNWEIGHTED_LOSS),
                                           _per_element_dtypes(inputs, targets, scores, dtype)))
    count = inputs.new_empty((), dtype=torch.int64)
    return (loss, *per_element, count)


def keeps_layout(inputs, targets):
    """Whether the per-element outputs take the inputs' strides, as csrc/focal_ops.cpp
    in_place_order decides, step for step: floating targets laid out as dense, non-contiguous
    inputs are; otherwise the outputs are contiguous."""
    if not targets.is_floating_point() or inputs.is_contiguous() or targets.stride() != inputs.stride():
        return False
    order = sorted(range(inputs.dim()), key=lambda dim: -inputs.stride(dim))  # stable, as C++'s
    return inputs.permute(order).is_contiguous()


def _strided_like(tensor, dtype):
    return tensor.new_empty_strided(tensor.shape, tensor.stride(), dtype=dtype)


def _contiguous_like(tensor, dtype):
    return tensor.new_empty(tensor.shape, dtype=dtype)


def _per_element_dtypes(inputs, targets, scores, loss_dtype_):
    """The dtypes of the forward's d(loss)/d(inputs), d(loss)/d(targets or scores) and loss
    before the weight."""
    differentiated = targets if scores is None else scores
    return saved_dtype(inputs.dtype), saved_dtype(differentiated.dtype), saved_dtype(loss_dtype_)


@torch.library.custom_op("focal_cuda::sigmoid_focal_loss_backward", mutates_args=())
def sigmoid_focal_loss_backward(
    grad_output: torch.Tensor, saved_grad: torch.Tensor, count: torch.Tensor, reduction: int
) -> torch.Tensor:
    """saved_grad * grad_output (divided by count for mean), without recomputing the loss."""
    return _C.sigmoid_focal_loss_backward(grad_output, saved_grad, count, reduction)


@sigmoid_focal_loss_backward.register_fake
def _(grad_output, saved_grad, count, reduction):
    _C.check_backward_arguments(grad_output, saved_grad, count, reduction)  # as the op's own
    return torch.empty_like(saved_grad)  # its layout, as the op's


@torch.library.custom_op("focal_cuda::sigmoid_focal_loss_backward_", mutates_args=("saved_grad",))
def sigmoid_focal_loss_backward_(
    grad_output: torch.Tensor, saved_grad: torch.Tensor, count: torch.Tensor, reduction: int
) -> None:
    """sigmoid_focal_loss_backward written into saved_grad, for its last use."""
    _C.sigmoid_focal_loss_backward_(grad_output, saved_grad, count, reduction)


@sigmoid_focal_loss_backward_.register_fake
def _(grad_output, saved_grad, count, reduction):
    _C.check_backward_arguments(grad_output, saved_grad, count, reduction)
    return None


@torch.library.custom_op("focal_cuda::check_labels", mutates_args=())
def check_labels(labels: torch.Tensor, classes: int, ignore_index: int,
                 with_background: bool) -> torch.Tensor:
    """The forward kernels' label check, for the reference formula's paths (torch.func,
    forward-mode AD), which run no kernel: every label names one of classes (with_background:
    or classes itself, the background) or is ignore_index. On CPU a ValueError naming the
    label; on CUDA, as the kernels, a device-side assertion, with no wait for the device.
    Returns the labels in int64, a copy the caller computes with: a compiled graph keeps an op
    whose result is used, where it drops one that returns nothing."""
    checked = labels.to(torch.int64, copy=True)  # compared in int64: no narrow label wraps
    if labels.is_cuda:
        # gather asserts on the device that each index lies in [0, the table's size); a zeroed
        # table, so that compute-sanitizer's initcheck reads no uninitialised memory.
        indices = torch.where(checked == ignore_index, torch.zeros_like(checked), checked)
        labels.new_zeros(classes + with_background, dtype=torch.uint8).gather(0, indices.reshape(-1))
    else:
        _C.check_cpu_labels(labels, classes, ignore_index, with_background)
    return checked


@check_labels.register_fake
def _(labels, classes, ignore_index, with_background):
    return torch.empty_like(labels, dtype=torch.int64)


@check_labels.register_vmap
def _(info, in_dims, labels, classes, ignore_index, with_background):
    # The whole batch at once, its batch dimension where it was.
    return check_labels(labels, classes, ignore_index, with_background), in_dims[0]


def last_use_of_saved(ctx, saved):
    """Whether this backward is the last use of saved, a gradient output of ctx's forward, so
    that scaling may write into it: the backward frees the graph (retain_graph=False) and nobody
    else holds the forward's gradient outputs (ctx.gradients_private). A training step then
    holds one gradient-sized buffer instead of two. Never while tracing (torch.compile, compiled
    autograd, AOT, opcheck: graphs stay functional) or batching (no in-place op on batched
    tensors)."""
    traced_or_batched = (
        _is_compiling()  # first: Dynamo (compiled autograd) must not trace the probe below
        or type(saved) is not torch.Tensor
        # A dispatch mode, a transform, or the legacy vmap with which is_grads_batched and
        # vectorized jacobians batch grad_output.
        or thread_dispatch_keys()
    )
    return (
        ctx.gradients_private
        and not traced_or_batched
        # Private: whether this backward keeps the graph is known to the engine alone.
        and not torch._C._autograd._get_current_graph_task_keep_graph()
    )


def _scaled_saved_grad(ctx, grad_loss, saved, count, reduction):
    """saved * grad_loss (divided by count for the mean), written into saved where this backward
    is its last use (last_use_of_saved)."""
    if not last_use_of_saved(ctx, saved):
        return sigmoid_focal_loss_backward(grad_loss, saved, count, reduction)
    if plain_eager((saved, grad_loss, count)):  # last_use_of_saved ruled out torch.compile
        _C.sigmoid_focal_loss_backward_(grad_loss, saved, count, reduction)
        torch.autograd.graph.increment_version(saved)  # as the in-place op's dispatch does
    else:  # e.g. under a function mode: the dispatcher's in-place op
        sigmoid_focal_loss_backward_(grad_loss, saved, count, reduction)
    return saved


def mean_scale(grad_output, count, reduction):
    """grad_output, divided by count for the mean: the label count, or the softmax loss's sum of
    weights (which may be below 1 or negative); 0 where that is 0, whatever grad_output is (the
    NaN of a mean of nothing), as the backward op's kernels."""
    if reduction != _MEAN:
        return grad_output
    counted = count != 0
    safe_count = torch.where(counted, count, torch.ones_like(count))  # no 0 / 0 in a double backward
    return torch.where(counted, grad_output / safe_count, torch.zeros_like(grad_output))


def forward_setup_context(ctx, inputs, output):
    # Every output but the loss only carries what backward needs; none is differentiable, and
    # autograd must not materialise full-size zero gradients for them.
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)
    # A caller of the op may hold its gradient outputs: backward never writes into them. (The
    # public function's autograd.Functions, which drop them, pass True.)
    save_for_gradients(ctx, inputs[:4], output, inputs[4:], False)


def save_for_gradients(ctx, operands, output, arguments, gradients_private):
    """What gradients() needs, for the sigmoid family and the softmax loss alike: the operands,
    the forward's scalar arguments (the op's after its operands; the outputs mask last), the
    outputs that mask asked for (None for the others: nothing to keep or unpack) and the count
    (or divisor); gradients_private as in last_use_of_saved."""
    outputs = arguments[-1]
    _, grad_inputs, grad_targets, unweighted, count = output
    ctx.save_for_backward(
        *operands, grad_inputs if outputs & GRAD_INPUTS else None,
        grad_targets if outputs & GRAD_TARGETS else None,
        unweighted if outputs & UNWEIGHTED_LOSS else None, count)
    ctx.arguments = arguments
    ctx.gradients_private = gradients_private


def saved_or_error(saved, name, function="sigmoid_focal_loss"):
    """saved, a forward op's d(loss)/d(name), when the op computed it; else the error that the
    op was called without it (function: the public function that asks for it)."""
    if saved is None:
        output = "UNWEIGHTED_LOSS" if name == "weight" else "GRAD_INPUTS" if name == "inputs" else "GRAD_TARGETS"
        raise RuntimeError(
            f"focal_cuda: backward needs d(loss)/d({name}), which the forward op did not compute "
            f"(its outputs mask left out {output}); call focal_cuda.{function}, which asks for "
            "what backward needs"
        )
    return saved


def forward_backward(ctx, grad_loss, *_grads_of_saved_outputs):
    return operand_gradients(ctx, grad_loss, ctx.needs_input_grad[:4]) + (None,) * 7


def operand_gradients(ctx, grad_loss, needs):
    """The gradients of the forward op's operands (inputs, targets, weight, scores) that needs
    asks for: with scores the targets are labels, and the scores take the targets' gradient."""
    grad_inputs, grad_targets, grad_weight = gradients(
        ctx, grad_loss, (needs[0], needs[1] or needs[3], needs[2]))
    return (grad_inputs, grad_targets if needs[1] else None, grad_weight,
            grad_targets if needs[3] else None)


def gradients(ctx, grad_loss, needed):
    """(d/dinputs, d/d(targets, or scores when given), d/dweight) of the loss, for the needed
    ones, from what save_for_gradients saved: the saved gradients scaled by grad_loss; with
    create_graph, differentiable again (focal_cuda/_higher_order.py)."""
    if grad_loss is None:
        return None, None, None
    x, labels_or_t, weight, scores, saved_grad_inputs, saved_grad_targets, unweighted, count = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True, or a torch.func transform
        return _higher_order.differentiable_gradients(ctx, grad_loss, needed)
    needs_x, needs_t, needs_weight = needed
    # With scores, they are the differentiable targets.
    t = labels_or_t if scores is None else scores
    reduction = ctx.arguments[2]
    grad_inputs = grad_targets = grad_weight = None
    # Saved in float32 for float16 operands: scaled there, rounded to float16 only then.
    if needs_x:
        saved = saved_or_error(saved_grad_inputs, "inputs")
        grad_inputs = _as_dtype(_scaled_saved_grad(ctx, grad_loss, saved, count, reduction), x.dtype)
    if needs_t:
        saved = saved_or_error(saved_grad_targets, "targets" if scores is None else "scores")
        grad_output = grad_loss
        if scores is not None and reduction == REDUCTION_CODES["none"]:
            grad_output = at_labelled_class(grad_loss, labels_or_t)
        grad_targets = _as_dtype(_scaled_saved_grad(ctx, grad_output, saved, count, reduction), t.dtype)
    if needs_weight:
        unweighted = saved_or_error(unweighted, "weight")
        math_dtype = torch.float64 if unweighted.dtype == torch.float64 else torch.float32
        scale = mean_scale(grad_loss.to(math_dtype), count, reduction)
        grad_weight = (unweighted.to(math_dtype) * scale).sum_to_size(weight.shape).to(weight.dtype)
    return grad_inputs, grad_targets, grad_weight


def _as_dtype(tensor, dtype):
    # tensor.to(its own dtype) is a no-op that costs a microsecond in Python.
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def at_labelled_class(grad_loss, labels):
    """An elementwise grad_output's value at each row's labelled class, where a score acts (0 for
    background rows, whose score gradient is 0 anyway: no inf or NaN of theirs is picked up)."""
    classes = grad_loss.shape[-1]
    if classes == 0:  # every row is background: nothing to gather from
        return grad_loss.new_zeros(labels.shape)
    labels = labels.long()  # gather's indices; and C - 1 need not fit a narrow label dtype
    labelled = (labels >= 0) & (labels < classes)
    picked = grad_loss.gather(-1, labels.clamp(0, classes - 1).unsqueeze(-1)).squeeze(-1)
    return torch.where(labelled, picked, torch.zeros_like(picked))


def loss_operands(x, t, float32_loss):
    """x and t as the reference formula differentiates them: float32 where the op's loss was
    (autocast with 16-bit operands), so that a scaled grad_loss is not rounded to 16 bits.
    The casts are differentiable."""
    if loss_dtype(x, t, float32_loss) != loss_dtype(x, t, False):
        return x.float(), (t.float() if t.is_floating_point() else t)
    return x, t


sigmoid_focal_loss_forward.register_autograd(forward_backward, setup_context=forward_setup_context)


def _backward_setup_context(ctx, inputs, output):
    grad_output, saved_grad, count, reduction = inputs
    ctx.save_for_backward(grad_output, saved_grad, count)
    ctx.reduction = reduction


def _backward_backward(ctx, grad_of_out):
    # out = saved_grad * grad_output [/ count], grad_output broadcast when it is one value.
    grad_output, saved_grad, count = ctx.saved_tensors
    grad_of_grad_output = grad_of_saved = None
    if ctx.needs_input_grad[0]:
        product = mean_scale(grad_of_out * saved_grad, count, ctx.reduction)
        if grad_output.numel() == 1 and saved_grad.numel() != 1:
            product = product.sum()
        grad_of_grad_output = product.reshape(grad_output.shape).to(grad_output.dtype)
    if ctx.needs_input_grad[1]:
        grad_of_saved = mean_scale(grad_of_out * grad_output, count, ctx.reduction)
        grad_of_saved = grad_of_saved.to(saved_grad.dtype)
    return grad_of_grad_output, grad_of_saved, None, None


sigmoid_focal_loss_backward.register_autograd(
    _backward_backward, setup_context=_backward_setup_context
)
