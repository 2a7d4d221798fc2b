"""Shared parametrization and helpers: devices, dtypes with their tolerances, reference results."""

import math

import pytest
import torch
import torch.nn.functional as F

import focal_cuda

CUDA_AVAILABLE = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not CUDA_AVAILABLE, reason="needs a CUDA device")

DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
REDUCTIONS = ["none", "mean", "sum"]
# 0.75 takes pow, 0.5 and 3.5 products; 0 and 2 have kernels of their own, 1 on the CPU
GAMMAS = [0.0, 0.5, 0.75, 1.0, 2.0, 3.5]

# Against the float64 reference evaluated on the same (rounded) values: the kernels compute in
# float32 (float64 for float64), so what remains is the rounding of the stored result.
TOLERANCES = {
    torch.float16: dict(rtol=2e-3, atol=1e-5),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-5),
    torch.float32: dict(rtol=2e-5, atol=1e-7),
    torch.float64: dict(rtol=1e-10, atol=1e-13),
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
    q_gamma = q.pow(gamma)
    ratio = torch.where(q > 0, p * pm / q, zero)
    ce_over_q = torch.where(q > 0, ce / q, zero)
    factor = valid if weight is None else valid * weight.detach().double().abs()
    if grad_output is not None:
        factor = factor * grad_output.detach().double().abs()
    if reduction == "mean":
        factor = factor / valid.sum().clamp_min(1)
    scale_inputs = factor * alpha_t * q_gamma * ((1 - t) * p + t * pm + gamma * (1 - 2 * t).abs() * ce * ratio)
    scale_targets = factor * (1 - label_smoothing) * q_gamma * (
        abs(alpha_slope) * ce + alpha_t * (x.abs() + gamma * (pm - p).abs() * ce_over_q)
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
    return tuple(torch.tensor(values, dtype=torch.float64) for values in (losses, grads_x, grads_t))


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
