"""Drop-in equivalence with torchvision.ops.sigmoid_focal_loss, where torchvision is installed."""

import pytest
import torch

import focal_cuda
from conftest import (DEVICES, GAMMAS, REDUCTIONS, assert_matches, derivative_term_scales,
                      random_case)

torchvision_ops = pytest.importorskip("torchvision.ops", reason="torchvision is not installed")


def run(function, inputs, targets, alpha, gamma, reduction, grad_output=None):
    x, t = inputs.clone().requires_grad_(), targets.clone().requires_grad_()
    loss = function(x, t, alpha, gamma, reduction)
    loss.backward(torch.ones_like(loss) if grad_output is None else grad_output.to(loss.dtype))
    return loss.detach(), x.grad, t.grad


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("gamma", GAMMAS)
@pytest.mark.parametrize("alpha", [0.25, -1])
def test_same_values_and_gradients_as_torchvision(device, dtype, reduction, gamma, alpha):
    inputs, targets = random_case((128, 80), dtype, device, scale=3.0, soft=alpha == -1)
    grad_output = torch.rand((128, 80) if reduction == "none" else (), device=device)
    ours = run(focal_cuda.sigmoid_focal_loss, inputs, targets, alpha, gamma, reduction, grad_output)
    # torchvision in float64 on the same values is the exact statement of its semantics.
    exact = run(torchvision_ops.sigmoid_focal_loss, inputs.double(), targets.double(), alpha,
                gamma, reduction, grad_output)
    # In float32 its composite form forms 1 - p_t by subtraction and loses up to ~1e-3
    # relative where |x| > 10 (amplified by q^(gamma - 1)); ours stays at float32 rounding.
    native = run(torchvision_ops.sigmoid_focal_loss, inputs, targets, alpha, gamma, reduction,
                 grad_output)
    # The derivatives are sums of terms that can cancel (d/dt does at gamma 1): their rounding
    # is relative to the terms' magnitudes.
    scales = (None,) + derivative_term_scales(inputs, targets, alpha, gamma, reduction=reduction,
                                              grad_output=grad_output)
    for our_value, exact_value, native_value, scale in zip(ours, exact, native, scales):
        assert our_value.dtype == native_value.dtype and our_value.shape == native_value.shape
        assert_matches(our_value, exact_value, scale=scale)
        torch.testing.assert_close(our_value, native_value, rtol=3e-3, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_finite_where_torchvision_gives_nan(device):
    inputs = torch.tensor([40.0, -40.0], device=device, requires_grad=True)
    targets = torch.tensor([1.0, 0.0], device=device)
    torchvision_ops.sigmoid_focal_loss(inputs, targets, 0.25, 0.5, "sum").backward()
    assert torch.isnan(inputs.grad).any(), "torchvision changed: this case no longer shows the NaN"
    inputs.grad = None
    focal_cuda.sigmoid_focal_loss(inputs, targets, 0.25, 0.5, "sum").backward()
    assert torch.isfinite(inputs.grad).all()
