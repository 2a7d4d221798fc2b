"""Shared parametrization and helpers: devices, dtypes with their tolerances, reference results."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import strategies as st

import focal_cuda

CUDA_AVAILABLE = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not CUDA_AVAILABLE, reason="needs a CUDA device")

DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
REDUCTIONS = ["none", "mean", "sum"]
# 0.75 takes pow, 0.5 and 3.5 products; 0 and 2 have kernels of their own, 1 on the CPU
GAMMAS = [0.0, 0.5, 0.75, 1.0, 2.0, 3.5]

# Against the float64 reference evaluated on the same (rounded) values: the kernels compute in
# float32 (float64 for float64), so what remains is the rounding of the stored result. float16:
# one rounding (its gradients are saved in float32), half an ulp, 2^-11, with room for the math.
# bfloat16: a gradient saved in bfloat16 is rounded again when scaled, one ulp, 2^-7, with room.
# float32: the math's own error (the focal form's worst, over 10^5 elements per gamma: 1.1e-6,
# ~9 ulp, at gamma 0.75 by pow; pow's grows with gamma |log q|, to 4.8e-6 at gamma 3.7, on terms
# of ~1e-23 that atol covers: test_properties draws gammas up to 5). float64:
# the float64 oracles' own cancellation (up to ~3e-12 against mpmath, e.g. QFL's d/dt at x = -11).
TOLERANCES = {
    torch.float16: dict(rtol=1e-3, atol=1e-5),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-5),
    torch.float32: dict(rtol=4e-6, atol=1e-7),
    torch.float64: dict(rtol=1e-11, atol=1e-13),
}


def assert_matches(actual, expected, dtype=None, scale=None):
    """actual (any dtype) against an expected float64 tensor, at the tolerance of dtype.

    scale: where the expected value is a sum of terms that may cancel (a derivative), the
    elementwise sum of their magnitudes (derivative_term_scales): the rounding of a result
    computed in float32 is relative to it, not to the possibly tiny result. Then an element
    passes when |actual - expected| <= atol + rtol * max(|expected|, scale)."""
    tolerance = TOLERANCES[dtype or actual.dtype]
    if scale is None:
        torch.testing.assert_close(actual.double(), expected.double(), **tolerance)
        return
    actual, expected = actual.double(), expected.double()
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)}, expected {tuple(expected.shape)}"
    allowed = tolerance["atol"] + tolerance["rtol"] * torch.maximum(expected.abs(), scale.double())
    both_nan = actual.isnan() & expected.isnan()
    bad = ~((actual - expected).abs() <= allowed) & ~both_nan
    if bad.any():
        worst = torch.where(bad, (actual - expected).abs() / allowed, torch.zeros_like(allowed))
        index = int(worst.nan_to_num(math.inf).flatten().argmax())
        raise AssertionError(
            f"{int(bad.sum())} of {bad.numel()} elements differ beyond atol + rtol * max(|expected|, "
            f"scale) ({tolerance}); worst at flat index {index}: {actual.flatten()[index].item()!r} vs "
            f"{expected.flatten()[index].item()!r} (scale {scale.double().flatten()[index].item():.3g})"
        )


# Central differences in float64 with step h = 1e-6 on values of order 1: truncation
# h^2 |f'''| / 6 ~ 1e-12 and rounding ~ 1e-16 |f| / h ~ 1e-10 stay well inside these.
DIFFERENCE_TOLERANCE = dict(rtol=1e-6, atol=1e-8)
# Differences of a first derivative (itself rounded to ~1e-15): the same, with room for it.
SECOND_DIFFERENCE_TOLERANCE = dict(rtol=1e-6, atol=1e-7)


def finite_difference_jacobian(function, args, argnum, step=1e-6):
    """d function(*args) / d args[argnum] by float64 central differences, element by element:
    shape function(*args).shape + args[argnum].shape. No derivative code of ours is involved."""
    base = args[argnum]
    columns = []
    for index in range(base.numel()):
        delta = torch.zeros(base.numel(), dtype=base.dtype, device=base.device)
        delta[index] = step
        delta = delta.view_as(base)
        evaluate = lambda value: function(*args[:argnum], value, *args[argnum + 1:])  # noqa: E731
        columns.append((evaluate(base + delta) - evaluate(base - delta)) / (2 * step))
    return torch.stack(columns, -1).reshape(columns[0].shape + base.shape)


def differentiable_positions(args):
    return [i for i, value in enumerate(args) if isinstance(value, torch.Tensor) and value.is_floating_point()]


def kernel_gradients(function, args):
    """The first derivatives of function(*args).sum() w.r.t. its floating arguments as a plain
    eager backward takes them (no graph): the gradients the fused forward saved."""
    positions = differentiable_positions(args)
    leaves = [value.detach().requires_grad_() if i in positions else value for i, value in enumerate(args)]
    return torch.autograd.grad(function(*leaves).sum(), [leaves[i] for i in positions])


def assert_second_derivatives_match_kernel_differences(function, args):
    """Double backward (create_graph=True, through focal_cuda.reference) against central
    differences of the kernels' first derivatives: for a random weighting u of the first
    derivatives g, d(sum g . u)/d(argument) for every floating argument. So the second
    derivatives are checked against the derivatives the kernels compute, not against the
    reference formula they come from."""
    positions = differentiable_positions(args)
    leaves = [value.detach().requires_grad_() if i in positions else value for i, value in enumerate(args)]
    first = torch.autograd.grad(function(*leaves).sum(), [leaves[i] for i in positions], create_graph=True)
    generator = torch.Generator().manual_seed(0)
    weights = [torch.randn(g.shape, generator=generator, dtype=g.dtype).to(g.device) for g in first]
    projected = sum((g * u).sum() for g, u in zip(first, weights))
    analytic = torch.autograd.grad(projected, [leaves[i] for i in positions], allow_unused=True)

    def kernel_projection(*values):
        return sum((g * u).sum() for g, u in zip(kernel_gradients(function, values), weights))

    for position, actual in zip(positions, analytic):
        expected = finite_difference_jacobian(kernel_projection, args, position)
        actual = torch.zeros_like(expected) if actual is None else actual
        torch.testing.assert_close(actual, expected, **SECOND_DIFFERENCE_TOLERANCE)


def dense_targets(inputs, targets, ignore_index=-100, label_smoothing=0.0, scores=None):
    """(t, valid) in float64: targets (floating, or integer class labels with optional per-row
    scores) as the dense target the loss sees after label smoothing, and 0 for the elements of
    ignored rows, else 1."""
    x = inputs.detach().double()
    valid = torch.ones_like(x)
    if targets.is_floating_point():
        t = targets.detach().double()
    else:
        classes = x.shape[-1]
        labels = targets.long()
        ignored = labels == ignore_index
        t = F.one_hot(torch.where(ignored, classes, labels), classes + 1)[..., :classes].double()
        if scores is not None:
            t = t * scores.detach().double().unsqueeze(-1)
        valid = (~ignored).double().unsqueeze(-1).expand_as(x)
    return t * (1 - label_smoothing) + label_smoothing / 2, valid


def derivative_term_scales(inputs, targets, alpha, gamma, *, weight=None, ignore_index=-100,
                           label_smoothing=0.0, reduction="none", grad_output=None, scores=None):
    """Elementwise sums of the magnitudes of the terms that d(loss)/d(inputs) and
    d(loss)/d(targets) add up (the formulas of csrc/focal_math.h, in float64): (scale_inputs,
    scale_targets), for assert_matches. targets: floating, or integer class labels. For the
    gradients that autograd gives (not the op's unscaled ones), pass reduction and grad_output."""
    x = inputs.detach().double()
    t, valid = dense_targets(inputs, targets, ignore_index, label_smoothing, scores)
    zero = torch.zeros_like(x)
    ce = t * torch.logaddexp(-x, zero) + (1 - t) * torch.logaddexp(x, zero)
    p, pm = torch.sigmoid(x), torch.sigmoid(-x)
    q = t * pm + (1 - t) * p
    if alpha is None or alpha < 0:
        alpha_t, alpha_slope = torch.ones_like(x), 0.0
    else:
        alpha_t, alpha_slope = alpha * t + (1 - alpha) * (1 - t), 2 * alpha - 1
    # Magnitudes throughout: for targets outside [0, 1], q, CE and alpha_t may be negative.
    q_gamma = q.pow(gamma).abs()
    ratio = torch.where(q != 0, p * pm / q, zero).abs()
    ce_over_q = torch.where(q != 0, ce / q, zero).abs()
    factor = valid if weight is None else valid * weight.detach().double().abs()
    if grad_output is not None:
        factor = factor * grad_output.detach().double().abs()
    if reduction == "mean":
        factor = factor / valid.sum().clamp_min(1)
    alpha_t = alpha_t.abs()
    scale_inputs = factor * alpha_t * q_gamma * (
        ((1 - t) * p).abs() + (t * pm).abs() + gamma * (1 - 2 * t).abs() * ce.abs() * ratio)
    scale_targets = factor * (1 - label_smoothing) * q_gamma * (
        # 1 - 2p is the difference of the rounded pm and p, known to their sum's rounding.
        abs(alpha_slope) * ce.abs() + alpha_t * (x.abs() + gamma * (pm + p) * ce_over_q)
    )
    return scale_inputs, scale_targets


def family_term_scales(form, inputs, targets, alpha, gamma, beta=0.0, *, weight=None,
                       ignore_index=-100, label_smoothing=0.0, reduction="none", grad_output=None,
                       scores=None):
    """For the forms of focal_cuda.reference.FORMS other than the focal loss: elementwise bounds
    (scale_loss, scale_inputs, scale_targets) on the rounding of the loss and its derivatives
    in the kernels' math type, relative to their unit roundoff (for assert_matches; the op's
    arguments: gamma is QFL's beta). For the sum or mean of the loss, sum scale_loss.

    QFL and VFL's negatives: a = |d|, d = p - t = (1 - t) p - t pm is a difference of terms of
    total size s = (1 - t) p + t pm, so it is known to eps * s: a^g to a relative g eps s / a,
    a^(g-1) to (g - 1) eps s / a; below eps * s a cannot be resolved (a_eff = max(a, eps s)).
    FL*: z = gamma (2t - 1) x + beta is known to eps * (|gamma (2t - 1) x| + |beta|), and
    softplus(-z), sigmoid(-z) to that relative error (d log / dz <= 1 for both)."""
    if known_form_key(form) == "focal":
        raise ValueError("family_term_scales is for the forms other than the focal loss "
                         "(derivative_term_scales has its)")
    x = inputs.detach().double()
    t, valid = dense_targets(inputs, targets, ignore_index, label_smoothing, scores)
    eps = torch.finfo(torch.float64 if inputs.dtype == torch.float64 else torch.float32).eps / 2
    zero = torch.zeros_like(x)
    p, pm = torch.sigmoid(x), torch.sigmoid(-x)
    ce = t * torch.logaddexp(-x, zero) + (1 - t) * torch.logaddexp(x, zero)
    if form == 1:  # FL*
        y = 2 * t - 1
        z = gamma * y * x + beta
        conditioning = 1 + (gamma * y * x).abs() + abs(beta)
        star = torch.logaddexp(-z, zero) / gamma
        sig_neg = torch.sigmoid(-z)
        alpha_t, slope = (torch.ones_like(x), 0.0) if alpha is None or alpha < 0 else \
            (alpha * t + (1 - alpha) * (1 - t), 2 * alpha - 1)
        loss = conditioning * alpha_t * star
        d_inputs = conditioning * alpha_t * y.abs() * sig_neg
        d_targets = conditioning * (abs(slope) * star + 2 * alpha_t * x.abs() * sig_neg)
    else:  # QFL, VFL
        s = (1 - t) * p + t * pm
        d = (1 - t) * p - t * pm
        a = torch.maximum(d.abs(), eps * s)
        g = gamma
        a_g, a_g1 = a.pow(g), a.pow(g - 1)
        amplify, amplify1 = 1 + g * s / a, 1 + abs(g - 1) * s / a
        loss = ce * a_g * amplify
        d_inputs = a_g * d.abs() * amplify + g * ce * p * pm * a_g1 * amplify1
        d_targets = a_g * x.abs() * amplify + g * ce * a_g1 * amplify1
        if form == 3:  # VFL: t > 0 is a positive, weighted by t
            positive = t > 0
            loss = torch.where(positive, t * ce, alpha * loss)
            d_inputs = torch.where(positive, t * s, alpha * d_inputs)
            d_targets = torch.where(positive, ce + t * x.abs(), alpha * d_targets)
    factor = valid if weight is None else valid * weight.detach().double().abs()
    loss = factor * loss
    if grad_output is not None:
        factor = factor * grad_output.detach().double().abs()
    if reduction == "mean":
        factor = factor / valid.sum().clamp_min(1)
    return loss, factor * d_inputs, factor * (1 - label_smoothing) * d_targets


# Saturated logits, and in each math type those where q = 1 - p_t is subnormal (1 / q overflows):
# +-95 in float32, +-720 in float64.
EXTREME_LOGITS = [-720.0, -100.0, -95.0, -30.0, -17.0, -1e-3, 0.0, 1e-3, 17.0, 30.0, 95.0, 100.0, 720.0]


def extreme_grid(dtype, device="cpu"):
    """Every extreme logit against targets 0, 1 and 0.5."""
    x = torch.tensor(EXTREME_LOGITS, dtype=torch.float64).repeat_interleave(3)
    t = torch.tensor([0.0, 1.0, 0.5], dtype=torch.float64).repeat(len(EXTREME_LOGITS))
    return x.to(device=device, dtype=dtype), t.to(device=device, dtype=dtype)


def exact_focal_loss_and_grads(inputs, targets, alpha, gamma):
    """The focal loss, d/dx and d/dt in float64 from the analytic formula, written independently
    with math.* (exact where torch.sigmoid's 1 / (1 + exp(-x)) gives 0 for a representable p)."""
    losses, grads_x, grads_t = [], [], []
    for x, t in zip(inputs.double().tolist(), targets.double().tolist()):
        p = 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))
        pm = 1 / (1 + math.exp(x)) if x <= 0 else math.exp(-x) / (1 + math.exp(-x))
        softplus_common = math.log1p(math.exp(-abs(x)))
        ce = t * (softplus_common + max(-x, 0)) + (1 - t) * (softplus_common + max(x, 0))
        q = t * pm + (1 - t) * p
        alpha_t = alpha * t + (1 - alpha) * (1 - t)
        qg = q**gamma
        ratio = p * pm / q if q > 0 else 0.0
        ce_over_q = ce / q if q > 0 else 0.0
        losses.append(alpha_t * qg * ce)
        grads_x.append(alpha_t * qg * ((1 - t) * p - t * pm + gamma * (1 - 2 * t) * ce * ratio))
        grads_t.append(qg * ((2 * alpha - 1) * ce + alpha_t * (gamma * (pm - p) * ce_over_q - x)))
    return tuple(torch.tensor(values, dtype=torch.float64, device=inputs.device)
                 for values in (losses, grads_x, grads_t))


def every_16_bit_logit(dtype, limit):
    """Every finite value of a 16-bit dtype in [-limit, limit], subnormals and both zeros
    included."""
    values = torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    return values[values.float().abs() <= limit]


def correctly_rounded(exact, dtype):
    """float64 values rounded once to a 16-bit dtype: to float32 rounding to odd (a value between
    two floats takes the one with odd significand), whose rounding to 16 bits is then the
    correct rounding of the float64 value, not a double rounding's."""
    nearest = exact.float()
    inexact = nearest.double() != exact
    even = (nearest.view(torch.int32) & 1) == 0
    toward = torch.where(exact > nearest.double(), math.inf, -math.inf).float()
    return torch.where(inexact & even, torch.nextafter(nearest, toward), nearest).to(dtype)


def ulps_apart(first, second):
    """How many values of their 16-bit dtype lie between first and second, elementwise (0 for
    +0 and -0)."""
    def ordered(values):
        bits = values.contiguous().view(torch.int16).int()
        return torch.where(bits < 0, -(bits & 0x7FFF), bits)
    return (ordered(first) - ordered(second)).abs()


def assert_16_bit_results_are_correctly_rounded(forward, dtype, gamma, limit, flushes_subnormals=False):
    """forward(inputs, targets) -> (loss, d inputs, d targets) of the focal loss, alpha 0.25, for
    every logit of the 16-bit dtype within limit against targets 0, 1 and 0.25: each stored
    result (float16's gradients, saved in float32, as backward rounds them) within 1 ulp of the
    correctly rounded float64 value, and for |x| <= 16 at least 99.9% equal to it. Up to 87
    nothing is subnormal in float32; beyond, a subnormal q keeps a few bits. Beyond 16 the loss
    of a hard target is 0.75 x or 0.25 x plus a part float32 drops (1 + e rounds to 1), often
    exactly halfway between two float16 values: ties to even decide, and the float32 math
    misses 0.3% there (bench/NOTES.md). flushes_subnormals (the CPU kernels): a result whose
    exact value is below float32's smallest normal, which bfloat16 can hold, need only be below
    it too (README, Subnormals)."""
    x = every_16_bit_logit(dtype, limit)
    inputs = x.repeat(3)
    targets = torch.tensor([0.0, 1.0, 0.25], dtype=dtype).repeat_interleave(x.numel())
    central = inputs.float().abs() <= 16
    for name, ours, exact in zip(("loss", "grad_inputs", "grad_targets"), forward(inputs, targets),
                                 exact_focal_loss_and_grads(inputs, targets, 0.25, gamma)):
        ours = ours.detach().cpu()
        apart = ulps_apart(ours.to(dtype), correctly_rounded(exact, dtype))
        if flushes_subnormals:
            tiny = exact.abs() < torch.finfo(torch.float32).tiny
            assert (ours[tiny].abs() <= torch.finfo(torch.float32).tiny).all(), name
            apart[tiny] = 0
        worst = int(apart.argmax())
        assert apart[worst] <= 1, (f"{name}: {apart[worst]} ulp at x={inputs[worst].item()}, "
                                   f"t={targets[worst].item()}: {ours[worst].item()} for {exact[worst].item()}")
        equal = (apart[central] == 0).double().mean().item()
        assert equal >= 0.999, f"{name}: {equal:.5f} of the results for |x| <= 16 correctly rounded"


def laid_out(tensor, layout):
    """A 4-d tensor's values in layout: "contiguous", "channels_last", "reversed" (its
    dimensions stored last first, as a transposed matrix's), "channels_last slice" (every other
    element of a channels-last tensor twice as wide: not dense); "size-one dims": 15 of its
    values as (1, 3, 1, 5) from a permuted (1, 5, 3, 1), whose size-1 dimensions carry strides a
    fresh tensor of that layout would not."""
    if layout == "size-one dims":
        return tensor.reshape(-1)[:15].reshape(1, 5, 3, 1).permute(0, 2, 3, 1)
    if layout == "reversed":
        return tensor.permute(3, 2, 1, 0).contiguous().permute(3, 2, 1, 0)
    if layout == "channels_last slice":  # not dense: a copy, such as autocast's, would be
        return torch.cat([tensor, tensor], -1).contiguous(memory_format=torch.channels_last)[..., ::2]
    formats = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}
    return tensor.contiguous(memory_format=formats[layout])


def random_case(shape, dtype, device, *, seed=0, scale=4.0, soft=False, positive_rate=0.3):
    """Logits ~ N(0, scale^2) and hard (or soft) targets, generated on CPU for reproducibility."""
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(shape, generator=generator, dtype=torch.float64) * scale
    if soft:
        targets = torch.rand(shape, generator=generator, dtype=torch.float64)
    else:
        targets = (torch.rand(shape, generator=generator) < positive_rate).double()
    return inputs.to(device=device, dtype=dtype), targets.to(device=device, dtype=dtype)


def reference_results(inputs, targets, alpha, gamma, reduction, grad_output=None):
    """Loss and gradients of focal_cuda.reference in float64 on the same values."""
    x = inputs.detach().double().requires_grad_()
    t = targets.detach().double().requires_grad_()
    loss = focal_cuda.reference.sigmoid_focal_loss(x, t, alpha, gamma, reduction)
    if grad_output is None:
        grad_output = torch.ones_like(loss)
    grad_x, grad_t = torch.autograd.grad(loss, (x, t), grad_output.double())
    return loss.detach(), grad_x, grad_t


def softplus_sigmoid_logits():
    """Logits for the ulp checks: every 1/200,000 of [-87.3, 87.3] (where no result is subnormal)
    and 100,000 uniform in [-4, 4]."""
    generator = torch.Generator().manual_seed(7)
    uniform = torch.rand(100_000, generator=generator) * 8 - 4
    return torch.cat([torch.linspace(-87.3, 87.3, 200_001), uniform])


def float32_ulp(exact):
    """float32's unit in the last place at each positive float64 value: exact = m 2^e with m in
    [0.5, 1) has ulp 2^(e - 24), exactly (log2 can round up just below a power of two)."""
    _, exponent = torch.frexp(exact)
    return torch.ldexp(torch.ones_like(exact), exponent - 24)


def worst_softplus_sigmoid_ulp(x, losses, grads):
    """With gamma 0, no alpha and target 0 the loss is softplus(x) and its gradient sigmoid(x):
    the kernels' exp, log1p and reciprocal. The worst error of float32 losses and grads at the
    logits x, in float32 units in the last place (NaN counts as infinitely wrong)."""
    exact_x = x.double()
    worst = 0.0
    for ours, exact in ((losses, F.softplus(exact_x)), (grads, torch.sigmoid(exact_x))):
        errors = (ours.cpu().double() - exact).abs() / float32_ulp(exact)
        worst = max(worst, errors.nan_to_num(nan=math.inf).max().item())
    return worst


def worst_float32_softplus_sigmoid_ulp(device, elements_per_call=None):
    """worst_softplus_sigmoid_ulp of focal_cuda on device. With elements_per_call (fewer than a
    vector holds), every element takes the CPU kernels' scalar path; a subsample keeps that quick."""
    x = softplus_sigmoid_logits()
    if elements_per_call is not None:
        x = x[::50]
    losses, grads = [], []
    for piece in x.split(elements_per_call or x.numel()):
        piece = piece.to(device).requires_grad_()
        loss = focal_cuda.sigmoid_focal_loss(piece, torch.zeros_like(piece), None, 0.0)
        losses.append(loss.detach())
        grads.append(torch.autograd.grad(loss.sum(), piece)[0])
    return worst_softplus_sigmoid_ulp(x, torch.cat(losses), torch.cat(grads))


def pytest_terminal_summary(terminalreporter):
    """After a CUDA emulation sweep: how many kernel instances it launched."""
    import cuda_emulation

    if cuda_emulation.launch_counts is not None:
        summary = cuda_emulation.coverage_summary(cuda_emulation.launch_counts)
        terminalreporter.write_line(f"CUDA emulation ({cuda_emulation.variant_from_environment()}): {summary}")


# The forms the helpers below know (each has formulas of its own in them): a new form of the
# sigmoid family adds its branch to each (test_family's tripwire lists every such table).
HELPER_FORMS = ("focal", "star", "quality", "varifocal")


def known_form_key(form):
    """form's key (from a key or a FORMS code), or an error that names the helpers to extend."""
    key = form if isinstance(form, str) else focal_cuda.reference.FAMILY[form].key
    if key not in HELPER_FORMS:
        raise KeyError(f"tests/conftest.py's helpers (consistency_options, loss_magnitude, "
                       f"family_term_scales, coefficients_of) have no branch for the form {key!r}")
    return key


def consistency_options(form, gamma, alpha, beta, label_smoothing):
    """The op's (form, alpha, gamma, beta, label_smoothing) for form (a reference.FORMS name),
    from drawn values a form may not take: FL* needs gamma > 0, QFL no alpha, QFL and VFL no
    label smoothing, VFL an alpha >= 0."""
    code = focal_cuda.reference.FORMS[known_form_key(form)]
    if form == "star":
        return code, alpha, max(gamma, 0.25), beta, label_smoothing
    if form == "quality":
        return code, -1.0, gamma, 0.0, 0.0
    if form == "varifocal":
        return code, abs(alpha), gamma, 0.0, 0.0
    return code, alpha, gamma, 0.0, label_smoothing


def loss_magnitude(form, inputs, targets, alpha, gamma, beta, label_smoothing):
    """The loss of the form (a FORMS code) with every sum in it taken of its terms' magnitudes
    (alpha_t, q or p - t, CE; FL*'s z), in float64: what the loss's rounding is relative to."""
    known_form_key(form)
    x = inputs.double()
    t = targets.double() * (1 - label_smoothing) + label_smoothing / 2
    zero = torch.zeros_like(x)
    p, pm = torch.sigmoid(x), torch.sigmoid(-x)
    weighted = alpha is not None and alpha >= 0 and form in (0, 1)
    # alpha_t as the kernels form it: (1 - alpha) + (2 alpha - 1) t (focal_math.h's FocalCoeffs).
    a = abs(1 - alpha) + ((2 * alpha - 1) * t).abs() if weighted else torch.ones_like(x)
    if form == 1:
        return a * (1 + (gamma * (2 * t - 1) * x).abs() + abs(beta)) / gamma
    q = (t * pm).abs() + ((1 - t) * p).abs()
    ce = t.abs() * torch.logaddexp(-x, zero) + (1 - t).abs() * torch.logaddexp(x, zero)
    if form == 3:
        a = torch.maximum(t.abs(), torch.full_like(t, alpha))
    return a * q.pow(gamma) * ce


def coefficients_of(form, alpha, gamma, beta=0.0, detach_modulation=False):
    """The sigmoid forward op's coefficients of form from the options in the kernels' meaning
    (gamma: the quality focal loss's beta; alpha -1 or None: none)."""
    known_form_key(form)
    named = dict(alpha=-1.0 if alpha is None else alpha, gamma=gamma,
                 beta=gamma if form == focal_cuda.reference.FORMS["quality"] else beta,
                 detach_modulation=float(detach_modulation))
    return [named[name] for name in focal_cuda.reference.FAMILY[form].coefficients]


def assert_gradients_are_derivatives(forward, inputs, targets, options, scores=None, weight=None):
    """The gradients that forward (the op's signature: the CPU op, or the emulated CUDA one)
    returns are the derivatives of the loss it returns, and match the float64 reference's
    autograd; a NaN loss has NaN gradients and a finite one finite gradients. float64 tensors;
    targets floating, or integer labels with optional scores (then d/dscores is checked).

    The first oracle is a central difference D of forward's own elementwise loss f, step
    h = 1e-6 (1 + |v|). Wherever f is smooth on the scale of h, its truncation error
    h^2 |f'''| / 6 stays within 1e-6 (|g| + |D|) plus twice the difference from the step
    h / 10's (which estimates it), and its rounding error (f to ~50 ulp, over h) within
    1e-8 max |f| over the points (plus, over h, 1e3 times the smallest normal number, below
    which the CPU kernels flush intermediates). The one-sided differences and a tenth of the
    step tell where f is not smooth (a kink, a jump, a singular power, a NaN within h): those
    elements are left out."""
    form, alpha, gamma, beta, label_smoothing = options
    labels = not targets.is_floating_point()
    grad_targets_wanted = not labels or scores is not None
    outputs = focal_cuda._ops.outputs_mask(True, grad_targets_wanted, True)

    def run(x, t, s):
        return forward(x, t, weight, s, form, coefficients_of(form, alpha, gamma, beta), 0, -100,
                       label_smoothing, False, outputs)[:4]

    loss, grad_inputs, grad_targets, unweighted = run(inputs, targets, scores)
    nan = loss.isnan()
    assert torch.equal(grad_inputs.isfinite(), ~nan), "no finite gradient where the loss is a number, or the reverse"
    if grad_targets_wanted:
        row_nan = nan.any(-1) if scores is not None else nan
        assert torch.equal(grad_targets.isfinite(), ~row_nan), "no finite target gradient where the loss is a number"
    if weight is not None:
        assert_matches(loss[~nan], (weight.expand_as(loss) * unweighted)[~nan])

    def check(grad, loss_at, value, what):
        h = 1e-6 * (1 + value.abs())
        f0, plus, minus = loss_at(value), loss_at(value + h), loss_at(value - h)
        central = (plus - minus) / (2 * h)
        # Plus the flush of intermediates below the smallest normal (the CPU kernels' FTZ), which
        # the loss's factors (weight, alpha, x) scale by a few: 1e3 of them, over h.
        size = torch.maximum(f0.abs(), torch.maximum(plus.abs(), minus.abs()))
        rounding = 1e-8 * size + 1e3 * torch.finfo(size.dtype).tiny / h
        # Smooth on the scale of h: the one-sided slopes agree, and so does a tenth of the step.
        forward_slope, backward_slope = (plus - f0) / h, (f0 - minus) / h
        finer = (loss_at(value + h / 10) - loss_at(value - h / 10)) / (h / 5)
        agree = lambda a, b, slack: (a - b).abs() <= 1e-3 * (a.abs() + b.abs()) + slack
        smooth = agree(forward_slope, backward_slope, rounding) & agree(central, finer, 10 * rounding)
        # The two steps' difference is (99% of) the truncation error of the coarser one.
        allowed = 1e-6 * (grad.abs() + central.abs()) + 2 * (central - finer).abs() + rounding
        bad = smooth & ~((grad - central).abs() <= allowed)
        assert not bad.any(), (
            f"d(loss)/d({what}) is not the derivative of the loss at {int(bad.sum())} of {bad.numel()} "
            f"elements; the first: {what} {value[bad][0].item()!r}, analytic {grad[bad][0].item()!r}, "
            f"finite difference {central[bad][0].item()!r}")

    check(grad_inputs, lambda x: run(x, targets, scores)[0], inputs, "inputs")
    if scores is not None:
        # Only the labelled element of a row depends on its score (labels < C here).
        labelled = lambda s: run(inputs, targets, s)[0].gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        check(grad_targets, labelled, scores, "scores")
    elif not labels:
        check(grad_targets, lambda t: run(inputs, t, None)[0], targets, "targets")

    # The second oracle: the float64 reference's autograd, where that is a number (its composite
    # forms give NaN where a modulating base is 0 and the exponent below 1).
    x = inputs.clone().requires_grad_()
    differentiable = scores if scores is not None else None if labels else targets
    wrt = [x] if differentiable is None else [x, differentiable.clone().requires_grad_()]
    reference_loss = focal_cuda.reference.family_loss(
        form, x, targets if scores is not None or labels else wrt[1],
        coefficients_of(form, alpha, gamma, beta), "none", weight, -100, label_smoothing,
        scores=wrt[1] if scores is not None else None)
    assert torch.equal(reference_loss.isnan(), nan), "NaN where the reference is a number, or the reverse"
    # Rounding is relative to the size of the terms the loss's factors sum, which may cancel for
    # targets outside [0, 1] (alpha_t, q and CE can all be near 0 there).
    dense = dense_targets(inputs, targets, scores=scores)[0] if labels else targets
    size = loss_magnitude(form, inputs, dense, alpha, gamma, beta, label_smoothing)
    reference = reference_loss.detach()
    # The CPU kernels flush intermediates below the smallest normal; the factors scale that.
    tiny = 1e3 * torch.finfo(torch.float64).tiny
    bad = ~nan & ~((loss - reference).abs() <= 1e-10 * reference.abs() + 1e-14 * size + tiny)
    assert not bad.any(), f"the loss differs from the reference's: {loss[bad][0].item()!r} vs {reference[bad][0].item()!r}"
    reference_grads = torch.autograd.grad(reference_loss.sum(), wrt)
    # A derivative adds terms of that size times |x| (or a ratio such as gamma CE / q).
    term_size = size * (1 + inputs.abs()) * (1 + gamma)
    for ours, theirs, what in zip((grad_inputs, grad_targets), reference_grads, ("inputs", "targets")):
        scale = term_size.gather(-1, targets.unsqueeze(-1)).squeeze(-1) if ours.dim() < term_size.dim() else term_size
        allowed = 1e-8 * (ours.abs() + theirs.abs()) + 1e-12 * scale + tiny
        bad = ours.isfinite() & theirs.isfinite() & ~((ours - theirs).abs() <= allowed)
        assert not bad.any(), (f"d(loss)/d({what}) differs from the reference's at {int(bad.sum())} elements; "
                               f"the first: {ours[bad][0].item()!r} vs {theirs[bad][0].item()!r}")


@st.composite
def consistency_cases(draw):
    """(inputs, targets, options, scores, weight) for assert_gradients_are_derivatives: 4 rows of
    5 classes in float64, logits in [-50, 50], targets (or the scores of labels) in [-3, 3] with
    0 and 1 drawn often, any form with the options it takes, whole and fractional gammas."""
    # No subnormals: the CPU kernels flush them to 0 in their arithmetic (README, Subnormals),
    # so a subnormal operand is not the value the float64 oracles compute with.
    values = lambda low, high, special: st.lists(
        st.one_of(st.floats(low, high, allow_subnormal=False), st.sampled_from(special)),
        min_size=20, max_size=20)
    x = torch.tensor(draw(values(-50, 50, [0.0, -1.2, 2.0])), dtype=torch.float64).view(4, 5)
    t = torch.tensor(draw(values(-3, 3, [0.0, 1.0, -0.5, 2.0])), dtype=torch.float64).view(4, 5)
    form = draw(st.sampled_from(list(focal_cuda.reference.FORMS)))
    options = consistency_options(
        form, draw(st.sampled_from([0.0, 0.5, 1.0, 1.5, 2.0, 2.7, 3.0, 9.0, 10.0])),
        draw(st.one_of(st.just(-1.0), st.floats(0, 1, allow_subnormal=False))),
        draw(st.floats(-3, 3, allow_subnormal=False)),
        draw(st.sampled_from([0.0, 0.1])))
    weight = {None: None, "class": torch.linspace(-1, 2, 5, dtype=torch.float64),
              "element": torch.linspace(-1, 2, 20, dtype=torch.float64).view(4, 5),
              }[draw(st.sampled_from([None, "class", "element"]))]
    if draw(st.booleans()):  # labels with scores: row r's class r + 1 gets the score t[r, 0]
        return x, torch.arange(1, 5), options, t[:, 0].clone(), weight
    return x, t, options, None, weight


def capture_cuda_graph(step):
    """(graph, step's output in it): step warmed up on a side stream, as capture requires, then
    captured; capture raises if anything in it waits for the host."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        output = step()
    return graph, output
