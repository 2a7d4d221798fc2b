"""The private torch APIs focal_cuda relies on, each checked for the behaviour it is used for:
if torch renames or changes one, this file says which, before a path silently goes wrong.

Where each is used and why: focal_cuda/_ops.py (plain_eager, forward_ad_active,
_scaled_saved_grad) and focal_cuda/_function.py (_refuse_forward_over_forward)."""

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from focal_cuda import _ops


class PassThroughMode(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def test_functorch_transforms_active_tells_a_transform_apart():
    seen = []

    def probe(x):
        seen.append(torch._C._are_functorch_transforms_active())
        return x

    probe(torch.ones(2))
    torch.func.vmap(probe)(torch.ones(3, 2))
    assert seen == [False, True]
    assert _ops.transforms_active is torch._C._are_functorch_transforms_active


def test_forward_ad_current_level_tells_a_forward_ad_level_apart():
    assert torch.autograd.forward_ad._current_level < 0 and not _ops.forward_ad_active()
    with torch.autograd.forward_ad.dual_level():
        assert torch.autograd.forward_ad._current_level >= 0 and _ops.forward_ad_active()
    assert not _ops.forward_ad_active()


def test_get_current_dispatch_mode_sees_a_dispatch_mode():
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    assert _get_current_dispatch_mode() is None
    mode = PassThroughMode()
    with mode:
        assert _get_current_dispatch_mode() is mode
    assert _ops._get_current_dispatch_mode is _get_current_dispatch_mode


def test_profiler_enabled_sees_the_profiler():
    assert not torch.autograd._profiler_enabled()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]):
        assert torch.autograd._profiler_enabled()
    assert not torch.autograd._profiler_enabled()


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
                                     torch._C._functorch.is_legacy_batchedtensor(grad)))
        return grad.expand(3)


def test_keep_graph_and_legacy_batched_grad_output_seen_in_backward():
    ProbeInBackward.seen.clear()
    x = torch.ones(3, requires_grad=True)
    torch.autograd.grad(ProbeInBackward.apply(x), x, retain_graph=True)
    torch.autograd.grad(ProbeInBackward.apply(x), x)
    torch.autograd.grad(ProbeInBackward.apply(x), x, torch.ones(4), is_grads_batched=True)
    assert ProbeInBackward.seen == [(True, False), (False, False), (False, True)]


def test_functorch_interpreters_count_forward_mode_levels():
    from torch._C._functorch import TransformType
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    counts = []

    def probe(x):
        levels = [i for i in retrieve_all_functorch_interpreters() if i.key() == TransformType.Jvp]
        counts.append(len(levels))
        return x

    x = torch.ones(2)
    torch.func.jvp(probe, (x,), (x,))
    torch.func.jvp(lambda y: torch.func.jvp(probe, (y,), (y,))[0], (x,), (x,))
    assert counts == [1, 2]
