"""Integer class labels, ignore_index, weight, label smoothing, the module, mmcv's golden values."""

import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import focal_cuda
from conftest import (DEVICES, DTYPES, GAMMAS, REDUCTIONS, assert_matches,
                      assert_second_derivatives_match_kernel_differences, requires_cuda)

CLASSES = 7


def label_case(shape, dtype, device, *, seed=0, label_dtype=torch.int64, ignore_fraction=0.0):
    """Logits of shape (*shape, CLASSES) and labels of shape shape, background included."""
    generator = torch.Generator().manual_seed(seed)
    inputs = (torch.randn(*shape, CLASSES, generator=generator, dtype=torch.float64) * 3)
    labels = torch.randint(0, CLASSES + 1, shape, generator=generator)
    if ignore_fraction:
        labels[torch.rand(shape, generator=generator) < ignore_fraction] = -100
    return inputs.to(device=device, dtype=dtype), labels.to(device=device, dtype=label_dtype)


def one_hot(labels):
    return F.one_hot(labels.long().clamp(0, CLASSES), CLASSES + 1)[..., :CLASSES]


def assert_equal_sums(actual, expected, terms):
    """Two reductions of the same nonnegative per-element losses (bit for bit the same with
    reduction "none"). The CPU sums both in one order: equal. The CUDA kernels group them
    otherwise (a label forward's second launch adds the labelled elements; packs of up to 16
    are summed in the math precision, float32 below float64, then in float64): each within 15
    float32 and `terms` float64 roundings of the exact sum, relative, then rounded to the dtype.
    Unreduced losses (actual.dim() > 0) are equal everywhere."""
    if actual.device.type == "cpu" or actual.dim() > 0:
        torch.testing.assert_close(actual, expected, rtol=0, atol=0)
        return
    pack_roundings = 0 if actual.dtype == torch.float64 else 15 * torch.finfo(torch.float32).eps
    rtol = pack_roundings + terms * torch.finfo(torch.float64).eps + torch.finfo(actual.dtype).eps
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=0)


def loss_and_grads(inputs, targets, reduction, grad_output=None, **options):
    """Loss and gradients (inputs, floating targets, weight) of focal_cuda."""
    x = inputs.detach().clone().requires_grad_()
    t = targets.detach().clone().requires_grad_(targets.is_floating_point())
    weight = options.pop("weight", None)
    w = None if weight is None else weight.detach().clone().requires_grad_()
    loss = focal_cuda.sigmoid_focal_loss(x, t, 0.25, 2.0, reduction, weight=w, **options)
    loss.backward(torch.ones_like(loss) if grad_output is None else grad_output)
    return loss.detach(), x.grad, t.grad, None if w is None else w.grad


def reference_loss_and_grads(inputs, targets, reduction, grad_output=None, **options):
    """The same from the reference, in float64."""
    x = inputs.detach().double().requires_grad_()
    t = targets.detach().double().requires_grad_() if targets.is_floating_point() else targets
    weight = options.pop("weight", None)
    w = None if weight is None else weight.detach().double().requires_grad_()
    loss = focal_cuda.reference.sigmoid_focal_loss(x, t, 0.25, 2.0, reduction, weight=w, **options)
    loss.backward(torch.ones_like(loss) if grad_output is None else grad_output.double())
    return loss.detach(), x.grad, t.grad if t.is_floating_point() else None, None if w is None else w.grad


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("label_dtype", [torch.int64, torch.int32, torch.int16, torch.uint8])
def test_labels_equal_float_path_on_one_hot(device, dtype, reduction, label_dtype):
    inputs, labels = label_case((5, 43), dtype, device, label_dtype=label_dtype)
    with_labels = loss_and_grads(inputs, labels, reduction)
    with_one_hot = loss_and_grads(inputs, one_hot(labels).to(dtype), reduction)
    assert with_labels[0].dtype == dtype
    assert_equal_sums(with_labels[0], with_one_hot[0], inputs.numel())
    torch.testing.assert_close(with_labels[1], with_one_hot[1], rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(1,), (300,), (4, 75), (2, 3, 50)])
@pytest.mark.parametrize("gamma", GAMMAS)
def test_labels_match_reference_for_nd_label_shapes(device, shape, gamma):
    inputs, labels = label_case(shape, torch.float32, device)
    x = inputs.clone().requires_grad_()
    loss = focal_cuda.sigmoid_focal_loss(x, labels, 0.25, gamma, "sum")
    loss.backward()
    xr = inputs.double().requires_grad_()
    expected = focal_cuda.reference.sigmoid_focal_loss(xr, labels, 0.25, gamma, "sum")
    expected.backward()
    assert_matches(loss, expected)
    assert_matches(x.grad, xr.grad)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_ignored_rows_give_nothing_and_leave_the_mean(device, reduction):
    inputs, labels = label_case((400,), torch.float32, device, ignore_fraction=0.3, seed=4)
    ignored = labels == -100
    loss, grad, _, _ = loss_and_grads(inputs, labels, reduction)
    if reduction == "none":
        assert (loss[ignored] == 0).all()
    assert (grad[ignored] == 0).all() and (grad[~ignored] != 0).any()
    # Dropping the rows shifts elements between vector lanes and scalar tails: equal to rounding.
    kept = loss_and_grads(inputs[~ignored], labels[~ignored], reduction)
    if reduction == "none":
        torch.testing.assert_close(loss[~ignored], kept[0], rtol=1e-6, atol=0)
    else:  # the mean divides by the elements of rows that are not ignored
        torch.testing.assert_close(loss, kept[0], rtol=1e-6, atol=0)
    torch.testing.assert_close(grad[~ignored], kept[1], rtol=1e-6, atol=0)
    expected = reference_loss_and_grads(inputs, labels, reduction)
    assert_matches(loss, expected[0])
    assert_matches(grad, expected[1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("loss_function", [focal_cuda.sigmoid_focal_loss, focal_cuda.softmax_focal_loss])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_a_nan_after_the_mean_of_nothing_leaves_zero_gradients(device, loss_function, dtype):
    """Every row ignored: the mean is NaN (as F.cross_entropy's), so a log after it sends NaN
    back; every logit was ignored, so its gradient is 0 all the same, as F.cross_entropy's."""
    inputs = torch.randn(6, 5, device=device).to(dtype).requires_grad_()
    weight = torch.rand(5, device=device).to(dtype).requires_grad_()
    labels = torch.full((6,), -100, device=device)
    loss = loss_function(inputs, labels, reduction="mean", weight=weight)
    assert loss.isnan()
    torch.log(loss).backward()
    assert torch.equal(inputs.grad, torch.zeros_like(inputs))
    assert torch.equal(weight.grad, torch.zeros_like(weight))
    expected = inputs.detach().float().requires_grad_()
    torch.log(F.cross_entropy(expected, labels)).backward()
    assert torch.equal(expected.grad, torch.zeros_like(expected))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("label_dtype", [torch.int8, torch.int16, torch.int32, torch.uint8])
def test_narrow_label_dtypes_compare_as_integers(device, label_dtype):
    inputs = torch.randn(4, 300, device=device, dtype=torch.float64)
    ignore_index = 255 if label_dtype == torch.uint8 else -100
    largest = 127 if label_dtype == torch.int8 else 250
    labels = torch.tensor([0, 120, ignore_index, largest], device=device).to(label_dtype)
    ours = loss_and_grads(inputs, labels, "mean", ignore_index=ignore_index)
    expected = reference_loss_and_grads(inputs, labels.long(), "mean", ignore_index=ignore_index)
    assert (ours[1][2] == 0).all()  # the ignored row
    assert_matches(ours[0], expected[0])
    assert_matches(ours[1], expected[1])


def test_uint8_label_never_matches_a_negative_ignore_index():
    # 156 is -100 wrapped to 8 bits: a real label (here out of range), not an ignored row.
    with pytest.raises(ValueError, match="class label 156"):
        focal_cuda.sigmoid_focal_loss(torch.zeros(2, 3), torch.tensor([156, 0], dtype=torch.uint8))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_every_row_ignored(device, reduction):
    inputs = torch.randn(6, CLASSES, device=device, dtype=torch.float64, requires_grad=True)
    labels = torch.full((6,), -1, device=device)
    loss = focal_cuda.sigmoid_focal_loss(inputs, labels, reduction=reduction, ignore_index=-1)
    assert torch.isnan(loss) if reduction == "mean" else loss.item() == 0.0
    first, = torch.autograd.grad(loss, inputs, create_graph=False, retain_graph=True)
    assert (first == 0).all()
    # The differentiable path (create_graph) agrees: zero gradients, not NaN.
    second, = torch.autograd.grad(loss, inputs, create_graph=True)
    assert (second == 0).all()
    # So do the paths of the reference formula (torch.func, forward-mode AD): eager's loss, and
    # zero derivatives.
    def function(x):
        return focal_cuda.sigmoid_focal_loss(x, labels, reduction=reduction, ignore_index=-1)

    x = inputs.detach()
    value, tangent = torch.func.jvp(function, (x,), (x,))
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.unpack_dual(function(torch.autograd.forward_ad.make_dual(x, x)))
    for loss_ in (torch.func.vmap(function)(x[None])[0], value, dual.primal):
        assert torch.isnan(loss_) if reduction == "mean" else loss_.item() == 0.0
    assert tangent.item() == 0.0 and dual.tangent.item() == 0.0
    assert (torch.func.grad(function)(x) == 0).all()


WEIGHT_SHAPES = [(), (CLASSES,), (1, CLASSES), (12, 1), (12, CLASSES), (1, 1)]
ND_WEIGHT_SHAPES = [(CLASSES,), (3, 1, 1), (3, 4, 1), (4, CLASSES), (3, 1, CLASSES), (3, 4, CLASSES)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize(
    "input_shape,weight_shape",
    [((12, CLASSES), shape) for shape in WEIGHT_SHAPES] + [((3, 4, CLASSES), shape) for shape in ND_WEIGHT_SHAPES],
)
@pytest.mark.parametrize("targets_kind", ["float", "labels"])
def test_weight_shapes_against_reference(device, reduction, input_shape, weight_shape, targets_kind):
    generator = torch.Generator().manual_seed(5)
    inputs = (torch.randn(input_shape, generator=generator, dtype=torch.float64) * 3).to(device)
    weight = torch.rand(weight_shape, generator=generator, dtype=torch.float64).to(device) + 0.5
    if targets_kind == "labels":
        targets = torch.randint(0, CLASSES + 1, input_shape[:-1], generator=generator).to(device)
    else:
        targets = torch.rand(input_shape, generator=generator, dtype=torch.float64).to(device)
    ours = loss_and_grads(inputs.float(), targets.float() if targets.is_floating_point() else targets,
                          reduction, weight=weight.float())
    expected = reference_loss_and_grads(inputs, targets, reduction, weight=weight)
    for our_value, expected_value in zip(ours, expected):
        if expected_value is not None:
            assert our_value.shape == expected_value.shape
            assert_matches(our_value, expected_value)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "input_dtype,target_dtype,weight_dtype",
    [(torch.float32, torch.float64, torch.float32), (torch.float16, torch.float64, torch.float16),
     (torch.bfloat16, torch.float32, torch.float64), (torch.float64, torch.float32, torch.float16)],
)
@pytest.mark.parametrize("weight_shape", [(CLASSES,), (30, 1), (30, CLASSES)])
def test_weight_with_mixed_dtypes(device, input_dtype, target_dtype, weight_dtype, weight_shape):
    generator = torch.Generator().manual_seed(10)
    inputs = (torch.randn(30, CLASSES, generator=generator, dtype=torch.float64) * 3).to(device, input_dtype)
    targets = torch.rand(30, CLASSES, generator=generator, dtype=torch.float64).to(device, target_dtype)
    weight = (torch.rand(weight_shape, generator=generator, dtype=torch.float64) + 0.5).to(device, weight_dtype)
    ours = loss_and_grads(inputs, targets, "sum", weight=weight)
    expected = reference_loss_and_grads(inputs, targets, "sum", weight=weight)
    loss_dtype = torch.promote_types(input_dtype, target_dtype)
    assert ours[0].dtype == loss_dtype and ours[3].dtype == weight_dtype
    assert_matches(ours[0], expected[0])
    assert_matches(ours[1], expected[1])
    assert_matches(ours[2], expected[2])
    # d loss / d weight is computed in the loss's precision, then stored in the weight's dtype.
    coarser = max((weight_dtype, loss_dtype), key=lambda dtype: torch.finfo(dtype).eps)
    assert_matches(ours[3], expected[3], dtype=coarser)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_label_smoothing_labels_equal_float_path_on_one_hot(device, dtype, reduction):
    inputs, labels = label_case((64,), dtype, device, seed=6)
    with_labels = loss_and_grads(inputs, labels, reduction, label_smoothing=0.1)
    with_one_hot = loss_and_grads(inputs, one_hot(labels).to(dtype), reduction, label_smoothing=0.1)
    assert_equal_sums(with_labels[0], with_one_hot[0], inputs.numel())
    torch.testing.assert_close(with_labels[1], with_one_hot[1], rtol=0, atol=0)
    expected = reference_loss_and_grads(inputs, labels, reduction, label_smoothing=0.1)
    assert_matches(with_labels[0], expected[0])
    assert_matches(with_labels[1], expected[1])


@pytest.mark.parametrize("device", DEVICES)
def test_label_smoothing_on_soft_targets_and_its_target_gradient(device):
    generator = torch.Generator().manual_seed(7)
    inputs = torch.randn(50, 9, generator=generator, dtype=torch.float64).to(device) * 3
    targets = torch.rand(50, 9, generator=generator, dtype=torch.float64).to(device)
    ours = loss_and_grads(inputs, targets, "sum", label_smoothing=0.2)
    expected = reference_loss_and_grads(inputs, targets, "sum", label_smoothing=0.2)
    for our_value, expected_value in zip(ours[:3], expected[:3]):
        assert_matches(our_value, expected_value)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("gamma", [0.5, 2.0])
def test_gradcheck_through_every_new_argument(device, reduction, gamma):
    generator = torch.Generator().manual_seed(8)
    inputs = (torch.randn(6, 5, generator=generator, dtype=torch.float64) * 2).to(device).requires_grad_()
    labels = torch.tensor([0, 4, 5, -100, 2, 5], device=device)  # 5 = background
    class_weight = (torch.rand(5, generator=generator, dtype=torch.float64) + 0.5).to(device).requires_grad_()
    row_weight = (torch.rand(6, 1, generator=generator, dtype=torch.float64) + 0.5).to(device).requires_grad_()
    soft = (torch.rand(6, 5, generator=generator, dtype=torch.float64) * 0.9 + 0.05).to(device).requires_grad_()

    def with_labels(x, w):
        return focal_cuda.sigmoid_focal_loss(x, labels, 0.25, gamma, reduction, weight=w, label_smoothing=0.1)

    def with_soft_targets(x, t, w):
        return focal_cuda.sigmoid_focal_loss(x, t, 0.25, gamma, reduction, weight=w, label_smoothing=0.1)

    assert torch.autograd.gradcheck(with_labels, (inputs, class_weight))
    assert torch.autograd.gradcheck(with_labels, (inputs, row_weight))
    assert torch.autograd.gradcheck(with_soft_targets, (inputs, soft, class_weight))
    assert_second_derivatives_match_kernel_differences(with_soft_targets, (inputs, soft, row_weight))


def test_bad_label_on_cpu_names_it_and_the_valid_range():
    inputs = torch.zeros(3, CLASSES)
    for bad in (CLASSES + 1, -1, 1000):
        labels = torch.tensor([0, bad, 2])
        message = (f"targets holds the class label {bad}; valid labels are 0 to {CLASSES - 1} (the "
                   f"{CLASSES} classes of inputs' last dimension), {CLASSES} (background) and "
                   "ignore_index (-100)")
        with pytest.raises(ValueError, match=re.escape(message)):
            focal_cuda.sigmoid_focal_loss(inputs, labels)


def test_bad_label_without_classes_says_so():
    message = ("targets holds the class label 1; inputs' last dimension (the classes) is 0, so the "
               "only valid labels are 0 (background) and ignore_index (-100)")
    with pytest.raises(ValueError, match=re.escape(message)):
        focal_cuda.sigmoid_focal_loss(torch.zeros(3, 0), torch.tensor([0, 1, -100]))


@pytest.mark.parametrize("path", ["grad", "vmap_batched_labels", "vmap_shared_labels", "forward_ad"])
@pytest.mark.parametrize("bad_label", [CLASSES + 1, -1])
def test_bad_labels_raise_under_transforms_as_in_eager(path, bad_label):
    """torch.func and forward-mode AD take the reference formula, which runs no kernel: the
    labels are checked there too, with the eager call's message."""
    inputs = torch.randn(3, CLASSES)
    labels = torch.tensor([0, bad_label, CLASSES])
    message = f"targets holds the class label {bad_label}; valid labels are 0 to {CLASSES - 1}"

    def loss_of(x, y=labels):
        return focal_cuda.sigmoid_focal_loss(x, y, 0.25, 2.0, "sum")

    with pytest.raises(ValueError, match=re.escape(message)):
        if path == "grad":
            torch.func.grad(loss_of)(inputs)
        elif path == "vmap_batched_labels":
            torch.func.vmap(loss_of)(inputs, labels)
        elif path == "vmap_shared_labels":
            torch.func.vmap(loss_of)(inputs.unsqueeze(0).expand(2, -1, -1))
        else:
            with torch.autograd.forward_ad.dual_level():
                loss_of(torch.autograd.forward_ad.make_dual(inputs, torch.ones_like(inputs)))


# What a CUDA process runs with a bad label: the fused kernels' assertion names it; the
# reference formula's paths (torch.func) assert in the index check that stands in for them.
CUDA_BAD_LABEL_CALLS = {
    "sigmoid": f"focal_cuda.sigmoid_focal_loss(x, torch.tensor([0, {CLASSES + 3}, 1], device='cuda'))",
    "softmax": f"focal_cuda.softmax_focal_loss(x, torch.tensor([0, {CLASSES}, 1], device='cuda'))",
    "sigmoid_torch_func": ("torch.func.grad(lambda a: focal_cuda.sigmoid_focal_loss(a, torch.tensor("
                           f"[0, {CLASSES + 3}, 1], device='cuda'), reduction='sum'))(x)"),
    "softmax_torch_func": ("torch.func.grad(lambda a: focal_cuda.softmax_focal_loss(a, torch.tensor("
                           f"[0, {CLASSES}, 1], device='cuda')))(x)"),
}


@requires_cuda
@pytest.mark.parametrize("call", list(CUDA_BAD_LABEL_CALLS))
def test_bad_label_on_cuda_is_a_device_side_assertion(tmp_path, call):
    # A device-side assertion leaves the CUDA context unusable: run it in its own process.
    script = (
        "import torch, focal_cuda\n"
        f"x = torch.zeros(3, {CLASSES}, device='cuda')\n"
        f"{CUDA_BAD_LABEL_CALLS[call]}\n"
        "torch.cuda.synchronize()\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path,
                            env=dict(os.environ, CUDA_LAUNCH_BLOCKING="1"))
    assert result.returncode != 0
    assert "device-side assert" in result.stderr
    if not call.endswith("torch_func"):
        bad_label = CLASSES + 3 if call == "sigmoid" else CLASSES
        assert f"targets holds the class label {bad_label}" in result.stdout + result.stderr


# mmcv's published golden values for its CUDA sigmoid focal loss (tests/test_ops/test_focal_loss.py):
# alpha 0.25, gamma 2; labels over the last dimension, label == C is background; mmcv's "mean"
# is the sum over elements divided by the number of rows.
MMCV_CASES = [
    dict(logits=[[1.0, 0], [0, 1.0]], labels=[0, 1], loss=0.13562961,
         grad=[[-0.00657264, 0.11185755], [0.11185755, -0.00657264]]),
    dict(logits=[[1.0, 0, -1.0], [0, 1.0, 2.0]], labels=[2, 1], loss=1.10251057,
         grad=[[0.28808805, 0.11185755, -0.09602935], [0.11185755, -0.00657264, 0.40376765]]),
    dict(logits=[[1e-6, 2e-6, 3e-6], [4e-6, 5e-5, 6e-4], [7e-3, 0.08, 0.9]], labels=[1, 2, 0],
         loss=0.42287254,
         grad=[[0.07457182, -0.02485716, 0.07457201], [0.07457211, 0.07457669, -0.02483728],
               [-0.02462499, 0.08277918, 0.1805037]]),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", MMCV_CASES)
def test_mmcv_golden_values(device, case):
    logits = torch.tensor(case["logits"], device=device, requires_grad=True)
    labels = torch.tensor(case["labels"], device=device)
    loss = focal_cuda.sigmoid_focal_loss(logits, labels, 0.25, 2.0, "sum") / logits.shape[0]
    loss.backward()
    torch.testing.assert_close(loss.item(), case["loss"], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(logits.grad, torch.tensor(case["grad"], device=device), rtol=1e-5, atol=1e-7)


def test_module():
    module = focal_cuda.SigmoidFocalLoss(alpha=0.5, gamma=1.5, reduction="mean", ignore_index=-1,
                                         label_smoothing=0.05)
    assert repr(module) == (
        "SigmoidFocalLoss(alpha=0.5, gamma=1.5, reduction='mean', ignore_index=-1, label_smoothing=0.05)"
    )
    inputs, labels = label_case((20,), torch.float32, "cpu", seed=9)
    weight = torch.rand(CLASSES)
    expected = focal_cuda.sigmoid_focal_loss(inputs, labels, 0.5, 1.5, "mean", weight=weight,
                                             ignore_index=-1, label_smoothing=0.05)
    assert torch.equal(module(inputs, labels, weight), expected)
    with pytest.raises(ValueError, match=re.escape("gamma must be in [0, 1000], got -1")):
        focal_cuda.SigmoidFocalLoss(gamma=-1)


@pytest.mark.parametrize("device", DEVICES)
def test_bfloat16_logits_give_the_weight_gradient_summed_in_float32(device):
    """d(mean loss)/d(weight[c]) is the sum over rows of each element's loss before the weight,
    divided by the count. For bfloat16 logits those losses are stored in bfloat16 (the values the
    unweighted "none" loss returns); their sum and the division are float32 (the weight's dtype),
    so the gradient is a float32 rounding away from the float64 sum of the stored values, where
    bfloat16 arithmetic would be ~1e-3 away."""
    inputs, labels = label_case((3000,), torch.bfloat16, device)
    weight = torch.rand(CLASSES, device=device, requires_grad=True)
    loss = focal_cuda.sigmoid_focal_loss(inputs, labels, 0.25, 2.0, "mean", weight=weight)
    (gradient,) = torch.autograd.grad(loss, weight)
    stored = focal_cuda.sigmoid_focal_loss(inputs, labels, 0.25, 2.0, "none").double()
    expected = stored.sum(0) / stored.numel()
    assert gradient.dtype == torch.float32
    torch.testing.assert_close(gradient.double(), expected, rtol=1e-5, atol=0)
