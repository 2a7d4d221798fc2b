"""Bitwise reproducibility: run to run, and on CPU whatever the number of threads."""

import pytest
import torch

import focal_cuda
from conftest import DEVICES, DTYPES, REDUCTIONS, random_case, requires_cuda


def loss_and_grad(inputs, targets, reduction):
    x = inputs.clone().requires_grad_()
    loss = focal_cuda.sigmoid_focal_loss(x, targets, 0.25, 1.5, reduction)
    loss.backward(torch.ones_like(loss))
    return loss.detach(), x.grad


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_repeated_calls_are_bitwise_identical(device, dtype, reduction):
    inputs, targets = random_case((300_001,), dtype, device)
    first = loss_and_grad(inputs, targets, reduction)
    for _ in range(5):
        again = loss_and_grad(inputs, targets, reduction)
        assert all(torch.equal(a, b) for a, b in zip(first, again))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cpu_result_does_not_depend_on_thread_count(dtype, reduction):
    inputs, targets = random_case((1_000_003,), dtype, "cpu")
    threads = torch.get_num_threads()
    try:
        results = {}
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            results[count] = loss_and_grad(inputs, targets, reduction)
    finally:
        torch.set_num_threads(threads)
    for count in (2, 3):
        assert all(torch.equal(a, b) for a, b in zip(results[1], results[count]))


@requires_cuda
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_hundred_calls_at_retinanet_scale_are_bitwise_identical(reduction):
    inputs, targets = random_case((2_000_000, 80), torch.float32, "cuda")  # 1.6e8 elements
    first = loss_and_grad(inputs, targets, reduction)
    for _ in range(100):
        again = loss_and_grad(inputs, targets, reduction)
        assert all(torch.equal(a, b) for a, b in zip(first, again))
