"""targets as a (labels, scores) pair, for the focal loss and its family: the same loss and
gradients as the dense soft target it stands for (the score at the labelled class, 0 elsewhere),
read per row by the kernels without building it."""

import pytest
import torch
import torch.nn.functional as F

import focal_cuda
from conftest import (DEVICES, DTYPES, REDUCTIONS, assert_matches,
                      assert_second_derivatives_match_kernel_differences, kernel_gradients)

# Each function with options it takes (label smoothing where the form takes it).
FUNCTIONS = {
    "focal": lambda x, t, **kw: focal_cuda.sigmoid_focal_loss(x, t, 0.25, 1.5, label_smoothing=0.1, **kw),
    "star": lambda x, t, **kw: focal_cuda.sigmoid_focal_loss_star(x, t, 0.25, 2.0, beta=0.5, **kw),
    "quality": lambda x, t, **kw: focal_cuda.quality_focal_loss(x, t, 0.5, **kw),
    "varifocal": lambda x, t, **kw: focal_cuda.varifocal_loss(x, t, 0.75, 2.0, **kw),
}
CLASSES = 9


def make_pair(rows, generator, ignore_index=-100):
    """Labels (a class, the background CLASSES, or ignored) and scores in [0, 1] with exact
    zeros (VFL's negatives at the labelled class)."""
    labels = torch.randint(0, CLASSES + 1, (rows,), generator=generator)
    labels[::6] = ignore_index
    scores = torch.rand(rows, generator=generator, dtype=torch.float64)
    scores[1::5] = 0.0
    return labels, scores


def dense(labels, scores, ignore_index=-100):
    """The dense soft target of a pair, and the mask of valid rows' elements."""
    ignored = labels == ignore_index
    one_hot = F.one_hot(torch.where(ignored, CLASSES, labels), CLASSES + 1)[..., :CLASSES]
    return one_hot * scores.unsqueeze(-1), (~ignored).unsqueeze(-1).expand(one_hot.shape)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("form", FUNCTIONS)
def test_pair_equals_the_dense_soft_target(device, dtype, reduction, form):
    """Loss, and gradients w.r.t. inputs, weight and scores, equal to those of the dense target
    (the scores' gradient is the dense target's at the labelled class; 0 for background and
    ignored rows). Same kernels, same values: only the order of sums may differ."""
    generator = torch.Generator().manual_seed(len(form))
    x = (torch.randn(5, 61, CLASSES, generator=generator, dtype=torch.float64) * 3).to(dtype)
    labels, scores = make_pair(5 * 61, generator)
    labels, scores = labels.view(5, 61), scores.view(5, 61).to(dtype)
    weight = (torch.rand(CLASSES, generator=generator, dtype=torch.float64) + 0.5).to(dtype)
    soft, valid = dense(labels, scores)
    grad_output = (torch.rand(x.shape if reduction == "none" else (), generator=generator) + 0.5).to(dtype)

    def run(targets, differentiable):  # the loss and its gradients w.r.t. inputs, weight, scores
        inputs = x.to(device).requires_grad_()
        w = weight.to(device).requires_grad_()
        differentiable = differentiable.to(device).requires_grad_()
        loss = FUNCTIONS[form](inputs, targets(differentiable), reduction=reduction, weight=w)
        return (loss,) + torch.autograd.grad(loss, (inputs, w, differentiable), grad_output.to(device, loss.dtype))

    ours = run(lambda s: (labels.to(device), s), scores)

    # The dense target of the same rows, the ignored rows' elements weighted 0 and left out of
    # the mean as the pair's are.
    def dense_loss(inputs, t, reduction, weight):
        loss = FUNCTIONS[form](inputs, t, reduction="none", weight=weight * valid.to(device, dtype))
        if reduction == "none":
            return loss
        return loss.sum() / (valid.sum().to(device) if reduction == "mean" else 1)

    inputs = x.to(device).requires_grad_()
    w = weight.to(device).requires_grad_()
    t = soft.to(device, dtype).requires_grad_()
    expected_loss = dense_loss(inputs, t, reduction, w)
    expected = (expected_loss,) + torch.autograd.grad(expected_loss, (inputs, w, t), grad_output.to(device, expected_loss.dtype))
    assert ours[0].dtype == dtype
    for actual, wanted in zip(ours[:3], expected[:3]):  # loss, d/dinputs, d/dweight
        assert_matches(actual.cpu(), wanted.cpu().double(), dtype)
    # d/dscores: the dense target's gradient at the labelled class.
    labelled = valid & (labels.unsqueeze(-1) == torch.arange(CLASSES))
    expected_scores = (expected[3].cpu().double() * labelled).sum(-1)
    assert ours[3].dtype == dtype
    assert_matches(ours[3].cpu(), expected_scores, dtype)


@pytest.mark.parametrize("form", FUNCTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_labels_are_the_pair_with_unit_scores(form, dtype):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(40, CLASSES, generator=generator, dtype=dtype)
    labels, _ = make_pair(40, generator)
    for reduction in REDUCTIONS:
        plain = FUNCTIONS[form](x, labels, reduction=reduction)
        pair = FUNCTIONS[form](x, (labels, torch.ones(40, dtype=dtype)), reduction=reduction)
        assert torch.equal(plain, pair)


@pytest.mark.parametrize("form", FUNCTIONS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck(form, reduction):
    """Finite differences w.r.t. inputs, scores and weight in float64, and of the gradient
    (create_graph: the reference, which takes the pair too). Scores stay positive: VFL's loss
    jumps at a score of 0."""
    generator = torch.Generator().manual_seed(2)
    x = (torch.randn(6, CLASSES, generator=generator, dtype=torch.float64) * 2).requires_grad_()
    labels = torch.tensor([0, 3, CLASSES, -100, 8, 3])
    scores = (torch.rand(6, generator=generator, dtype=torch.float64) * 0.9 + 0.05).requires_grad_()
    weight = (torch.rand(CLASSES, generator=generator, dtype=torch.float64) + 0.5).requires_grad_()

    def loss(x_, scores_, weight_):
        return FUNCTIONS[form](x_, (labels, scores_), reduction=reduction, weight=weight_)

    assert torch.autograd.gradcheck(loss, (x, scores, weight))
    assert_second_derivatives_match_kernel_differences(loss, (x, scores, weight))


@pytest.mark.parametrize("form", FUNCTIONS)
def test_forward_mode_and_vmap(form):
    """jvp with a tangent on the scores (through the reference formula) equals the fused
    kernels' gradient dotted with it; vmap over a batch of pairs equals the eager loop."""
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(7, CLASSES, generator=generator, dtype=torch.float64)
    labels, _ = make_pair(7, generator)
    scores = torch.rand(7, generator=generator, dtype=torch.float64) * 0.9 + 0.05
    x_tangent = torch.randn(7, CLASSES, generator=generator, dtype=torch.float64)
    s_tangent = torch.randn(7, generator=generator, dtype=torch.float64)
    for reduction in REDUCTIONS:
        def loss(x_, s_):
            return FUNCTIONS[form](x_, (labels, s_), reduction=reduction)

        _, derivative = torch.func.jvp(loss, (x, scores), (x_tangent, s_tangent))
        grad_x, grad_s = kernel_gradients(loss, (x, scores))
        assert_matches(derivative.sum(), (grad_x * x_tangent).sum() + (grad_s * s_tangent).sum())
    batch_labels = torch.stack([labels, labels.roll(1), labels.roll(2)])
    batch_scores = torch.stack([scores, scores.roll(1), scores.roll(2)])
    batched = torch.func.vmap(lambda l_, s_: FUNCTIONS[form](x, (l_, s_), reduction="mean"))(batch_labels, batch_scores)
    looped = torch.stack([FUNCTIONS[form](x, (l_, s_), reduction="mean") for l_, s_ in zip(batch_labels, batch_scores)])
    torch.testing.assert_close(batched, looped)


@pytest.mark.parametrize("form", FUNCTIONS)
def test_opcheck_and_compile(form):
    """The op with scores under opcheck, and torch.compile(fullgraph=True) of the pair loss with
    its backward equal to eager, bitwise."""
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(6, 5, generator=generator)
    labels = torch.tensor([0, 5, 2, -100, 4, 1])
    scores = torch.rand(6, generator=generator)
    for requires_grad in (False, True):
        args = (x.clone().requires_grad_(requires_grad), labels, None, scores.clone().requires_grad_(requires_grad),
                0, [0.25, 2.0], 1, -100, 0.0, False,
                focal_cuda._ops.outputs_mask(requires_grad, requires_grad, False))
        torch.library.opcheck(torch.ops.focal_cuda.sigmoid_focal_loss_forward.default, args)
    torch._dynamo.reset()

    def step(x_, labels_, scores_):
        return FUNCTIONS[form](x_, (labels_, scores_), reduction="sum")

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager", dynamic=True)
    eager_args = [x.clone().requires_grad_(), labels, scores.clone().requires_grad_()]
    compiled_args = [x.clone().requires_grad_(), labels, scores.clone().requires_grad_()]
    eager, result = step(*eager_args), compiled(*compiled_args)
    eager.backward()
    result.backward()
    torch.testing.assert_close(result, eager, rtol=0, atol=0)
    for index in (0, 2):
        torch.testing.assert_close(compiled_args[index].grad, eager_args[index].grad, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_autocast_pair_gives_a_float32_loss_and_scores_gradients_in_their_dtype(dtype):
    x = torch.randn(6, CLASSES).to(dtype).requires_grad_()
    labels = torch.tensor([0, 3, CLASSES, -100, 8, 3])
    scores = torch.rand(6).to(dtype).requires_grad_()
    with torch.autocast("cpu", dtype=dtype):
        loss = focal_cuda.varifocal_loss(x, (labels, scores), reduction="sum")
    assert loss.dtype == torch.float32
    loss.backward()
    assert x.grad.dtype == dtype and scores.grad.dtype == dtype
    assert scores.grad[2] == 0 and scores.grad[3] == 0  # background, ignored


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("label_dtype", [torch.uint8, torch.int8, torch.int16, torch.int32])
@pytest.mark.parametrize("form", FUNCTIONS)
def test_narrow_labels_give_the_int64_pairs_gradients(device, label_dtype, form):
    """Labels of any integer dtype, elementwise grad_output included (the scores' gradient then
    picks each row's value at its labelled class)."""
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(7, 4, CLASSES, generator=generator, dtype=torch.float64, device=device)
    labels, scores = make_pair(28, generator, ignore_index=255 if label_dtype == torch.uint8 else -100)
    labels, scores = labels.view(7, 4).to(device), scores.view(7, 4).to(device)
    grad_output = torch.rand(x.shape, generator=generator, dtype=torch.float64).to(device)

    def gradients(labels):
        inputs, s = x.clone().requires_grad_(), scores.clone().requires_grad_()
        ignore_index = 255 if label_dtype == torch.uint8 else -100
        loss = FUNCTIONS[form](inputs, (labels, s), reduction="none", ignore_index=ignore_index)
        loss.backward(grad_output)
        return loss.detach(), inputs.grad, s.grad

    for ours, expected in zip(gradients(labels.to(label_dtype)), gradients(labels)):
        assert torch.equal(ours, expected)


@pytest.mark.parametrize("label_dtype, classes", [(torch.int8, 200), (torch.uint8, 300), (torch.int16, 40_000)])
def test_narrow_labels_of_many_classes_give_the_int64_pairs_gradients(label_dtype, classes):
    """C - 1 beyond the label dtype's range: the elementwise backward must not compare or clamp
    in that dtype."""
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(3, classes, generator=generator, dtype=torch.float64)
    labels = torch.tensor([1, 100, -100 if label_dtype != torch.uint8 else 255])
    scores = torch.rand(3, generator=generator, dtype=torch.float64)
    ignore_index = 255 if label_dtype == torch.uint8 else -100
    grad_output = torch.rand(x.shape, generator=generator, dtype=torch.float64)

    def gradients(labels):
        inputs, s = x.clone().requires_grad_(), scores.clone().requires_grad_()
        loss = focal_cuda.quality_focal_loss(inputs, (labels, s), reduction="none", ignore_index=ignore_index)
        loss.backward(grad_output)
        return inputs.grad, s.grad

    for ours, expected in zip(gradients(labels.to(label_dtype)), gradients(labels)):
        assert torch.equal(ours, expected)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("form", FUNCTIONS)
def test_no_classes_is_all_background(form, reduction):
    """With C = 0 every row's label is the background (or ignored): empty gradients for the
    logits and 0 for the scores, which act on no class."""
    x = torch.zeros(3, 0, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, -100, 0])
    scores = torch.rand(3, dtype=torch.float64, requires_grad=True)
    loss = FUNCTIONS[form](x, (labels, scores), reduction=reduction)
    grad_x, grad_scores = torch.autograd.grad(loss.sum(), [x, scores], allow_unused=True)
    assert grad_x.shape == (3, 0)
    assert grad_scores is None or torch.equal(grad_scores, torch.zeros(3, dtype=torch.float64))


@pytest.mark.parametrize("form", FUNCTIONS)
@pytest.mark.parametrize("bad_score", [float("nan"), float("inf")])
def test_scores_of_background_and_ignored_rows_are_never_read(form, bad_score):
    """A row without a labelled class reads no score, whatever it holds, on every path: the
    kernels, and the reference formula that torch.func, forward-mode AD and create_graph take."""
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(3, CLASSES, dtype=torch.float64, generator=generator)
    labels = torch.tensor([2, CLASSES, -100])  # labelled, background, ignored
    scores = torch.tensor([0.7, bad_score, bad_score], dtype=torch.float64)
    clean = torch.tensor([0.7, 0.0, 0.0], dtype=torch.float64)

    def loss_of(x_, scores_):
        return FUNCTIONS[form](x_, (labels, scores_), reduction="sum")

    eager = kernel_gradients(lambda x_: loss_of(x_, clean), (x,))
    x_ = x.clone().requires_grad_()
    (by_create_graph,) = torch.autograd.grad(loss_of(x_, scores), x_, create_graph=True)
    by_func, value = torch.func.grad_and_value(loss_of)(x, scores)
    assert_matches(value, loss_of(x, clean))
    for gradient in (by_create_graph, by_func):
        assert_matches(gradient, eager[0])


@pytest.mark.parametrize("targets, error, message", [
    (lambda labels, scores: (labels, scores, scores), TypeError,
     "targets must be a torch.Tensor, or a (labels, scores) tuple of two tensors, got a tuple of 3 "
     "items (Tensor, Tensor, Tensor)"),
    (lambda labels, scores: [0, 1, 1, 0], TypeError,
     "targets must be a torch.Tensor, or a (labels, scores) tuple of two tensors, got a list of 4 "
     "items (int, int, int, int)"),
    (lambda labels, scores: (labels.double(), scores), ValueError,
     "scores go with integer targets (class labels), as in a (labels, scores) pair; got targets of "
     "dtype torch.float64"),
    (lambda labels, scores: (labels, labels), ValueError,
     "scores must be a floating-point tensor (float16, bfloat16, float32 or float64), got torch.int64"),
    (lambda labels, scores: (labels, scores[:3]), ValueError,
     "scores must have the shape of the class labels, [4], got [3]"),
    (lambda labels, scores: (labels[:3], scores[:3]), ValueError,
     "integer targets (class labels) must have the shape of inputs without its last (class) dimension"),
    (lambda labels, scores: (labels, [0.5] * 4), TypeError,
     "targets must be a torch.Tensor, or a (labels, scores) tuple of two tensors, got a tuple of 2 "
     "items (Tensor, list)"),
])
def test_pair_errors_name_what_is_wrong(targets, error, message):
    with pytest.raises(error) as raised:
        focal_cuda.quality_focal_loss(torch.zeros(4, 5), targets(torch.zeros(4, dtype=torch.long), torch.zeros(4)))
    assert message in str(raised.value)


def test_op_refuses_scores_without_labels():
    with pytest.raises(ValueError, match="scores go with integer targets"):
        torch.ops.focal_cuda.sigmoid_focal_loss_forward(
            torch.zeros(2, 3), torch.zeros(2, 3), None, torch.zeros(2), 0, [0.25, 2.0], 0, -100, 0.0, False, 0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("form", FUNCTIONS)
def test_rows_without_a_labelled_class_ignore_their_grad_output(device, form):
    """A background or ignored row's loss does not depend on its score, so the score's gradient
    is 0 whatever grad_output holds in that row (the inf or NaN of a later division by a zero
    normaliser, say), with reduction "none"."""
    x = torch.randn(4, CLASSES, dtype=torch.float64, device=device)
    labels = torch.tensor([1, CLASSES, -100, 2], device=device)  # row 1 background, row 2 ignored
    scores = torch.rand(4, dtype=torch.float64, device=device, requires_grad=True)
    loss = FUNCTIONS[form](x, (labels, scores), reduction="none")
    with torch.no_grad():  # the oracle: those rows' losses do not move with their scores
        moved = scores + torch.tensor([0.0, 0.3, 0.3, 0.0], dtype=torch.float64, device=device)
        assert torch.equal(FUNCTIONS[form](x, (labels, moved), reduction="none")[1:3], loss[1:3])
    grad_output = torch.ones_like(loss)
    grad_output[1] = float("inf")
    grad_output[2] = float("nan")
    (gradient,) = torch.autograd.grad(loss, scores, grad_output)
    assert gradient[1] == 0 and gradient[2] == 0
    assert torch.isfinite(gradient).all()
