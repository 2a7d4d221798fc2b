"""Plain eager calls go straight to the C++ op (the dispatcher's Python path costs tens of
microseconds a call); whatever the dispatcher serves still sees the op: dispatch and function
modes, tensor subclasses, meta tensors, torch.jit.trace, torch.compile of a call without
gradient (torch.func transforms: tests/test_transforms.py). The profiler sees the C++ functions'
own records on either path. Both paths give the same bits."""

import contextlib

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import focal_cuda
from conftest import exact_focal_loss_and_grads

FORWARD = "focal_cuda.sigmoid_focal_loss_forward.default"
# Under a mode the saved gradient is not reused in place (see _ops._scaled_saved_grad).
BACKWARD = "focal_cuda.sigmoid_focal_loss_backward.default"


class RecordingDispatchMode(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.add(str(func))
        return func(*args, **(kwargs or {}))


class RecordingFunctionMode(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.seen = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.seen.add(str(func))
        return func(*args, **(kwargs or {}))


def training_step(x, t, reduction="sum"):
    x = x.detach().requires_grad_()
    loss = focal_cuda.sigmoid_focal_loss(x, t, 0.25, 2.0, reduction)
    loss.backward()
    return loss.detach(), x.grad


@pytest.fixture
def operands():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(37, 13, generator=generator)
    t = (torch.rand(37, 13, generator=generator) < 0.2).float()
    return x, t


def test_dispatch_mode_sees_the_ops_and_the_bits_match(operands):
    direct = training_step(*operands)
    mode = RecordingDispatchMode()
    with mode:
        dispatched = training_step(*operands)
    assert {FORWARD, BACKWARD} <= mode.seen, mode.seen
    for a, b in zip(direct, dispatched):
        assert torch.equal(a, b)


def test_function_mode_sees_the_forward_op(operands):
    mode = RecordingFunctionMode()
    with mode:
        training_step(*operands)
    assert any("sigmoid_focal_loss_forward" in name for name in mode.seen), mode.seen


def test_profiler_records_the_kernels_calls(operands):
    """A plain eager step passes no dispatcher, which would record the op's name: the C++
    functions record their own."""
    x, t = operands
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as profile:
        training_step(*operands)
        # Backward keeping the graph: the saved gradient scaled into a new tensor.
        x = x.detach().requires_grad_()
        focal_cuda.sigmoid_focal_loss(x, t, reduction="sum").backward(retain_graph=True)
        focal_cuda.softmax_focal_loss(x.detach(), torch.zeros(x.shape[0], dtype=torch.long))
    names = {event.name for event in profile.events()}
    assert {"focal_cuda._C.sigmoid_focal_loss_forward", "focal_cuda._C.sigmoid_focal_loss_backward_",
            "focal_cuda._C.sigmoid_focal_loss_backward", "focal_cuda._C.softmax_focal_loss_forward"} <= names, names
    forward = next(event for event in profile.events() if event.name == "focal_cuda._C.sigmoid_focal_loss_forward")
    assert forward.input_shapes[:2] == [list(x.shape), list(t.shape)], forward.input_shapes


def test_no_grad_call_matches_the_dispatched_op(operands):
    x, t = operands
    with torch.no_grad():
        direct = focal_cuda.sigmoid_focal_loss(x, t, 0.25, 2.0, "none")
        mode = RecordingDispatchMode()
        with mode:
            dispatched = focal_cuda.sigmoid_focal_loss(x, t, 0.25, 2.0, "none")
    assert FORWARD in mode.seen
    assert torch.equal(direct, dispatched)


def test_subclass_inputs_take_the_dispatcher(operands):
    class Tagged(torch.Tensor):
        pass

    x, t = operands
    loss = focal_cuda.sigmoid_focal_loss(x.as_subclass(Tagged), t, 0.25, 2.0, "sum")
    assert type(loss) is Tagged  # the dispatcher's __torch_function__ wrapped the result
    assert torch.equal(loss.as_subclass(torch.Tensor), focal_cuda.sigmoid_focal_loss(x, t, 0.25, 2.0, "sum"))


@pytest.mark.parametrize("requires_grad", [False, True])
def test_meta_tensors_give_meta_results(requires_grad):
    x = torch.empty(37, 13, device="meta", requires_grad=requires_grad)
    loss = focal_cuda.sigmoid_focal_loss(x, torch.empty(37, 13, device="meta"), 0.25, 2.0, "none")
    assert loss.device.type == "meta" and loss.shape == x.shape


def test_jit_trace_records_the_op(operands):
    x, t = operands
    traced = torch.jit.trace(lambda x_: focal_cuda.sigmoid_focal_loss(x_, t, 0.25, 2.0, "sum"), (x,))
    assert "focal_cuda::sigmoid_focal_loss_forward" in str(traced.graph)
    other = torch.randn_like(x)
    assert torch.equal(traced(other), focal_cuda.sigmoid_focal_loss(other, t, 0.25, 2.0, "sum"))


@pytest.mark.parametrize("loss", ["sigmoid", "softmax"])
def test_jit_trace_of_a_training_head_saves_and_gives_eager_gradients(loss, tmp_path):
    """Traced with parameters that require grad, the graph holds the op (a Python
    autograd.Function would be a node no saved graph can hold, and trace's own check, which
    reruns the function under no_grad, would see another graph) and trains as eager does."""
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(8, 6, generator=generator)
    if loss == "sigmoid":
        targets = torch.rand(8, 5, generator=generator)
        loss_function = lambda logits, t: focal_cuda.sigmoid_focal_loss(logits, t, 0.25, 2.0, "mean")  # noqa: E731
    else:
        targets = torch.randint(0, 5, (8,), generator=generator)
        loss_function = lambda logits, t: focal_cuda.softmax_focal_loss(logits, t, gamma=2.0)  # noqa: E731

    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(6, 5)

        def forward(self, features_, targets_):
            return loss_function(self.linear(features_), targets_)

    head = Head()
    traced = torch.jit.trace(head, (features, targets))
    assert f"focal_cuda::{loss}_focal_loss_forward" in str(traced.graph)
    torch.jit.save(traced, tmp_path / "head.pt")
    loaded = torch.jit.load(tmp_path / "head.pt")
    loaded(features, targets).backward()
    head(features, targets).backward()
    # Not bit for bit: TorchScript's executor may run the linear layer its own way.
    torch.testing.assert_close(loaded.linear.weight.grad, head.linear.weight.grad)
    with torch.no_grad():
        torch.testing.assert_close(loaded(features, targets), head(features, targets))


@pytest.mark.parametrize("no_grad", [True, False], ids=["under-no_grad", "inputs-without-grad"])
def test_compile_fullgraph_without_gradient(operands, no_grad):
    x, t = operands
    compiled = torch.compile(lambda x_, t_: focal_cuda.sigmoid_focal_loss(x_, t_, 0.25, 2.0, "sum"),
                             fullgraph=True, backend="aot_eager")
    with torch.no_grad() if no_grad else contextlib.nullcontext():
        assert torch.equal(compiled(x, t), focal_cuda.sigmoid_focal_loss(x, t, 0.25, 2.0, "sum"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_eager_forward_allocates_only_what_is_asked(operands, dtype):
    """The C++ forwards leave the outputs not asked for undefined (None: nothing allocated on the
    eager path); the ops, whose schemas return tensors, give empty ones in the fake kernels'
    dtypes (opcheck compares those: tests/test_pt2.py)."""
    x, t = (tensor.to(dtype) for tensor in operands)
    only_inputs = focal_cuda._ops.GRAD_INPUTS
    sigmoid = (x, t, None, None, 0, [0.25, 2.0], 2, -100, 0.0, False, only_inputs)
    labels = torch.zeros(x.shape[0], dtype=torch.long)
    softmax = (x, labels, None, [-1.0, 2.0], 2, -100, 0.0, False, only_inputs)
    for direct, op in [(focal_cuda._C.sigmoid_focal_loss_forward, torch.ops.focal_cuda.sigmoid_focal_loss_forward),
                       (focal_cuda._C.softmax_focal_loss_forward, torch.ops.focal_cuda.softmax_focal_loss_forward)]:
        arguments = sigmoid if "sigmoid" in str(op) else softmax
        loss, grad_inputs, grad_targets, unweighted, _ = direct(*arguments)
        assert grad_inputs.shape == x.shape and grad_targets is None and unweighted is None
        op_outputs = op(*arguments)
        assert torch.equal(op_outputs[0], loss) and torch.equal(op_outputs[1], grad_inputs)
        assert op_outputs[2].shape == op_outputs[3].shape == (0,)
        assert op_outputs[3].dtype == torch.float32  # the saved dtype of a float16 loss too


@pytest.mark.parametrize("keep_graph", [False, True], ids=["last use", "graph kept"])
def test_backward_reads_an_expanded_grad_output_as_its_one_value(operands, keep_graph):
    """loss.sum().backward() hands a "none" loss an expanded scalar: the backward op reads its one
    value rather than a gradient-sized copy of it (no aten::copy_ under the profiler)."""
    x, t = operands
    x = x.clone().requires_grad_()
    loss = focal_cuda.sigmoid_focal_loss(x, t, 0.25, 2.0, "none")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        (grad,) = torch.autograd.grad(loss.sum(), x, retain_graph=keep_graph)
    assert "aten::copy_" not in {event.name for event in profile.events()}
    _, exact_x, _ = exact_focal_loss_and_grads(x.detach().flatten(), t.flatten(), 0.25, 2.0)
    torch.testing.assert_close(grad, exact_x.reshape(x.shape).float(), rtol=4e-6, atol=1e-7)


@pytest.mark.parametrize("loss", ["sigmoid", "softmax"])
def test_only_the_ops_loss_is_differentiable(loss):
    """The forward ops' other outputs carry what backward needs; differentiating through one is
    an error, not a silent zero gradient."""
    x = torch.randn(4, 3, requires_grad=True)
    mask = focal_cuda._ops.outputs_mask(True, False, False)
    if loss == "sigmoid":
        outputs = torch.ops.focal_cuda.sigmoid_focal_loss_forward(
            x, torch.rand(4, 3), None, None, 0, [0.25, 2.0], 2, -100, 0.0, False, mask)
    else:
        outputs = torch.ops.focal_cuda.softmax_focal_loss_forward(
            x, torch.tensor([0, 2, 1, 0]), None, [-1.0, 2.0], 2, -100, 0.0, False, mask)
    assert outputs[0].requires_grad
    assert not any(output.requires_grad for output in outputs[1:])
    with pytest.raises(RuntimeError, match="does not require grad"):
        outputs[1].sum().backward()


def test_jit_trace_gives_the_weight_its_gradient():
    """A traced call records the op asking for the weight's gradient too; d(sum loss)/d(weight)
    is each element's loss before the weight, summed over the rows (the float64 formula)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, dtype=torch.float64, generator=generator, requires_grad=True)
    t = torch.rand(5, 3, dtype=torch.float64, generator=generator)
    weight = torch.rand(3, dtype=torch.float64, generator=generator, requires_grad=True)
    traced = torch.jit.trace(lambda x_, w_: focal_cuda.sigmoid_focal_loss(x_, t, 0.25, 2.0, "sum", w_),
                             (x, weight))
    (gradient,) = torch.autograd.grad(traced(x, weight), weight)
    losses = exact_focal_loss_and_grads(x.detach().flatten(), t.flatten(), 0.25, 2.0)[0]
    expected = losses.reshape(x.shape).sum(0)
    torch.testing.assert_close(gradient, expected)
