"""Every way PyTorch users take derivatives: torch.func (grad, vmap, jacrev, jacfwd, hessian),
torch.autograd.forward_ad and TorchScript. Under a transform or a forward-mode level the loss is
the reference formula's (focal_cuda/_higher_order.py): its values and derivatives are checked
against the fused kernels in plain eager mode (their values, the gradients they save) or
against central differences of them, never against the reference formula itself."""

import pytest
import torch
from torch.func import grad, hessian, jacfwd, jacrev, jvp, vmap

import focal_cuda
from conftest import (DEVICES, DIFFERENCE_TOLERANCE, SECOND_DIFFERENCE_TOLERANCE, assert_matches,
                      exact_focal_loss_and_grads, finite_difference_jacobian, kernel_gradients)

REFERENCE = focal_cuda.reference.sigmoid_focal_loss
F64 = torch.float64


def make_case(kind, device, rows=5, classes=4, seed=0):
    """(inputs, targets, weight, options) for the kinds of call users make."""
    generator = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, classes, generator=generator, dtype=F64) * 3).to(device)
    options = dict(alpha=0.25, gamma=2.0)
    weight = None
    if kind == "labels":
        targets = torch.randint(0, classes + 1, (rows,), generator=generator)
        targets[1] = -100
        targets = targets.to(device)
    else:
        targets = torch.rand(rows, classes, generator=generator, dtype=F64).to(device)
    if kind == "weight":
        weight = (torch.rand(classes, generator=generator, dtype=F64) + 0.5).to(device)
    if kind == "fractional":
        options = dict(alpha=-1.0, gamma=1.5, label_smoothing=0.1)
    return x, targets, weight, options


KINDS = ["soft", "labels", "weight", "fractional"]
REDUCTIONS = ["none", "mean", "sum"]


def both(kind, reduction, device):
    """(ours, reference) as functions of (x, t, w); t and w pass through when not floating."""
    x, t, w, options = make_case(kind, device)

    def ours(x_, t_, w_):
        return focal_cuda.sigmoid_focal_loss(x_, t_, reduction=reduction, weight=w_, **options)

    def theirs(x_, t_, w_):
        return REFERENCE(x_, t_, reduction=reduction, weight=w_, **options)

    return ours, theirs, (x, t, w)


def differentiable_argnums(args):
    x, t, w = args
    return tuple(i for i, value in enumerate((x, t, w)) if value is not None and value.is_floating_point())


def assert_all_match(actual, expected):
    actual = actual if isinstance(actual, (tuple, list)) else (actual,)
    expected = expected if isinstance(expected, (tuple, list)) else (expected,)
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert_matches(a, e, F64)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("kind", KINDS)
def test_func_grad(device, kind, reduction):
    ours, _, args = both(kind, reduction, device)
    argnums = differentiable_argnums(args)
    for actual, argnum in zip(grad(ours, argnums)(*args), argnums):
        torch.testing.assert_close(actual, finite_difference_jacobian(ours, args, argnum), **DIFFERENCE_TOLERANCE)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", KINDS)
def test_func_vjp(device, kind, reduction):
    """torch.func.vjp with a cotangent that is not all ones: its primal against the fused eager
    value, its pullback against the fused eager backward of the same cotangent."""
    ours, _, args = both(kind, reduction, device)
    argnums = differentiable_argnums(args)
    expected_value = ours(*args)
    generator = torch.Generator().manual_seed(1)
    cotangent = torch.randn(expected_value.shape, generator=generator, dtype=F64).to(device)

    value, pullback = torch.func.vjp(lambda *primals: with_primals(ours, args, argnums, primals),
                                     *(args[i] for i in argnums))
    assert_matches(value, expected_value, F64)
    expected = kernel_gradients(lambda *values: ours(*values) * cotangent, args)
    assert_all_match(pullback(cotangent), expected)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", KINDS)
def test_vmap_forward(device, kind, reduction):
    """A batch of independent losses: vmap over the first dimension of inputs and targets."""
    ours, _, (x, t, w) = both(kind, reduction, device)
    batch = torch.stack([x, x.flip(0)]), torch.stack([t, t.flip(0)])
    looped = torch.stack([ours(x_, t_, w) for x_, t_ in zip(*batch)])
    assert_matches(vmap(ours, (0, 0, None))(*batch, w), looped, F64)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_vmap_with_batched_weight_and_shared_targets(device, reduction):
    ours, _, (x, t, w) = both("weight", reduction, device)
    xs = torch.stack([x, 2 * x, -x])
    ws = torch.stack([w, w.flip(0), 2 * w])
    looped = torch.stack([ours(x_, t, w_) for x_, w_ in zip(xs, ws)])
    assert_matches(vmap(ours, (0, None, 0))(xs, t, ws), looped, F64)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", KINDS)
def test_vmap_then_ordinary_backward(device, kind, reduction):
    """Inside vmap the batched tensors do not report requires_grad: an ordinary backward of the
    vmapped result must still reach the inputs."""
    ours, _, (x, t, w) = both(kind, reduction, device)
    xs = torch.stack([x, -x]).requires_grad_()
    vmap(ours, (0, None, None))(xs, t, w).sum().backward()
    expected = torch.stack([kernel_gradients(ours, (x_, t, w))[0] for x_ in (x, -x)])
    assert_matches(xs.grad, expected, F64)


def test_vmap_of_empty_inputs_keeps_their_shape():
    ours, _, _ = both("soft", "none", "cpu")
    xs, ts = torch.empty(3, 0, 4, dtype=F64), torch.empty(3, 0, 4, dtype=F64)
    assert vmap(ours, (0, 0, None))(xs, ts, None).shape == (3, 0, 4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", KINDS)
def test_batched_backward_passes(device, kind):
    """Vectorized jacobians and is_grads_batched run backward on batched gradients."""
    ours, theirs, (x, t, w) = both(kind, "none", device)
    for function in (ours, theirs):
        function.jacobian = torch.autograd.functional.jacobian(
            lambda x_: function(x_, t, w), x, vectorize=True)
    assert_matches(ours.jacobian, theirs.jacobian, F64)
    x = x.clone().requires_grad_()
    basis = torch.eye(x.numel(), dtype=F64, device=device).reshape(x.numel(), *x.shape)
    (batched,) = torch.autograd.grad(ours(x, t, w), x, basis, is_grads_batched=True)
    assert_matches(batched, ours.jacobian.reshape(x.numel(), *x.shape), F64)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("kind", KINDS)
def test_per_sample_gradients(device, kind, reduction):
    """vmap(grad(f)): the gradient of each sample's loss, as in DP-SGD."""
    ours, _, (x, t, w) = both(kind, reduction, device)
    xs, ts = torch.stack([x, -x, 0.5 * x]), torch.stack([t, t, t])
    expected = torch.stack([finite_difference_jacobian(ours, (x_, t, w), 0) for x_ in xs])
    torch.testing.assert_close(vmap(grad(ours), (0, 0, None))(xs, ts, w), expected, **DIFFERENCE_TOLERANCE)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", KINDS)
def test_jacrev_of_the_elementwise_loss(device, kind):
    ours, _, args = both(kind, "none", device)
    argnums = differentiable_argnums(args)
    for actual, argnum in zip(jacrev(ours, argnums)(*args), argnums):
        torch.testing.assert_close(actual, finite_difference_jacobian(ours, args, argnum), **DIFFERENCE_TOLERANCE)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", KINDS)
def test_jvp_with_tangents_on_every_argument(device, kind, reduction):
    """The value is the fused loss's; the tangent its central difference along the tangents."""
    ours, _, args = both(kind, reduction, device)
    generator = torch.Generator().manual_seed(3)
    argnums = differentiable_argnums(args)
    tangents = [torch.randn(args[i].shape, generator=generator, dtype=F64).to(device) for i in argnums]

    def along(step):
        return with_primals(ours, args, argnums, [args[i] + step * v for i, v in zip(argnums, tangents)])

    value, tangent = jvp(lambda *primals: with_primals(ours, args, argnums, primals),
                         tuple(args[i] for i in argnums), tuple(tangents))
    assert_matches(value, ours(*args), F64)
    step = 1e-6
    torch.testing.assert_close(tangent, (along(step) - along(-step)) / (2 * step), rtol=1e-6, atol=1e-8)


def with_primals(function, args, argnums, primals):
    """function(*args) with the arguments at argnums replaced by primals."""
    values = list(args)
    for i, primal in zip(argnums, primals):
        values[i] = primal
    return function(*values)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", KINDS)
def test_jacfwd(device, kind):
    ours, _, (x, t, w) = both(kind, "sum", device)
    assert_matches(jacfwd(ours)(x, t, w), kernel_gradients(ours, (x, t, w))[0], F64)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", KINDS)
def test_forward_mode_matches_finite_differences(device, kind):
    ours, _, (x, t, w) = both(kind, "sum", device)
    direction = torch.randn(x.shape, generator=torch.Generator().manual_seed(4), dtype=F64).to(device)
    _, tangent = jvp(lambda x_: ours(x_, t, w), (x,), (direction,))
    step = 1e-6
    central = (ours(x + step * direction, t, w) - ours(x - step * direction, t, w)) / (2 * step)
    torch.testing.assert_close(tangent, central, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("second_order", ["hessian", "jacrev(jacrev)", "jacrev(jacfwd)", "jacfwd(jacfwd)"])
def test_second_derivatives(device, kind, second_order):
    """Forward over reverse (hessian), reverse over reverse, reverse over forward and forward
    over forward."""
    ours, _, (x, t, w) = both(kind, "sum", device)
    transform = {"hessian": hessian, "jacrev(jacrev)": lambda f: jacrev(jacrev(f)),
                 "jacrev(jacfwd)": lambda f: jacrev(jacfwd(f)),
                 "jacfwd(jacfwd)": lambda f: jacfwd(jacfwd(f))}[second_order]
    expected = finite_difference_jacobian(lambda x_, t_, w_: kernel_gradients(ours, (x_, t_, w_))[0], (x, t, w), 0)
    torch.testing.assert_close(transform(ours)(x, t, w), expected, **SECOND_DIFFERENCE_TOLERANCE)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", KINDS)
def test_autograd_forward_ad(device, kind, reduction):
    import torch.autograd.forward_ad as forward_ad

    ours, _, (x, t, w) = both(kind, reduction, device)
    direction = torch.randn(x.shape, generator=torch.Generator().manual_seed(5), dtype=F64).to(device)
    # Each element's loss depends on its own logit alone: its derivative times the direction.
    expected = kernel_gradients(ours, (x, t, w))[0] * direction
    if reduction != "none":
        expected = expected.sum()
    with forward_ad.dual_level():
        loss = ours(forward_ad.make_dual(x, direction), t, w)
        tangent = forward_ad.unpack_dual(loss).tangent
    assert tangent is not None
    assert_matches(tangent, expected, F64)


@pytest.mark.parametrize("device", DEVICES)
def test_forward_ad_then_backward_of_the_tangent(device):
    """Reverse over eager forward AD: the tangent's own gradient (a Hessian-vector product)."""
    import torch.autograd.forward_ad as forward_ad

    ours, _, (x, t, w) = both("soft", "sum", device)
    direction = torch.randn(x.shape, generator=torch.Generator().manual_seed(6), dtype=F64).to(device)
    leaf = x.clone().requires_grad_()
    with forward_ad.dual_level():
        tangent = forward_ad.unpack_dual(ours(forward_ad.make_dual(leaf, direction), t, w)).tangent
    (hvp,) = torch.autograd.grad(tangent, leaf)
    # The kernels' gradient differenced along the direction.
    step = 1e-6
    along = [kernel_gradients(ours, (x + sign * step * direction, t, w))[0] for sign in (1, -1)]
    torch.testing.assert_close(hvp, (along[0] - along[1]) / (2 * step), **SECOND_DIFFERENCE_TOLERANCE)


# ---- TorchScript --------------------------------------------------------------------------------



@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", KINDS)
def test_scripted_function_matches_eager(device, kind, reduction):
    x, t, w, options = make_case(kind, device)
    scripted = torch.jit.script(focal_cuda.sigmoid_focal_loss)
    args = dict(alpha=options["alpha"], gamma=options["gamma"], reduction=reduction, weight=w,
                label_smoothing=options.get("label_smoothing", 0.0))
    if kind == "labels":  # an ignore_index of the caller's, which the scripted call must pass on
        t = torch.where(t == -100, -1, t)
        args["ignore_index"] = -1
    results = []
    for function in (scripted, focal_cuda.sigmoid_focal_loss):
        x_ = x.clone().requires_grad_()
        loss = function(x_, t, **args)
        (gradient,) = torch.autograd.grad(loss.sum(), x_)
        results.append((loss.detach(), gradient))
    assert torch.equal(results[0][0], results[1][0])
    assert_matches(results[0][1], results[1][1], F64)


def test_scripted_function_literals_are_the_ops_codes():
    """TorchScript reads no globals, so the scripted function writes the reduction codes and
    the outputs mask's bits as literals: they must stay the op's."""
    assert (focal_cuda._C.GRAD_INPUTS, focal_cuda._C.GRAD_TARGETS,
            focal_cuda._C.UNWEIGHTED_LOSS) == (1, 2, 4)
    assert focal_cuda._ops.REDUCTION_CODES == {"none": 0, "mean": 1, "sum": 2}


def test_scripted_function_rejects_a_bad_reduction():
    scripted = torch.jit.script(focal_cuda.sigmoid_focal_loss)
    x = torch.zeros(2, 3)
    with pytest.raises(Exception, match="reduction must be one of 'none', 'mean', 'sum', got 'avg'"):
        scripted(x, x, 0.25, 2.0, "avg")


@pytest.mark.parametrize("alpha", [0.25, None])
def test_scripted_module_matches_eager(alpha):
    module = focal_cuda.SigmoidFocalLoss(alpha=alpha, gamma=2, reduction="mean", ignore_index=-1,
                                         label_smoothing=0.1)
    scripted = torch.jit.script(module)
    x, t, w, _ = make_case("labels", "cpu")
    t = torch.where(t == -100, -1, t)
    assert torch.equal(scripted(x, t), module(x, t))
    x2, t2, w2, _ = make_case("weight", "cpu")
    assert torch.equal(scripted(x2, t2, w2), module(x2, t2, w2))


def test_scripted_function_sees_cuda_autocast_only():
    """Documented: under CPU autocast eager gives a float32 loss for bfloat16 logits, the
    scripted function (TorchScript reads CUDA autocast only) a bfloat16 one."""
    x, t, _, _ = make_case("labels", "cpu")
    x = x.to(torch.bfloat16)
    scripted = torch.jit.script(focal_cuda.sigmoid_focal_loss)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert focal_cuda.sigmoid_focal_loss(x, t).dtype == torch.float32
        assert scripted(x, t, 0.25, 2.0, "none").dtype == torch.bfloat16


def test_a_dual_level_without_tangents_keeps_the_fused_path():
    """Calls whose operands carry no tangent stay fused inside a forward-mode AD level: the same
    bits as outside it, finite where the loss saturates."""
    import torch.autograd.forward_ad as forward_ad

    # Saturated logits, and random ones where the reference formula's bits differ from the kernels'.
    generator = torch.Generator().manual_seed(2)
    x = torch.cat([torch.tensor([[200.0, -200.0, 3.0]]), torch.randn(40, 3, generator=generator)])
    t = torch.cat([torch.tensor([[1.0, 0.0, 1.0]]), torch.rand(40, 3, generator=generator)])
    results = []
    for level in (False, True):
        leaf = x.clone().requires_grad_()
        with forward_ad.dual_level() if level else torch.enable_grad():
            loss = focal_cuda.sigmoid_focal_loss(leaf, t, gamma=0.5, reduction="sum")
            loss.backward()
        results.append((type(loss.grad_fn).__name__, loss.detach(), leaf.grad))
    assert results[1][0] == results[0][0] == "FusedFocalLossBackward"  # the fused op's Function
    assert torch.isfinite(results[1][2]).all()
    assert torch.equal(results[0][1], results[1][1]) and torch.equal(results[0][2], results[1][2])


@pytest.mark.parametrize("case", ["saturated focal", "quality at p == t", "softmax at p == 1"])
def test_forward_mode_is_finite_where_a_fractional_power_meets_zero(case):
    """The reference formula's powers with an exponent in (0, 1) at base 0 (a saturated logit,
    p == t, p == 1) have an infinite derivative times a zero slope: taken as 0, the tangent is
    the fused gradient's, not NaN."""
    x, target, function = {
        "saturated focal": (torch.tensor([[200.0, -200.0, 3.0]], dtype=F64),
                            torch.tensor([[1.0, 0.0, 1.0]], dtype=F64),
                            lambda x_, t_: focal_cuda.sigmoid_focal_loss(x_, t_, gamma=0.5, reduction="sum")),
        "quality at p == t": (torch.zeros(1, 2, dtype=F64), torch.full((1, 2), 0.5, dtype=F64),
                              lambda x_, t_: focal_cuda.quality_focal_loss(x_, t_, beta=0.5, reduction="sum")),
        "softmax at p == 1": (torch.tensor([[800.0, 0.0, -5.0]], dtype=F64), torch.tensor([0]),
                              lambda x_, t_: focal_cuda.softmax_focal_loss(x_, t_, gamma=0.5, reduction="sum")),
    }[case]
    direction = torch.tensor([[1.0, -2.0, 0.5]], dtype=F64)[:, :x.shape[1]]
    _, tangent = jvp(lambda x_: function(x_, target), (x,), (direction,))
    (gradient,) = kernel_gradients(lambda x_: function(x_, target), (x,))
    assert torch.isfinite(tangent) and torch.isfinite(gradient).all()
    assert_matches(tangent, (gradient * direction).sum(), F64)
    assert torch.isfinite(grad(lambda x_: function(x_, target))(x)).all()


AUTOCAST_LOSSES = {
    "sigmoid": lambda x, t, labels, scores: focal_cuda.sigmoid_focal_loss(x, t, reduction="sum"),
    "pair": lambda x, t, labels, scores: focal_cuda.varifocal_loss(x, (labels, scores), reduction="sum"),
    "softmax": lambda x, t, labels, scores: focal_cuda.softmax_focal_loss(x, labels, reduction="sum"),
}


@pytest.mark.parametrize("loss", AUTOCAST_LOSSES)
@pytest.mark.parametrize("path", ["vmap", "jvp", "forward_ad"])
def test_autocast_gives_the_eager_float32_loss_under_transforms(loss, path):
    """Under autocast 16-bit logits give a float32 loss on the reference formula's paths too,
    computed from the same 16-bit values as the fused kernels' eager loss."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(6, 4, generator=generator).to(torch.bfloat16)
    t = torch.rand(6, 4, generator=generator).to(torch.bfloat16)
    labels = torch.randint(0, 4, (6,), generator=generator)
    scores = torch.rand(6, generator=generator).to(torch.bfloat16)

    def function(inputs):
        return AUTOCAST_LOSSES[loss](inputs, t, labels, scores)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = function(x)
        if path == "vmap":
            value = vmap(function)(x[None])[0]
        elif path == "jvp":
            value = jvp(function, (x,), (torch.ones_like(x),))[0]
        else:
            with torch.autograd.forward_ad.dual_level():
                dual = torch.autograd.forward_ad.make_dual(x, torch.ones_like(x))
                value = torch.autograd.forward_ad.unpack_dual(function(dual)).primal
    assert expected.dtype == value.dtype == torch.float32
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=0)


def test_scripted_function_gives_the_weight_its_gradient():
    """d(sum loss)/d(weight) through TorchScript: each element's loss before the weight, summed
    over the rows (the float64 formula)."""
    x, t, _, _ = make_case("soft", "cpu")
    weight = torch.rand(4, dtype=F64, requires_grad=True)
    scripted = torch.jit.script(focal_cuda.sigmoid_focal_loss)
    (gradient,) = torch.autograd.grad(scripted(x, t, 0.25, 2.0, "sum", weight, -100, 0.0), weight)
    expected = exact_focal_loss_and_grads(x.flatten(), t.flatten(), 0.25, 2.0)[0].reshape(x.shape).sum(0)
    torch.testing.assert_close(gradient, expected)


def dual_operand_case(name):
    """(the loss as a function of one operand other than the inputs, that operand), float64."""
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(5, 4, generator=generator, dtype=F64) * 2
    t = torch.rand(5, 4, generator=generator, dtype=F64)
    weight = torch.rand(4, generator=generator, dtype=F64) + 0.5
    scores = torch.rand(5, generator=generator, dtype=F64) * 0.8 + 0.1
    labels = torch.tensor([0, 4, 2, -100, 3])  # 4 is the background
    probabilities = torch.rand(5, 4, generator=generator, dtype=F64).softmax(1)
    return {
        "sigmoid-targets": (lambda o: focal_cuda.sigmoid_focal_loss(x, o, reduction="sum"), t),
        "sigmoid-weight": (lambda o: focal_cuda.sigmoid_focal_loss(x, t, reduction="sum", weight=o), weight),
        "pair-scores": (lambda o: focal_cuda.varifocal_loss(x, (labels, o), reduction="sum"), scores),
        "softmax-probabilities": (lambda o: focal_cuda.softmax_focal_loss(x, o, reduction="sum"), probabilities),
        "softmax-weight": (lambda o: focal_cuda.softmax_focal_loss(x, labels.clamp(max=3), weight=o), weight),
    }[name]


@pytest.mark.parametrize("name", ["sigmoid-targets", "sigmoid-weight", "pair-scores",
                                  "softmax-probabilities", "softmax-weight"])
def test_forward_ad_tangent_of_an_operand_other_than_the_inputs(name):
    """A dual tensor passed as targets, weight or scores carries its tangent through the loss
    (the call takes the reference formula), against central differences of the fused loss."""
    function, operand = dual_operand_case(name)
    direction = torch.rand(operand.shape, generator=torch.Generator().manual_seed(4), dtype=F64)
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(operand, direction)
        tangent = torch.autograd.forward_ad.unpack_dual(function(dual)).tangent
    expected = (finite_difference_jacobian(function, (operand,), 0) * direction).sum()
    assert tangent is not None
    torch.testing.assert_close(tangent, expected, **DIFFERENCE_TOLERANCE)


@pytest.mark.parametrize("dtypes", [(torch.float32, F64), (torch.bfloat16, torch.float32),
                                    (torch.float16, torch.bfloat16)], ids=str)
@pytest.mark.parametrize("path", ["vmap", "forward_ad", "reference"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_targets_of_another_dtype_give_the_eager_loss_dtype_on_every_path(dtypes, path, reduction):
    """Floating targets of another dtype: the loss takes the dtype the two promote to on the
    reference formula's paths (and in focal_cuda.reference) as in eager mode, at that dtype's
    tolerance of the fused eager loss."""
    x, t, _, options = make_case("soft", "cpu")
    x, t = x.to(dtypes[0]), t.to(dtypes[1])
    eager = focal_cuda.sigmoid_focal_loss(x, t, reduction=reduction, **options)
    promoted = torch.promote_types(*dtypes)
    if path == "vmap":
        value = vmap(lambda x_: focal_cuda.sigmoid_focal_loss(x_, t, reduction=reduction, **options))(
            x.unsqueeze(0))[0]
    elif path == "forward_ad":
        with torch.autograd.forward_ad.dual_level():
            dual = torch.autograd.forward_ad.make_dual(x, torch.ones_like(x))
            loss = focal_cuda.sigmoid_focal_loss(dual, t, reduction=reduction, **options)
            value = torch.autograd.forward_ad.unpack_dual(loss).primal
    else:
        value = REFERENCE(x, t, reduction=reduction, **options)
    assert eager.dtype == value.dtype == promoted
    assert_matches(value, eager.double(), promoted)
