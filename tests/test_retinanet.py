"""A real client: torchvision's RetinaNet trained one step with our loss swapped in."""

import pytest
import torch

import focal_cuda
from conftest import DEVICES

retinanet_module = pytest.importorskip("torchvision.models.detection.retinanet")


def retinanet_losses_and_head_grads(device, monkeypatch, loss_function):
    monkeypatch.setattr(retinanet_module, "sigmoid_focal_loss", loss_function)
    torch.manual_seed(0)
    model = retinanet_module.retinanet_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=5, min_size=96, max_size=96
    ).to(device)
    model.train()
    generator = torch.Generator().manual_seed(1)
    images = [torch.rand(3, 96, 96, generator=generator).to(device) for _ in range(2)]
    targets = [
        {"boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0], [40.0, 30.0, 90.0, 80.0]], device=device),
         "labels": torch.tensor([1, 3], device=device)},
        {"boxes": torch.tensor([[5.0, 5.0, 50.0, 45.0]], device=device),
         "labels": torch.tensor([4], device=device)},
    ]
    losses = model(images, targets)
    sum(losses.values()).backward()
    head = model.head.classification_head
    grads = {name: parameter.grad.detach().clone() for name, parameter in head.named_parameters()}
    return {name: value.detach() for name, value in losses.items()}, grads


@pytest.mark.parametrize("device", DEVICES)
def test_retinanet_training_losses_and_gradients_match_torchvision(device, monkeypatch):
    theirs = retinanet_losses_and_head_grads(device, monkeypatch, retinanet_module.sigmoid_focal_loss)
    calls = []

    def ours(*args, **kwargs):
        calls.append(args[0].shape)
        return focal_cuda.sigmoid_focal_loss(*args, **kwargs)

    mine = retinanet_losses_and_head_grads(device, monkeypatch, ours)
    assert len(calls) == 2, "the classification head calls the loss once per image"
    for name in theirs[0]:
        torch.testing.assert_close(mine[0][name], theirs[0][name], rtol=1e-5, atol=1e-6)
    for name in theirs[1]:
        torch.testing.assert_close(mine[1][name], theirs[1][name], rtol=1e-4, atol=1e-6)


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
def test_scripted_retinanet_trains_with_our_loss(monkeypatch):
    """torch.jit.script of torchvision's RetinaNet with our loss swapped in: the scripted model
    computes the same losses as the eager one and a training step moves its parameters."""
    monkeypatch.setattr(retinanet_module, "sigmoid_focal_loss", focal_cuda.sigmoid_focal_loss)
    torch.manual_seed(0)
    model = retinanet_module.retinanet_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=5, min_size=96, max_size=96
    )
    model.train()
    scripted = torch.jit.script(model)
    generator = torch.Generator().manual_seed(1)
    images = [torch.rand(3, 96, 96, generator=generator) for _ in range(2)]
    targets = [
        {"boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0]]), "labels": torch.tensor([1])},
        {"boxes": torch.tensor([[5.0, 5.0, 50.0, 45.0]]), "labels": torch.tensor([4])},
    ]
    eager_losses = model(images, targets)
    scripted_losses, _ = scripted(images, targets)
    for name in eager_losses:
        torch.testing.assert_close(scripted_losses[name], eager_losses[name], rtol=1e-5, atol=1e-6)
    head = scripted.head.classification_head.cls_logits.weight
    before = head.detach().clone()
    optimizer = torch.optim.SGD(scripted.parameters(), lr=0.01)
    sum(scripted_losses.values()).backward()
    assert head.grad is not None and head.grad.abs().sum() > 0
    optimizer.step()
    assert not torch.equal(head.detach(), before)
