"""The public function's autograd: two torch.autograd.Functions around the fused forward.

EagerFunction serves plain eager calls (_ops.plain_eager), the training loop's: the fused
forward straight from C++, the loss its only output, backward the saved gradient scaled.
TransformableFunction serves everything else that differentiates: torch.func (grad, vmap,
jacrev, jacfwd, hessian), torch.autograd.forward_ad, dispatch and function modes, tensor
subclasses. Its forward/setup_context/backward are the op's own autograd formulas
(focal_cuda._ops); on top it has a forward-mode rule (jvp) built from the derivatives the fused
forward computes, and a vmap rule generated from the op's. Both take higher derivatives
(create_graph) through the reference formula (_ops.gradients). torch.compile and TorchScript
call the registered op instead, and a call without gradient the op alone: see
focal_cuda/loss.py.
"""

import inspect

import torch

from . import _C, _ops, reference

_NONE = _ops.REDUCTION_CODES["none"]
_MEAN = _ops.REDUCTION_CODES["mean"]


class EagerFunction(torch.autograd.Function):
    """apply(inputs, targets, weight, scores, arguments) -> the loss, where arguments are the
    op's scalar arguments from alpha to beta (focal_cuda::sigmoid_focal_loss_forward)."""

    # forward takes ctx, with no setup_context, and returns the loss alone: with setup_context
    # apply binds the arguments to forward's signature on every call, and each further output
    # gets a zero-filled gradient in backward; together they doubled a small step's cost.
    @staticmethod
    def forward(ctx, inputs, targets, weight, scores, arguments):
        output = _C.sigmoid_focal_loss_forward(inputs, targets, weight, *arguments, scores)
        _ops.save_for_gradients(ctx, (inputs, targets, weight, scores), output, arguments,
                                gradients_private=True)
        return output[0]

    @staticmethod
    def backward(ctx, grad_loss):
        needs = ctx.needs_input_grad  # with scores, the targets are labels: needs[1] is False
        grad_inputs, grad_targets, grad_weight = _ops.gradients(
            ctx, grad_loss, (needs[0], needs[1] or needs[3], needs[2]))
        return grad_inputs, grad_targets if needs[1] else None, grad_weight, grad_targets if needs[3] else None, None


class TransformableFunction(torch.autograd.Function):
    """apply(inputs, targets, weight, alpha, gamma, reduction, ignore_index, label_smoothing,
    float32_loss, compute_grad_inputs, compute_grad_targets, compute_unweighted_loss, form,
    beta, scores) -> the outputs of focal_cuda::sigmoid_focal_loss_forward; only the loss is
    differentiable."""

    # The forward calls an op with a vmap rule, and setup_context, backward and jvp use ops
    # that vmap supports: functorch can batch the whole Function.
    generate_vmap_rule = True

    @staticmethod
    def forward(*arguments):
        # One variadic parameter: apply binds the arguments to this signature on every call
        # (for setup_context), and binding one parameter costs far less than binding twelve.
        return _ops.forward(*arguments)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _ops.forward_setup_context(ctx, inputs, output)
        # The public function keeps only the loss: backward is the gradients' only user.
        ctx.gradients_private = True
        ctx.save_for_forward(*inputs[:3], inputs[14], *output[1:])

    @staticmethod
    def backward(ctx, grad_loss, *grads_of_saved_outputs):
        return _ops.forward_backward(ctx, grad_loss, *grads_of_saved_outputs)

    @staticmethod
    def jvp(ctx, inputs_tangent, targets_tangent, weight_tangent, *other_tangents):
        # d(loss) = dL/dx . dx + dL/dt . dt + (loss before weight) . dw, summed for "sum",
        # divided by the count for "mean"; with scores, dL/dscores . dscores at each row's
        # labelled element. The derivatives come from one more fused pass, through
        # _Derivatives, so that an outer transform can differentiate them again.
        _refuse_forward_over_forward()
        x, t, weight, scores, _, _, _, count = ctx.saved_tensors
        alpha, gamma, reduction, ignore_index, label_smoothing, float32_loss, *_, form, beta = ctx.arguments
        if scores is not None:
            targets_tangent = other_tangents[11]
        tangents = (inputs_tangent, targets_tangent, weight_tangent)
        derivatives = _Derivatives.apply(
            x, t, weight, scores, alpha, gamma, ignore_index, label_smoothing, float32_loss, form,
            beta, *(tangent is not None for tangent in tangents),
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
            total = total.sum()
            if reduction == _MEAN:
                total = torch.where(count > 0, total / count.clamp_min(1), torch.zeros_like(total))
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


class _Derivatives(torch.autograd.Function):
    """(dL/dinputs, dL/dtargets, L before weight) of the elementwise loss L, as the fused op
    computes them; differentiable again, in reverse mode, through the reference formula. (No jvp:
    forward over forward is refused before one could be needed.)"""

    generate_vmap_rule = True

    @staticmethod
    def forward(inputs, targets, weight, scores, alpha, gamma, ignore_index, label_smoothing,
                float32_loss, form, beta, need_inputs, need_targets, need_weight):
        _, grad_inputs, grad_targets, unweighted, _ = _ops.sigmoid_focal_loss_forward(
            inputs, targets, weight, alpha, gamma, _NONE, ignore_index, label_smoothing,
            float32_loss, need_inputs, need_targets, need_weight, form, beta, scores,
        )
        return grad_inputs, grad_targets, unweighted

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:4])
        ctx.arguments = inputs[4:11]
        ctx.computed = inputs[11:]

    @staticmethod
    def backward(ctx, *cotangents):
        operands = ctx.saved_tensors  # x, t, weight, scores
        primals, rebuild = _differentiable_primals(operands)
        outputs, vjp = torch.func.vjp(_reference_derivatives(ctx, rebuild), *primals)
        cotangents = [torch.zeros_like(output) if cotangent is None else cotangent
                      for cotangent, output in zip(cotangents, outputs)]
        grads = iter(vjp(tuple(cotangents)))
        return tuple(next(grads) if _differentiable(value) else None for value in operands) + (None,) * 10


def _differentiable(value):
    return value is not None and value.is_floating_point()


def _differentiable_primals(operands):
    """The floating tensors among operands, and how to put operands back together from them."""
    primals = [value for value in operands if _differentiable(value)]

    def rebuild(*values):
        values = iter(values)
        return tuple(next(values) if _differentiable(value) else value for value in operands)

    return primals, rebuild


def _reference_derivatives(ctx, rebuild):
    """(x, t, weight, scores) -> what _Derivatives.forward computes, in differentiable
    reference ops."""
    alpha, gamma, ignore_index, label_smoothing, float32_loss, form, beta = ctx.arguments

    def derivatives(*primals):
        inputs, targets, weight, scores = rebuild(*primals)
        dtype = _ops.loss_dtype(inputs, targets, float32_loss)
        x, t = _ops.loss_operands(inputs, targets, float32_loss)
        options = dict(form=form, alpha=alpha, gamma=gamma, beta=beta, reduction="none",
                       ignore_index=ignore_index, label_smoothing=label_smoothing)
        # What the op differentiates as its targets: the scores when there are some.
        target = t if scores is None else scores

        def elementwise(x_, target_):
            t_, scores_ = (target_, None) if scores is None else (t, target_)
            return reference.family_loss(inputs=x_, targets=t_, weight=weight, scores=scores_, **options)

        # Each element of the loss depends on its own logit and target only (a score on its
        # row's labelled element only): the derivative is the vector-Jacobian product with ones.
        if target.is_floating_point():
            loss, vjp = torch.func.vjp(elementwise, x, target)
            grad_inputs, grad_targets = vjp(torch.ones_like(loss))
        else:
            loss, vjp = torch.func.vjp(lambda x_: elementwise(x_, target), x)
            (grad_inputs,), grad_targets = vjp(torch.ones_like(loss)), None
        unweighted = reference.family_loss(inputs=x, targets=t, weight=None, scores=scores, **options)
        saved = _ops.saved_dtype  # the dtypes of the op's outputs
        grad_inputs = grad_inputs.to(saved(inputs.dtype))
        # Labels have no derivative: a floating placeholder, since torch.func.vjp wants floats.
        grad_targets = grad_inputs.new_empty(0) if grad_targets is None else grad_targets.to(saved(target.dtype))
        unweighted = unweighted.to(saved(dtype))
        # Empty where the op computed nothing, as its outputs are.
        return tuple(output if computed else output.new_empty(0)
                     for output, computed in zip((grad_inputs, grad_targets, unweighted), ctx.computed))

    return derivatives
