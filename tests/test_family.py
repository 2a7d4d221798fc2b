"""The focal family: FL* (Lin et al., appendix A), the quality focal loss (Li et al., GFL) and the
varifocal loss (Zhang et al.). Values and gradients against float64 formulas written here in
the composite form of the libraries that use them (fvcore, mmdet), gradcheck, fvcore's FL*
behaviour as data, labels against one-hot targets, saturated logits, errors, modules, and the
PyTorch 2 paths (opcheck, torch.compile)."""

import inspect
import math
import pickle

import pytest
import torch
import torch.nn.functional as F

import focal_cuda
from conftest import (DEVICES, DTYPES, REDUCTIONS, assert_matches,
                      assert_second_derivatives_match_kernel_differences, coefficients_of, family_term_scales,
                      kernel_gradients)

FORMS = {"star": 1, "quality": 2, "varifocal": 3}
FUNCTIONS = {
    "star": focal_cuda.sigmoid_focal_loss_star,
    "quality": focal_cuda.quality_focal_loss,
    "varifocal": focal_cuda.varifocal_loss,
}
REFERENCES = {
    "star": focal_cuda.reference.sigmoid_focal_loss_star,
    "quality": focal_cuda.reference.quality_focal_loss,
    "varifocal": focal_cuda.reference.varifocal_loss,
}
# Per form, parameter sets: the defaults, and others (fractional exponents, FL*'s beta, and
# exponent 1, which has CPU kernels of its own).
PARAMETERS = {
    "star": [dict(), dict(alpha=0.25, gamma=2.0, beta=0.5), dict(alpha=0.75, gamma=0.5, beta=-1.0)],
    "quality": [dict(), dict(beta=0.5), dict(beta=1.5), dict(beta=1.0)],
    "varifocal": [dict(), dict(alpha=0.5, gamma=1.5), dict(alpha=1.0, gamma=0.5),
                  dict(alpha=0.25, gamma=1.0)],
}
CASES = [(form, index) for form, sets in PARAMETERS.items() for index in range(len(sets))]


def defaults(form):
    """The public defaults: fvcore's for FL*, mmdet's for QFL and VFL."""
    return {"star": dict(alpha=-1.0, gamma=1.0, beta=0.0), "quality": dict(beta=2.0),
            "varifocal": dict(alpha=0.75, gamma=2.0)}[form]


def formula(form, x, t, alpha=None, gamma=None, beta=None):
    """The elementwise loss in the composite form the libraries write it (float64 autograd
    differentiates it): fvcore's FL* with the paper's beta, mmdet's QFL (soft-target form) and
    VFL (iou_weighted)."""
    bce = F.binary_cross_entropy_with_logits(x, t, reduction="none")
    if form == "star":
        loss = -F.logsigmoid(gamma * x * (2 * t - 1) + beta) / gamma
        if alpha >= 0:
            loss = loss * (alpha * t + (1 - alpha) * (1 - t))
        return loss
    if form == "quality":
        return bce * (t - x.sigmoid()).abs().pow(beta)
    focal_weight = t * (t > 0).double() + alpha * (x.sigmoid() - t).abs().pow(gamma) * (t <= 0).double()
    return bce * focal_weight


def op_arguments(form, parameters):
    """(alpha, gamma, beta) in the kernels' meaning (family_term_scales' and
    conftest.coefficients_of's): gamma is QFL's beta, alpha -1 where there is none."""
    p = dict(defaults(form), **parameters)
    if form == "star":
        return (-1.0 if p["alpha"] is None else p["alpha"]), p["gamma"], p["beta"]
    if form == "quality":
        return -1.0, p["beta"], 0.0
    return p["alpha"], p["gamma"], 0.0


def one_hot(labels, classes, ignore_index=-100):
    """(dense float64 targets, valid rows mask) of integer labels: C is background."""
    ignored = labels == ignore_index
    dense = F.one_hot(torch.where(ignored, classes, labels), classes + 1)[..., :classes].double()
    return dense, (~ignored).double().unsqueeze(-1).expand(dense.shape)


def make_targets(kind, shape, generator):
    """Soft scores (with exact zeros: VFL's negatives), hard 0/1 targets, or class labels."""
    if kind == "labels":
        labels = torch.randint(0, shape[-1] + 1, shape[:-1], generator=generator)
        labels.view(-1)[::7] = -100
        return labels
    if kind == "hard":
        return (torch.rand(shape, generator=generator) < 0.3).double()
    soft = torch.rand(shape, generator=generator, dtype=torch.float64)
    return torch.where(torch.rand(shape, generator=generator) < 0.6, torch.zeros_like(soft), soft)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", ["soft", "hard", "labels"])
@pytest.mark.parametrize("form, index", CASES)
def test_matches_formula(device, dtype, reduction, kind, form, index):
    """Loss and gradients w.r.t. inputs, floating targets and a per-class weight."""
    parameters = PARAMETERS[form][index]
    if form == "star" and kind == "soft":
        parameters = dict(parameters, label_smoothing=0.1)
    generator = torch.Generator().manual_seed(index)
    shape = (3, 67, 9)  # 1809 elements: full vectors and a ragged tail
    x = (torch.randn(shape, generator=generator, dtype=torch.float64) * 3).to(dtype)
    targets = make_targets(kind, shape, generator)
    if kind != "labels":
        targets = targets.to(dtype)
    weight = (torch.rand(shape[-1], generator=generator, dtype=torch.float64) + 0.5).to(dtype)
    loss_shape = shape if reduction == "none" else ()
    grad_output = torch.rand(loss_shape, generator=generator, dtype=torch.float64) + 0.5

    ours_x = x.to(device).requires_grad_()
    ours_t = targets.to(device).requires_grad_(kind != "labels")
    ours_w = weight.to(device).requires_grad_()
    loss = FUNCTIONS[form](ours_x, ours_t, reduction=reduction, weight=ours_w, **parameters)
    wrt = [ours_x, ours_w] + ([ours_t] if kind != "labels" else [])
    grads = torch.autograd.grad(loss, wrt, grad_output.to(device=device, dtype=loss.dtype))

    # The formula, in float64 on the same rounded values.
    smoothing = parameters.get("label_smoothing", 0.0)
    exact_x = x.double().requires_grad_()
    exact_w = weight.double().requires_grad_()
    if kind == "labels":
        exact_t, valid = one_hot(targets, shape[-1])
    else:
        exact_t, valid = targets.double().requires_grad_(), torch.ones(shape, dtype=torch.float64)
    smoothed = exact_t * (1 - smoothing) + smoothing / 2
    form_parameters = {k: v for k, v in dict(defaults(form), **parameters).items() if k != "label_smoothing"}
    elementwise = formula(form, exact_x, smoothed, **form_parameters) * valid * exact_w
    if reduction == "none":
        expected = elementwise
    else:
        expected = elementwise.sum() / (valid.sum() if reduction == "mean" else 1)
    exact_wrt = [exact_x, exact_w] + ([exact_t] if kind != "labels" else [])
    expected_grads = torch.autograd.grad(expected, exact_wrt, grad_output)

    alpha, gamma, beta = op_arguments(form, parameters)
    scale_options = dict(ignore_index=-100, label_smoothing=smoothing)
    scale_loss, _, _ = family_term_scales(FORMS[form], x, targets, alpha, gamma, beta, weight=weight,
                                          **scale_options)
    _, scale_x, scale_t = family_term_scales(FORMS[form], x, targets, alpha, gamma, beta, weight=weight,
                                             reduction=reduction, grad_output=grad_output, **scale_options)
    unweighted_scale, _, _ = family_term_scales(FORMS[form], x, targets, alpha, gamma, beta, **scale_options)
    mean_divisor = valid.sum() if reduction == "mean" else 1
    scale_w = (unweighted_scale * grad_output / mean_divisor).sum_to_size(weight.shape)
    if reduction != "none":
        scale_loss = scale_loss.sum() / mean_divisor

    assert loss.dtype == dtype and loss.shape == loss_shape
    assert_matches(loss.cpu(), expected.detach(), scale=scale_loss)
    assert_matches(grads[0].cpu(), expected_grads[0], scale=scale_x)
    assert_matches(grads[1].cpu(), expected_grads[1], scale=scale_w)
    if kind != "labels":
        assert_matches(grads[2].cpu(), expected_grads[2], scale=scale_t)


@pytest.mark.parametrize("form, index", CASES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck(form, index, reduction):
    """Finite differences of the fused loss in float64; second derivatives (create_graph, which
    differentiates focal_cuda.reference) against differences of the kernels' gradients. VFL
    jumps at t = 0: its targets stay positive here."""
    parameters = PARAMETERS[form][index]
    generator = torch.Generator().manual_seed(10 + index)
    x = (torch.randn(4, 5, generator=generator, dtype=torch.float64) * 2).requires_grad_()
    t = (torch.rand(4, 5, generator=generator, dtype=torch.float64) * 0.9 + 0.05).requires_grad_()
    weight = (torch.rand(5, generator=generator, dtype=torch.float64) + 0.5).requires_grad_()

    def loss(x_, t_, w_):
        return FUNCTIONS[form](x_, t_, reduction=reduction, weight=w_, **parameters)

    assert torch.autograd.gradcheck(loss, (x, t, weight))
    assert_second_derivatives_match_kernel_differences(loss, (x, t, weight))
    labels = torch.tensor([0, 5, 2, -100])
    assert torch.autograd.gradcheck(lambda x_: FUNCTIONS[form](x_, labels, reduction=reduction, **parameters),
                                    (x,))


# fvcore's tests of sigmoid_focal_loss_star, as data: (probabilities, targets, gamma, alpha,
# expected FL*), the expected values from the closed form log(1 + ((1 - p_t) / p_t)^gamma) / gamma
# (times alpha_t), computed separately with Python's math module.
FVCORE_STAR_CASES = [
    # gamma = 1, no alpha: FL* is the cross-entropy, -log(p_t).
    ([0.95, 0.90, 0.98, 0.99], [1, 1, 1, 1], 1.0, -1.0,
     [0.05129329438755059, 0.10536051565782628, 0.02020270731751947, 0.01005033585350145]),
    # gamma = 3: easy examples down-weighted (cross-entropy / FL* > 10).
    ([0.75, 0.8, 0.12, 0.05], [1, 1, 0, 0], 3.0, -1.0,
     [0.012122548056958282, 0.005168062178655082, 0.0008441593406259136, 4.8594406869842935e-05]),
    # gamma = 2: hard examples roughly unchanged (cross-entropy / FL* within 0.1 of 1).
    ([0.05, 0.12, 0.91, 0.85], [1, 1, 0, 0], 2.0, -1.0,
     [2.9458221059128853, 2.0016422983532354, 2.3185018786220364, 1.7499344545845925]),
]


def logit(p):
    return torch.log(p / (1 - p))


@pytest.mark.parametrize("probabilities, targets, gamma, alpha, expected", FVCORE_STAR_CASES)
def test_fvcore_star_cases(probabilities, targets, gamma, alpha, expected):
    x = logit(torch.tensor(probabilities, dtype=torch.float64))
    t = torch.tensor(targets, dtype=torch.float64)
    loss = focal_cuda.sigmoid_focal_loss_star(x, t, gamma=gamma, alpha=alpha)
    assert_matches(loss, torch.tensor(expected, dtype=torch.float64))
    ce = F.binary_cross_entropy_with_logits(x, t, reduction="none")
    ratio = ce / loss
    if gamma == 1.0:
        assert_matches(loss, ce)
    elif gamma == 3.0:
        assert (ratio > 10).all()
    else:
        assert ((ratio - 1).abs() < 0.1).all()


def test_fvcore_star_defaults_are_the_cross_entropy():
    """alpha = -1, gamma = 1 (fvcore's defaults): FL* is the BCE, its gradient p - t, and the
    mean and sum reduce as the BCE's do, also over several classes."""
    p = torch.tensor([[0.95, 0.55, 0.12, 0.05], [0.09, 0.95, 0.36, 0.11], [0.06, 0.12, 0.56, 0.07]],
                     dtype=torch.float64)
    x = logit(p).requires_grad_()
    t = torch.tensor([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]], dtype=torch.float64)
    for reduction in REDUCTIONS:
        loss = focal_cuda.sigmoid_focal_loss_star(x, t, reduction=reduction)
        ce = F.binary_cross_entropy_with_logits(x, t, reduction=reduction)
        assert_matches(loss, ce)
    (grad,) = torch.autograd.grad(focal_cuda.sigmoid_focal_loss_star(x, t, reduction="sum"), x)
    assert_matches(grad, p - t)


def test_fvcore_star_alpha_weights():
    """alpha = 0.5 halves every loss; alpha = 1 zeroes the negatives, alpha = 0 the positives."""
    x = logit(torch.tensor([0.05, 0.12, 0.89, 0.79], dtype=torch.float64))
    t = torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    unweighted = focal_cuda.sigmoid_focal_loss_star(x, t, gamma=2.0)
    assert_matches(focal_cuda.sigmoid_focal_loss_star(x, t, gamma=2.0, alpha=0.5), unweighted / 2)
    only_positives = focal_cuda.sigmoid_focal_loss_star(x, t, gamma=3.0, alpha=1.0)
    only_negatives = focal_cuda.sigmoid_focal_loss_star(x, t, gamma=3.0, alpha=0.0)
    assert (only_positives[t == 0] == 0).all() and (only_positives[t == 1] > 0).all()
    assert (only_negatives[t == 1] == 0).all() and (only_negatives[t == 0] > 0).all()


def test_star_beta_shifts_the_logit():
    """FL* with beta is FL* of gamma * x_t + beta: -log(sigmoid(z)) / gamma (the closed form)."""
    x = logit(torch.tensor([0.3, 0.3], dtype=torch.float64))
    t = torch.tensor([1.0, 0.0], dtype=torch.float64)
    loss = focal_cuda.sigmoid_focal_loss_star(x, t, alpha=0.25, gamma=2.0, beta=0.5)
    # log1p(exp(-z)) / gamma * alpha_t with z = 2 * (+-1) * logit(0.3) + 0.5, by hand.
    assert_matches(loss, torch.tensor([0.18239146814279728, 0.03960889219575364], dtype=torch.float64))


@pytest.mark.parametrize("form, index", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_labels_equal_one_hot(form, index, dtype):
    """Integer labels give the loss and input gradient of their one-hot targets (score 1),
    ignored rows nothing, and the mean counts the elements of rows not ignored."""
    parameters = PARAMETERS[form][index]
    generator = torch.Generator().manual_seed(index)
    x = (torch.randn(40, 7, generator=generator, dtype=torch.float64) * 3).to(dtype)
    labels = torch.randint(0, 8, (40,), generator=generator)
    labels[::5] = -1
    dense, valid = one_hot(labels, 7, ignore_index=-1)
    for reduction in REDUCTIONS:
        x_labels = x.clone().requires_grad_()
        x_dense = x.clone().requires_grad_()
        ours = FUNCTIONS[form](x_labels, labels, reduction=reduction, ignore_index=-1, **parameters)
        elementwise = FUNCTIONS[form](x_dense, dense.to(dtype), reduction="none", **parameters) * valid.to(dtype)
        expected = elementwise if reduction == "none" else elementwise.sum() / (valid.sum() if reduction == "mean" else 1)
        # The same kernels on the same values: only the order of the sums differs.
        assert_matches(ours, expected.double(), dtype)
        (grad_labels,) = torch.autograd.grad(ours.sum(), x_labels)
        (grad_dense,) = torch.autograd.grad(expected.sum(), x_dense)
        assert_matches(grad_labels, grad_dense.double(), dtype)


@pytest.mark.parametrize("form, index", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_saturated_logits_stay_finite(form, index, dtype):
    """Logits far past saturation, with hard and soft targets: the loss and every gradient are
    finite (fractional exponents included), and match the formula where it is itself exact."""
    parameters = PARAMETERS[form][index]
    big = torch.tensor([-1e4, -500.0, -100.0, -40.0, -17.0, 17.0, 40.0, 100.0, 500.0, 1e4], dtype=dtype)
    x = big.repeat(3).requires_grad_()
    t = torch.cat([torch.zeros(10), torch.ones(10), torch.full((10,), 0.25)]).to(dtype).requires_grad_()
    loss = FUNCTIONS[form](x, t, reduction="none", **parameters)
    grad_x, grad_t = torch.autograd.grad(loss.sum(), (x, t))
    for value in (loss, grad_x, grad_t):
        assert torch.isfinite(value).all(), value
    # Against focal_cuda.reference in float64 (softplus as logaddexp, |p - t| without
    # cancellation): exact to ~1e-16 where the composite BCE of the libraries is not (log(1 +
    # exp(-17)) loses 9 digits). Up to |x| = 100: past it sigmoid(-|x|) is 0 in float64 and the
    # reference's autograd of |p - t|^beta NaN.
    moderate = x.detach().abs() <= 100
    exact_x = x.detach().double().requires_grad_()
    exact_t = t.detach().double().requires_grad_()
    expected = REFERENCES[form](exact_x, exact_t, reduction="none", **parameters)
    expected_x, expected_t = torch.autograd.grad(expected.sum(), (exact_x, exact_t))
    alpha, gamma, beta = op_arguments(form, parameters)
    scales = family_term_scales(FORMS[form], x, t, alpha, gamma, beta)
    for ours, wanted, scale in zip((loss, grad_x, grad_t), (expected, expected_x, expected_t), scales):
        assert_matches(ours.detach()[moderate], wanted.detach()[moderate], dtype, scale=scale[moderate])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("form", ["focal", *FUNCTIONS])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_logits_up_to_the_largest_float_keep_their_gradients(device, form, dtype):
    """Logits up to float32's largest (bfloat16 shares its range, and its math is float32's),
    where an exponent times CE overflows though p(1 - p) is 0: the loss and the gradient w.r.t.
    the logits are the float64 reference's, inf only where that exceeds the dtype's range; the
    target gradient, whose terms grow like the logit, is never NaN and is the reference's up to
    |x| = 1e30 (beyond, a sum of such terms may overflow where the exact one does not). FL*'s
    gamma is a slope whose product with the logit overflows (README): gamma <= 1 here."""
    largest = torch.finfo(dtype).max
    logits = torch.tensor([largest, largest / 4, 1e30], dtype=torch.float64)
    x = torch.cat([logits, -logits]).repeat(3).to(device, dtype).requires_grad_()
    t = torch.tensor([0.0, 1.0, 0.5]).repeat_interleave(6).to(device, dtype).requires_grad_()
    function = FUNCTIONS.get(form, focal_cuda.sigmoid_focal_loss)
    reference = REFERENCES.get(form, focal_cuda.reference.sigmoid_focal_loss)
    exponent = "beta" if form == "quality" else "gamma"
    for value in (0.5, 1.0) if form == "star" else (0.5, 1.0, 2.0, 3.7, 1000.0):
        loss = function(x, t, reduction="none", **{exponent: value})
        results = (loss, *torch.autograd.grad(loss.sum(), (x, t)))
        exact_x = x.detach().double().requires_grad_()
        exact_t = t.detach().double().requires_grad_()
        expected = reference(exact_x, exact_t, reduction="none", **{exponent: value})
        wanted = (expected, *torch.autograd.grad(expected.sum(), (exact_x, exact_t)))
        moderate = x.detach().double().abs() <= 1e30
        everywhere = torch.ones_like(moderate)
        for ours, exact, compared in zip(results, wanted, (everywhere, everywhere, moderate)):
            assert not ours.isnan().any(), (value, ours)
            ours, exact = ours.detach().double()[compared], exact.detach()[compared]
            assert not exact.isnan().any(), (value, exact)
            # Near the dtype's largest, rounding decides between it and inf: the sign only.
            huge = exact.abs() > largest / 2
            assert torch.equal(ours[huge].sign(), exact[huge].sign()), (value, ours, exact)
            assert_matches(ours[~huge], exact[~huge], dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("form", ["focal", *FUNCTIONS])
@pytest.mark.parametrize("dtype", DTYPES)
def test_infinite_logits_give_one_result_wherever_the_element_lies(device, form, dtype):
    """An infinite logit's loss and gradients (NaN where a term is inf - inf or 0 * inf) are the
    same for every element of a tensor of equal elements: the CPU's vector lanes and its scalar
    tail alike, under every ISA (a clamp once turned the tail's NaN target gradient into float's
    largest; the lanes without FMA once gave inf for CE at x = +inf), and on CUDA, whose kernels
    compute every element as that tail does, the CPU's (to rounding)."""
    function = FUNCTIONS.get(form, focal_cuda.sigmoid_focal_loss)
    for logit in (math.inf, -math.inf):
        for target in (-0.5, 0.0, 0.5, 1.0, 1.5):  # beyond [0, 1] too: inf - t inf is inf for t < 0
            results = []
            for on in ("cpu", device):
                x = torch.full((37,), logit, dtype=dtype, device=on, requires_grad=True)
                t = torch.full((37,), target, dtype=dtype, device=on, requires_grad=True)
                loss = function(x, t, reduction="none")
                results.append([r.cpu() for r in (loss, *torch.autograd.grad(loss.sum(), (x, t)))])
            for name, on_cpu, on_device in zip(("loss", "d/dx", "d/dt"), *results):
                where = (form, logit, target, name)
                torch.testing.assert_close(on_cpu, on_cpu[:1].expand(37), rtol=0, atol=0,
                                           equal_nan=True, msg=lambda m: f"{where}: {m}")
                torch.testing.assert_close(on_device, on_cpu, equal_nan=True,
                                           msg=lambda m: f"{where}: {m}")


def test_quality_gradient_at_exact_target_is_finite():
    """QFL with beta < 1 where sigmoid(x) == t exactly: the sign(d) term is taken as 0 (abs'(0))."""
    x = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    t = torch.full((3,), 0.5, dtype=torch.float64, requires_grad=True)
    loss = focal_cuda.quality_focal_loss(x, t, beta=0.5, reduction="sum")
    grad_x, grad_t = torch.autograd.grad(loss, (x, t))
    assert loss.item() == 0
    assert torch.equal(grad_x, torch.zeros(3, dtype=torch.float64))
    assert torch.equal(grad_t, torch.zeros(3, dtype=torch.float64))


def test_varifocal_gradient_with_respect_to_targets_at_zero_is_the_negative_branch():
    """At t = 0: d/dt [alpha |p - t|^gamma CE] = alpha p^gamma (-gamma CE / p - x), by hand."""
    x = torch.tensor([-1.0, 0.5, 2.0], dtype=torch.float64)
    t = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    loss = focal_cuda.varifocal_loss(x, t, alpha=0.75, gamma=2.0, reduction="sum")
    (grad_t,) = torch.autograd.grad(loss, t)
    p = torch.sigmoid(x)
    ce = F.softplus(x)
    assert_matches(grad_t, 0.75 * p**2 * (-2.0 * ce / p - x))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("labels", [False, True], ids=["scores", "labels"])
def test_varifocal_subnormal_target_is_a_positive(device, dtype, labels):
    """A subnormal target (an IoU score below the smallest normal number) is a positive: its
    loss t CE and d/dx t (p - t) are subnormal, d/dt CE - t x, though the CPU kernels flush the
    arithmetic's subnormals to 0 (README, Subnormals); not the negatives' alpha |p - t|^gamma CE.
    70 positions: the CPU kernels' vector lanes and their scalar tail."""
    smallest_normal = torch.finfo(dtype).smallest_normal
    score = smallest_normal / 4  # a power of two: exact in every dtype here
    x = torch.linspace(-2, 2, 70, dtype=torch.float64).reshape(35, 2)
    if labels:
        classes = torch.tensor([0, 1, 2] * 11 + [0, 2])  # 2: background, two classes
        dense = F.one_hot(classes, 3)[:, :2].double() * score
        targets = (classes.to(device), torch.full((35,), score, dtype=dtype, device=device))
    else:
        dense = torch.full_like(x, score)
        targets = dense.to(device, dtype, copy=True)
    graded = targets[1] if labels else targets
    graded.requires_grad_()
    inputs = x.to(device, dtype, copy=True).requires_grad_()
    loss = focal_cuda.varifocal_loss(inputs, targets, alpha=0.75, gamma=2.0, reduction="none")
    loss.sum().backward()

    x64, t64 = x.clone().requires_grad_(), dense.clone().requires_grad_()
    expected = formula("varifocal", x64, t64, alpha=0.75, gamma=2.0)
    expected.sum().backward()
    positive = dense != 0
    assert expected[positive].abs().max() < smallest_normal  # their losses are subnormal
    within_a_subnormal = dict(rtol=0, atol=smallest_normal)
    for name, ours, truth in [("loss", loss.detach(), expected.detach()), ("d/dx", inputs.grad, x64.grad)]:
        ours = ours.double().cpu()
        torch.testing.assert_close(ours[positive], truth[positive], **within_a_subnormal,
                                   msg=lambda m: f"{name} of the positives: {m}")
        assert_matches(ours[~positive], truth[~positive], dtype)
    grad_targets = (t64.grad * positive).sum(-1) if labels else t64.grad  # a label's score's
    assert_matches(graded.grad.cpu(), grad_targets, dtype)


def anchor_targets(generator, anchors=40, classes=6):
    """Logits, labels (background = C) and IoU scores as a one-stage head's assigner gives them."""
    x = (3 * torch.randn(anchors, classes, generator=generator, dtype=torch.float64)).requires_grad_()
    labels = torch.randint(0, classes + 1, (anchors,), generator=generator)
    scores = torch.rand(anchors, generator=generator, dtype=torch.float64) * 0.9 + 0.05
    return x, labels, scores


def test_mmdet_quality_focal_loss_is_the_sum_over_each_anchors_classes():
    """README's mapping: mmdet sums each anchor's C terms, weights the anchor, then takes the mean
    over anchors or divides by avg_factor (mmdet's composite, written here in float64)."""
    x, labels, scores = anchor_targets(torch.Generator().manual_seed(5))
    anchor_weight = torch.rand(x.shape[0], generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    dense, _ = one_hot(labels, x.shape[1])
    per_anchor = formula("quality", x, dense * scores[:, None], beta=2.0).sum(1) * anchor_weight
    ours = focal_cuda.quality_focal_loss(x, (labels, scores), weight=anchor_weight[:, None], reduction="sum")
    avg_factor = 7.5
    for mmdet, mapped in [(per_anchor.mean(), ours / x.shape[0]), (per_anchor.sum() / avg_factor, ours / avg_factor)]:
        assert_matches(mapped, mmdet)
        assert_matches(torch.autograd.grad(mapped, x, retain_graph=True)[0],
                       torch.autograd.grad(mmdet, x, retain_graph=True)[0])
    assert_matches(focal_cuda.quality_focal_loss(x, (labels, scores), reduction="none").sum(1),
                   formula("quality", x, dense * scores[:, None], beta=2.0).sum(1))


def test_rt_detr_varifocal_loss_has_the_values_and_a_detached_modulation():
    """README's mapping: RT-DETR's VFL (its composite, written here in float64) weights by a
    one-hot label mask and detaches p in alpha * p^gamma. Where no labelled score is 0 the values
    agree; on negatives ours differentiates the modulation too, 1 + gamma (1 - p) softplus(x) / p
    times theirs (in [1, 1 + gamma]); positives' gradients agree."""
    x, labels, scores = anchor_targets(torch.Generator().manual_seed(7))
    dense, _ = one_hot(labels, x.shape[1])
    target = dense * scores[:, None]
    weight = 0.75 * x.sigmoid().detach().pow(2) * (1 - dense) + target
    theirs = F.binary_cross_entropy_with_logits(x, target, weight=weight, reduction="sum")
    ours = focal_cuda.varifocal_loss(x, (labels, scores), alpha=0.75, gamma=2.0, reduction="sum")
    assert_matches(ours, theirs)
    grad_ours, = torch.autograd.grad(ours, x)
    grad_theirs, = torch.autograd.grad(theirs, x)
    p = x.detach().sigmoid()
    negative = dense == 0
    ratio = 1 + 2.0 * (1 - p) * F.softplus(x.detach()) / p
    assert_matches(grad_ours[negative], (grad_theirs * ratio)[negative])
    assert_matches(grad_ours[~negative], grad_theirs[~negative])
    assert ratio.min() >= 1 and ratio.max() <= 3


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("labels", [False, True], ids=["scores", "labels"])
def test_detached_modulation_is_rt_detrs_varifocal_loss(device, dtype, labels):
    """detach_modulation=True is RT-DETR's VFL (its composite, written here in float64, p
    detached in alpha * p^gamma; its scores, IoUs, detached too): the same loss and gradient
    w.r.t. the logits; gamma 2 and 1.5 (on CUDA the General kernels' products and pow)."""
    x64, label_index, scores = anchor_targets(torch.Generator().manual_seed(11))
    dense, _ = one_hot(label_index, x64.shape[1])
    target = dense * scores[:, None]
    x = x64.detach().to(device, dtype).requires_grad_()
    targets = (label_index.to(device), scores.to(device, dtype)) if labels else target.to(device, dtype)
    for gamma in (2.0, 1.5):
        weight = 0.75 * x64.sigmoid().detach().pow(gamma) * (1 - dense) + target
        theirs = F.binary_cross_entropy_with_logits(x64, target, weight=weight, reduction="sum")
        ours = focal_cuda.varifocal_loss(x, targets, alpha=0.75, gamma=gamma, reduction="sum",
                                         detach_modulation=True)
        assert_matches(ours.cpu(), theirs.detach(), dtype)
        assert_matches(torch.autograd.grad(ours, x)[0].cpu(), torch.autograd.grad(theirs, x64)[0], dtype)


@pytest.mark.parametrize("gamma", [0.0, 1.0, 2.0, 0.5])
def test_detached_modulation_changes_only_the_negatives_logit_gradient(gamma):
    """Against the module's own float64 terms differentiated by autograd (reference.varifocal_loss
    with p detached in its modulation): the loss and the target gradient as without detach,
    d/dx alpha |p - t|^gamma (p - t) on the negatives; on the CPU kernels, lanes and tail."""
    generator = torch.Generator().manual_seed(5)
    x = (4 * torch.randn(67, generator=generator, dtype=torch.float64)).requires_grad_()
    t = torch.where(torch.rand(67, generator=generator) < 0.5, torch.zeros(67, dtype=torch.float64),
                    torch.rand(67, generator=generator, dtype=torch.float64)).requires_grad_()
    options = dict(alpha=0.75, gamma=gamma, reduction="sum")
    detached = focal_cuda.varifocal_loss(x, t, detach_modulation=True, **options)
    attached = focal_cuda.varifocal_loss(x, t, **options)
    grad_x, grad_t = torch.autograd.grad(detached, (x, t))
    attached_x, attached_t = torch.autograd.grad(attached, (x, t))
    p = x.detach().sigmoid()
    d = p - t.detach()
    negative = t.detach() <= 0
    expected_x = torch.where(negative, 0.75 * d.abs() ** gamma * d, attached_x)
    assert_matches(detached, attached.detach())
    assert_matches(grad_t, attached_t)
    assert_matches(grad_x, expected_x)
    assert gamma == 0 or not torch.allclose(grad_x[negative], attached_x[negative])
    reference = focal_cuda.reference.varifocal_loss(x, t, detach_modulation=True, **options)
    assert_matches(torch.autograd.grad(reference, x)[0], expected_x)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gamma", [2.0, 1.5])
def test_detached_modulation_keeps_the_gradient_at_infinite_logits_finite(device, dtype, gamma):
    """Detached, d/dx at x = +-inf is the closed form with p = 1 or 0: t (p - t) on positives,
    alpha |p - t|^gamma (p - t) on negatives, finite, as the reference formula's (autograd): the
    modulation's term is left out, not 0 times CE, which is inf or NaN there. 37 elements: the
    CPU kernels' lanes and tail; on CUDA the General kernels."""
    for logit, p in ((math.inf, 1.0), (-math.inf, 0.0)):
        for target in (-0.5, 0.0, 0.5, 1.0, 1.5):
            x = torch.full((37,), logit, dtype=dtype, device=device, requires_grad=True)
            t = torch.full((37,), target, dtype=dtype, device=device)
            loss = focal_cuda.varifocal_loss(x, t, alpha=0.75, gamma=gamma, reduction="sum",
                                             detach_modulation=True)
            (grad_x,) = torch.autograd.grad(loss, x)
            d = p - target
            closed_form = target * d if target > 0 else 0.75 * abs(d) ** gamma * d
            expected = torch.full((37,), closed_form, dtype=torch.float64)
            assert_matches(grad_x.cpu(), expected, dtype)
            x64 = x.detach().cpu().double().requires_grad_()
            reference = focal_cuda.reference.varifocal_loss(x64, t.cpu().double(), alpha=0.75, gamma=gamma,
                                                            reduction="sum", detach_modulation=True)
            assert_matches(torch.autograd.grad(reference, x64)[0], expected)


def test_detached_modulation_on_the_reference_formulas_paths():
    """torch.func.grad and create_graph take the reference formula (p detached there by
    x.detach()): the eager kernels' gradient, and a second derivative through it; compiled
    code the op."""
    generator = torch.Generator().manual_seed(6)
    x = 3 * torch.randn(5, 4, generator=generator, dtype=torch.float64)
    t = torch.where(torch.rand(5, 4, generator=generator) < 0.5, torch.zeros_like(x), torch.rand_like(x))

    def loss(inputs):
        return focal_cuda.varifocal_loss(inputs, t, reduction="sum", detach_modulation=True)

    eager = x.clone().requires_grad_()
    (eager_grad,) = torch.autograd.grad(loss(eager), eager)
    assert_matches(torch.func.grad(loss)(x), eager_grad)
    graph = x.clone().requires_grad_()
    (graph_grad,) = torch.autograd.grad(loss(graph), graph, create_graph=True)
    assert_matches(graph_grad.detach(), eager_grad)
    assert graph_grad.requires_grad
    compiled = x.clone().requires_grad_()  # the op with its registered autograd
    (compiled_grad,) = torch.autograd.grad(torch.compile(loss, fullgraph=True)(compiled), compiled)
    assert_matches(compiled_grad, eager_grad)


def test_detach_modulation_must_be_a_bool():
    message = r"detach_modulation must be a bool \(True or False\), got "
    with pytest.raises(ValueError, match=message + "1$"):
        focal_cuda.varifocal_loss(torch.zeros(2, 3), torch.zeros(2, 3), detach_modulation=1)
    with pytest.raises(ValueError, match=message + "a Tensor$"):
        focal_cuda.varifocal_loss(torch.zeros(2, 3), torch.zeros(2, 3), detach_modulation=torch.tensor(True))
    with pytest.raises(ValueError, match=message + "1$"):
        focal_cuda.VarifocalLoss(detach_modulation=1)


@pytest.mark.parametrize("call, error, message", [
    (lambda x, t: focal_cuda.sigmoid_focal_loss_star(x, t, gamma=0.0), ValueError,
     "gamma must be in (0, 1000], got 0"),
    (lambda x, t: focal_cuda.sigmoid_focal_loss_star(x, t, gamma=float("inf")), ValueError,
     "gamma must be in (0, 1000], got inf"),
    # float32 math: a larger coefficient would be inf there, its products NaN.
    (lambda x, t: focal_cuda.sigmoid_focal_loss_star(x, t, gamma=1e39), ValueError,
     "gamma must be in (0, 1000], got 1e+39"),
    (lambda x, t: focal_cuda.varifocal_loss(x, t, alpha=1e39), ValueError,
     "alpha must be >= 0 and at most 3.4028234663852886e+38 (float32's largest), got 1e+39"),
    (lambda x, t: focal_cuda.varifocal_loss(x, t, gamma=1e6), ValueError,
     "gamma must be in [0, 1000], got 1000000.0"),
    (lambda x, t: focal_cuda.sigmoid_focal_loss_star(x, t, beta=float("nan")), ValueError,
     "beta must be a number of magnitude at most 3.4028234663852886e+38 (float32's largest), got nan"),
    (lambda x, t: focal_cuda.sigmoid_focal_loss_star(x, t, alpha=2.0), ValueError,
     "alpha must be in [0, 1], or -1 or None to disable the weighting, got 2"),
    (lambda x, t: focal_cuda.quality_focal_loss(x, t, beta=-1), ValueError,
     "beta must be in [0, 1000], got -1"),
    (lambda x, t: focal_cuda.quality_focal_loss(x, t, beta="2"), ValueError,
     "beta must be a real number, got '2'"),
    (lambda x, t: focal_cuda.varifocal_loss(x, t, alpha=-0.5), ValueError,
     "alpha must be >= 0 and at most 3.4028234663852886e+38 (float32's largest), got -0.5"),
    (lambda x, t: focal_cuda.varifocal_loss(x, t, gamma=None), ValueError,
     "gamma must be a real number, got None"),
    (lambda x, t: focal_cuda.varifocal_loss(x, t, reduction="avg"), ValueError,
     "reduction must be one of 'none', 'mean', 'sum', got 'avg'"),
    (lambda x, t: focal_cuda.quality_focal_loss(x, t[:, :3]), ValueError,
     "targets must have the shape of inputs, [4, 4], got [4, 3]"),
])
def test_errors_name_the_argument(call, error, message):
    with pytest.raises(error) as raised:
        call(torch.zeros(4, 4), torch.zeros(4, 4))
    assert message in str(raised.value)


@pytest.mark.parametrize("form, coefficients, label_smoothing, message", [
    (4, [0.25, 2.0], 0.0, "form must be 0 (focal loss), 1 (FL*), 2 (quality focal loss) or 3 (varifocal loss), got 4"),
    (2, [0.25, 2.0], 0.0, "the quality focal loss takes the coefficients (beta), got 2 values"),
    (0, [0.25, 2.0, 1.0], 0.0, "the focal loss takes the coefficients (alpha, gamma), got 3 values"),
    (1, [-1.0, 0.0, 0.0], 0.0, "gamma must be in (0, 1000], got 0"),
    (1, [-1.0, 1.0, math.inf], 0.0, "beta must be a number of magnitude at most 3.4028234663852886e+38 (float32's largest), got inf"),
    (2, [-0.5], 0.0, "beta must be in [0, 1000], got -0.5"),
    (3, [0.75, 2.0, 0.0], 0.1, "label_smoothing must be 0 for the varifocal loss, whose targets are soft scores already, got 0.1"),
    (2, [2.0], 0.1, "label_smoothing must be 0 for the quality focal loss, whose targets are soft scores already, got 0.1"),
    (3, [-1.0, 2.0, 0.0], 0.0, "alpha must be >= 0 and at most 3.4028234663852886e+38 (float32's largest), got -1"),
    (3, [0.75, 2.0, 0.5], 0.0, "detach_modulation must be 0 or 1 (False or True), got 0.5"),
    (3, [0.75, 2.0], 0.0, "the varifocal loss takes the coefficients (alpha, gamma, detach_modulation), got 2 values"),
    (0, [0.25, 2.0], 1.0, "label_smoothing must be in [0, 1), got 1"),
])
def test_op_checks_the_form_arguments(form, coefficients, label_smoothing, message):
    """The op itself refuses what its form does not define (ValueError, the argument named)."""
    with pytest.raises(ValueError) as raised:
        torch.ops.focal_cuda.sigmoid_focal_loss_forward(
            torch.zeros(2, 3), torch.zeros(2, 3), None, None, form, coefficients, 0, -100,
            label_smoothing, False, 0)
    assert message in str(raised.value)


def test_every_table_that_names_the_forms_holds_each_registered_one():
    """The tables that name the forms one by one (each form's options and formulas are its own)
    hold every form that focal_cuda.loss registers: a new form fails here, naming the table to
    extend, rather than going untested there."""
    import conftest
    import drive_cuda_kernels
    import test_cuda_emulation
    from focal_cuda import __main__ as selfcheck

    registered = set(focal_cuda.reference.FORMS)
    names = {focal_cuda.reference.FAMILY[code].function.__name__ for code in focal_cuda.reference.FAMILY}
    self_checked = {case[1] for case in selfcheck.check_cases(torch.Generator().manual_seed(0))}
    tables = {
        "tests/test_family.py FORMS, FUNCTIONS, REFERENCES, PARAMETERS (and defaults, formula, "
        "op_arguments)": set(FORMS) | {"focal"},
        "tests/conftest.py HELPER_FORMS (and its helpers' branches)": set(conftest.HELPER_FORMS),
        "tests/drive_cuda_kernels.py FORMS (and form_call)": set(drive_cuda_kernels.FORMS),
        "tests/test_cuda_emulation.py FORM_ROTATION (and form_options)":
            set(test_cuda_emulation.FORM_ROTATION),
    }
    for table, forms in tables.items():
        assert forms == registered, f"{table}: {sorted(forms)}, registered {sorted(registered)}"
    assert names <= self_checked, f"focal_cuda/__main__.py check_cases misses {sorted(names - self_checked)}"
    assert {FUNCTIONS[form].__name__ for form in FUNCTIONS} | {"sigmoid_focal_loss"} == names


@pytest.mark.parametrize("form", sorted(focal_cuda.reference.FORMS.values()))
def test_op_and_reference_agree_on_each_forms_coefficients(form):
    """The op's table (csrc/focal_math.h) and the reference's name the same coefficients in the
    same order: asked for one too many, the op lists them."""
    coefficients = focal_cuda.reference.FAMILY[form].coefficients
    with pytest.raises(ValueError) as raised:
        torch.ops.focal_cuda.sigmoid_focal_loss_forward(
            torch.zeros(2, 3), torch.zeros(2, 3), None, None, form, [0.5] * (len(coefficients) + 1),
            0, -100, 0.0, False, 0)
    assert f"takes the coefficients ({', '.join(coefficients)}), got" in str(raised.value)


@pytest.mark.parametrize("module, function, parameters", [
    (focal_cuda.SigmoidFocalLossStar, focal_cuda.sigmoid_focal_loss_star, dict(alpha=0.25, gamma=2.0, beta=0.5)),
    (focal_cuda.QualityFocalLoss, focal_cuda.quality_focal_loss, dict(beta=1.5)),
    (focal_cuda.VarifocalLoss, focal_cuda.varifocal_loss, dict(alpha=0.5, gamma=1.5)),
    (focal_cuda.VarifocalLoss, focal_cuda.varifocal_loss, dict(alpha=0.75, gamma=2.0, detach_modulation=True)),
])
def test_modules(module, function, parameters):
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(6, 4, generator=generator, requires_grad=True)
    t = torch.rand(6, 4, generator=generator)
    weight = torch.rand(4, generator=generator)
    for reduction in REDUCTIONS:
        loss = module(reduction=reduction, **parameters)(x, t, weight)
        expected = function(x, t, reduction=reduction, weight=weight, **parameters)
        assert torch.equal(loss, expected)
        # The gradient too: an option such as detach_modulation changes it alone.
        assert torch.equal(*(torch.autograd.grad(value.sum(), x)[0] for value in (loss, expected)))
    assert "reduction='mean'" in repr(module(reduction="mean", **parameters))
    with pytest.raises(ValueError, match="reduction must be one of"):
        module(reduction="avg")


@pytest.mark.parametrize("module, function", [
    (focal_cuda.SigmoidFocalLossStar, focal_cuda.sigmoid_focal_loss_star),
    (focal_cuda.QualityFocalLoss, focal_cuda.quality_focal_loss),
    (focal_cuda.VarifocalLoss, focal_cuda.varifocal_loss),
])
def test_module_takes_its_functions_options(module, function):
    """Made from the function's signature: the same options and defaults, checked when built as
    a call checks them; the module pickles (its class is found by name)."""
    options = {name: parameter.default for name, parameter in inspect.signature(function).parameters.items()
               if name not in ("inputs", "targets", "weight")}
    assert {name: parameter.default for name, parameter in inspect.signature(module).parameters.items()} == options
    built = module()
    assert {name: getattr(built, name) for name in options} == options
    assert repr(pickle.loads(pickle.dumps(built))) == repr(built)
    with pytest.raises(ValueError, match="ignore_index must be an integer, got 1.5"):
        module(ignore_index=1.5)
    with pytest.raises(TypeError):
        module(weight=torch.ones(3))  # a call's operand, not an option
    built.reduction = "sum"  # options stay plain attributes, read at each call
    x, t = torch.randn(3, 4), torch.rand(3, 4)
    assert torch.equal(built(x, t), function(x, t, reduction="sum"))
    assert_documents_its_function(module, function)


def assert_documents_its_function(module, function):
    """help() on the module documents the loss as the function does (no function documentation
    under python -OO)."""
    assert module.__doc__.startswith(f"``{function.__name__}`` as a module")
    if function.__doc__:
        assert module.__doc__.endswith(inspect.getdoc(function))


@pytest.mark.parametrize("module, function", [
    (focal_cuda.SigmoidFocalLoss, focal_cuda.sigmoid_focal_loss),
    (focal_cuda.SoftmaxFocalLoss, focal_cuda.softmax_focal_loss),
])
def test_written_modules_document_their_functions_options(module, function):
    """help() on the two modules written by hand documents their options, as on the family's."""
    assert_documents_its_function(module, function)


@pytest.mark.parametrize("form", FUNCTIONS)
@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("labels", [False, True])
def test_opcheck(form, requires_grad, labels):
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(6, 5, generator=generator).requires_grad_(requires_grad)
    t = torch.randint(0, 6, (6,), generator=generator) if labels else \
        torch.rand(6, 5, generator=generator).requires_grad_(requires_grad)
    alpha, gamma, beta = op_arguments(form, PARAMETERS[form][1])
    outputs = focal_cuda._ops.outputs_mask(requires_grad, requires_grad and not labels, False)
    args = (x, t, None, None, FORMS[form], coefficients_of(FORMS[form], alpha, gamma, beta), 1, -100,
            0.0, False, outputs)
    torch.library.opcheck(torch.ops.focal_cuda.sigmoid_focal_loss_forward.default, args)


@pytest.mark.parametrize("form", FUNCTIONS)
@pytest.mark.parametrize("labels", [False, True])
def test_compile_fullgraph_matches_eager(form, labels):
    """torch.compile(fullgraph=True, dynamic) of the loss: eager's values and gradients, bitwise,
    with soft targets (and their gradient) or labels with a class weight."""
    torch._dynamo.reset()
    parameters = PARAMETERS[form][1]

    def step(inputs, targets, weight):
        return FUNCTIONS[form](inputs, targets, reduction="sum", weight=weight, **parameters)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager", dynamic=True)
    for rows in (16, 24):
        generator = torch.Generator().manual_seed(rows)
        inputs = torch.randn(rows, 6, generator=generator)
        targets = torch.randint(0, 7, (rows,), generator=generator) if labels else \
            torch.rand(rows, 6, generator=generator)
        weight = torch.rand(6, generator=generator)
        copies = [[tensor.clone().requires_grad_(tensor.is_floating_point()) for tensor in (inputs, targets, weight)]
                  for _ in range(2)]
        eager, result = step(*copies[0]), compiled(*copies[1])
        eager.backward()
        result.backward()
        torch.testing.assert_close(result, eager, rtol=0, atol=0)
        for ours, theirs in zip(copies[1], copies[0]):
            if ours.is_floating_point():
                torch.testing.assert_close(ours.grad, theirs.grad, rtol=0, atol=0)


@pytest.mark.parametrize("form", FUNCTIONS)
def test_forward_mode_and_functorch(form):
    """jvp (forward mode, through the reference formula) equals the fused kernels' gradient
    dotted with the tangent; vmap over a batch equals the eager loop."""
    generator = torch.Generator().manual_seed(6)
    x = torch.randn(5, 4, generator=generator, dtype=torch.float64)
    t = torch.rand(5, 4, generator=generator, dtype=torch.float64) * 0.9 + 0.05
    tangent = torch.randn(5, 4, generator=generator, dtype=torch.float64)
    parameters = PARAMETERS[form][2]

    def loss(x_):
        return FUNCTIONS[form](x_, t, reduction="mean", **parameters)

    _, derivative = torch.func.jvp(loss, (x,), (tangent,))
    (gradient,) = kernel_gradients(loss, (x,))
    assert_matches(derivative, (gradient * tangent).sum())
    samples = torch.stack([x, -x, 0.5 * x])  # distinct: a batch rule that mixes them up fails
    batched = torch.func.vmap(lambda x_: FUNCTIONS[form](x_, t, reduction="sum", **parameters))(samples)
    looped = torch.stack([FUNCTIONS[form](sample, t, reduction="sum", **parameters) for sample in samples])
    torch.testing.assert_close(batched, looped)


@pytest.mark.parametrize("form", FUNCTIONS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_autocast_gives_a_float32_loss(form, dtype):
    """Under autocast, 16-bit logits give a float32 loss, as the focal loss does: the float64
    formula's on the 16-bit values, to float32's rounding, and its gradient to the dtype's."""
    x = torch.randn(6, 5).to(dtype).requires_grad_()
    t = torch.rand(6, 5).to(dtype)
    with torch.autocast("cpu", dtype=dtype):
        loss = FUNCTIONS[form](x, t, reduction="sum", **PARAMETERS[form][1])
    assert loss.dtype == torch.float32
    loss.backward()
    assert x.grad.dtype == dtype
    x64 = x.detach().double().requires_grad_()
    expected = formula(form, x64, t.double(), **dict(defaults(form), **PARAMETERS[form][1])).sum()
    expected.backward()
    assert_matches(loss, expected.detach(), torch.float32)
    assert_matches(x.grad, x64.grad, dtype)


def test_quality_focal_loss_of_beta_0_is_the_bce_where_p_equals_t():
    """|p - t| ** 0 is 1 at p == t too (x = 0, t = 1/2), on every path: the fused kernels, the
    reference formula, and torch.func's transforms that compute with it."""
    x = torch.zeros(2, dtype=torch.float64)
    t = torch.full((2,), 0.5, dtype=torch.float64)
    expected = F.binary_cross_entropy_with_logits(x, t, reduction="sum")

    def function(x_):
        return focal_cuda.quality_focal_loss(x_, t, beta=0.0, reduction="sum")

    for value in (function(x), focal_cuda.reference.quality_focal_loss(x, t, beta=0.0, reduction="sum"),
                  torch.func.vmap(function)(x[None])[0]):
        torch.testing.assert_close(value, expected, rtol=1e-15, atol=0)


def test_reference_functions_match_the_fused_ones():
    """focal_cuda.reference documents the family with the public signatures: each declared
    form's function has its reference twin, computed by the form's terms."""
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(9, 4, generator=generator, dtype=torch.float64)
    t = torch.rand(9, 4, generator=generator, dtype=torch.float64)
    names = {form.function.__name__ for form in focal_cuda.reference.FAMILY.values()}
    assert names == {"sigmoid_focal_loss", "sigmoid_focal_loss_star", "quality_focal_loss", "varifocal_loss"}
    for name in names:
        ours, theirs = getattr(focal_cuda, name), getattr(focal_cuda.reference, name)
        assert inspect.signature(ours) == inspect.signature(theirs), name
        for reduction in REDUCTIONS:
            torch.testing.assert_close(ours(x, t, reduction=reduction), theirs(x, t, reduction=reduction),
                                       rtol=1e-12, atol=0)
    assert {name: focal_cuda.reference.FORMS[name] for name in FORMS} == FORMS
    assert not hasattr(focal_cuda.reference, "sigmoid_focal_loss_typo")
    assert "varifocal_loss" in dir(focal_cuda.reference)


def test_a_form_registers_once_with_its_coefficients_among_its_parameters():
    """register_form refuses a second form of a taken code, key or name, and terms whose
    coefficients the public function does not take (its reference twin could not call them)."""
    def terms(x, t, alpha):
        return x

    def function(inputs, targets, alpha=0.5, reduction="none", weight=None, ignore_index=-100):
        return inputs

    function.__name__ = "new_focal_loss"
    with pytest.raises(ValueError, match="a form of code 1 already"):
        focal_cuda.reference.register_form("new", 1, terms, function)
    with pytest.raises(ValueError, match="a form of key 'star' already"):
        focal_cuda.reference.register_form("star", 99, terms, function)
    function.__name__ = "varifocal_loss"
    with pytest.raises(ValueError, match="a form of name 'varifocal_loss' already"):
        focal_cuda.reference.register_form("new", 99, terms, function)
    function.__name__ = "new_focal_loss"
    with pytest.raises(ValueError, match=r"must include its terms' coefficients \('delta',\), got"):
        focal_cuda.reference.register_form("new", 99, lambda x, t, delta: x, function)
    assert 99 not in focal_cuda.reference.FAMILY and "new" not in focal_cuda.reference.FORMS


def test_focal_cuda_exports_exactly_the_public_losses():
    """focal_cuda re-exports focal_cuda.loss.__all__, the one list a new form's function and
    module join; that list names every public function and class focal_cuda.loss defines."""
    defined = {name for name, value in vars(focal_cuda.loss).items()
               if not name.startswith("_") and (inspect.isfunction(value) or inspect.isclass(value))
               and value.__module__ == "focal_cuda.loss"}
    assert defined == set(focal_cuda.loss.__all__)
    assert set(focal_cuda.__all__) == defined | {"__version__", "backends", "reference"}
    for name in focal_cuda.__all__:
        assert hasattr(focal_cuda, name), name
