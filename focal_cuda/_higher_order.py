"""Higher-order and transform derivatives: the one path of create_graph=True, torch.func
transforms and forward-mode AD through the public function's autograd.

First derivatives that must be differentiable again (create_graph, and every torch.func
transform, which always builds graphs) are the reference formula's vector-Jacobian product,
which autograd and torch.func differentiate further. Forward-mode tangents are the fused
kernels' derivatives (Derivatives), differentiable again in reverse mode through the
reference formula.
"""

import torch

from . import _ops, reference


def differentiable_gradients(ctx, grad_loss, needed):
    """What _ops.gradients returns, (d/dinputs, d/d(targets or scores), d/dweight) for the needed
    ones, as the reference formula's vector-Jacobian product (differentiable again), from what
    _ops.save_for_gradients saved."""
    x, t, weight, scores, *_ = ctx.saved_tensors
    form, coefficients, reduction, ignore_index, label_smoothing, float32_loss, _ = ctx.arguments
    options = dict(form=form, **reference.family_scalars(form, coefficients),
                   reduction=reference.REDUCTIONS[reduction], ignore_index=ignore_index,
                   label_smoothing=label_smoothing)
    candidates = (x, t if scores is None else scores, weight)
    wrt = [tensor for tensor, need in zip(candidates, needed) if need]

    def loss_of(*differentiated):
        values = iter(differentiated)
        x_, target_, weight_ = (next(values) if need else tensor for tensor, need in zip(candidates, needed))
        t_, scores_ = (target_, None) if scores is None else (t, target_)
        x_, t_ = _ops.loss_operands(x_, t_, float32_loss)
        return reference.family_loss(inputs=x_, targets=t_, weight=weight_, scores=scores_, **options)

    _, vjp = torch.func.vjp(loss_of, *wrt)
    grads = iter(vjp(grad_loss))
    return tuple(next(grads) if need else None for need in needed)


class Derivatives(torch.autograd.Function):
    """(dL/dinputs, dL/dtargets, L before weight) of the elementwise loss L, as the fused op
    computes them; differentiable again, in reverse mode, through the reference formula. (No jvp:
    forward over forward is refused before one could be needed.)"""

    generate_vmap_rule = True

    @staticmethod
    def forward(inputs, targets, weight, scores, form, ignore_index, label_smoothing, float32_loss,
                need_inputs, need_targets, need_weight, *coefficients):
        # The coefficients last and spread, as TransformableFunction's (_function.op_arguments).
        _, grad_inputs, grad_targets, unweighted, _ = _ops.sigmoid_focal_loss_forward(
            inputs, targets, weight, scores, form, list(coefficients), _ops.REDUCTION_CODES["none"],
            ignore_index, label_smoothing, float32_loss,
            _ops.outputs_mask(need_inputs, need_targets, need_weight),
        )
        return grad_inputs, grad_targets, unweighted

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:4])
        form, ignore_index, label_smoothing, float32_loss = inputs[4:8]
        ctx.arguments = (form, list(inputs[11:]), ignore_index, label_smoothing, float32_loss)
        ctx.computed = inputs[8:11]
        ctx.num_inputs = len(inputs)

    @staticmethod
    def backward(ctx, *cotangents):
        operands = ctx.saved_tensors  # x, t, weight, scores
        primals, rebuild = _differentiable_primals(operands)
        outputs, vjp = torch.func.vjp(_reference_derivatives(ctx, rebuild), *primals)
        cotangents = [torch.zeros_like(output) if cotangent is None else cotangent
                      for cotangent, output in zip(cotangents, outputs)]
        grads = iter(vjp(tuple(cotangents)))
        return (tuple(next(grads) if _differentiable(value) else None for value in operands)
                + (None,) * (ctx.num_inputs - 4))


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
    """(x, t, weight, scores) -> what Derivatives.forward computes, in differentiable
    reference ops."""
    form, coefficients, ignore_index, label_smoothing, float32_loss = ctx.arguments

    def derivatives(*primals):
        inputs, targets, weight, scores = rebuild(*primals)
        dtype = _ops.loss_dtype(inputs, targets, float32_loss)
        x, t = _ops.loss_operands(inputs, targets, float32_loss)
        options = dict(form=form, **reference.family_scalars(form, coefficients), reduction="none",
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
