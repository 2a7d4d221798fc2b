"""Loss values and gradients against the float64 reference, across devices, dtypes and options."""

import pytest
import torch

import focal_cuda
from conftest import (
    DEVICES,
    DTYPES,
    GAMMAS,
    REDUCTIONS,
    assert_matches,
    derivative_term_scales,
    exact_focal_loss_and_grads,
    laid_out,
    random_case,
    reference_results,
    requires_cuda,
)


def run(inputs, targets, alpha, gamma, reduction, grad_output=None, grad_targets=True):
    """Our loss and gradients for inputs and (optionally) targets."""
    x = inputs.detach().clone().requires_grad_()
    t = targets.detach().clone().requires_grad_(grad_targets)
    loss = focal_cuda.sigmoid_focal_loss(x, t, alpha, gamma, reduction)
    loss.backward(torch.ones_like(loss) if grad_output is None else grad_output)
    return loss.detach(), x.grad, t.grad


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("gamma", GAMMAS)
@pytest.mark.parametrize("alpha", [0.25, -1.0])
def test_matches_reference(device, dtype, reduction, gamma, alpha):
    # 3001 elements: full packs/vectors plus a ragged tail on every backend.
    inputs, targets = random_case((3, 1000 + 1), dtype, device, soft=alpha < 0)
    loss_shape = inputs.shape if reduction == "none" else ()
    grad_output = torch.randn(loss_shape, dtype=torch.float64).to(device=device, dtype=dtype)
    loss, grad_x, grad_t = run(inputs, targets, alpha, gamma, reduction, grad_output)
    ref_loss, ref_grad_x, ref_grad_t = reference_results(
        inputs, targets, alpha, gamma, reduction, grad_output
    )
    # The derivatives are sums of terms that can cancel (d/dt does at gamma 1): their rounding
    # is relative to the terms' magnitudes.
    scale_x, scale_t = derivative_term_scales(inputs, targets, alpha, gamma, reduction=reduction,
                                              grad_output=grad_output)
    assert loss.dtype == dtype and loss.shape == loss_shape
    assert grad_x.dtype == dtype and grad_t.dtype == dtype
    assert_matches(loss, ref_loss)
    assert_matches(grad_x, ref_grad_x, scale=scale_x)
    assert_matches(grad_t, ref_grad_t, scale=scale_t)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "input_dtype,target_dtype",
    [
        (torch.float16, torch.float32),
        (torch.bfloat16, torch.float32),
        (torch.float32, torch.float16),
        (torch.float32, torch.float64),
        (torch.float16, torch.bfloat16),
    ],
)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_mixed_dtypes_promote_like_torch(device, input_dtype, target_dtype, reduction):
    inputs, targets = random_case((7, 33), torch.float64, device, soft=True)
    inputs, targets = inputs.to(input_dtype), targets.to(target_dtype)
    loss, grad_x, grad_t = run(inputs, targets, 0.25, 2.0, reduction)
    ref_loss, ref_grad_x, ref_grad_t = reference_results(inputs, targets, 0.25, 2.0, reduction)
    assert loss.dtype == torch.promote_types(input_dtype, target_dtype)
    assert grad_x.dtype == input_dtype and grad_t.dtype == target_dtype
    assert_matches(loss, ref_loss)
    assert_matches(grad_x, ref_grad_x)
    assert_matches(grad_t, ref_grad_t)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_non_contiguous_and_misaligned_views(device, reduction):
    base_x, base_t = random_case((9, 40, 6), torch.float32, device)
    views = [
        (base_x.transpose(0, 2), base_t.transpose(0, 2)),  # permuted
        (base_x[:, ::3, 1:], base_t[:, ::3, 1:]),  # strided slices
        (base_x.reshape(-1)[1:], base_t.reshape(-1)[1:]),  # contiguous, off by one element
        (base_x.reshape(-1)[1:], base_t.reshape(-1)[:-1]),  # misaligned differently
        (base_x[0, 0].expand(5, 6), base_t[0, 0].expand(5, 6)),  # zero strides
    ]
    for inputs, targets in views:
        loss, grad_x, grad_t = run(inputs, targets, 0.25, 2.0, reduction)
        ref_loss, ref_grad_x, ref_grad_t = reference_results(inputs, targets, 0.25, 2.0, reduction)
        assert grad_x.shape == inputs.shape
        assert_matches(loss, ref_loss)
        assert_matches(grad_x, ref_grad_x)
        assert_matches(grad_t, ref_grad_t)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("layout", ["channels_last", "reversed", "targets contiguous"])
@pytest.mark.parametrize("weight_shape", [None, (1, 5, 1, 1), (5, 1, 1), (7,), (2, 5, 6, 7)],
                         ids=["none", "class", "class right-aligned", "column", "element"])
def test_dense_layouts_are_read_in_place_and_kept(device, reduction, layout, weight_shape):
    """As torch's elementwise ops, the loss with floating targets keeps the layout of dense
    inputs (channels-last; reversed, as a transposed matrix): "none" losses and the gradients
    come back in it, read without a copy, when the targets share it (otherwise contiguous); with
    any weight broadcast."""
    base_x, base_t = random_case((2, 5, 6, 7), torch.float32, device, soft=True)
    inputs = laid_out(base_x, "reversed" if layout == "reversed" else "channels_last")
    targets = base_t if layout == "targets contiguous" else laid_out(base_t, layout)
    generator = torch.Generator().manual_seed(1)
    weight = (None if weight_shape is None else
              torch.rand(weight_shape, generator=generator, dtype=torch.float64).to(device))
    operands = [inputs.clone().requires_grad_(), targets.clone().requires_grad_()]
    if weight is not None:
        operands.append(weight.float().requires_grad_())
    loss = focal_cuda.sigmoid_focal_loss(*operands[:2], 0.25, 2.0, reduction,
                                         weight=None if weight is None else operands[2])
    grads = torch.autograd.grad(loss, operands, torch.ones_like(loss))
    exact = [operand.detach().double().requires_grad_() for operand in operands]
    exact_loss = focal_cuda.reference.sigmoid_focal_loss(
        *exact[:2], 0.25, 2.0, reduction, weight=None if weight is None else exact[2])
    exact_grads = torch.autograd.grad(exact_loss, exact, torch.ones_like(exact_loss))
    assert_matches(loss, exact_loss.detach())
    for grad, exact_grad in zip(grads, exact_grads):
        assert_matches(grad, exact_grad)
    kept = layout != "targets contiguous"
    expected_strides = inputs.stride() if kept else base_x.contiguous().stride()
    if reduction == "none":
        assert loss.stride() == expected_strides
    assert grads[0].stride() == expected_strides and grads[1].stride() == expected_strides


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["channels_last", "reversed"])
@pytest.mark.parametrize("keep_graph", [False, True], ids=["last use", "graph kept"])
def test_dense_layouts_take_a_grad_output_laid_out_otherwise(device, dtype, layout, keep_graph):
    """A "none" loss kept in the inputs' dense layout is back-propagated from a grad_output of
    another layout (contiguous, as torch.randn makes it) element by element: where backward
    scales the saved gradient in place (its last use) and where it writes a new tensor (the graph
    kept), which takes the saved gradient's layout. Against the float64 formula (math.*) on the
    rounded values."""
    base_x, base_t = random_case((2, 5, 6, 7), dtype, device, soft=True)
    inputs = laid_out(base_x, layout).requires_grad_()
    targets = laid_out(base_t, layout).requires_grad_()
    loss = focal_cuda.sigmoid_focal_loss(inputs, targets, 0.25, 2.0, "none")
    generator = torch.Generator().manual_seed(1)
    grad_output = torch.randn(loss.shape, generator=generator, dtype=torch.float64).to(device, loss.dtype)
    assert loss.stride() == inputs.stride() != grad_output.stride()
    grads = torch.autograd.grad(loss, (inputs, targets), grad_output, retain_graph=keep_graph)
    _, exact_x, exact_t = exact_focal_loss_and_grads(base_x.flatten(), base_t.flatten(), 0.25, 2.0)
    scales = derivative_term_scales(base_x, base_t, 0.25, 2.0, grad_output=grad_output)
    for grad, exact, scale in zip(grads, (exact_x, exact_t), scales):
        assert grad.stride() == inputs.stride()
        assert_matches(grad, exact.reshape(base_x.shape) * grad_output.double(), scale=scale)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(), (1,), (0,), (0, 80), (2, 0, 3), (5, 1, 1, 3)])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_shapes_including_scalar_and_empty(device, shape, reduction):
    inputs, targets = random_case(shape, torch.float32, device)
    loss, grad_x, grad_t = run(inputs, targets, 0.25, 2.0, reduction)
    ref_loss, ref_grad_x, ref_grad_t = reference_results(inputs, targets, 0.25, 2.0, reduction)
    assert loss.shape == ref_loss.shape
    assert grad_x.shape == inputs.shape and grad_t.shape == targets.shape
    torch.testing.assert_close(loss.double(), ref_loss, equal_nan=True, rtol=2e-5, atol=1e-7)
    assert_matches(grad_x, ref_grad_x)
    assert_matches(grad_t, ref_grad_t)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_mean_is_nan_and_sum_is_zero(device):
    inputs = torch.empty(0, 4, device=device)
    assert torch.isnan(focal_cuda.sigmoid_focal_loss(inputs, inputs, reduction="mean"))
    assert focal_cuda.sigmoid_focal_loss(inputs, inputs, reduction="sum").item() == 0.0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape, weight_shape", [
    ((0, 4), (0, 1)), ((0, 4), (0, 4)), ((3, 0), (3, 0)), ((3, 0), (3, 1)),
    ((2, 0, 4), (0, 4)), ((2, 0, 4), (1, 0, 1)), ((2, 0, 4), (1, 0, 4)), ((0, 4), (4,)),
])
@pytest.mark.parametrize("labels", [False, True], ids=["soft", "labels"])
def test_empty_inputs_with_a_weight_of_any_kind(device, shape, weight_shape, labels):
    """Per-anchor and per-element weights of empty inputs weigh nothing (their views once
    reached past an empty storage): sum 0, mean NaN, gradients empty."""
    x = torch.zeros(shape, device=device, requires_grad=True)
    targets = torch.zeros(shape[:-1], dtype=torch.long, device=device) if labels else torch.zeros(shape, device=device)
    weight = torch.ones(weight_shape, device=device, requires_grad=True)
    total = focal_cuda.sigmoid_focal_loss(x, targets, reduction="sum", weight=weight)
    assert total.item() == 0.0
    assert focal_cuda.sigmoid_focal_loss(x, targets, reduction="mean", weight=weight).isnan()
    assert focal_cuda.sigmoid_focal_loss(x, targets, reduction="none", weight=weight).shape == shape
    grad_x, grad_weight = torch.autograd.grad(total, (x, weight))
    assert grad_x.shape == shape and grad_weight.shape == weight_shape
    assert (grad_weight == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_empty_loss_takes_an_expanded_empty_grad_output(device):
    """An empty grad_output whose strides are all 0 (an expansion of nothing, with no storage)
    is no one value to read: the backward of an empty loss gives an empty gradient."""
    x = torch.zeros(0, 4, device=device, requires_grad=True)
    loss = focal_cuda.sigmoid_focal_loss(x, torch.zeros(0, 4, device=device), reduction="none")
    grad_output = torch.empty(0, device=device).as_strided((0, 4), (0, 0))
    (grad,) = torch.autograd.grad(loss, x, grad_output)
    assert grad.shape == (0, 4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("alpha", [0.0, 0.25, 0.5, 1.0, -1.0, None])
def test_alpha_values(device, alpha):
    inputs, targets = random_case((6, 50), torch.float64, device, soft=True)
    loss, grad_x, grad_t = run(inputs, targets, alpha, 1.5, "sum")
    ref_loss, ref_grad_x, ref_grad_t = reference_results(inputs, targets, alpha, 1.5, "sum")
    assert_matches(loss, ref_loss)
    assert_matches(grad_x, ref_grad_x)
    assert_matches(grad_t, ref_grad_t)


@pytest.mark.parametrize("device", DEVICES)
def test_expanded_grad_output_from_sum_of_elementwise_loss(device):
    inputs, targets = random_case((64, 80), torch.float32, device)
    x = inputs.clone().requires_grad_()
    (focal_cuda.sigmoid_focal_loss(x, targets) * 3.0).sum().backward()
    _, ref_grad_x, _ = reference_results(inputs, targets, 0.25, 2.0, "sum", torch.tensor(3.0))
    assert_matches(x.grad, ref_grad_x)


@pytest.mark.parametrize("device", DEVICES)
def test_positional_arguments_in_torchvision_order(device):
    inputs, targets = random_case((4, 5), torch.float64, device)
    positional = focal_cuda.sigmoid_focal_loss(inputs, targets, 0.5, 1.0, "sum")
    keyword = focal_cuda.sigmoid_focal_loss(
        inputs=inputs, targets=targets, alpha=0.5, gamma=1.0, reduction="sum"
    )
    assert torch.equal(positional, keyword)
    assert_matches(positional, reference_results(inputs, targets, 0.5, 1.0, "sum")[0])


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cuda_matches_cpu(dtype, reduction):
    inputs, targets = random_case((257, 81), dtype, "cpu", soft=True)
    cpu = run(inputs, targets, 0.25, 2.0, reduction)
    cuda = run(inputs.cuda(), targets.cuda(), 0.25, 2.0, reduction)
    for on_cpu, on_cuda in zip(cpu, cuda):
        torch.testing.assert_close(on_cuda.cpu().double(), on_cpu.double(), **{
            torch.float16: dict(rtol=2e-3, atol=1e-5),
            torch.bfloat16: dict(rtol=1.6e-2, atol=1e-5),
            torch.float32: dict(rtol=1e-5, atol=1e-7),
            torch.float64: dict(rtol=1e-12, atol=1e-14),
        }[dtype])
