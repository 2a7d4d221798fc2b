"""The ops as PyTorch 2 citizens: opcheck on both custom ops, torch.compile(fullgraph=True)."""

import pytest
import torch

import focal_cuda
from conftest import DEVICES, DTYPES, REDUCTIONS, assert_matches, laid_out, random_case

forward_op = torch.ops.focal_cuda.sigmoid_focal_loss_forward.default
backward_op = torch.ops.focal_cuda.sigmoid_focal_loss_backward.default
backward_in_place_op = torch.ops.focal_cuda.sigmoid_focal_loss_backward_.default


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", [0, 1, 2])
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck_forward(device, dtype, reduction, requires_grad):
    inputs, targets = random_case((6, 5), dtype, device)
    inputs.requires_grad_(requires_grad)
    targets.requires_grad_(requires_grad)
    args = (inputs, targets, None, None, 0, [0.25, 2.0], reduction, -100, 0.0, False,
            focal_cuda._ops.outputs_mask(requires_grad, requires_grad, False))
    torch.library.opcheck(forward_op, args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float64), (torch.bfloat16, torch.float16),
                                    (torch.float16, torch.float32)], ids=str)
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck_forward_with_targets_of_another_dtype(device, dtypes, requires_grad):
    """The loss takes the dtype the two promote to (torch.promote_types), in the fake kernel as
    in the real one."""
    inputs, targets = random_case((6, 5), dtypes[0], device)
    targets = targets.to(dtypes[1]).requires_grad_(requires_grad)
    args = (inputs.requires_grad_(requires_grad), targets, None, None, 0, [0.25, 2.0], 2, -100, 0.0,
            False, focal_cuda._ops.outputs_mask(requires_grad, requires_grad, False))
    torch.library.opcheck(forward_op, args)
    meta = forward_op(*(arg.to("meta") if isinstance(arg, torch.Tensor) else arg for arg in args))
    assert meta[0].dtype == torch.promote_types(*dtypes)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layouts", [("channels_last", "channels_last"), ("channels_last", "contiguous"),
                                     ("channels_last", "channels_last slice"), ("reversed", "reversed"),
                                     ("size-one dims", "size-one dims")], ids=str)
@pytest.mark.parametrize("reduction", [0, 1, 2])
@pytest.mark.parametrize("float32_loss", [False, True], ids=["", "float32 loss"])
def test_opcheck_forward_in_the_inputs_layout(device, layouts, reduction, float32_loss):
    """The fake kernel gives the per-element outputs the strides the op gives them: the inputs'
    for a dense layout the targets share (_ops.keeps_layout), contiguous otherwise; also for
    autocast's float32 loss of 16-bit operands, whose targets the op converts first."""
    dtype = torch.bfloat16 if float32_loss else torch.float32
    inputs, targets = random_case((2, 5, 3, 4), dtype, device, soft=True)
    inputs, targets = laid_out(inputs, layouts[0]), laid_out(targets, layouts[1])
    args = (inputs.requires_grad_(), targets.requires_grad_(), None, None, 0, [0.25, 2.0], reduction,
            -100, 0.0, float32_loss, focal_cuda._ops.GRAD_INPUTS | focal_cuda._ops.GRAD_TARGETS
            | focal_cuda._ops.UNWEIGHTED_LOSS)
    torch.library.opcheck(forward_op, args)
    real = forward_op(*args)
    # Meta operands of the same strides (to("meta") would give size-1 dimensions others).
    as_meta = lambda arg: torch.empty_strided(arg.shape, arg.stride(), dtype=arg.dtype, device="meta")
    fake = forward_op(*(as_meta(arg) if isinstance(arg, torch.Tensor) else arg for arg in args))
    for real_output, fake_output in zip(real, fake):
        assert fake_output.stride() == real_output.stride()
    expected = inputs.stride() if layouts[0] == layouts[1] else inputs.contiguous().stride()
    assert real[1].stride() == expected


def backward_case(device, dtype, reduction):
    """(grad_output, saved gradient, count) as the backward ops receive them."""
    saved, _ = random_case((6, 5), dtype, device)
    grad_output = torch.rand((6, 5) if reduction == 0 else (), dtype=torch.float64)
    count = torch.tensor(saved.numel(), device=device)
    return grad_output.to(device=device, dtype=dtype), saved, count


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", [0, 1, 2])
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck_backward(device, dtype, reduction, requires_grad):
    grad_output, saved, count = backward_case(device, dtype, reduction)
    args = (grad_output.requires_grad_(requires_grad), saved.requires_grad_(requires_grad), count,
            reduction)
    torch.library.opcheck(backward_op, args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", [0, 1, 2])
def test_opcheck_backward_in_place(device, dtype, reduction):
    grad_output, saved, count = backward_case(device, dtype, reduction)
    expected = backward_op(grad_output, saved, count, reduction)
    torch.library.opcheck(backward_in_place_op, (grad_output, saved.clone(), count, reduction))
    backward_in_place_op(grad_output, saved, count, reduction)
    torch.testing.assert_close(saved, expected, rtol=0, atol=0)


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


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck_forward_with_labels_and_weight(device, dtype, requires_grad):
    inputs, _ = random_case((6, 5), dtype, device)
    labels = torch.tensor([0, 5, 2, -100, 4, 1], device=device)
    weight = torch.rand(5, device=device, dtype=dtype).requires_grad_(requires_grad)
    inputs.requires_grad_(requires_grad)
    for reduction in (0, 1, 2):
        args = (inputs, labels, weight, None, 0, [0.25, 2.0], reduction, -100, 0.1, False,
                focal_cuda._ops.outputs_mask(requires_grad, False, requires_grad))
        torch.library.opcheck(forward_op, args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_compile_fullgraph_with_labels_and_weight(device, reduction):
    torch._dynamo.reset()

    def step(inputs, labels, weight):
        loss = focal_cuda.sigmoid_focal_loss(inputs, labels, 0.25, 2.0, reduction, weight=weight,
                                             label_smoothing=0.05)
        return loss.sum() if reduction == "none" else loss

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager", dynamic=True)
    for rows in (16, 24):
        inputs, _ = random_case((rows, 80), torch.float32, device, seed=rows)
        labels = torch.randint(0, 81, (rows,), device=device)
        labels[0] = -100
        weight = torch.rand(80, device=device)
        weights = [weight.clone().requires_grad_() for _ in range(2)]
        xs = [inputs.clone().requires_grad_() for _ in range(2)]
        eager = step(xs[0], labels, weights[0])
        result = compiled(xs[1], labels, weights[1])
        eager.backward()
        result.backward()
        torch.testing.assert_close(result, eager, rtol=0, atol=0)
        torch.testing.assert_close(xs[1].grad, xs[0].grad, rtol=0, atol=0)
        torch.testing.assert_close(weights[1].grad, weights[0].grad)


@pytest.mark.parametrize("labels", [False, True], ids=["soft", "labels"])
def test_compile_with_rows_picked_by_a_mask(labels):
    """Rows chosen by a boolean mask have a data-dependent count: the op's checks (a per-row
    weight's broadcast) must not guard on it."""
    torch._dynamo.reset()
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(8, 3, generator=generator)
    targets = torch.randint(0, 4, (8,), generator=generator) if labels else torch.rand(8, 3, generator=generator)
    mask = torch.rand(8, generator=generator) > 0.3
    weight = torch.rand(8, 1, generator=generator)

    def picked(x_, targets_, mask_, weight_):
        return focal_cuda.sigmoid_focal_loss(x_[mask_], targets_[mask_], reduction="sum", weight=weight_[mask_])

    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        compiled = torch.compile(picked, fullgraph=True, backend="eager")(x, targets, mask, weight)
    torch.testing.assert_close(compiled, picked(x, targets, mask, weight), rtol=0, atol=0)


def test_compiled_autograd_traces_the_eager_backward_whole():
    """A backward compiled by compiled autograd, of a forward run eagerly: one graph, none of
    the eager backward's probes traced (fullgraph=True fails on a graph break)."""
    torch._dynamo.reset()
    x = torch.randn(4, 3, requires_grad=True)
    weight = torch.rand(3, requires_grad=True)
    targets = torch.rand(4, 3)
    expected = torch.autograd.grad(
        focal_cuda.sigmoid_focal_loss(x, targets, reduction="mean", weight=weight), (x, weight))
    with torch._dynamo.compiled_autograd._enable(torch.compile(backend="eager", fullgraph=True)):
        loss = focal_cuda.sigmoid_focal_loss(x, targets, reduction="mean", weight=weight)
        loss.backward()
    torch.testing.assert_close((x.grad, weight.grad), expected, rtol=0, atol=0)


class DetectorLoss(torch.nn.Module):
    """A classification head and its focal loss, as a detector's training graph holds them."""

    def __init__(self):
        super().__init__()
        self.head = torch.nn.Linear(8, 5)
        self.criterion = focal_cuda.SigmoidFocalLoss(reduction="mean")

    def forward(self, features, labels):
        return self.criterion(self.head(features), labels)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_export(device):
    """torch.export captures the custom op; the exported program computes the eager loss and
    its graph holds the fused op."""
    torch.manual_seed(0)
    model = DetectorLoss().to(device)
    features = torch.randn(4, 7, 8, device=device)
    labels = torch.randint(0, 6, (4, 7), device=device)
    exported = torch.export.export(model, (features, labels))
    targets = [str(node.target) for node in exported.graph.nodes if node.op == "call_function"]
    assert any("focal_cuda.sigmoid_focal_loss_forward" in target for target in targets), targets
    torch.testing.assert_close(exported.module()(features, labels), model(features, labels))


# Losses a torch.func transform may be compiled around, each of one sample's logits (3, 200):
# uint8 labels of 128 and more (a narrow label that must not match ignore_index -100, which
# wraps to 156 in uint8), soft targets, and the softmax loss.
SAMPLE_LABELS = torch.tensor([156, 3, 199], dtype=torch.uint8)
SAMPLE_TARGETS = torch.rand(3, 200, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
SAMPLE_LOSSES = {
    "sigmoid_labels": lambda x: focal_cuda.sigmoid_focal_loss(x, SAMPLE_LABELS, reduction="mean"),
    "sigmoid_soft": lambda x: focal_cuda.sigmoid_focal_loss(x, SAMPLE_TARGETS, gamma=1.5, reduction="sum"),
    "softmax": lambda x: focal_cuda.softmax_focal_loss(x, SAMPLE_LABELS.long(), gamma=1.5),
}
TRANSFORMS = {
    "vmap": torch.func.vmap,
    "grad": torch.func.grad,
    "vmap_grad": lambda f: torch.func.vmap(torch.func.grad(f)),
    "jacrev": torch.func.jacrev,
}


@pytest.mark.parametrize("loss", SAMPLE_LOSSES)
@pytest.mark.parametrize("transform", TRANSFORMS)
def test_compiled_torch_func_transform_matches_eager_calls(loss, transform):
    """torch.compile around a torch.func transform takes the reference formula, as the transform
    does uncompiled (the custom op's registered autograd fails under functorch's grad): checked
    against a loop of eager calls of the fused kernels, each differentiated by autograd."""
    torch._dynamo.reset()
    loss_of = SAMPLE_LOSSES[loss]
    batched = transform.startswith("vmap")
    x = torch.randn((2, 3, 200) if batched else (3, 200), dtype=torch.float64,
                    generator=torch.Generator().manual_seed(1))
    compiled = torch.compile(TRANSFORMS[transform](loss_of), fullgraph=True, backend="aot_eager")(x)

    def eager(sample):
        sample = sample.clone().requires_grad_()
        value = loss_of(sample)
        return value.detach() if transform == "vmap" else torch.autograd.grad(value, sample)[0]

    expected = torch.stack([eager(sample) for sample in x]) if batched else eager(x)
    assert_matches(compiled, expected)


@pytest.mark.parametrize("loss", SAMPLE_LOSSES)
def test_backward_through_a_compiled_vmap(loss):
    """Gradients of per-sample losses from a compiled vmap: the op's outputs mask cannot see the
    batched logits' requires_grad, so this too is the reference formula's."""
    torch._dynamo.reset()
    loss_of = SAMPLE_LOSSES[loss]
    x = torch.randn(2, 3, 200, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    compiled_x, eager_x = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch.compile(torch.func.vmap(loss_of), fullgraph=True, backend="aot_eager")(compiled_x).sum().backward()
    torch.stack([loss_of(sample) for sample in eager_x]).sum().backward()
    assert_matches(compiled_x.grad, eager_x.grad.detach())



@pytest.mark.parametrize("loss", ["sigmoid", "softmax"])
@pytest.mark.parametrize("transform", ["vmap", "grad"])
def test_compiled_torch_func_transform_checks_labels(loss, transform):
    """A bad label raises the eager ValueError when the compiled transform runs: the check's
    op returns the labels it checked, which the loss uses, so the graph cannot drop it."""
    torch._dynamo.reset()
    bad = torch.tensor([0, 1, 7, 2])
    loss_of = {"sigmoid": lambda x: focal_cuda.sigmoid_focal_loss(x, bad, reduction="sum"),
               "softmax": lambda x: focal_cuda.softmax_focal_loss(x, bad)}[loss]
    x = torch.randn(4, 5)
    compiled = torch.compile(TRANSFORMS[transform](loss_of), fullgraph=True, backend="aot_eager")
    with pytest.raises(ValueError, match="targets holds the class label 7"):
        compiled(x.unsqueeze(0) if transform == "vmap" else x)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("label_dtype", [torch.int64, torch.int32, torch.int16, torch.uint8], ids=str)
@pytest.mark.parametrize("with_background", [False, True], ids=["softmax", "sigmoid"])
def test_opcheck_check_labels_returns_int64_labels_as_its_fake_kernel_says(device, label_dtype,
                                                                           with_background):
    """The third custom op, the label check of the reference formula's paths (torch.func,
    forward-mode AD, compiled transforms): its fake kernel gives the int64 copy the op returns,
    whatever the labels' dtype, so a compiled graph computes with what the eager op gives."""
    classes = 5
    labels = torch.tensor([[0, classes - 1, 200], [2, 200, 1]], device=device)
    if with_background:
        labels[0, 0] = classes  # the background label, which only the sigmoid losses take
    args = (labels.to(label_dtype), classes, 200, with_background)
    torch.library.opcheck(torch.ops.focal_cuda.check_labels.default, args)
    checked = torch.ops.focal_cuda.check_labels(*args)
    assert checked.dtype == torch.int64
    assert torch.equal(checked, labels)
