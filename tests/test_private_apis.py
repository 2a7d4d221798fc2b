"""The private torch APIs focal_cuda relies on, three, each checked for the behaviour it is used
for: if torch renames or changes one, this file says which, before a path silently goes wrong.

- c10::impl::tls_local_dispatch_key_set (C++, csrc/bindings.cpp thread_dispatch_keys): whether
  a direct call of the kernels would bypass a transform or mode (focal_cuda/_ops.py plain_eager,
  transforms_active, last_use_of_saved);
- torch.autograd.forward_ad._current_level (_ops.forward_ad_active): tangents may be about;
- torch._C._autograd._get_current_graph_task_keep_graph (_ops.last_use_of_saved): the backward
  keeps the graph.
"""

import pathlib
import re

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import focal_cuda
from focal_cuda import _C, _ops

PACKAGE = pathlib.Path(focal_cuda.__file__).parent  # the package under test, maybe installed
CSRC = pathlib.Path(__file__).resolve().parents[1] / "csrc"  # the source tree's


class PassThroughMode(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def keys_inside(transform):
    seen = []

    def probe(x):
        seen.append((_C.thread_dispatch_keys(), _ops.transforms_active()))
        return x.sum()

    transform(probe)(torch.ones(3))
    return seen[0]


@pytest.mark.parametrize("transform", ["vmap", "grad", "jvp", "jacrev", "jacfwd"])
def test_thread_dispatch_keys_see_each_transform(transform):
    wrap = {"vmap": lambda f: torch.func.vmap(lambda x: f(x.unsqueeze(0))),
            "grad": torch.func.grad,
            "jvp": lambda f: lambda x: torch.func.jvp(f, (x,), (x,)),
            "jacrev": torch.func.jacrev, "jacfwd": torch.func.jacfwd}[transform]
    assert keys_inside(wrap) == (_C.FUNCTORCH_TRANSFORM, True)
    assert not _ops.transforms_active()


def test_thread_dispatch_keys_are_none_in_plain_eager_modes():
    assert _C.thread_dispatch_keys() == 0
    with torch.no_grad():
        assert _C.thread_dispatch_keys() == 0
    with torch.inference_mode():
        assert _C.thread_dispatch_keys() == 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _C.thread_dispatch_keys() == 0


def test_thread_dispatch_keys_see_dispatch_modes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    for mode in (PassThroughMode(), FakeTensorMode()):
        with mode:
            assert _C.thread_dispatch_keys() == _C.OTHER_DISPATCH_KEYS
    assert _C.thread_dispatch_keys() == 0


class ProbeInBackward(torch.autograd.Function):
    """Records, in its backward, the two probes that decide whether the saved gradient may be
    overwritten."""

    seen = []

    @staticmethod
    def forward(ctx, x):
        return x.sum()

    @staticmethod
    def backward(ctx, grad):
        ProbeInBackward.seen.append((torch._C._autograd._get_current_graph_task_keep_graph(),
                                     _C.thread_dispatch_keys()))
        return grad.expand(3)


def test_keep_graph_and_the_legacy_vmap_of_batched_grads_seen_in_backward():
    ProbeInBackward.seen.clear()
    x = torch.ones(3, requires_grad=True)
    torch.autograd.grad(ProbeInBackward.apply(x), x, retain_graph=True)
    torch.autograd.grad(ProbeInBackward.apply(x), x)
    torch.autograd.grad(ProbeInBackward.apply(x), x, torch.ones(4), is_grads_batched=True)
    torch.autograd.functional.jacobian(lambda x_: ProbeInBackward.apply(x_).expand(2), x, vectorize=True)
    other = _C.OTHER_DISPATCH_KEYS
    assert ProbeInBackward.seen == [(True, 0), (False, 0), (False, other), (False, other)]


def test_forward_ad_current_level_tells_a_forward_ad_level_apart():
    assert torch.autograd.forward_ad._current_level < 0 and not _ops.forward_ad_active()
    with torch.autograd.forward_ad.dual_level():
        assert torch.autograd.forward_ad._current_level >= 0 and _ops.forward_ad_active()
    assert not _ops.forward_ad_active()


def test_no_other_private_torch_api_is_used():
    """The package's Python and C++ name no private torch API but the three above."""
    python = "\n".join(path.read_text() for path in sorted(PACKAGE.glob("*.py")))
    private_python = set(re.findall(r"torch(?:\.\w+)*\._(?!_)\w+(?:\.\w+)*", python))
    private_python |= set(re.findall(r"\b_forward_ad\._\w+", python))
    assert private_python == {"torch._C._autograd._get_current_graph_task_keep_graph",
                              "_forward_ad._current_level"}, private_python
    sources = [path for path in CSRC.rglob("*") if path.suffix in (".h", ".cpp", ".cu", ".cuh")]
    assert len(sources) > 10, f"no C++ sources found under {CSRC}"
    internal = {match for path in sources
                for match in re.findall(r"\b(?:c10|at|torch)::(?:impl|detail|native|autograd)::\w+",
                                        path.read_text())}
    assert internal == {"c10::impl::tls_local_dispatch_key_set"}, internal
