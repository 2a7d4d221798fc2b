"""Autograd: float64 gradcheck, second derivatives (create_graph, through the reference formula)
against differences of the kernels' gradients, what the forward computes, backward reuse."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import focal_cuda
from conftest import (DEVICES, GAMMAS, REDUCTIONS, assert_second_derivatives_match_kernel_differences,
                      random_case, requires_cuda)


def focal_fn(alpha, gamma, reduction):
    return lambda x, t: focal_cuda.sigmoid_focal_loss(x, t, alpha, gamma, reduction)


def soft_case(device, seed=0):
    # Targets inside (0, 1) so that finite differences in t stay in the valid range.
    inputs, targets = random_case((4, 7), torch.float64, device, seed=seed, scale=3.0, soft=True)
    return inputs.requires_grad_(), (0.05 + 0.9 * targets).requires_grad_()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("gamma", GAMMAS)
@pytest.mark.parametrize("alpha", [0.25, -1.0])
def test_gradcheck_inputs_and_targets(device, reduction, gamma, alpha):
    inputs, targets = soft_case(device)
    assert torch.autograd.gradcheck(focal_fn(alpha, gamma, reduction), (inputs, targets))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("gamma", GAMMAS)
def test_gradcheck_inputs_with_hard_targets(device, reduction, gamma):
    inputs, targets = random_case((5, 6), torch.float64, device, seed=1, scale=3.0)
    inputs.requires_grad_()
    assert torch.autograd.gradcheck(focal_fn(0.25, gamma, reduction), (inputs, targets))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("gamma", [0.5, 2.0])
def test_second_derivatives(device, reduction, gamma):
    inputs, targets = soft_case(device, seed=2)
    assert_second_derivatives_match_kernel_differences(focal_fn(0.25, gamma, reduction), (inputs, targets))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction, count", [
    ("none", 7), ("sum", 7), ("mean", 7), ("mean", 0),
    # The softmax loss's mean divides by its labels' summed weight: below 1, negative, or 0.
    ("mean", 0.3), ("mean", -0.8), ("mean", 0.0),
])
def test_backward_op_derivatives_match_finite_differences(device, reduction, count):
    """The backward op's own autograd formula (out = saved_grad * grad_output / count), which
    differentiating through the op directly or through opcheck takes; a mean of nothing is 0."""
    saved = torch.randn(3, 5, dtype=torch.float64, device=device, requires_grad=True)
    shape = (3, 5) if reduction == "none" else ()
    grad_output = torch.randn(shape, dtype=torch.float64, device=device, requires_grad=True)
    # int64 for the sigmoid family, float64 for the softmax loss
    count = torch.tensor(count, dtype=torch.float64 if isinstance(count, float) else torch.int64, device=device)
    code = focal_cuda.reference.REDUCTIONS.index(reduction)

    def backward_op(grad_output_, saved_):
        return torch.ops.focal_cuda.sigmoid_focal_loss_backward(grad_output_, saved_, count, code)

    assert torch.autograd.gradcheck(backward_op, (grad_output, saved))
    # Its formula's own derivatives (a third derivative of the loss, through the op).
    assert torch.autograd.gradgradcheck(backward_op, (grad_output, saved))
    if reduction == "mean" and count == 0:
        grads = torch.autograd.grad(backward_op(grad_output, saved).sum(), (grad_output, saved),
                                    create_graph=True)
        assert all(torch.equal(grad, torch.zeros_like(grad)) for grad in grads)
        (second,) = torch.autograd.grad(grads[0].sum(), saved)
        assert torch.equal(second, torch.zeros_like(second))


def exact_hard_target_second_derivative(x, t, alpha, gamma):
    """d^2/dx^2 of alpha_t (1 - p_t)^gamma BCE for t in {0, 1}, in float64 from its closed form:
    with z = x (t = 1) or -x, q = sigmoid(-z), p_t = 1 - q, S = softplus(-z), it is
    alpha_t q^gamma p_t (gamma^2 p_t S + 2 gamma q - gamma q S + q); also the magnitude of its
    terms, which a float32 result's rounding is relative to."""
    z = torch.where(t == 1, x, -x).double()
    q = torch.where(z >= 0, torch.exp(-z) / (1 + torch.exp(-z)), 1 / (1 + torch.exp(z)))
    p_t = torch.where(z >= 0, 1 / (1 + torch.exp(-z)), torch.exp(z) / (1 + torch.exp(z)))
    s = torch.where(z >= 0, torch.log1p(torch.exp(-z)), -z + torch.log1p(torch.exp(z)))
    alpha_t = torch.where(t == 1, alpha, 1 - alpha).double()
    factor = alpha_t * q**gamma * p_t
    terms = (gamma**2 * p_t * s, 2 * gamma * q, -gamma * q * s, q)
    return factor * sum(terms), factor * sum(term.abs() for term in terms)


@pytest.mark.parametrize("dtype, logits", [
    (torch.float32, [-100.0, -89.0, -60.0, -30.0, -17.0, 0.0, 1.0, 17.0, 30.0, 60.0, 89.0, 100.0]),
    (torch.float64, [-710.0, -700.0, -100.0, -40.0, -30.0, 0.0, 1.0, 30.0, 40.0, 100.0, 700.0, 710.0]),
])
@pytest.mark.parametrize("gamma", [0.0, 1.0, 1.5, 2.0, 3.0])
def test_second_derivatives_in_the_tails(dtype, logits, gamma):
    """create_graph's and torch.func.hessian's second derivatives (the reference formula's) at
    saturated logits, where sigmoid's own derivative p (1 - p) rounds to 0 and logaddexp's
    second one is NaN: within 64 roundings of its terms' magnitude (a chain of some twenty ops)
    of the closed form wherever that is far from the subnormals, and finite everywhere."""
    x = torch.tensor(logits, dtype=dtype).repeat(2)
    t = torch.cat([torch.zeros(len(logits)), torch.ones(len(logits))]).to(dtype)

    def loss_of(x_):
        return focal_cuda.sigmoid_focal_loss(x_, t, 0.25, gamma, "sum")

    x_ = x.clone().requires_grad_()
    (first,) = torch.autograd.grad(loss_of(x_), x_, create_graph=True)
    (by_create_graph,) = torch.autograd.grad(first.sum(), x_)
    by_hessian = torch.func.hessian(loss_of)(x).diagonal()
    exact, scale = exact_hard_target_second_derivative(x, t, 0.25, gamma)
    resolvable = exact.abs() > torch.finfo(dtype).tiny * 2**24  # far above the subnormals
    for second in (by_create_graph, by_hessian):
        assert second.isfinite().all(), second
        error = (second.double() - exact).abs()
        assert (error[resolvable] <= 64 * torch.finfo(dtype).eps * scale[resolvable]).all(), (
            second, exact)


class RecordFocalOps(TorchDispatchMode):
    """Records the calls of the focal_cuda ops with their arguments."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "focal_cuda":
            self.calls.append((func.__name__, args))
        return func(*args, **(kwargs or {}))


def recorded_gradient_flags(inputs, targets):
    with RecordFocalOps() as recorder:
        focal_cuda.sigmoid_focal_loss(inputs, targets, reduction="sum")
    (name, args), = recorder.calls
    assert name.startswith("sigmoid_focal_loss_forward")
    outputs = args[10]
    return bool(outputs & focal_cuda._ops.GRAD_INPUTS), bool(outputs & focal_cuda._ops.GRAD_TARGETS)


@pytest.mark.parametrize("device", DEVICES)
def test_forward_computes_only_the_gradients_needed(device):
    def case(inputs_grad, targets_grad):
        inputs, targets = random_case((3, 4), torch.float32, device)
        return inputs.requires_grad_(inputs_grad), targets.requires_grad_(targets_grad)

    assert recorded_gradient_flags(*case(False, False)) == (False, False)
    assert recorded_gradient_flags(*case(True, False)) == (True, False)
    assert recorded_gradient_flags(*case(False, True)) == (False, True)
    assert recorded_gradient_flags(*case(True, True)) == (True, True)
    with torch.no_grad():
        assert recorded_gradient_flags(*case(True, True)) == (False, False)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_backward_twice_with_retain_graph_gives_the_same_gradient(device, reduction):
    inputs, targets = random_case((50, 9), torch.float32, device)
    inputs.requires_grad_()
    loss = focal_cuda.sigmoid_focal_loss(inputs, targets, reduction=reduction)
    grad_output = torch.full_like(loss, 0.5)
    first = torch.autograd.grad(loss, inputs, grad_output, retain_graph=True)[0]
    first_copy = first.clone()
    second = torch.autograd.grad(loss, inputs, grad_output)[0]
    assert torch.equal(first, first_copy), "the first gradient was modified by the second backward"
    assert torch.equal(first, second)


@pytest.mark.parametrize("device", DEVICES)
def test_gradient_accumulates_across_calls(device):
    inputs, targets = random_case((8, 8), torch.float64, device)
    inputs.requires_grad_()
    focal_cuda.sigmoid_focal_loss(inputs, targets, reduction="sum").backward()
    once = inputs.grad.clone()
    focal_cuda.sigmoid_focal_loss(inputs, targets, reduction="sum").backward()
    torch.testing.assert_close(inputs.grad, 2 * once)


@pytest.mark.parametrize("device", DEVICES)
def test_saved_gradient_becomes_the_gradient_only_on_its_last_use(device):
    inputs, targets = random_case((40, 8), torch.float32, device)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        x = inputs.clone().requires_grad_()
        loss = focal_cuda.sigmoid_focal_loss(x, targets, reduction="mean")
    saved_gradient = next(t for t in saved if t.shape == x.shape and t.data_ptr() != x.data_ptr()
                          and t.data_ptr() != targets.data_ptr())
    unscaled = saved_gradient.clone()
    # A backward that keeps the graph leaves the saved gradient intact...
    first = torch.autograd.grad(loss, x, retain_graph=True)[0]
    assert torch.equal(saved_gradient, unscaled) and first.data_ptr() != saved_gradient.data_ptr()
    # ...the one that frees it scales it in place and hands it over: no second buffer (for
    # autograd to take the buffer over, nothing else may hold it).
    saved_pointer = saved_gradient.data_ptr()
    del saved, saved_gradient
    loss.backward()
    assert x.grad.data_ptr() == saved_pointer
    torch.testing.assert_close(x.grad, first, rtol=0, atol=0)
    # Whoever calls the op itself may hold its gradient outputs: never reused.
    outputs = torch.ops.focal_cuda.sigmoid_focal_loss_forward(
        x, targets, None, None, 0, [0.25, 2.0], 1, -100, 0.0, False, focal_cuda._ops.GRAD_INPUTS
    )
    held = outputs[1].clone()
    x.grad = None
    outputs[0].backward()
    assert torch.equal(outputs[1], held) and x.grad.data_ptr() != outputs[1].data_ptr()


@requires_cuda
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_training_step_peak_memory_is_one_gradient_buffer(reduction):
    inputs, targets = random_case((100_000, 80), torch.float32, "cuda")
    x = inputs.clone().requires_grad_()
    gradient_bytes = x.numel() * x.element_size()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    baseline = torch.cuda.memory_allocated()
    loss = focal_cuda.sigmoid_focal_loss(x, targets, reduction=reduction)
    loss.backward(torch.ones_like(loss) if reduction == "none" else None)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - baseline
    # The elementwise loss of "none" is an output the caller asked for, on top.
    allowed = 1.1 * gradient_bytes + (2 * gradient_bytes if reduction == "none" else 0)
    assert extra <= allowed, f"peak {extra / gradient_bytes:.2f} gradient buffers"
