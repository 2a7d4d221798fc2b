"""The gradients are the derivatives of the loss returned, for every finite input accepted: any
float targets and scores (those outside [0, 1] continue the formulas, as torchvision's do), every
form, weights and label smoothing. The CUDA kernels' counterpart runs under the emulation
(test_cuda_emulation.py)."""

import pytest
import torch
from hypothesis import given, settings

import focal_cuda
from conftest import (DEVICES, assert_gradients_are_derivatives, assert_matches, consistency_cases,
                      derivative_term_scales, reference_results)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(case=consistency_cases())
def test_cpu_gradients_are_the_derivatives_of_the_loss(case):
    assert_gradients_are_derivatives(torch.ops.focal_cuda.sigmoid_focal_loss_forward, *case)


def test_target_outside_the_unit_interval_of_the_issue():
    """The report's two points (x -1.2, t -0.5 and x 2, t 2; alpha 0.25, gamma 2), whose d/dx
    the kernels gave as 0.001004 and 0.115464."""
    inputs = torch.tensor([[-1.2], [2.0]], dtype=torch.float64)
    targets = torch.tensor([[-0.5], [2.0]], dtype=torch.float64)
    assert_gradients_are_derivatives(torch.ops.focal_cuda.sigmoid_focal_loss_forward, inputs, targets,
                                     (0, 0.25, 2.0, 0.0, 0.0))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("gamma", [0.0, 1.0, 2.0, 3.0])
def test_every_dtype_continues_the_formula(device, dtype, gamma):
    """Targets in [-3, 3] and logits in [-50, 50] stored in 16 and 32 bits: loss and gradients
    against the float64 reference on the same rounded values, within the tolerance table (whole
    gammas: q^gamma is a number for every target). The rounding is relative to the terms'
    magnitudes: CE = softplus(x) - t x cancels for some targets outside [0, 1]."""
    generator = torch.Generator().manual_seed(25)
    x = (torch.rand(4000, generator=generator, dtype=torch.float64) * 100 - 50).to(device, dtype)
    t = (torch.rand(4000, generator=generator, dtype=torch.float64) * 6 - 3).to(device, dtype)
    x_leaf, t_leaf = x.clone().requires_grad_(), t.clone().requires_grad_()
    loss = focal_cuda.sigmoid_focal_loss(x_leaf, t_leaf, 0.25, gamma, "none")
    grad_x, grad_t = torch.autograd.grad(loss.sum(), (x_leaf, t_leaf))
    ref_loss, ref_grad_x, ref_grad_t = reference_results(x, t, 0.25, gamma, "none")
    x64, t64 = x.double().cpu(), t.double().cpu()
    softplus = torch.nn.functional.softplus
    q = (t64 * torch.sigmoid(-x64) + (1 - t64) * torch.sigmoid(x64)).abs()
    loss_scale = (0.25 * t64 + 0.75 * (1 - t64)).abs() * q.pow(gamma) * (
        (t64 * softplus(-x64)).abs() + ((1 - t64) * softplus(x64)).abs())
    scale_x, scale_t = derivative_term_scales(x, t, 0.25, gamma)
    assert_matches(loss.cpu(), ref_loss.cpu(), dtype, scale=loss_scale)
    assert_matches(grad_x.cpu(), ref_grad_x.cpu(), dtype, scale=scale_x.cpu())
    assert_matches(grad_t.cpu(), ref_grad_t.cpu(), dtype, scale=scale_t.cpu())
