"""The softmax focal loss: values and gradients against float64 formulas written here and against
F.cross_entropy at gamma 0, layouts, extremes (against mpmath), errors, the module, and the
paths the sigmoid losses have (autograd twice, torch.compile, opcheck, torch.func, autocast)."""

import math
import re

import mpmath
import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import focal_cuda
from conftest import (CUDA_AVAILABLE, DEVICES, DTYPES, REDUCTIONS, assert_matches,
                      assert_second_derivatives_match_kernel_differences, capture_cuda_graph)

CLASSES = 5
SOFTMAX_GAMMAS = [0.0, 0.5, 1.0, 2.0, 2.5, 0.3]  # 0.3 by pow
TARGET_KINDS = ["labels", "smoothed", "probabilities"]


def expected_loss(inputs, targets, alpha=None, gamma=2.0, reduction="mean", weight=None,
                  ignore_index=-100, label_smoothing=0.0):
    """The loss in float64 from its definition, on the (rounded) inputs: p by exponentials of
    the shifted logits, the targets as a dense distribution, the reductions of F.cross_entropy."""
    x = inputs.double()
    dim = 0 if x.dim() == 1 else 1
    classes = x.shape[dim]
    shifted = x - x.amax(dim, keepdim=True)
    log_p = shifted - shifted.exp().sum(dim, keepdim=True).log()
    one_minus_p = -torch.expm1(log_p)
    shape = [1] * x.dim()
    shape[dim] = classes
    w = torch.ones(classes, dtype=torch.float64) if weight is None else weight.double().cpu()
    w = w.to(x.device)
    if targets.is_floating_point():
        q = targets.double()
        counted = torch.ones(q.sum(dim).shape, dtype=torch.float64, device=x.device)
    else:
        labels = targets.long()
        valid = labels != ignore_index
        q = F.one_hot(torch.where(valid, labels, 0), classes).double().movedim(-1, dim)
        counted = torch.where(valid, w[torch.where(valid, labels, 0)], 0.0)
    q = q * (1 - label_smoothing) + label_smoothing / classes
    if not targets.is_floating_point():
        q = q * (targets.long() != ignore_index).unsqueeze(dim)
    loss = -(1.0 if alpha is None else alpha) * (w.reshape(shape) * q * one_minus_p**gamma * log_p).sum(dim)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / counted.sum()


def make_case(shape, dtype, device, kind, *, seed=0, scale=3.0, ignore_fraction=0.2):
    """(logits, targets) for logits of shape (N, C, ...) and targets of kind."""
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(shape, generator=generator, dtype=torch.float64) * scale
    dim = 0 if len(shape) == 1 else 1
    if kind == "probabilities":
        targets = torch.softmax(torch.randn(shape, generator=generator, dtype=torch.float64) * 2, dim)
        targets = targets.to(dtype)
    else:
        positions = list(shape)
        del positions[dim]
        targets = torch.randint(0, shape[dim], positions, generator=generator)
        if ignore_fraction and targets.dim() > 0:
            targets[torch.rand(positions, generator=generator) < ignore_fraction] = -100
    return inputs.to(device=device, dtype=dtype), targets.to(device)


def with_ignored_logits_poisoned(inputs, targets, ignore_index=-100):
    """A copy of inputs (same strides) whose ignored positions hold NaN, inf and -inf logits."""
    dim = 0 if inputs.dim() == 1 else 1
    classes = inputs.shape[dim]
    pattern = torch.tensor([math.nan, math.inf, -math.inf], dtype=inputs.dtype, device=inputs.device)
    pattern = pattern.repeat(classes)[:classes].reshape([classes] + [1] * (inputs.dim() - dim - 1))
    ignored = (targets == ignore_index).unsqueeze(dim)
    poisoned = inputs.clone()
    poisoned.copy_(torch.where(ignored, pattern, inputs))
    return poisoned


def loss_and_grads(function, inputs, targets, grad_output=None, weight_grad=True, **options):
    """function's loss and its gradients w.r.t. inputs, floating targets and a given weight
    (when weight_grad)."""
    x = inputs.detach().clone().requires_grad_()
    t = targets.detach().clone().requires_grad_(targets.is_floating_point())
    weight = options.pop("weight", None)
    w = None if weight is None else weight.detach().clone().requires_grad_(weight_grad)
    loss = function(x, t, weight=w, **options)
    loss.backward(torch.ones_like(loss) if grad_output is None else grad_output)
    return loss.detach(), x.grad, t.grad if t.requires_grad else None, None if w is None else w.grad


def dense_targets(inputs, targets, ignore_index, label_smoothing):
    """The target distribution per position in float64 (0 at ignored positions)."""
    dim = 0 if inputs.dim() == 1 else 1
    classes = inputs.shape[dim]
    if targets.is_floating_point():
        return targets.double() * (1 - label_smoothing) + label_smoothing / classes
    labels = targets.long()
    valid = (labels != ignore_index).unsqueeze(dim)
    q = F.one_hot(torch.where(labels != ignore_index, labels, 0), classes).double().movedim(-1, dim)
    return (q * (1 - label_smoothing) + label_smoothing / classes) * valid


def gradient_scale(inputs, targets, alpha, gamma, reduction, weight, label_smoothing, ignore_index=-100):
    """Per element, what d(loss)/d(inputs) = g_j - p_j sum_c g_c sums in magnitude,
    |g_j| + p_j sum_c |g_c| with g_c = alpha w_c q_c (1 - p_c)^gamma (gamma p log p / (1 - p) - 1)
    in float64 (scaled for the mean): the rounding of a float32 result is relative to it."""
    x = inputs.double()
    dim = 0 if x.dim() == 1 else 1
    log_p = torch.log_softmax(x, dim)
    p = log_p.exp()
    u = -torch.expm1(log_p)
    ratio = torch.where(u > 0, p * log_p / u, torch.full_like(u, -1.0))
    shape = [1] * x.dim()
    shape[dim] = x.shape[dim]
    w = (torch.ones(x.shape[dim]) if weight is None else weight.double().cpu()).to(x.device).reshape(shape)
    q = dense_targets(inputs, targets, ignore_index, label_smoothing)
    g = (alpha * w * q * u**gamma * (gamma * ratio - 1)).abs()
    scale = g + p * g.sum(dim, keepdim=True)
    if reduction == "mean":
        if targets.is_floating_point():
            divisor = q.sum(dim).numel()
        else:
            labels = targets.long()
            counted = labels != ignore_index
            divisor = float(w.flatten()[torch.where(counted, labels, 0)][counted].sum().detach())
        scale = scale / divisor
    return scale


def weight_gradient_scale(expected, weight, expected_grad):
    """What d(loss)/d(weight) sums in magnitude, to which its rounding is relative: a label
    mean's d/dw_c = (S_c - mean n_c) / W cancels (to 0 where every label is c), its terms each at
    most |loss| / min(weight) (weights > 0)."""
    terms = expected.detach().abs().sum() / weight.min()
    return torch.maximum(expected_grad.abs().max(), terms).expand_as(expected_grad)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", TARGET_KINDS)
@pytest.mark.parametrize("gamma", SOFTMAX_GAMMAS)
# 21 positions a sample: vectors, and a tail, in each class's plane (the CPU's NCHW loops); 131
# classes side by side: vectors over a row's classes, and a tail (its (N, C) loops).
@pytest.mark.parametrize("shape", [(6, CLASSES, 3, 7), (9, 131)], ids=["planes", "rows"])
def test_loss_and_gradients_match_the_definition(device, dtype, kind, gamma, shape):
    inputs, targets = make_case(shape, dtype, device, kind, seed=int(gamma * 10))
    smoothing = 0.1 if kind == "smoothed" else 0.0
    weight = torch.rand(shape[1], dtype=torch.float64, device=device) + 0.5
    # The weight's gradient sums over positions: float32 rounds each term and the running sum.
    weight_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    for reduction in REDUCTIONS:
        options = dict(alpha=0.25, gamma=gamma, reduction=reduction, label_smoothing=smoothing)
        loss, grad_x, grad_t, grad_w = loss_and_grads(focal_cuda.softmax_focal_loss, inputs, targets,
                                                      weight=weight, **options)
        x = inputs.double().clone().requires_grad_()
        t = targets.double().clone().requires_grad_() if targets.is_floating_point() else targets
        w = weight.clone().requires_grad_()
        expected = expected_loss(x, t, weight=w, **options)
        expected.backward(torch.ones_like(expected))
        assert loss.dtype == dtype
        assert_matches(loss, expected.detach(), dtype)
        scale = gradient_scale(inputs, targets, 0.25, gamma, reduction, weight, smoothing)
        assert_matches(grad_x, x.grad, dtype, scale=scale)
        if grad_t is not None:
            assert_matches(grad_t, t.grad, dtype)
        assert_matches(grad_w, w.grad, weight_dtype, scale=weight_gradient_scale(expected, weight, w.grad))


@st.composite
def strided_layouts(draw):
    """A shape with its class dimension (up to 140 classes: the CPU's row loops from 64), and a
    memory layout: a permutation of the dimensions and a step and offset in each."""
    rank = draw(st.integers(1, 5))
    shape = draw(st.lists(st.integers(0, 5), min_size=rank, max_size=rank))
    shape[0 if rank == 1 else 1] = draw(st.one_of(st.integers(1, 9), st.integers(60, 140)))
    permutation = draw(st.permutations(range(rank)))
    steps = draw(st.lists(st.integers(1, 3), min_size=rank, max_size=rank))
    offsets = draw(st.lists(st.integers(0, 2), min_size=rank, max_size=rank))
    return shape, permutation, steps, offsets


def strided(values, layout):
    """A tensor of layout's shape whose elements lie in values(storage shape) as layout says."""
    shape, permutation, steps, offsets = layout
    padded = [offset + max(size - 1, 0) * step + 1 for size, step, offset in zip(shape, steps, offsets)]
    storage = values([padded[dim] for dim in permutation])
    logical = storage.permute([permutation.index(dim) for dim in range(len(shape))])
    return logical[tuple(slice(offset, offset + size * step, step)
                         for size, step, offset in zip(shape, steps, offsets))]


@settings(max_examples=200, deadline=None)
@given(layout=strided_layouts(), same_target_layout=st.booleans(),
       kind=st.sampled_from(TARGET_KINDS), dtype=st.sampled_from(DTYPES),
       device=st.sampled_from(["cpu", "cuda"] if CUDA_AVAILABLE else ["cpu"]),
       reduction=st.sampled_from(REDUCTIONS), gamma=st.sampled_from(SOFTMAX_GAMMAS),
       weighted=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_random_layouts_match_the_definition(layout, same_target_layout, kind, dtype, device, reduction,
                                             gamma, weighted, seed):
    """Any strides of the logits (and of probability targets, which need not sum to 1), any
    class count and rank, against the float64 definition."""
    generator = torch.Generator().manual_seed(seed)
    draw = lambda shape: (torch.randn(shape, generator=generator, dtype=torch.float64) * 3).to(device, dtype)
    inputs = strided(draw, layout)
    dim = 0 if inputs.dim() == 1 else 1
    classes = inputs.shape[dim]
    # One class: p = 1, where the float64 autograd's (1 - p)^(gamma - 1) is inf times 0.
    assume(classes > 1 or gamma >= 1)
    if kind == "probabilities":
        uniform = lambda shape: torch.rand(shape, generator=generator, dtype=torch.float64).to(device, dtype)
        targets = strided(uniform, layout) if same_target_layout else uniform(inputs.shape)
    else:
        positions = inputs.shape[:dim] + inputs.shape[dim + 1:]
        targets = torch.randint(0, classes, positions, generator=generator)
        targets[torch.rand(positions, generator=generator) < 0.2] = -100
        targets = targets.to(device)
    smoothing = 0.1 if kind == "smoothed" else 0.0
    weight = torch.rand(classes, generator=generator, dtype=torch.float64).to(device) + 0.5 if weighted else None
    options = dict(alpha=0.25, gamma=gamma, reduction=reduction, label_smoothing=smoothing)
    x = inputs.double().clone().requires_grad_()
    t = targets.double().clone().requires_grad_() if targets.is_floating_point() else targets
    w = None if weight is None else weight.clone().requires_grad_()
    expected = expected_loss(x, t, weight=w, **options)
    assume(not expected.isnan().any())  # a mean of nothing: test_mean_of_nothing_and_empty_inputs
    loss, grad_x, grad_t, grad_w = loss_and_grads(focal_cuda.softmax_focal_loss, inputs, targets,
                                                  weight=weight, **options)
    assert loss.shape == expected.shape and loss.dtype == dtype
    assert_matches(loss, expected.detach(), dtype)
    if inputs.numel() == 0:
        return
    expected.backward(torch.ones_like(expected))
    assert_matches(grad_x, x.grad, dtype,
                   scale=gradient_scale(inputs, targets, 0.25, gamma, reduction, weight, smoothing))
    if grad_t is not None:
        assert_matches(grad_t, t.grad, dtype)
    if grad_w is not None:
        weight_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        assert_matches(grad_w, w.grad, weight_dtype, scale=weight_gradient_scale(expected, weight, w.grad))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(9, CLASSES), (2, CLASSES, 4, 5), (3, CLASSES, 17), (CLASSES,)])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.15])
@pytest.mark.parametrize("kind", ["labels", "probabilities"])
def test_gamma_zero_is_cross_entropy(device, dtype, shape, weighted, label_smoothing, kind):
    inputs, targets = make_case(shape, dtype, device, kind)
    weight = torch.rand(CLASSES, dtype=dtype, device=device) + 0.5 if weighted else None
    # float64: a few roundings of values of order 1 apart; float32 likewise, in float32.
    tolerance = dict(rtol=1e-13, atol=1e-14) if dtype == torch.float64 else dict(rtol=2e-6, atol=2e-7)
    for reduction in REDUCTIONS:
        options = dict(weight=weight, reduction=reduction, label_smoothing=label_smoothing)
        # F.cross_entropy does not differentiate its weight.
        ours = loss_and_grads(lambda x, t, **o: focal_cuda.softmax_focal_loss(x, t, gamma=0.0, **o),
                              inputs, targets, weight_grad=False, **options)
        theirs = loss_and_grads(F.cross_entropy, inputs, targets, weight_grad=False, **options)
        for mine, peer in zip(ours, theirs):
            if peer is None:
                assert mine is None
                continue
            torch.testing.assert_close(mine, peer, **tolerance)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["channels_last", "transposed", "sliced"])
def test_layouts_give_the_contiguous_result(device, layout):
    """Bit for bit the result of the same logits in a contiguous NCHW (or (N, C)) tensor."""
    inputs, targets = make_case((4, CLASSES, 6, 9), torch.float32, device, "labels")
    if layout == "channels_last":
        strided = inputs.to(memory_format=torch.channels_last)
    elif layout == "transposed":  # (N, C) with the classes outermost in memory
        inputs, targets = make_case((33, CLASSES), torch.float32, device, "labels")
        strided = inputs.t().contiguous().t()
    else:  # sliced: positions not one stride apart, read through a copy
        wide, _ = make_case((4, CLASSES, 6, 18), torch.float32, device, "labels")
        strided = wide[..., ::2]
        inputs = strided.contiguous()
    assert not strided.is_contiguous()
    for reduction in REDUCTIONS:  # the backward's scaling in the saved gradient's layout too
        expected = loss_and_grads(focal_cuda.softmax_focal_loss, inputs, targets, reduction=reduction)
        actual = loss_and_grads(focal_cuda.softmax_focal_loss, strided, targets, reduction=reduction)
        torch.testing.assert_close(actual[0], expected[0], rtol=0, atol=0)
        torch.testing.assert_close(actual[1], expected[1], rtol=0, atol=0)


def exact_softmax_focal(logits, label, gamma):
    """(loss, d loss/d logits) of one position with a label, at 60 digits."""
    with mpmath.workdps(60):
        z = [mpmath.mpf(v) for v in logits]
        top = max(z)
        total = mpmath.fsum(mpmath.exp(v - top) for v in z)
        p = [mpmath.exp(v - top) / total for v in z]
        log_p = z[label] - top - mpmath.log(total)
        u = 1 - p[label]
        loss = -(u**gamma) * log_p
        slope = (gamma * u ** (gamma - 1) * p[label] * log_p - u**gamma) if u > 0 else -(u**gamma)
        grads = [slope * ((1 if j == label else 0) - p[j]) for j in range(len(z))]
        return float(loss), [float(g) for g in grads]


# Confident rows (1 - p far below float's epsilon), classes whose probability underflows,
# logits of +-1e4, ties at the max, a label at the least likely class.
EXTREME_ROWS = [
        ([12.0, 0.0, -3.0, -8.0, 1.0], 0),
        ([40.0, 0.0, -3.0, -8.0, 1.0], 0),
        ([1e4, -1e4, 0.0, 5.0, -5.0], 0),
        ([1e4, -1e4, 0.0, 5.0, -5.0], 1),
        ([-1e4, -1e4, -1e4, -1e4, -1e4], 3),
        ([3.0, 3.0, -100.0, 0.0, 2.0], 1),
        ([0.0, -120.0, -800.0, 1.0, 0.5], 2),
        ([25.0, 24.0, 0.0, 0.0, 0.0], 1),
]


def assert_extreme_rows_exact(loss, grad_x, dtype, gamma, rows=EXTREME_ROWS):
    """The loss and gradients of rows (reduction "none") against mpmath's."""
    assert torch.isfinite(loss).all() and torch.isfinite(grad_x).all()
    exact = [exact_softmax_focal(row, label, gamma) for row, label in rows]
    expected_loss_ = torch.tensor([value for value, _ in exact], dtype=torch.float64)
    expected_grad = torch.tensor([grads for _, grads in exact], dtype=torch.float64)
    # Relative to each value (the loss of a confident row is kept, not cancelled), within a few
    # roundings; an underflowed float value (below 1e-38, flushed on CPU) counts as 0.
    eps = torch.finfo(dtype).eps
    tiny = torch.finfo(dtype).tiny
    for actual, expected in ((loss, expected_loss_), (grad_x, expected_grad)):
        error = (actual.double().cpu() - expected).abs()
        allowed = 16 * eps * expected.abs() + tiny * 4
        assert (error <= allowed).all(), (actual, expected)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("gamma", [0.0, 0.25, 0.75, 1.0, 2.0])
def test_extreme_logits_are_finite_and_exact(device, dtype, gamma):
    inputs = torch.tensor([row for row, _ in EXTREME_ROWS], dtype=dtype, device=device)
    labels = torch.tensor([label for _, label in EXTREME_ROWS], device=device)
    loss, grad_x, _, _ = loss_and_grads(focal_cuda.softmax_focal_loss, inputs, labels, gamma=gamma,
                                        reduction="none")
    assert_extreme_rows_exact(loss, grad_x, dtype, gamma)


def confident_soft_case(kind, classes, device):
    """(float32 inputs, targets, label_smoothing): six positions whose class 0 is confident (logit
    10 to 26 against N(0, 1): p > 0.99 for up to 131 classes) and holds most of the target:
    label 0 smoothed by 0.02, or probabilities with 0.98 on class 0. NCHW planes for CLASSES
    classes, else (N, C) rows."""
    generator = torch.Generator().manual_seed(5)
    rows = torch.randn(6, classes, generator=generator, dtype=torch.float64)
    rows[:, 0] = torch.tensor([10.0, 12.0, 14.0, 18.0, 22.0, 26.0], dtype=torch.float64)
    inputs = rows.T.reshape(1, classes, 6) if classes == CLASSES else rows
    if kind == "probabilities":
        rest = torch.softmax(torch.randn(inputs.shape, generator=generator, dtype=torch.float64), 1)[:, 1:]
        targets = torch.cat([torch.full_like(rest[:, :1], 0.98), rest / rest.sum(1, keepdim=True) * 0.02], 1)
        return inputs.float().to(device), targets.float().to(device), 0.0
    labels = torch.zeros(inputs.shape[:1] + inputs.shape[2:], dtype=torch.long, device=device)
    return inputs.float().to(device), labels, 0.02


def assert_confident_class_gradient_exact(grad, inputs, targets, gamma, label_smoothing):
    """grad (of the summed loss) at class 0 within 8 ulp of the float64 definition at the same
    float32 operands, relative to itself: each of its two products is about 8 roundings of at
    most half an ulp (the slope's power, ratio and reciprocal, q, w) and the sum of two such
    terms of unlike size adds one."""
    x = inputs.double().requires_grad_()
    t = targets.double() if targets.is_floating_point() else targets
    expected_loss(x, t, gamma=gamma, reduction="sum", label_smoothing=label_smoothing).backward()
    error = (grad[:, 0].double() - x.grad[:, 0]).abs() / x.grad[:, 0].abs()
    eps = torch.finfo(torch.float32).eps
    assert error.max() <= 8 * eps, f"{error.max() / eps:.1f} ulp"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["smoothed", "probabilities"])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
@pytest.mark.parametrize("classes", [CLASSES, 131], ids=["planes", "rows"])
def test_soft_target_gradient_at_a_confident_class_keeps_its_accuracy(device, kind, gamma, classes):
    """With soft targets and most of the target on the most likely class (label smoothing once a
    network is confident), dL/dz there is about p - q, both near 1: as g - p sum(g) it would
    subtract nearly equal terms (in float32 that form lost up to 238 ulp on these cases at
    gamma 0, up to 19 at gamma 0.5). Taken as g (1 - p) - p (the other classes' g), with 1 - p
    from the row's sums, it keeps a few ulp."""
    inputs, targets, smoothing = confident_soft_case(kind, classes, device)
    _, grad, _, _ = loss_and_grads(focal_cuda.softmax_focal_loss, inputs, targets, gamma=gamma,
                                   reduction="sum", label_smoothing=smoothing)
    assert_confident_class_gradient_exact(grad, inputs, targets, gamma, smoothing)


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_in_float64(device):
    for kind in TARGET_KINDS:
        inputs, targets = make_case((3, 4, 5), torch.float64, device,
                                    "probabilities" if kind == "probabilities" else "labels")
        weight = torch.rand(4, dtype=torch.float64, device=device) + 0.5
        x = inputs.requires_grad_()
        t = targets.requires_grad_() if targets.is_floating_point() else targets
        w = weight.requires_grad_()
        smoothing = 0.2 if kind == "smoothed" else 0.0
        for reduction in REDUCTIONS:
            for gamma in (0.0, 0.5, 2.0):
                def function(x_, w_, t_=t):
                    return focal_cuda.softmax_focal_loss(x_, t_, 0.5, gamma, reduction, w_, -100, smoothing)
                assert torch.autograd.gradcheck(function, (x, w))
                assert_second_derivatives_match_kernel_differences(function, (x, w))
                if targets.is_floating_point():
                    assert torch.autograd.gradcheck(lambda t_: function(x, w, t_), (t,))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["smoothed", "probabilities"])
def test_a_class_masked_with_minus_inf_keeps_the_gradient_finite(device, dtype, kind):
    """A class whose logits are -inf (masked) but whose target is not 0: the loss is inf, as
    F.cross_entropy's; the logits' gradient is its limit, finite as F.cross_entropy's (at
    gamma 2 too, where p log p / u enters it): the gradient of logits of -1e4 there, whose p is
    0 as well, bit for bit."""
    inputs, targets = make_case((6, CLASSES, 4), dtype, device, kind if kind == "probabilities" else "labels",
                                ignore_fraction=0)
    options = dict(gamma=2.0, label_smoothing=0.1 if kind == "smoothed" else 0.0)
    masked, far = inputs.clone(), inputs.clone()
    masked[:, 2] = -math.inf
    far[:, 2] = -1e4
    loss, grad, *_ = loss_and_grads(focal_cuda.softmax_focal_loss, masked, targets, **options)
    limit = loss_and_grads(focal_cuda.softmax_focal_loss, far, targets, **options)[1]
    assert loss.isinf() and loss > 0
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(grad, limit, rtol=0, atol=0)
    # The reference formula's paths (create_graph, torch.func): the same limit, to rounding.
    loss_of = lambda x: focal_cuda.softmax_focal_loss(x, targets, **options)
    x = masked.clone().requires_grad_()
    reference_loss = loss_of(x)
    (differentiable,) = torch.autograd.grad(reference_loss, x, create_graph=True)
    assert reference_loss.isinf() and reference_loss > 0
    for reference in (differentiable.detach(), torch.func.grad(loss_of)(masked)):
        assert_matches(reference, limit.double())


@pytest.mark.parametrize("gamma", [0.0, 2.0])
def test_a_masked_class_no_label_names_adds_nothing_on_every_path(gamma):
    """Labels, none of them the masked (-inf) class: a finite loss, the logits' of -1e4 there,
    from the kernels and from the reference formula (torch.func, create_graph) alike, where
    0 * inf had made the latter NaN."""
    inputs, labels = make_case((6, CLASSES, 4), torch.float64, "cpu", "labels", ignore_fraction=0)
    labels = torch.where(labels == 2, torch.zeros_like(labels), labels)
    masked, far = inputs.clone(), inputs.clone()
    masked[:, 2] = -math.inf
    far[:, 2] = -1e4

    def loss_of(x):
        return focal_cuda.softmax_focal_loss(x, labels, gamma=gamma)

    expected, expected_grad = loss_and_grads(focal_cuda.softmax_focal_loss, far, labels, gamma=gamma)[:2]
    grad, value = torch.func.grad_and_value(loss_of)(masked)
    x = masked.clone().requires_grad_()
    (differentiable,) = torch.autograd.grad(loss_of(x), x, create_graph=True)
    assert_matches(loss_of(masked), expected)
    assert_matches(value, expected)
    assert_matches(grad, expected_grad)
    assert_matches(differentiable.detach(), expected_grad)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, CLASSES, 4, 5), (7, CLASSES), (CLASSES,)], ids=["nchw", "rows", "one"])
def test_elementwise_loss_may_be_changed_in_place(device, dtype, shape):
    """As F.cross_entropy's: the "none" loss is no view, so positions may be masked in place
    before the backward (autograd refuses in-place changes to a Function's view outputs)."""
    inputs, labels = make_case(shape, dtype, device, "labels", ignore_fraction=0)
    mask = torch.arange(labels.numel(), device=device).view(labels.shape) % 3 == 0

    def masked_gradient(loss_of, x):
        x = x.clone().requires_grad_()
        loss = loss_of(x)
        loss[mask] = 0
        loss.sum().backward()
        return x.grad

    ours = masked_gradient(lambda x: focal_cuda.softmax_focal_loss(x, labels, gamma=0.0, reduction="none"), inputs)
    expected = masked_gradient(lambda x: F.cross_entropy(x, labels, reduction="none"), inputs.double())
    assert_matches(ours, expected, dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_mean_of_nothing_and_empty_inputs(device):
    inputs, labels = make_case((4, CLASSES), torch.float32, device, "labels")
    labels.fill_(-100)
    loss, grad_x, _, _ = loss_and_grads(focal_cuda.softmax_focal_loss, inputs, labels)
    assert loss.isnan() and F.cross_entropy(inputs, labels).isnan()
    assert (grad_x == 0).all()
    empty = torch.empty(0, CLASSES, device=device, requires_grad=True)
    for reduction, value in (("mean", math.nan), ("sum", 0.0)):
        result = focal_cuda.softmax_focal_loss(empty, torch.empty(0, dtype=torch.int64, device=device),
                                               reduction=reduction)
        torch.testing.assert_close(result, torch.tensor(value, device=device), equal_nan=True)
    none = focal_cuda.softmax_focal_loss(empty, torch.empty(0, dtype=torch.int64, device=device),
                                         reduction="none")
    assert none.shape == (0,)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["labels", "smoothed"])
# The CPU's NCHW planes, its (N, C) rows of many classes, and its gathered blocks.
@pytest.mark.parametrize("shape, memory_format", [((6, CLASSES, 3, 7), None), ((9, 131), None),
                                                  ((2, 6, 3, 5), torch.channels_last)],
                         ids=["planes", "rows", "channels_last"])
def test_ignored_positions_leave_no_trace_whatever_their_logits(device, dtype, kind, shape, memory_format):
    """F.cross_entropy's loss, but not its gradient, stays finite there; ours are both exactly
    what finite logits give: 0 at the ignored positions, the rest unchanged to the bit."""
    inputs, labels = make_case(shape, dtype, device, "labels", ignore_fraction=0.4)
    if memory_format is not None:
        inputs = inputs.contiguous(memory_format=memory_format)
    poisoned = with_ignored_logits_poisoned(inputs, labels)
    weight = torch.rand(shape[1], dtype=torch.float64, device=device) + 0.5
    ignored = (labels == -100).unsqueeze(1).expand_as(inputs)
    for reduction in REDUCTIONS:
        options = dict(alpha=0.25, gamma=1.5, reduction=reduction, weight=weight,
                       label_smoothing=0.1 if kind == "smoothed" else 0.0)
        clean = loss_and_grads(focal_cuda.softmax_focal_loss, inputs, labels, **options)
        dirty = loss_and_grads(focal_cuda.softmax_focal_loss, poisoned, labels, **options)
        for got, expected in zip(dirty, clean):
            if expected is not None:
                torch.testing.assert_close(got, expected, rtol=0, atol=0)
        assert (dirty[1][ignored] == 0).all()


def test_ignored_positions_leave_no_trace_on_the_reference_paths():
    """create_graph, torch.func and vmap take the reference formula: poisoned ignored logits
    change none of their bits, and their values are the fused kernels' (the oracle: eager calls
    on the clean logits, a path of its own)."""
    inputs, labels = make_case((6, CLASSES, 3, 7), torch.float64, "cpu", "labels", ignore_fraction=0.4)
    poisoned = with_ignored_logits_poisoned(inputs, labels)
    ignored = (labels == -100).unsqueeze(1).expand_as(inputs)
    options = dict(gamma=1.5, label_smoothing=0.1)
    loss_of = lambda x: focal_cuda.softmax_focal_loss(x, labels, **options)
    clean = torch.func.grad(loss_of)(inputs)
    assert_matches(clean, loss_and_grads(focal_cuda.softmax_focal_loss, inputs, labels, **options)[1])
    for x in (inputs, poisoned):
        x = x.clone().requires_grad_()
        (first,) = torch.autograd.grad(loss_of(x), x, create_graph=True)
        (second,) = torch.autograd.grad(first.sum(), x)
        assert torch.isfinite(second).all() and (second[ignored] == 0).all()
        for grad in (first.detach(), torch.func.grad(loss_of)(x.detach())):
            assert (grad[ignored] == 0).all()
            torch.testing.assert_close(grad, clean, rtol=0, atol=0)
    rows, row_labels = make_case((9, CLASSES), torch.float64, "cpu", "labels", ignore_fraction=0.4)
    batch = torch.stack([rows, rows + 1])
    per_sample = torch.func.vmap(lambda x: focal_cuda.softmax_focal_loss(x, row_labels, gamma=1.5))
    poisoned_batch = torch.stack([with_ignored_logits_poisoned(sample, row_labels) for sample in batch])
    batched = per_sample(batch)
    torch.testing.assert_close(per_sample(poisoned_batch), batched, rtol=0, atol=0)
    assert_matches(batched, torch.stack([focal_cuda.softmax_focal_loss(sample, row_labels, gamma=1.5)
                                         for sample in batch]))


@pytest.mark.parametrize("label_dtype", [torch.int32, torch.uint8, torch.int16])
def test_narrow_label_dtypes(label_dtype):
    inputs, labels = make_case((7, CLASSES, 3), torch.float32, "cpu", "labels", ignore_fraction=0)
    expected = focal_cuda.softmax_focal_loss(inputs, labels, reduction="none")
    torch.testing.assert_close(focal_cuda.softmax_focal_loss(inputs, labels.to(label_dtype),
                                                             reduction="none"), expected)


@pytest.mark.parametrize("label_dtype", [torch.uint8, torch.int8])
def test_an_ignore_index_outside_narrow_labels_range_ignores_nothing(label_dtype):
    """ignore_index 300 is no uint8 or int8 label: class 44 (300 wrapped to 8 bits) keeps its
    loss and gradients, as F.cross_entropy's at gamma 0 with int64 labels."""
    inputs = torch.randn(6, 50, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([44, 3, 44, 10, 49, 0])
    loss = focal_cuda.softmax_focal_loss(inputs, labels.to(label_dtype), None, 0.0, "none", ignore_index=300)
    expected = F.cross_entropy(inputs, labels, reduction="none", ignore_index=300)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(torch.autograd.grad(loss.sum(), inputs)[0],
                               torch.autograd.grad(expected.sum(), inputs)[0])


def test_bitwise_same_at_any_thread_count():
    inputs, labels = make_case((64, 19, 40, 40), torch.float32, "cpu", "labels")
    threads = torch.get_num_threads()
    try:
        results = []
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            results.append(loss_and_grads(focal_cuda.softmax_focal_loss, inputs, labels))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert torch.equal(other[0], results[0][0]) and torch.equal(other[1], results[0][1])


def test_autocast_computes_16_bit_logits_in_float32():
    inputs, labels = make_case((8, CLASSES, 6), torch.bfloat16, "cpu", "labels")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = focal_cuda.softmax_focal_loss(inputs, labels)
    assert loss.dtype == torch.float32
    assert_matches(loss, expected_loss(inputs, labels), torch.float32)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda x, y: focal_cuda.softmax_focal_loss(x, torch.full_like(y, 5)),
         "targets holds the class label 5; valid labels are 0 to 4"),
        (lambda x, y: focal_cuda.softmax_focal_loss(x, y[:2]), "class-index targets must have the shape"),
        (lambda x, y: focal_cuda.softmax_focal_loss(x, y.bool()), "targets must be class indices"),
        (lambda x, y: focal_cuda.softmax_focal_loss(x, y.to(torch.uint64)), "got torch.uint64"),
        (lambda x, y: focal_cuda.softmax_focal_loss(x, F.one_hot(y, x.shape[1]).to(torch.float8_e4m3fn)),
         "class probabilities (a floating-point tensor); integer dtypes int8 to int64 and uint8 to uint32, "
         "floating float16, bfloat16, float32 or float64; got torch.float8_e4m3fn"),
        (lambda x, y: focal_cuda.softmax_focal_loss(x.to(torch.float8_e4m3fn), y),
         "inputs must be a floating-point tensor (float16, bfloat16, float32 or float64), got torch.float8_e4m3fn"),
        (lambda x, y: focal_cuda.softmax_focal_loss(x.to_sparse(), y), "inputs must be a strided (dense) tensor"),
        (lambda x, y: focal_cuda.softmax_focal_loss(x, x[:, :2]), "class-probability targets must have the shape"),
        (lambda x, y: focal_cuda.softmax_focal_loss(x, y.float()),
         f"class-probability targets must have the shape of inputs, [4, {CLASSES}], got [4] "
         "(class indices must be an integer tensor, got torch.float32)"),
        (lambda x, y: focal_cuda.softmax_focal_loss(x, F.one_hot(y, CLASSES)),
         f"class-index targets must have the shape of inputs without its class dimension 1, [4], got "
         f"[4, {CLASSES}] (class probabilities must be a floating-point tensor, got torch.int64)"),
        (lambda x, y: focal_cuda.softmax_focal_loss(x, y[:, None].float()),
         f"class-probability targets must have the shape of inputs, [4, {CLASSES}], got [4, 1] "
         "(class indices without the class dimension of size 1: targets.squeeze(1).long())"),
        (lambda x, y: focal_cuda.softmax_focal_loss(x[:, :, None, None].expand(-1, -1, 2, 2),
                                                    y[:, None, None, None].expand(-1, 1, 2, 2)),
         "class-index targets must have the shape of inputs without its class dimension 1, [4, 2, 2], got "
         "[4, 1, 2, 2] (class indices without the class dimension of size 1: targets.squeeze(1))"),
        (lambda x, y: focal_cuda.softmax_focal_loss(x, y, torch.ones(CLASSES)),
         f"alpha must be a real number, got a Tensor of shape [{CLASSES}] (one number is expected; "
         "per-class factors go in weight=)"),
        (lambda x, y: focal_cuda.SoftmaxFocalLoss(torch.ones(CLASSES)),
         "alpha must be a real number, got a Tensor of shape"),
        (lambda x, y: focal_cuda.softmax_focal_loss(x[:, :0], y), "at least one class along dimension 1"),
        (lambda x, y: focal_cuda.softmax_focal_loss(x, y, weight=torch.ones(3)), "weight must have one value per class"),
        (lambda x, y: focal_cuda.softmax_focal_loss(x, y, weight=torch.ones(CLASSES, 2)),
         "weight must have one value per class, shape (5), got [5, 2]"),
        (lambda x, y: focal_cuda.softmax_focal_loss(x, y, gamma=-1.0), "gamma must be in [0, 1000], got -1"),
        (lambda x, y: focal_cuda.softmax_focal_loss(x, y, alpha=-0.5), "alpha must be >= 0 and at most 3.4028234663852886e+38 (float32's largest), or None (or -1) for 1, got -0.5"),
        (lambda x, y: focal_cuda.softmax_focal_loss(x, y, label_smoothing=1.0), "label_smoothing must be in"),
        (lambda x, y: focal_cuda.softmax_focal_loss(x, y, reduction="avg"), "reduction must be one of"),
        (lambda x, y: focal_cuda.softmax_focal_loss(x, torch.softmax(x, 1), ignore_index=255),
         "ignore_index applies to class-index targets; with class-probability targets it must be "
         "negative (the default, -100), got 255"),
        (lambda x, y: focal_cuda.softmax_focal_loss(x[:, :1], y.clamp(max=1)),
         "targets holds the class label 1; inputs have one class along their class dimension, so the "
         "only valid labels are 0 and ignore_index (-100), and the softmax is 1 and the loss 0 "
         "everywhere: a two-class classifier wants 2 logits (or sigmoid_focal_loss on one)"),
        (lambda x, y: focal_cuda.softmax_focal_loss(x.long(), y), "inputs must be a floating-point tensor"),
        (lambda x, y: focal_cuda.SoftmaxFocalLoss(gamma=-2), "gamma must be in [0, 1000]"),
    ],
)
def test_bad_arguments_raise_value_errors(call, message):
    inputs, labels = make_case((4, CLASSES), torch.float32, "cpu", "labels", ignore_fraction=0)
    with pytest.raises(ValueError, match=re.escape(message)):
        call(inputs, labels)


def test_cpu_class_count_limit_is_float32s_exact_integers():
    """The CPU kernel compares class numbers in its math type's lanes: float32 holds every
    integer up to 2^24, float64 every class count memory allows (one row past 2^24 here, its
    label the last class, against the closed form at gamma 0: log of the sum of exponentials,
    2^24 + 1 ones and e^3 and e^5, minus 3; F.cross_entropy's was 5.5e-12 off)."""
    classes = 2**24 + 3
    with pytest.raises(ValueError, match=re.escape(
            "on CPU, inputs of dtype torch.float32 may have at most 16777216 classes (float32's "
            "exact integers; float64 inputs may have more), got 16777219")):
        focal_cuda.softmax_focal_loss(torch.zeros(1, classes), torch.tensor([classes - 1]))
    logits = torch.zeros(1, classes, dtype=torch.float64)
    logits[0, -1], logits[0, -2] = 3.0, 5.0
    labels = torch.tensor([classes - 1])
    exact = math.log((classes - 2) + math.exp(3.0) + math.exp(5.0)) - 3.0
    torch.testing.assert_close(focal_cuda.softmax_focal_loss(logits, labels, gamma=0.0),
                               torch.tensor(exact, dtype=torch.float64), rtol=1e-14, atol=0)


def test_probability_targets_take_ignore_index_where_f_cross_entropy_does():
    """A negative ignore_index (the default among them) names no class and is accepted with
    probabilities; a class is refused, by F.cross_entropy too (a peer's check, not ours)."""
    inputs, _ = make_case((4, CLASSES), torch.float64, "cpu", "labels")
    probabilities = torch.softmax(torch.randn(4, CLASSES, dtype=torch.float64), 1)
    for ignore_index in (-100, -1):
        torch.testing.assert_close(
            focal_cuda.softmax_focal_loss(inputs, probabilities, gamma=0.0, ignore_index=ignore_index),
            F.cross_entropy(inputs, probabilities, ignore_index=ignore_index), rtol=1e-14, atol=0)
    for ignore_index in (0, 255):
        with pytest.raises(RuntimeError, match="ignore_index is not supported for floating point target"):
            F.cross_entropy(inputs, probabilities, ignore_index=ignore_index)
        with pytest.raises(ValueError, match=f"must be negative .the default, -100., got {ignore_index}"):
            focal_cuda.softmax_focal_loss(inputs, probabilities, ignore_index=ignore_index)


def test_migrations_from_kornia_and_mmcv_as_the_readme_writes_them():
    """Their formulas as they compute them (kornia's focal_loss over (N, C, *) logits, its mean
    over every position; mmcv's softmax_focal_loss over (N, C), weight[label] on each row's loss,
    its mean the sum over N), against README's lines."""
    alpha, gamma = 0.5, 2.0
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(4, CLASSES, 3, 3, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, CLASSES, (4, 3, 3), generator=generator)
    log_p = F.log_softmax(inputs, 1)
    one_hot = F.one_hot(labels, CLASSES).movedim(-1, 1)
    kornia_mean = (one_hot * -alpha * (1 - log_p.exp()) ** gamma * log_p).sum(1).mean()
    torch.testing.assert_close(
        focal_cuda.softmax_focal_loss(inputs, labels, alpha=alpha, gamma=gamma, reduction="sum") / labels.numel(),
        kornia_mean)

    rows = torch.randn(16, CLASSES, generator=generator, dtype=torch.float64)
    weight = torch.rand(CLASSES, generator=generator, dtype=torch.float64) + 0.5
    row_labels = torch.randint(0, CLASSES, (16,), generator=generator)
    p_label = torch.softmax(rows, 1).gather(1, row_labels[:, None])[:, 0]
    mmcv_mean = (-0.25 * (1 - p_label) ** gamma * p_label.log() * weight[row_labels]).sum() / rows.shape[0]
    torch.testing.assert_close(
        focal_cuda.softmax_focal_loss(rows, row_labels, alpha=0.25, gamma=gamma, weight=weight,
                                      reduction="sum") / rows.shape[0],
        mmcv_mean)


def test_the_exp_ce_recipe_as_the_readme_maps_it():
    """README's migration: the recipe's sum over the counted positions is our "mean"; a per-class
    alpha tensor in it is our weight for "none" and "sum", but its .mean() divides by the count
    where ours divides by the summed weight, so "sum" / count keeps its scale."""
    generator = torch.Generator().manual_seed(3)
    inputs = torch.randn(2, CLASSES, 4, 4, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, CLASSES, (2, 4, 4), generator=generator)
    ignored = labels.clone()
    ignored[0, 0] = 255
    ce = F.cross_entropy(inputs, ignored, reduction="none", ignore_index=255)
    recipe = ((1 - torch.exp(-ce)) ** 2 * ce).sum() / (ignored != 255).sum()
    torch.testing.assert_close(focal_cuda.softmax_focal_loss(inputs, ignored, gamma=2.0, ignore_index=255), recipe)

    alpha = torch.rand(CLASSES, generator=generator, dtype=torch.float64) + 0.1
    ce = F.cross_entropy(inputs, labels, reduction="none")
    recipe = alpha[labels] * (1 - torch.exp(-ce)) ** 2 * ce
    ours = focal_cuda.softmax_focal_loss(inputs, labels, gamma=2.0, weight=alpha, reduction="none")
    torch.testing.assert_close(ours, recipe)
    torch.testing.assert_close(focal_cuda.softmax_focal_loss(inputs, labels, gamma=2.0, weight=alpha,
                                                             reduction="sum") / labels.numel(), recipe.mean())
    assert not torch.allclose(focal_cuda.softmax_focal_loss(inputs, labels, gamma=2.0, weight=alpha), recipe.mean())


def test_a_plus_inf_logit_on_an_unlabelled_class_gives_the_limit_or_nan_as_readme_says():
    """The loss's limit, inf, without smoothing (F.cross_entropy: NaN); NaN with smoothing, as
    F.cross_entropy; a gradient that is not finite either way."""
    inputs = torch.tensor([[float("inf"), 0.0, 1.0, 2.0, 3.0]], requires_grad=True)
    for smoothing, expected in [(0.0, float("inf")), (0.1, float("nan"))]:
        loss = focal_cuda.softmax_focal_loss(inputs, torch.tensor([2]), gamma=0.0, label_smoothing=smoothing)
        torch.testing.assert_close(loss, torch.tensor(expected), equal_nan=True)
        assert not torch.autograd.grad(loss, inputs)[0].isfinite().all()


def test_module_matches_the_function_and_moves_its_weight():
    inputs, labels = make_case((4, CLASSES, 3), torch.float32, "cpu", "labels")
    weight = torch.rand(CLASSES) + 0.5
    module = focal_cuda.SoftmaxFocalLoss(alpha=0.5, gamma=1.5, weight=weight, label_smoothing=0.1)
    expected = focal_cuda.softmax_focal_loss(inputs, labels, 0.5, 1.5, "mean", weight, -100, 0.1)
    torch.testing.assert_close(module(inputs, labels), expected, rtol=0, atol=0)
    assert "weight" in dict(module.named_buffers())
    assert module.double().weight.dtype == torch.float64
    assert "gamma=1.5" in repr(module)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1, -1.0, None])
def test_module_keeps_every_alpha_the_function_takes(alpha):
    """The module passes its alpha on as given: 0 (a zero loss) is not None (1), and None and -1
    both mean 1."""
    inputs, labels = make_case((4, CLASSES, 3), torch.float64, "cpu", "labels")
    module = focal_cuda.SoftmaxFocalLoss(alpha=alpha, gamma=2.0)
    expected = focal_cuda.softmax_focal_loss(inputs, labels, alpha, 2.0)
    torch.testing.assert_close(module(inputs, labels), expected, rtol=0, atol=0)
    assert f"alpha={alpha if alpha is None else float(alpha)}" in repr(module)


@pytest.mark.parametrize("options", [dict(ignore_index=255), dict(ignore_index=2, reduction="sum"),
                                     dict(ignore_index=1, label_smoothing=0.1, reduction="none")], ids=str)
def test_module_takes_its_options_as_cross_entropy_loss_does(options):
    inputs = torch.randn(4, CLASSES, 3, 3, dtype=torch.float64)
    labels = torch.randint(0, CLASSES, (4, 3, 3))
    labels[0, 0] = options["ignore_index"]
    module = focal_cuda.SoftmaxFocalLoss(alpha=None, gamma=0.0, **options)
    torch.testing.assert_close(module(inputs, labels), torch.nn.CrossEntropyLoss(**options)(inputs, labels))


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    inputs, labels = make_case((4, CLASSES, 6), torch.float32, "cpu", "labels")
    weight = torch.rand(CLASSES) + 0.5

    def step(x, y, w):
        return focal_cuda.softmax_focal_loss(x, y, 0.25, 2.0, "mean", w, -100, 0.1)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    expected = loss_and_grads(lambda x, t, weight: step(x, t, weight), inputs, labels, weight=weight)
    actual = loss_and_grads(lambda x, t, weight: compiled(x, t, weight), inputs, labels, weight=weight)
    for mine, theirs in zip(actual, expected):
        if theirs is not None:
            torch.testing.assert_close(mine, theirs)


# Layouts read in place (the outputs take the inputs' strides) and copied (contiguous outputs):
# the fake kernel must give the op's strides for each.
OPCHECK_LAYOUTS = {
    "contiguous": lambda x: x,
    "channels_last": lambda x: x.contiguous(memory_format=torch.channels_last),
    "transposed_rows": lambda x: x[:, :, 0, 0].t().contiguous().t(),
    "spatial_permuted": lambda x: x.permute(0, 1, 3, 2),
    "sliced": lambda x: x[..., ::2],
}


@pytest.mark.parametrize("kind", ["labels", "probabilities"])
@pytest.mark.parametrize("layout", list(OPCHECK_LAYOUTS))
def test_opcheck(kind, layout):
    inputs, _ = make_case((3, CLASSES, 4, 6), torch.float32, "cpu", kind)
    inputs = OPCHECK_LAYOUTS[layout](inputs)
    positions = list(inputs.shape)
    del positions[1]
    generator = torch.Generator().manual_seed(1)
    if kind == "labels":
        targets = torch.randint(0, CLASSES, positions, generator=generator)
    else:
        targets = torch.softmax(torch.randn(inputs.shape, generator=generator), 1)
    weight = torch.rand(CLASSES)
    for reduction in (0, 1, 2):
        arguments = (inputs.detach().requires_grad_(), targets, weight, [0.5, 2.0], reduction, -100, 0.1,
                     False, focal_cuda._ops.outputs_mask(True, kind == "probabilities", True))
        torch.library.opcheck(torch.ops.focal_cuda.softmax_focal_loss_forward.default, arguments)


@pytest.mark.parametrize("kind", ["labels", "probabilities"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("float32_loss", [False, True], ids=["", "float32 loss"])
def test_opcheck_of_16_bit_inputs_gives_the_ops_dtypes(kind, dtype, float32_loss):
    """16-bit inputs, with and without autocast's float32 loss: the fake kernel gives each output
    the op's dtype (the loss float32 under float32_loss, each class's loss before its weight in
    float32, the saved gradients in float32 for float16), as opcheck and meta tensors compare."""
    inputs, targets = make_case((3, CLASSES, 4), dtype, "cpu", kind)
    weight = torch.rand(CLASSES, generator=torch.Generator().manual_seed(1)).to(dtype)
    mask = focal_cuda._ops.outputs_mask(True, kind == "probabilities", True)
    for reduction in (0, 1, 2):
        arguments = (inputs.detach().requires_grad_(), targets.detach().requires_grad_(kind == "probabilities"),
                     weight.requires_grad_(), [0.5, 2.0], reduction, -100, 0.1, float32_loss, mask)
        torch.library.opcheck(torch.ops.focal_cuda.softmax_focal_loss_forward.default, arguments)
        real = torch.ops.focal_cuda.softmax_focal_loss_forward(*arguments)
        meta = torch.ops.focal_cuda.softmax_focal_loss_forward(
            *(arg.to("meta") if isinstance(arg, torch.Tensor) else arg for arg in arguments))
        assert [output.dtype for output in meta] == [output.dtype for output in real]
        assert real[0].dtype == (torch.float32 if float32_loss else dtype)


@pytest.mark.parametrize("kind", ["labels", "probabilities"])
def test_unbatched_inputs_give_per_class_outputs_of_their_shape(kind):
    """(C) inputs, as F.cross_entropy takes them: the op's per-element outputs have the shape
    (C), as its fake kernel says (opcheck), and at gamma 0 d(loss)/d(inputs) is
    F.cross_entropy's gradient."""
    inputs, targets = make_case((CLASSES,), torch.float64, "cpu", kind)
    mask = focal_cuda._ops.outputs_mask(True, kind == "probabilities", True)
    weight = torch.rand(CLASSES, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for reduction in (0, 1, 2):
        arguments = (inputs.detach().requires_grad_(), targets, weight, [-1.0, 0.0], reduction, -100,
                     0.0, False, mask)
        torch.library.opcheck(torch.ops.focal_cuda.softmax_focal_loss_forward.default, arguments)
    _, grad_inputs, grad_targets, unweighted, _ = torch.ops.focal_cuda.softmax_focal_loss_forward(
        inputs, targets, weight, [-1.0, 0.0], 0, -100, 0.0, False, mask)
    assert grad_inputs.shape == unweighted.shape == inputs.shape
    if kind == "probabilities":
        assert grad_targets.shape == inputs.shape
    x = inputs.detach().requires_grad_()
    (expected,) = torch.autograd.grad(F.cross_entropy(x, targets, weight=weight, reduction="sum"), x)
    assert_matches(grad_inputs, expected)


def test_float32_probabilities_are_not_rounded_to_16_bit_logits():
    inputs, _ = make_case((8, CLASSES, 6), torch.bfloat16, "cpu", "probabilities")
    targets = torch.softmax(torch.randn(8, CLASSES, 6, generator=torch.Generator().manual_seed(2)), 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a float32 loss, judged at float32's tolerance
        loss = focal_cuda.softmax_focal_loss(inputs, targets)
    assert_matches(loss, expected_loss(inputs, targets), torch.float32)


def test_a_negative_weight_sum_still_has_gradients():
    """F.cross_entropy accepts negative class weights; a mean over a negative summed weight is a
    finite loss with the derivatives of that quotient."""
    inputs, labels = make_case((9, CLASSES), torch.float64, "cpu", "labels", ignore_fraction=0)
    weight = -torch.rand(CLASSES, dtype=torch.float64) - 0.5
    loss, grad_x, _, grad_w = loss_and_grads(focal_cuda.softmax_focal_loss, inputs, labels, weight=weight)
    x = inputs.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    expected = expected_loss(x, labels, weight=w)
    expected.backward()
    torch.testing.assert_close(loss, expected.detach())
    torch.testing.assert_close(grad_x, x.grad)
    torch.testing.assert_close(grad_w, w.grad)


@pytest.mark.parametrize("path", ["grad", "vmap_batched_labels", "vmap_shared_labels", "forward_ad"])
@pytest.mark.parametrize("bad_label", [CLASSES, -1])
def test_bad_labels_raise_under_transforms_as_in_eager(path, bad_label):
    """torch.func and forward-mode AD take the reference formula, which runs no kernel: the
    labels are checked there too, with the eager call's message (a -1 must not pick the last
    class's weight, a C must not count in the mean's divisor)."""
    inputs, labels = make_case((3, CLASSES), torch.float32, "cpu", "labels", ignore_fraction=0)
    labels[1] = bad_label
    weight = torch.rand(CLASSES) + 0.5
    message = f"targets holds the class label {bad_label}; valid labels are 0 to {CLASSES - 1}"
    with pytest.raises(ValueError, match=re.escape(message)):
        focal_cuda.softmax_focal_loss(inputs, labels, weight=weight)
    with pytest.raises(ValueError, match=re.escape(message)):
        if path == "grad":
            torch.func.grad(lambda x: focal_cuda.softmax_focal_loss(x, labels, weight=weight))(inputs)
        elif path == "vmap_batched_labels":
            torch.func.vmap(lambda x, y: focal_cuda.softmax_focal_loss(x, y, weight=weight))(inputs, labels)
        elif path == "vmap_shared_labels":
            torch.func.vmap(lambda x: focal_cuda.softmax_focal_loss(x, labels, weight=weight))(
                inputs.unsqueeze(0).expand(2, -1, -1))
        else:
            with torch.autograd.forward_ad.dual_level():
                dual = torch.autograd.forward_ad.make_dual(inputs, torch.ones_like(inputs))
                focal_cuda.softmax_focal_loss(dual, labels, weight=weight)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("create_graph", [False, True], ids=["fused", "reference"])
def test_ignored_positions_take_no_gradient_from_a_nan_grad_output(device, label_smoothing, create_graph):
    """A per-image mean of the elementwise loss divides an image with no labelled pixel by 0: its
    grad_output is NaN. F.cross_entropy's gradients are 0 at ignored positions whatever it is;
    so are ours, of the inputs and of the weight, on the fused and the reference path."""
    inputs, labels = make_case((2, CLASSES, 4, 4), torch.float64, device, "labels", ignore_fraction=0.3)
    labels[1] = -100
    weight = torch.rand(CLASSES, dtype=torch.float64, device=device) + 0.5

    def gradients(loss_function, weight_, images=2):
        x = inputs[:images].clone().requires_grad_()
        y = labels[:images]
        loss = loss_function(x, y, weight=weight_, reduction="none", label_smoothing=label_smoothing)
        per_image = loss.sum((1, 2)) / (y != -100).sum((1, 2))  # 0 / 0 for the second image
        differentiated = [x] if not weight_.requires_grad else [x, weight_]
        return torch.autograd.grad(per_image.nansum(), differentiated, create_graph=create_graph)

    def focal(*args, **options):
        return focal_cuda.softmax_focal_loss(*args, gamma=0.0, **options)

    expected = gradients(F.cross_entropy, weight)[0]
    assert not expected.isnan().any()
    got_x, got_weight = gradients(focal, weight.clone().requires_grad_())
    torch.testing.assert_close(got_x, expected)
    assert (got_x[1] == 0).all()
    torch.testing.assert_close(got_weight, gradients(focal, weight.clone().requires_grad_(), images=1)[1])


# F.cross_entropy's loss takes the dtype the logits and probability targets promote to.
MIXED_DTYPES = [(torch.float32, torch.float64), (torch.float16, torch.float32), (torch.bfloat16, torch.float64),
                (torch.float16, torch.bfloat16), (torch.float64, torch.float32), (torch.float32, torch.bfloat16)]


@pytest.mark.parametrize("inputs_dtype, targets_dtype", MIXED_DTYPES)
def test_probabilities_of_another_dtype_give_the_promoted_loss(inputs_dtype, targets_dtype):
    inputs, targets = make_case((6, CLASSES, 3), inputs_dtype, "cpu", "probabilities")
    targets = targets.to(targets_dtype)
    promoted = torch.promote_types(inputs_dtype, targets_dtype)
    loss, grad_x, grad_t, _ = loss_and_grads(focal_cuda.softmax_focal_loss, inputs, targets, gamma=0.0)
    expected = F.cross_entropy(inputs.to(promoted), targets.to(promoted))
    assert loss.dtype == expected.dtype == promoted
    assert focal_cuda.reference.softmax_focal_loss(inputs, targets, gamma=0.0).dtype == promoted
    assert grad_x.dtype == inputs_dtype and grad_t.dtype == targets_dtype
    # Computed in the promoted dtype's math (float32 or float64) from the stored values.
    assert_matches(loss, expected_loss(inputs, targets, gamma=0.0), promoted if promoted == torch.float64 else torch.float32)


@pytest.mark.parametrize("path", ["fused", "create_graph", "torch_func"])
@pytest.mark.parametrize("case", ["zero_weights", "cancelling_weights"])
def test_a_mean_whose_divisor_is_zero_leaves_zero_gradients_on_every_path(path, case):
    """The counted labels' weights sum to 0: the loss is NaN or inf, as F.cross_entropy's, and
    the gradients of the inputs and the weight are 0 on the fused and the reference paths."""
    inputs, _ = make_case((3, 4), torch.float64, "cpu", "labels", ignore_fraction=0)
    if case == "zero_weights":
        labels, weight = torch.tensor([0, 0, 1]), torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=torch.float64)
    else:
        labels, weight = torch.tensor([0, 1, 2]), torch.tensor([1.0, -2.0, 1.0, 1.0], dtype=torch.float64)
    expected_loss = F.cross_entropy(inputs, labels, weight=weight)
    x, w = inputs.clone().requires_grad_(), weight.clone().requires_grad_()
    if path == "torch_func":
        loss = focal_cuda.softmax_focal_loss(inputs, labels, gamma=2.0, weight=weight)
        grads = torch.func.grad(lambda a, b: focal_cuda.softmax_focal_loss(a, labels, gamma=2.0, weight=b),
                                argnums=(0, 1))(inputs, weight)
    else:
        loss = focal_cuda.softmax_focal_loss(x, labels, gamma=2.0, weight=w)
        grads = torch.autograd.grad(loss, [x, w], create_graph=path == "create_graph")
    assert loss.isnan() == expected_loss.isnan() and loss.isinf() == expected_loss.isinf()
    for grad in grads:
        assert (grad == 0).all()


def test_torch_func_grad_and_vmap_match_eager():
    inputs, labels = make_case((3, CLASSES, 4), torch.float64, "cpu", "labels")

    def loss_of(x, y):
        return focal_cuda.softmax_focal_loss(x, y, 0.5, 2.0, "sum")

    eager = loss_and_grads(lambda x, t, weight: loss_of(x, t), inputs, labels)[1]
    torch.testing.assert_close(torch.func.grad(loss_of)(inputs, labels), eager)
    batched = torch.func.vmap(torch.func.grad(loss_of))(inputs.unsqueeze(0).expand(2, -1, -1, -1),
                                                        labels.unsqueeze(0).expand(2, -1, -1))
    torch.testing.assert_close(batched, eager.unsqueeze(0).expand(2, -1, -1, -1))


@pytest.mark.parametrize("alpha", [0.0, 0.5, -1.0, None])
@pytest.mark.parametrize("path", ["grad", "jvp", "create_graph", "focal_cuda.reference"])
def test_alpha_scales_the_derivatives_on_every_path(alpha, path):
    """alpha multiplies the whole loss (None and -1 mean 1), on the reference formula's paths
    and in focal_cuda.reference as on the fused one: alpha 0 gives zero derivatives everywhere.
    Compared with alpha times the fused eager gradient of alpha None, in float64."""
    inputs, labels = make_case((3, CLASSES, 4), torch.float64, "cpu", "labels")
    factor = 1.0 if alpha is None or alpha < 0 else alpha

    def loss_of(x):
        return focal_cuda.softmax_focal_loss(x, labels, alpha, 2.0, "mean")

    x = inputs.detach().requires_grad_()
    (unit_grad,) = torch.autograd.grad(focal_cuda.softmax_focal_loss(x, labels, None, 2.0, "mean"), x)
    expected = factor * unit_grad
    if path == "grad":
        actual = torch.func.grad(loss_of)(inputs)
    elif path == "jvp":
        tangent = torch.randn(inputs.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        actual, expected = torch.func.jvp(loss_of, (inputs,), (tangent,))[1], (expected * tangent).sum()
    elif path == "create_graph":
        (actual,) = torch.autograd.grad(loss_of(x), x, create_graph=True)
    else:
        (actual,) = torch.autograd.grad(focal_cuda.reference.softmax_focal_loss(x, labels, alpha, 2.0, "mean"), x)
    assert_matches(actual, expected)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_saved_gradient_becomes_the_gradient_only_on_its_last_use(reduction, dtype):
    inputs, labels = make_case((6, CLASSES, 3, 7), dtype, "cpu", "labels")
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        x = inputs.clone().requires_grad_()
        loss = focal_cuda.softmax_focal_loss(x, labels, reduction=reduction)
    saved_gradient = next(t for t in saved if t.shape == x.shape and t.data_ptr() != x.data_ptr())
    unscaled = saved_gradient.clone()
    grad_loss = torch.rand_like(loss) + 0.5
    # A backward that keeps the graph leaves the saved gradient intact...
    first = torch.autograd.grad(loss, x, grad_loss, retain_graph=True)[0]
    assert torch.equal(saved_gradient, unscaled) and first.data_ptr() != saved_gradient.data_ptr()
    # ...the one that frees it scales it in place (a float32 one for 16-bit inputs, whose
    # gradient is then a cast of it): one gradient-sized buffer in all.
    saved_pointer = saved_gradient.data_ptr()
    del saved, saved_gradient
    loss.backward(grad_loss)
    torch.testing.assert_close(x.grad, first, rtol=0, atol=0)
    if dtype == torch.float32:
        assert x.grad.data_ptr() == saved_pointer


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=DEVICES[1].marks)])
@pytest.mark.parametrize("weighted", [False, True])
def test_training_step_replays_in_a_cuda_graph(device, weighted):
    """Nothing in the forward or backward waits for the host: the step captures and replays,
    the weighted mean's divisor included."""
    inputs, labels = make_case((4, CLASSES, 16, 16), torch.float32, device, "labels")
    weight = torch.rand(CLASSES, device=device) + 0.5 if weighted else None
    static_x = inputs.clone().requires_grad_()
    static_y = labels.clone()

    def step():
        static_x.grad = None
        loss = focal_cuda.softmax_focal_loss(static_x, static_y, 0.25, 2.0, "mean", weight)
        loss.backward()
        return loss

    graph, static_loss = capture_cuda_graph(step)
    for seed in (1, 2):
        new_x, new_y = make_case((4, CLASSES, 16, 16), torch.float32, device, "labels", seed=seed)
        static_x.data.copy_(new_x)
        static_y.copy_(new_y)
        graph.replay()
        torch.cuda.synchronize()
        expected = loss_and_grads(focal_cuda.softmax_focal_loss, new_x, new_y, alpha=0.25, gamma=2.0,
                                  weight=weight, weight_grad=False)
        torch.testing.assert_close(static_loss, expected[0])
        torch.testing.assert_close(static_x.grad, expected[1])


@pytest.mark.parametrize("gamma", [0.5, 2.0])
def test_transforms_keep_a_confident_position_accurate(gamma):
    """Under torch.func (the reference formula) a confident position's loss and gradients keep
    their relative accuracy as the eager kernels' do: 1 - p where p -> 1 is not 1 minus p.
    float32 rows of 5 classes, the label ahead by 8 to 20; exact values from mpmath."""
    margins = [8.0, 12.0, 16.0, 20.0]
    x = torch.zeros(len(margins), 5)
    x[:, 2] = torch.tensor(margins)
    labels = torch.full((len(margins),), 2)

    def loss_of(x_):
        return focal_cuda.softmax_focal_loss(x_, labels, gamma=gamma, reduction="sum")

    losses = torch.func.vmap(lambda row, label: focal_cuda.softmax_focal_loss(row, label, gamma=gamma,
                                                                              reduction="sum"))(x, labels)
    grads = torch.func.grad(loss_of)(x)

    def exact_loss(*row):
        top = max(row)
        total = mpmath.fsum(mpmath.exp(v - top) for v in row)
        log_p = row[2] - top - mpmath.log(total)
        one_minus_p = mpmath.fsum(mpmath.exp(v - top) for i, v in enumerate(row) if i != 2) / total
        return -one_minus_p**gamma * log_p

    for row, loss, grad in zip(x.tolist(), losses, grads):
        with mpmath.workdps(50):
            exact = float(exact_loss(*row))
            partials = [float(mpmath.diff(exact_loss, row, tuple(int(i == c) for i in range(5))))
                        for c in range(5)]
        assert abs(loss.item() - exact) <= 8 * 2**-23 * exact
        for c, partial in enumerate(partials):
            assert abs(grad[c].item() - partial) <= 8 * 2**-23 * abs(partial), (c, grad, partial)


# Many classes in every layout: the (N, C) rows sum across vector lanes, the others (NCHW,
# column-major (N, C), channels-last) each position's classes one by one, which a plain running
# sum in float32 would round by up to C/2 ulp (29 times the tolerance at 5,000 classes).
MANY_CLASSES_LAYOUTS = {
    "rows": lambda x: x,
    "column_major": lambda x: x.t().contiguous().t(),
    "nchw": lambda x: x.t().reshape(1, x.shape[1], 4, x.shape[0] // 4),
    "channels_last": lambda x: x[:, :, None, None].contiguous(memory_format=torch.channels_last),
}


def labels_in_layout(layout, labels):
    """Labels of a (16, C) tensor's rows, shaped as its positions in layout."""
    if layout == "nchw":
        return labels.reshape(1, 4, labels.shape[0] // 4)
    if layout == "channels_last":
        return labels[:, None, None]
    return labels


def many_classes_targets(layout, kind, logits, generator, device):
    """Labels of logits' (16, C) rows, or (for "probabilities") a distribution over their
    classes, laid out as the logits are in layout, on device."""
    if kind == "probabilities":
        probabilities = torch.softmax(torch.randn(logits.shape, generator=generator, dtype=torch.float64), 1)
        return MANY_CLASSES_LAYOUTS[layout](probabilities).float().to(device).requires_grad_()
    return labels_in_layout(layout, torch.randint(0, logits.shape[1], (16,), generator=generator)).to(device)


def assert_many_classes_match_the_definition(layout, kind, gamma, logits, targets):
    """Loss and gradients (inputs; probabilities too, smoothed by 0.1 as labels are for
    "smoothed") of float32 logits in layout, on the targets' device (on CUDA, a warp takes each
    row of the (N, C) layouts, a thread each position of the others), against the float64
    definition at the float32 tolerance."""
    smoothing = 0.0 if kind == "labels" else 0.1
    x = MANY_CLASSES_LAYOUTS[layout](logits).float().to(targets.device).requires_grad_()
    loss = focal_cuda.softmax_focal_loss(x, targets, gamma=gamma, reduction="sum", label_smoothing=smoothing)
    loss.backward()
    exact_x = x.detach().double().requires_grad_()
    exact_t = targets.detach().double().requires_grad_() if kind == "probabilities" else targets
    expected = expected_loss(exact_x, exact_t, None, gamma, "sum", label_smoothing=smoothing)
    expected.backward()
    assert_matches(loss, expected.detach())
    scale = gradient_scale(x.detach(), targets.detach(), 1.0, gamma, "sum", None, smoothing)
    assert_matches(x.grad, exact_x.grad, scale=scale)
    if kind == "probabilities":
        assert_matches(targets.grad, exact_t.grad)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", MANY_CLASSES_LAYOUTS)
@pytest.mark.parametrize("kind", ["labels", "smoothed", "probabilities"])
@pytest.mark.parametrize("gamma", [0.0, 2.0])
def test_many_classes_in_every_layout(device, layout, kind, gamma):
    """5,000 classes, float32, in each layout."""
    generator = torch.Generator().manual_seed(7)
    logits = torch.randn(16, 5000, generator=generator, dtype=torch.float64) * 3
    targets = many_classes_targets(layout, kind, logits, generator, device)
    assert_many_classes_match_the_definition(layout, kind, gamma, logits, targets)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", MANY_CLASSES_LAYOUTS)
@pytest.mark.parametrize("kind", ["labels", "probabilities"])
def test_logits_far_below_zero_at_a_class_count_no_vector_divides(device, layout, kind):
    """Every logit near -200 (exp(-200) is 0 in float32): only the shift by the row's true
    maximum keeps the sums; 1,003 classes leave a part-filled last vector on every ISA, whose
    unused lanes must not take part in the maximum."""
    generator = torch.Generator().manual_seed(8)
    logits = torch.randn(16, 1003, generator=generator, dtype=torch.float64) * 3 - 200
    targets = many_classes_targets(layout, kind, logits, generator, device)
    assert_many_classes_match_the_definition(layout, kind, 2.0, logits, targets)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", MANY_CLASSES_LAYOUTS)
@pytest.mark.parametrize("kind", ["labels", "smoothed"])
def test_thousands_of_tiny_terms_after_large_ones_keep_their_sum(device, layout, kind):
    """Per row: class 0 the maximum, 16 classes of p = max / 2, then 65,536 of 2^-26 of it,
    so that every vector lane (or, in NCHW, every position) adds thousands of exponentials each
    below half an ulp of its running sum: 2^-10 of their sum, 1e-4, that a plain float32 sum
    drops; with smoothing, also 65,553 classes' losses, whose plain float32 sum rounds to 5e-5
    (rows) and 1e-3 (NCHW) off (README: compensated sums). The float64 definition keeps both."""
    labels = labels_in_layout(layout, torch.zeros(16, dtype=torch.long)).to(device)
    assert_many_classes_match_the_definition(layout, kind, 2.0, tiny_terms_logits(), labels)


def tiny_terms_logits():
    """16 rows of class 0 the maximum, 16 classes of half its exponential, then 65,536 of 2^-26
    of it (test_thousands_of_tiny_terms_after_large_ones_keep_their_sum)."""
    logits = torch.full((16, 17 + 65536), -26 * math.log(2), dtype=torch.float64)
    logits[:, 0] = 0.0
    logits[:, 1:17] = math.log(0.5)
    return logits
