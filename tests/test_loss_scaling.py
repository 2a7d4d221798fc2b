"""float16 training with loss scaling (torch.amp.GradScaler): every gradient that float16 can
hold after the scale, the loss's gradient holds too, within float16's rounding of the exact
value. The saved d(loss)/d(inputs) is float32 for float16 operands, so the scale is applied
before the rounding to float16, as autograd through a composite loss does."""

import pytest
import torch

import focal_cuda
from conftest import DEVICES

LOSS_SCALE = 2.0 ** 16
F16 = torch.float16


def float16_case(targets, device="cpu"):
    """float16 logits over [-16, 16] (their gradients span float16's whole range once scaled),
    with float32 targets or integer labels."""
    generator = torch.Generator().manual_seed(0)
    x = (torch.rand(400, 25, generator=generator) * 32 - 16).to(F16)
    if targets == "labels":
        t = torch.randint(0, 26, (400,), generator=generator)
        t[::7] = -100
    else:
        t = (torch.rand(400, 25, generator=generator) < 0.2).float()
    return x.to(device), t.to(device)


def check_scaled_float16_gradient(gradient, x, t, reduction):
    """gradient (float16): the loss's gradient times LOSS_SCALE, against the float64 one."""
    exact_x = x.detach().double().requires_grad_()
    exact_t = t.double() if t.is_floating_point() else t
    loss = focal_cuda.reference.sigmoid_focal_loss(exact_x, exact_t, 0.25, 2.0, reduction)
    (exact,) = torch.autograd.grad(loss * LOSS_SCALE, exact_x)
    gradient, exact = gradient.double().cpu(), exact.cpu()
    representable = exact.abs() >= 2.0 ** -20
    lost = representable & (gradient == 0)
    assert not lost.any(), f"{int(lost.sum())} scaled gradients >= 2^-20 became 0"
    normal = exact.abs() >= 2.0 ** -14  # float16's normal range: relative rounding 2^-11
    error = (gradient - exact).abs() / exact.abs()
    assert (error[normal] <= 2.0 ** -10).all(), f"worst relative error {error[normal].max():.3g}"
    assert representable.sum() > 1000 and (representable & ~normal).sum() > 10


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("targets", ["float32", "labels"])
def test_scaled_backward_keeps_small_gradients(device, targets, reduction):
    """float32 targets give a float32 loss; with labels, autocast does (a float16 loss times
    2^16 would overflow, whatever computes it)."""
    x, t = float16_case(targets, device)
    x.requires_grad_()
    with torch.autocast(device, dtype=F16, enabled=targets == "labels"):
        loss = focal_cuda.sigmoid_focal_loss(x, t, 0.25, 2.0, reduction)
    assert loss.dtype == torch.float32
    (loss * LOSS_SCALE).backward()
    assert x.grad.dtype == F16
    check_scaled_float16_gradient(x.grad, x, t, reduction)


@pytest.mark.parametrize("device", DEVICES)
def test_grad_scaler_training_step(device):
    """The README's AMP recipe: autocast + GradScaler, one step changes the logits' producer."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(8, 25).to(device)
    features = torch.randn(400, 8, device=device)
    x, t = float16_case("labels", device)
    scaler = torch.amp.GradScaler(device, init_scale=LOSS_SCALE)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    before = layer.weight.detach().clone()
    with torch.autocast(device, dtype=F16):
        logits = layer(features)
        loss = focal_cuda.sigmoid_focal_loss(logits, t, reduction="mean")
    assert logits.dtype == F16 and loss.dtype == torch.float32
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    assert torch.isfinite(layer.weight).all() and not torch.equal(layer.weight.detach(), before)
