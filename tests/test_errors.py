"""Every bad argument raises a clear error that names it, what was expected and what was got."""

import os
import random
import re
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import focal_cuda

X = torch.zeros(4, 4)


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        (dict(targets=torch.zeros(4, 3)), ValueError,
         "targets must have the shape of inputs, [4, 4], got [4, 3]"),
        (dict(targets=torch.zeros(4)), ValueError,
         "targets must have the shape of inputs, [4, 4], got [4]"),
        (dict(inputs=torch.zeros(4, 4, dtype=torch.long)), ValueError,
         "inputs must be a floating-point tensor (float16, bfloat16, float32 or float64), got torch.int64"),
        (dict(targets=torch.zeros(4, 4, dtype=torch.bool)), ValueError,
         "targets must be a floating-point tensor, or an integer tensor of class labels; integer dtypes "
         "int8 to int64 and uint8 to uint32, floating float16, bfloat16, float32 or float64; got torch.bool"),
        (dict(targets=torch.zeros(4, 4).to(torch.float8_e4m3fn)), ValueError,
         "targets must be a floating-point tensor, or an integer tensor of class labels; integer dtypes "
         "int8 to int64 and uint8 to uint32, floating float16, bfloat16, float32 or float64; got "
         "torch.float8_e4m3fn"),
        (dict(targets=torch.zeros(4, dtype=torch.uint64)), ValueError, "got torch.uint64"),
        (dict(inputs=torch.zeros(4, 4).to(torch.float8_e5m2)), ValueError,
         "inputs must be a floating-point tensor (float16, bfloat16, float32 or float64), got torch.float8_e5m2"),
        (dict(inputs=torch.zeros(4, 4).to_sparse()), ValueError,
         "inputs must be a strided (dense) tensor, got layout Sparse"),
        (dict(targets=torch.zeros(4, 4).to_sparse()), ValueError,
         "targets must be a strided (dense) tensor, got layout Sparse"),
        (dict(weight=torch.ones(4).to_sparse()), ValueError,
         "weight must be a strided (dense) tensor, got layout Sparse"),
        (dict(weight=torch.ones(4).to(torch.float8_e4m3fn)), ValueError,
         "weight must be a floating-point tensor (float16, bfloat16, float32 or float64), got "
         "torch.float8_e4m3fn"),
        (dict(ignore_index=2**63), ValueError, "ignore_index must be an integer in int64's range, got "
         "9223372036854775808"),
        (dict(ignore_index=-2**63 - 1), ValueError, "ignore_index must be an integer in int64's range"),
        (dict(targets=torch.zeros(4, 4, dtype=torch.long)), ValueError,
         "integer targets (class labels) must have the shape of inputs without its last (class) "
         "dimension, [4], got [4, 4]"),
        (dict(inputs=torch.zeros(()), targets=torch.zeros((), dtype=torch.long)), ValueError,
         "integer targets (class labels) need inputs with a class dimension, its last; got 0-d inputs"),
        (dict(weight=torch.ones(3)), ValueError,
         "weight must be broadcastable to the shape of inputs, [4, 4], got [3]"),
        (dict(weight=torch.ones(2, 4, 4)), ValueError,
         "weight must be broadcastable to the shape of inputs, [4, 4], got [2, 4, 4]"),
        (dict(weight=torch.ones(4, dtype=torch.long)), ValueError,
         "weight must be a floating-point tensor (float16, bfloat16, float32 or float64), got torch.int64"),
        (dict(weight=[1.0]), TypeError, "weight must be a torch.Tensor, got list"),
        (dict(label_smoothing=1.0), ValueError, "label_smoothing must be in [0, 1), got 1.0"),
        (dict(label_smoothing=-0.1), ValueError, "label_smoothing must be in [0, 1), got -0.1"),
        (dict(ignore_index=1.5), ValueError, "ignore_index must be an integer, got 1.5"),
        (dict(inputs=[[0.0]]), TypeError, "inputs must be a torch.Tensor, got list"),
        (dict(targets=0.5), TypeError, "targets must be a torch.Tensor, got float"),
        (dict(alpha=1.5), ValueError, "alpha must be in [0, 1], or -1 or None to disable the weighting, got 1.5"),
        (dict(alpha=-0.5), ValueError, "got -0.5"),
        (dict(alpha=float("nan")), ValueError, "got nan"),
        (dict(alpha="0.25"), ValueError, "got '0.25'"),
        (dict(gamma=-1.0), ValueError, "gamma must be in [0, 1000], got -1.0"),
        # Numbers as Python writes them: a stream's six digits would print 1 here.
        (dict(alpha=1.0000001), ValueError, "the weighting, got 1.0000001"),
        (dict(gamma=-1e-300), ValueError, "gamma must be in [0, 1000], got -1e-300"),
        (dict(gamma=float("inf")), ValueError, "gamma must be in [0, 1000], got inf"),
        # Past 1,000 float32's rounding of q decides q^gamma (README, Semantics).
        (dict(gamma=1000.5), ValueError, "gamma must be in [0, 1000], got 1000.5"),
        # Positional from 1e-4 to 1e16, as Python's repr.
        (dict(gamma=-100000.0), ValueError, "gamma must be in [0, 1000], got -100000.0"),
        (dict(gamma=-1e16), ValueError, "gamma must be in [0, 1000], got -1e+16"),
        (dict(gamma=-0.00015), ValueError, "gamma must be in [0, 1000], got -0.00015"),
        (dict(gamma=10**400), ValueError, "gamma must be a real number that float64 holds, got 1000"),
        (dict(gamma=None), ValueError, "gamma must be a real number, got None"),
        (dict(gamma=True), ValueError, "gamma must be a real number, got True"),  # bool is an int, not a number here
        (dict(ignore_index=True), ValueError, "ignore_index must be an integer, got True"),
        (dict(reduction="avg"), ValueError, "reduction must be one of 'none', 'mean', 'sum', got 'avg'"),
        (dict(reduction=None), ValueError, "reduction must be one of 'none', 'mean', 'sum', got None"),
        (dict(reduction=["mean"]), ValueError, "reduction must be one of 'none', 'mean', 'sum', got ['mean']"),
    ],
)
def test_bad_arguments(kwargs, error, message):
    arguments = dict(inputs=X, targets=X, alpha=0.25, gamma=2.0, reduction="none") | kwargs
    with pytest.raises(error, match=re.escape(message)):
        focal_cuda.sigmoid_focal_loss(**arguments)


@pytest.mark.parametrize("kwargs, message", [
    (dict(targets=torch.zeros(4)), "targets must have the shape of inputs, [4, 3], got [4] (class labels "
     "of that shape must be an integer tensor, got torch.float32)"),
    (dict(targets=torch.zeros(3)), "targets must have the shape of inputs, [4, 3], got [3]"),
    (dict(weight=torch.ones(4)), "weight must be broadcastable to the shape of inputs, [4, 3], got [4] (a "
     "weight per row needs a last dimension of size 1: weight.unsqueeze(-1))"),
    (dict(weight=torch.ones(2)), "weight must be broadcastable to the shape of inputs, [4, 3], got [2]"),
    (dict(targets=torch.zeros(4, 3, dtype=torch.long), ignore_index=-100),
     "integer targets (class labels) must have the shape of inputs without its last (class) "
     "dimension, [4], got [4, 3] (one-hot or soft targets must be a floating-point tensor, got "
     "torch.int64: targets.float())"),
])
def test_a_shape_error_in_the_rows_shape_says_what_was_likely_meant(kwargs, message):
    """Float class labels and a per-anchor weight without its last dimension (mmdet's
    label_weights) have the shape of inputs without the class dimension; other shapes get no hint."""
    arguments = dict(inputs=torch.zeros(4, 3), targets=torch.zeros(4, 3)) | kwargs
    with pytest.raises(ValueError, match=re.escape(message) + "$"):
        focal_cuda.sigmoid_focal_loss(**arguments)


# Arguments that only the op's checks refuse (check_forward_arguments, check_softmax_arguments):
# the reference formula's paths, which run no kernel, make the same checks first.
OP_CHECKED_ARGUMENTS = {
    "sigmoid target shape": (focal_cuda.sigmoid_focal_loss, dict(targets=torch.rand(4, 3)),
                             "targets must have the shape of inputs, [4, 4], got [4, 3]"),
    "sigmoid weight shape": (focal_cuda.sigmoid_focal_loss, dict(weight=torch.ones(3)),
                             "weight must be broadcastable to the shape of inputs, [4, 4], got [3]"),
    "sigmoid gamma": (focal_cuda.sigmoid_focal_loss, dict(gamma=-1.0), "gamma must be in [0, 1000], got -1"),
    "sigmoid alpha": (focal_cuda.sigmoid_focal_loss, dict(alpha=1.5), "alpha must be in [0, 1]"),
    "sigmoid label_smoothing": (focal_cuda.sigmoid_focal_loss, dict(label_smoothing=1.0),
                                "label_smoothing must be in [0, 1), got 1"),
    "FL* gamma": (focal_cuda.sigmoid_focal_loss_star, dict(gamma=0.0), "gamma"),
    "varifocal alpha": (focal_cuda.varifocal_loss, dict(alpha=-0.5), "alpha"),
    "softmax weight shape": (focal_cuda.softmax_focal_loss, dict(weight=torch.ones(3)),
                             "weight must have one value per class"),
    "softmax gamma": (focal_cuda.softmax_focal_loss, dict(gamma=-1.0), "gamma must be in [0, 1000], got -1"),
}


@pytest.mark.parametrize("path", ["eager", "grad", "vmap", "forward_ad"])
@pytest.mark.parametrize("case", list(OP_CHECKED_ARGUMENTS))
def test_bad_arguments_raise_the_eager_error_under_transforms(case, path):
    """torch.func and forward-mode AD compute the loss by the reference formula, which would
    broadcast a wrong shape or compute with an exponent out of range: they raise the eager
    call's ValueError instead."""
    function, options, message = OP_CHECKED_ARGUMENTS[case]
    options = dict(options)
    inputs = torch.randn(4, 4, generator=torch.Generator().manual_seed(0))
    targets = torch.tensor([0, 1, 2, 3]) if function is focal_cuda.softmax_focal_loss else torch.rand(4, 4)
    targets = options.pop("targets", targets)

    def loss_of(x):
        return function(x, targets, reduction="sum", **options)

    with pytest.raises(ValueError, match=re.escape(message)):
        if path == "eager":
            loss_of(inputs)
        elif path == "grad":
            torch.func.grad(loss_of)(inputs)
        elif path == "vmap":
            torch.func.vmap(loss_of)(inputs.unsqueeze(0).expand(2, -1, -1))
        else:
            with torch.autograd.forward_ad.dual_level():
                loss_of(torch.autograd.forward_ad.make_dual(inputs, torch.ones_like(inputs)))


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors is in prototype stage:UserWarning")
@pytest.mark.parametrize("argument", ["inputs", "targets", "weight"])
def test_nested_tensors_are_refused_by_name(argument):
    # A nested tensor of the strided layout passes a layout check but has no sizes to check.
    nested = torch.nested.nested_tensor([torch.zeros(2, 4), torch.zeros(2, 4)])
    arguments = dict(inputs=torch.zeros(2, 2, 4), targets=torch.zeros(2, 2, 4), alpha=0.25, gamma=2.0)
    arguments[argument] = nested
    message = f"{argument} must be a strided (dense) tensor, got a nested tensor"
    with pytest.raises(ValueError, match=re.escape(message)):
        focal_cuda.sigmoid_focal_loss(**arguments)
    if argument != "targets":
        softmax_arguments = dict(inputs=torch.zeros(2, 4), targets=torch.zeros(2, dtype=torch.long),
                                 weight=torch.ones(4))
        softmax_arguments[argument] = nested if argument == "inputs" else torch.nested.nested_tensor(
            [torch.ones(4)])
        with pytest.raises(ValueError, match=re.escape(message)):
            focal_cuda.softmax_focal_loss(**softmax_arguments)


def jagged_zeros(requires_grad=False):
    return torch.nested.nested_tensor([torch.zeros(2, 4), torch.zeros(3, 4)], layout=torch.jagged,
                                      requires_grad=requires_grad)


@pytest.mark.parametrize("argument", ["inputs", "targets", "weight", "scores"])
@pytest.mark.parametrize("requires_grad", [False, True], ids=["nograd", "grad"])
def test_jagged_nested_tensors_are_refused_by_name(argument, requires_grad):
    """A jagged nested tensor, a tensor subclass whose own dispatch refuses an op it does not
    know (a bare NotImplementedError), gets the op's layout error naming the argument: every
    operand of both families."""
    message = f"{argument} must be a strided (dense) tensor, got layout Jagged"
    arguments = dict(inputs=torch.zeros(5, 4, requires_grad=requires_grad), targets=torch.zeros(5, 4),
                     weight=torch.ones(5, 4))
    if argument == "scores":
        arguments["targets"] = (torch.zeros(5, dtype=torch.long), jagged_zeros(requires_grad))
    else:
        arguments[argument] = jagged_zeros(requires_grad)
    with pytest.raises(ValueError, match=re.escape(message)):
        focal_cuda.sigmoid_focal_loss(**arguments)
    if argument != "scores":
        softmax_arguments = dict(inputs=torch.zeros(5, 4, requires_grad=requires_grad),
                                 targets=torch.zeros(5, dtype=torch.long), weight=torch.ones(4))
        softmax_arguments[argument] = jagged_zeros(requires_grad)
        with pytest.raises(ValueError, match=re.escape(message)):
            focal_cuda.softmax_focal_loss(**softmax_arguments)


def test_jagged_nested_tensors_are_refused_by_name_when_traced_or_compiled():
    """The same error from torch.jit.trace, and from torch.compile while it traces (inside
    Dynamo's TorchRuntimeError, as the op's other checks)."""
    message = "weight must be a strided (dense) tensor, got layout Jagged"
    jagged = jagged_zeros()

    def loss(x):
        return focal_cuda.sigmoid_focal_loss(x, torch.zeros(5, 4), weight=jagged, reduction="sum")

    with pytest.raises(ValueError, match=re.escape(message)):
        torch.jit.trace(loss, torch.zeros(5, 4))
    torch._dynamo.reset()
    with pytest.raises(Exception, match=re.escape(message)):
        torch.compile(loss, backend="eager", fullgraph=True)(torch.zeros(5, 4))


def test_device_mismatch():
    meta = torch.zeros(4, 4, device="meta")
    with pytest.raises(ValueError, match=re.escape("targets must be on inputs' device (cpu), got one on meta")):
        focal_cuda.sigmoid_focal_loss(X, meta)


@pytest.mark.parametrize("name, call", [
    ("weight", lambda other: focal_cuda.sigmoid_focal_loss(X, X, reduction="sum", weight=other(4))),
    ("weight", lambda other: focal_cuda.sigmoid_focal_loss(X, X, reduction="none", weight=other(()))),
    ("scores", lambda other: focal_cuda.sigmoid_focal_loss(
        X, (torch.zeros(4, dtype=torch.long), other(4)))),
    ("weight", lambda other: focal_cuda.softmax_focal_loss(X, torch.zeros(4, dtype=torch.long),
                                                           weight=other(4))),
], ids=["sigmoid weight", "sigmoid 0-d weight", "scores", "softmax weight"])
def test_operands_on_another_device_are_refused_by_name(name, call):
    """Every tensor operand is checked against the inputs' device (the kernels would read a
    pointer of another device), not only the targets."""
    message = f"{name} must be on inputs' device (cpu), got one on meta"
    with pytest.raises(ValueError, match=re.escape(message)):
        call(lambda shape: torch.ones(shape, device="meta"))


def forward_op(inputs, targets, alpha=0.25, gamma=2.0, reduction=0, weight=None, label_smoothing=0.0):
    return focal_cuda._C.sigmoid_focal_loss_forward(
        inputs, targets, weight, None, 0, [alpha, gamma], reduction, -100, label_smoothing, False, 0
    )


def test_unsupported_device():
    meta = torch.zeros(4, 4, device="meta")
    with pytest.raises(RuntimeError, match="inputs must be a CPU or CUDA tensor .what focal_cuda runs on., got one on meta"):
        forward_op(meta, meta)


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda: forward_op(X, X, alpha=2.0), "alpha must be in [0, 1], or -1 or None to disable the weighting, got 2"),
        (lambda: forward_op(X, X, gamma=-2.0), "gamma must be in [0, 1000], got -2"),
        (lambda: forward_op(X, X, reduction=3), "reduction must be 0 (none), 1 (mean) or 2 (sum), got 3"),
        (lambda: forward_op(X, X, label_smoothing=1.0), "label_smoothing must be in [0, 1), got 1"),
    ],
)
def test_op_level_checks_raise_value_error(call, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        call()


def test_meta_tensors_are_checked_as_real_ones():
    """The fake (and meta) kernel runs the op's own checks."""
    x = torch.zeros(4, 4, device="meta")
    with pytest.raises(ValueError, match=re.escape("targets must have the shape of inputs, [4, 4], got [4, 3]")):
        focal_cuda.sigmoid_focal_loss(x, torch.zeros(4, 3, device="meta"))
    with pytest.raises(ValueError, match=re.escape("weight must be broadcastable to the shape of inputs, [4, 4], got [3]")):
        focal_cuda.sigmoid_focal_loss(x, x, weight=torch.ones(3, device="meta"))


@pytest.mark.parametrize("fullgraph", [True, False])
@pytest.mark.parametrize("dynamic", [False, True])
def test_compile_reports_bad_input_with_the_eager_message(dynamic, fullgraph):
    """Under torch.compile the fake kernel raises the op's error while tracing (Dynamo wraps it in
    its TorchRuntimeError, as it does the errors of torch's own ops), before any kernel runs;
    with dynamic shapes the sizes in the message are symbols."""
    torch._dynamo.reset()
    compiled = torch.compile(lambda x, t: focal_cuda.sigmoid_focal_loss(x, t, reduction="sum"),
                             fullgraph=fullgraph, backend="eager", dynamic=dynamic)
    with pytest.raises(torch._dynamo.exc.TorchRuntimeError, match=re.escape("targets must have the shape of inputs, [")):
        compiled(X, torch.zeros(4, 3))


@pytest.mark.parametrize(
    "call,errors,message",
    [
        (lambda x, t: focal_cuda.sigmoid_focal_loss(x, t, reduction="avg"), torch._dynamo.exc.Unsupported,
         "reduction must be one of 'none', 'mean', 'sum', got 'avg'"),
        # torch 2.14 stops on the raised error (Unsupported), 2.13 while running the check on fake
        # tensors (TorchRuntimeError).
        (lambda x, t: torch.func.grad(lambda x_: focal_cuda.sigmoid_focal_loss(x_, t[:, :3], reduction="sum"))(x),
         (torch._dynamo.exc.Unsupported, torch._dynamo.exc.TorchRuntimeError),
         "targets must have the shape of inputs, [4, 4], got [4, 3]"),
    ],
    ids=["python-level check", "inside a torch.func transform"],
)
def test_compile_carries_the_eager_message_in_dynamos_error(call, errors, message):
    """What README's "works with" table says of these two cases: Dynamo stops with an error of
    its own whose text holds the eager message."""
    torch._dynamo.reset()
    compiled = torch.compile(call, fullgraph=True, backend="eager")
    with pytest.raises(errors, match=re.escape(message)):
        compiled(X, torch.zeros(4, 4))


@pytest.mark.parametrize("op", ["sigmoid_focal_loss_backward", "sigmoid_focal_loss_backward_"])
# meta: through the dispatcher to the ops' fake kernels, which must check as the ops do.
@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize(
    "arguments,error,message",
    [
        ((torch.zeros(3), X, torch.tensor(16), 0), RuntimeError,
         "grad_output must have the shape of the loss, [4, 4], got [3]"),
        ((torch.zeros(3), X, torch.tensor(16), 2), RuntimeError,
         "grad_output of a reduced loss must have one element, got shape [3]"),
        ((torch.zeros(()), X, torch.tensor(1.0), 2), RuntimeError,
         "count must be the 0-d int64 (or float64, the softmax loss's) tensor the forward op returns, got torch.float32 of shape []"),
        ((torch.zeros(()), X[:, ::2], torch.tensor(16), 2), RuntimeError, "saved_grad must be dense"),
        ((torch.zeros(()), X, torch.tensor(16), 3), ValueError,
         "reduction must be 0 (none), 1 (mean) or 2 (sum), got 3"),
    ],
)
def test_backward_op_checks(op, device, arguments, error, message):
    *tensors, reduction = arguments
    # In their strides (to() would make the non-dense one dense on meta).
    tensors = [torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype, device=device)
               for tensor in tensors]
    call = getattr(focal_cuda._C if device == "cpu" else torch.ops.focal_cuda, op)
    with pytest.raises(error, match=re.escape(message)):
        call(*tensors, reduction)


@pytest.mark.parametrize("op", ["sigmoid_focal_loss_backward", "sigmoid_focal_loss_backward_"])
def test_backward_ops_refuse_operands_on_two_devices(op):
    """One meta operand sends the call to the fake kernel, which must refuse it as the op does
    rather than return memory nobody wrote."""
    message = "grad_output, saved_grad and count must be on one device, got cpu, cpu and meta"
    with pytest.raises(RuntimeError, match=re.escape(message)):
        getattr(torch.ops.focal_cuda, op)(torch.tensor(1.0), torch.ones(2, 3),
                                          torch.tensor(6, device="meta"), 1)


def test_backward_without_saved_gradient_explains():
    x = torch.zeros(3, requires_grad=True)
    loss = torch.ops.focal_cuda.sigmoid_focal_loss_forward(
        x, torch.zeros(3), None, None, 0, [0.25, 2.0], 2, -100, 0.0, False, 0
    )[0]
    message = ("backward needs d(loss)/d(inputs), which the forward op did not compute (its "
               "outputs mask left out GRAD_INPUTS); call focal_cuda.sigmoid_focal_loss")
    with pytest.raises(RuntimeError, match=re.escape(message)):
        loss.backward()


@pytest.mark.skipif(focal_cuda.backends()["cuda"], reason="this build has CUDA kernels")
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cpu_only_build_on_cuda_tensors_says_how_to_rebuild():
    x = torch.zeros(3, device="cuda")
    with pytest.raises(RuntimeError, match="FORCE_CUDA=1 pip install"):
        focal_cuda.sigmoid_focal_loss(x, x)


def test_user_errors_raise_in_a_fresh_process():
    """tests/raise_errors.py: each kind of error the extension raises, with CUDA initialised
    first where there is a GPU (where a user error once killed the process)."""
    script = os.path.join(os.path.dirname(__file__), "raise_errors.py")
    result = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "all errors raised" in result.stdout, (
        f"exit status {result.returncode}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")


@pytest.mark.parametrize("call, message", [
    (lambda: torch.ops.focal_cuda.sigmoid_focal_loss_forward(
        X, X, None, None, 0, [0.25, 2.0], 0, -100, 0.0, False, 8),
     "outputs must be a mask of GRAD_INPUTS (1), GRAD_TARGETS (2) and UNWEIGHTED_LOSS (4), got 8"),
    (lambda: torch.ops.focal_cuda.softmax_focal_loss_forward(
        X, torch.zeros(4, dtype=torch.long), None, [0.25, 2.0], 0, -100, 0.0, False, -1),
     "outputs must be a mask of GRAD_INPUTS (1), GRAD_TARGETS (2) and UNWEIGHTED_LOSS (4), got -1"),
    (lambda: torch.ops.focal_cuda.softmax_focal_loss_forward(
        X, torch.zeros(4, dtype=torch.long), None, [0.25], 0, -100, 0.0, False, 0),
     "the softmax focal loss takes the coefficients (alpha, gamma), got 1 value"),
])
def test_ops_check_their_grouped_arguments(call, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        call()


@pytest.mark.parametrize("call,name", [
    (lambda: focal_cuda.sigmoid_focal_loss(X, X, alpha=torch.tensor(0.25)), "alpha must be a real number"),
    (lambda: focal_cuda.softmax_focal_loss(X, torch.zeros(4, dtype=torch.long), gamma=torch.tensor(2.0)),
     "gamma must be a real number"),
    (lambda: focal_cuda.sigmoid_focal_loss(X, torch.zeros(4, dtype=torch.long),
                                           ignore_index=torch.tensor(-1)), "ignore_index must be an integer"),
])
def test_a_tensor_coefficient_is_refused_with_the_way_to_a_number(call, name):
    """torchvision's function takes a tensor alpha into its arithmetic; ours are numbers the op
    takes on the host, and converting a tensor on each call would read it back from the GPU."""
    with pytest.raises(ValueError, match=re.escape(
            f"{name}, got a Tensor (float() or int() of a 0-d tensor gives the number)")):
        call()


@pytest.mark.parametrize("call,message", [
    (lambda: focal_cuda.sigmoid_focal_loss(X, X, alpha=torch.full((4,), 0.25)),
     "alpha must be a real number, got a Tensor of shape [4] (one number is expected; per-class "
     "factors go in weight=)"),
    (lambda: focal_cuda.sigmoid_focal_loss(X, X, gamma=torch.full((1,), 2.0)),
     "gamma must be a real number, got a Tensor of shape [1] (one number is expected)"),
])
def test_a_tensor_of_several_values_is_refused_by_its_shape(call, message):
    with pytest.raises(ValueError, match=re.escape(message) + "$"):
        call()


def test_a_tensor_coefficient_is_named_under_torch_compile():
    """The eager message, which Dynamo carries (it cannot take the tensor's repr into it)."""
    torch._dynamo.reset()
    compiled = torch.compile(lambda x, gamma: focal_cuda.sigmoid_focal_loss(x, x, gamma=gamma),
                             fullgraph=True, backend="eager")
    with pytest.raises(Exception, match="gamma must be a real number, got a Tensor"):
        compiled(torch.zeros(2, 3), torch.tensor(2.0))


@pytest.mark.parametrize("module", [focal_cuda.SigmoidFocalLossStar, focal_cuda.QualityFocalLoss,
                                    focal_cuda.VarifocalLoss])
def test_family_module_constructor_errors_name_the_module(module):
    with pytest.raises(TypeError, match=rf"^{module.__name__}\(\): got an unexpected keyword argument 'weight'"):
        module(weight=torch.ones(3))


@pytest.mark.parametrize("module", [focal_cuda.SigmoidFocalLossStar, focal_cuda.QualityFocalLoss,
                                    focal_cuda.VarifocalLoss, focal_cuda.SoftmaxFocalLoss])
def test_scripting_a_model_that_holds_an_unscriptable_loss_says_what_to_do(module):
    """torch.jit.script calls a module's __prepare_scriptable__ before compiling it (the hook
    torchvision's v2 transforms use): these modules' hook names the module and the way out,
    where TorchScript would report the Python inside the function. If torch stops calling
    the hook, TorchScript's own message comes back and this fails."""
    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(4, 5)
            self.loss = module()

        def forward(self, inputs, targets):
            return self.loss(self.linear(inputs), targets)

    with pytest.raises(RuntimeError, match=f"^{module.__name__} cannot be scripted by TorchScript "
                                           r"\(of the losses, only sigmoid_focal_loss and "
                                           r"SigmoidFocalLoss can\): use torch.compile or torch.jit.trace"):
        torch.jit.script(Head())


FUZZ_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int64, torch.int32,
               torch.uint8, torch.bool, torch.complex64, torch.float8_e4m3fn]


def random_operand(r, shape=None):
    """A small tensor of a random dtype and shape (or the given one), laid out at random:
    contiguous, transposed, expanded from one value, flattened, sparse or on the meta device."""
    shape = [r.choice([0, 1, 2, 3, 5]) for _ in range(r.randint(0, 4))] if shape is None else list(shape)
    dtype = r.choice(FUZZ_DTYPES)
    values = torch.randn(shape) * r.choice([1.0, 100.0, 1e30])
    tensor = values.to(dtype) if dtype.is_floating_point or dtype.is_complex else values.abs().to(dtype)
    layout = r.choice(["contiguous", "transposed", "expanded", "flat", "sparse", "meta"])
    if layout == "transposed" and tensor.dim() > 1:
        return tensor.transpose(0, -1)
    if layout == "expanded" and tensor.numel() > 0:
        return tensor.flatten()[:1].reshape([1] * tensor.dim()).expand(tensor.shape)
    if layout == "flat":
        return tensor.reshape(-1)
    if layout == "sparse" and tensor.dim() > 0 and dtype != torch.float8_e4m3fn:
        return tensor.to_sparse()
    if layout == "meta":
        return tensor.to("meta")
    return tensor


def random_call(r):
    """One call of a public function or an op with random operands and options."""
    inputs = random_operand(r)
    other = lambda: random_operand(r, inputs.shape if r.random() < 0.6 else None)
    optional = lambda make: None if r.random() < 0.4 else make()
    coefficients = [r.choice([0.0, 0.25, 2.0, -1.0, -5.0, float("nan"), float("inf")])
                    for _ in range(r.randint(0, 4))]
    ops = focal_cuda._C
    calls = [
        lambda: focal_cuda.sigmoid_focal_loss(
            inputs, other(), r.choice([0.25, -1, 2.0]), r.choice([0.0, 2.0, 0.5, -1.0]),
            r.choice(["none", "mean", "sum", "avg"]), weight=optional(other),
            ignore_index=r.choice([-100, 0, 3])),
        lambda: focal_cuda.softmax_focal_loss(
            inputs, other(), r.choice([None, 0.25]), r.choice([0.0, 2.0, 0.5]), r.choice(["none", "mean", "sum"]),
            weight=optional(lambda: random_operand(r)), ignore_index=r.choice([-100, 0, 3]),
            label_smoothing=r.choice([0.0, 0.1])),
        lambda: ops.sigmoid_focal_loss_forward(
            inputs, other(), optional(other), optional(lambda: random_operand(r)), r.randint(-1, 5), coefficients,
            r.randint(-1, 3), r.choice([-100, 0, 3]), r.choice([0.0, 0.1, 1.0, float("nan")]), r.random() < 0.5,
            r.randint(-2, 9)),
        lambda: ops.softmax_focal_loss_forward(
            inputs, other(), optional(lambda: random_operand(r)), coefficients, r.randint(-1, 3),
            r.choice([-100, 0, 3]), r.choice([0.0, 0.1, 1.0]), r.random() < 0.5, r.randint(-2, 9)),
        lambda: r.choice([ops.sigmoid_focal_loss_backward, ops.sigmoid_focal_loss_backward_])(
            other(), inputs, random_operand(r, r.choice([[], [1], [2]])), r.randint(-1, 3)),
    ]
    return r.choice(calls)()


@pytest.mark.parametrize("function", [focal_cuda.sigmoid_focal_loss, focal_cuda.quality_focal_loss])
def test_floating_targets_refuse_an_ignore_index_they_would_silently_not_apply(function):
    """As F.cross_entropy refuses one with class probabilities: a config's ignore_index=255
    meeting one-hot targets fails, where it would ignore nothing; a negative one is the default."""
    x = torch.zeros(4, 3)
    with pytest.raises(ValueError, match=re.escape(
            "ignore_index applies to integer targets (class labels); with floating targets it must "
            "be negative (the default, -100), got 255")):
        function(x, torch.zeros(4, 3), ignore_index=255)
    function(x, torch.zeros(4, 3), ignore_index=-1)
    function(x, torch.zeros(4, dtype=torch.long), ignore_index=255)  # labels: it applies


def test_modules_take_an_ignore_index_for_the_labels_they_will_get():
    """A module is built before it sees targets: any ignore_index is taken then, and checked
    against the targets of each call."""
    module = focal_cuda.SigmoidFocalLoss(ignore_index=255)
    labels = torch.tensor([0, 255, 2, 1])
    assert module(torch.zeros(4, 3), labels).shape == (4, 3)
    with pytest.raises(ValueError, match="with floating targets it must be negative"):
        module(torch.zeros(4, 3), torch.zeros(4, 3))


@pytest.mark.parametrize("name", ["sigmoid_focal_loss", "varifocal_loss", "softmax_focal_loss"])
def test_the_reference_functions_check_labels_as_the_fused_ones(name):
    """focal_cuda.reference's public functions, the definition of what the kernels compute,
    refuse a label that names no class, with the fused functions' message: computed, it would
    give the loss of a row without a positive class."""
    labels = torch.tensor([0, 7, 2, 1])
    for function in (getattr(focal_cuda, name), getattr(focal_cuda.reference, name)):
        with pytest.raises(ValueError, match="targets holds the class label 7"):
            function(torch.zeros(4, 5), labels)


def test_the_label_check_refuses_uint64_labels():
    """uint64's upper half would wrap to negative labels, ignore_index among them."""
    labels = torch.tensor([2**63 + 1], dtype=torch.uint64)
    with pytest.raises(ValueError, match=re.escape("labels must be a CPU tensor of an integer dtype "
                                                   "int8 to int64 or uint8 to uint32, got torch.uint64")):
        torch.ops.focal_cuda.check_labels(labels, 5, -100, True)


@pytest.mark.parametrize("weight, message", [
    (torch.ones(5, dtype=torch.long), "weight must be a floating-point tensor (float16, bfloat16, "
     "float32 or float64), got torch.int64"),
    (torch.ones(5, 2), "weight must have one value per class, shape (C) with C >= 1, got shape [5, 2]"),
    (torch.ones(0), "weight must have one value per class, shape (C) with C >= 1, got shape [0]"),
])
def test_softmax_module_checks_its_weight_when_built(weight, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        focal_cuda.SoftmaxFocalLoss(weight=weight)


@settings(max_examples=300, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_random_arguments_return_or_raise_a_python_error(seed):
    """Random, mostly wrong operands (any dtype, rank, strides, layout, the meta device) and
    options, to the public functions and to the ops: each call returns or raises ValueError,
    TypeError or RuntimeError with a message. A crash kills the suite (issue 24)."""
    try:
        random_call(random.Random(seed))
    except (ValueError, TypeError, RuntimeError) as error:
        assert str(error).strip()
