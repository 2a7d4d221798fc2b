"""The ops as PyTorch 2 citizens: opcheck on both custom ops, torch.compile(fullgraph=True)."""

import pytest
import torch

import focal_cuda
from conftest import DEVICES, DTYPES, REDUCTIONS, random_case

forward_op = torch.ops.focal_cuda.sigmoid_focal_loss_forward.default
backward_op = torch.ops.focal_cuda.sigmoid_focal_loss_backward.default


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", [0, 1, 2])
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck_forward(device, dtype, reduction, requires_grad):
    inputs, targets = random_case((6, 5), dtype, device)
    inputs.requires_grad_(requires_grad)
    targets.requires_grad_(requires_grad)
    args = (inputs, targets, 0.25, 2.0, reduction, requires_grad, requires_grad)
    torch.library.opcheck(forward_op, args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", [0, 1, 2])
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck_backward(device, dtype, reduction, requires_grad):
    saved, _ = random_case((6, 5), dtype, device)
    grad_output = torch.rand((6, 5) if reduction == 0 else (), dtype=torch.float64)
    grad_output = grad_output.to(device=device, dtype=dtype).requires_grad_(requires_grad)
    torch.library.opcheck(backward_op, (grad_output, saved.requires_grad_(requires_grad), reduction))


def training_step(inputs, targets, reduction, alpha, gamma):
    loss = focal_cuda.sigmoid_focal_loss(inputs, targets, alpha, gamma, reduction)
    return loss.sum() if reduction == "none" else loss


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dynamic", [False, True])
def test_compile_fullgraph_matches_eager(device, reduction, dynamic):
    torch._dynamo.reset()
    compiled = torch.compile(training_step, fullgraph=True, dynamic=dynamic, backend="aot_eager")
    for rows in (16, 24):  # a second shape exercises recompilation or the dynamic graph
        inputs, targets = random_case((rows, 80), torch.float32, device, seed=rows)
        eager_x, compiled_x = inputs.clone().requires_grad_(), inputs.clone().requires_grad_()
        eager = training_step(eager_x, targets, reduction, 0.25, 1.5)
        result = compiled(compiled_x, targets, reduction, 0.25, 1.5)
        eager.backward()
        result.backward()
        torch.testing.assert_close(result, eager, rtol=0, atol=0)
        torch.testing.assert_close(compiled_x.grad, eager_x.grad, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_compile_with_inductor(device):
    torch._dynamo.reset()

    def step(inputs, targets):
        # Surrounding pointwise work for inductor to fuse around our op.
        return focal_cuda.sigmoid_focal_loss(inputs * 2.0, targets, 0.25, 2.0, "mean") + 1.0

    compiled = torch.compile(step, fullgraph=True)
    inputs, targets = random_case((32, 80), torch.float32, device)
    eager_x, compiled_x = inputs.clone().requires_grad_(), inputs.clone().requires_grad_()
    eager = step(eager_x, targets)
    result = compiled(compiled_x, targets)
    eager.backward()
    result.backward()
    torch.testing.assert_close(result, eager)
    torch.testing.assert_close(compiled_x.grad, eager_x.grad)
