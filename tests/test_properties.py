"""Random property tests: any shape, any strides, any values agree with the reference."""

import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import focal_cuda
from conftest import CUDA_AVAILABLE, DTYPES, REDUCTIONS, assert_matches, derivative_term_scales, reference_results

DEVICE_NAMES = ["cpu", "cuda"] if CUDA_AVAILABLE else ["cpu"]


@st.composite
def strided_cases(draw):
    """A tensor pair viewed through a random permutation and random slicing steps/offsets."""
    rank = draw(st.integers(0, 4))
    base_shape = draw(st.lists(st.integers(0, 9), min_size=rank, max_size=rank))
    permutation = draw(st.permutations(range(rank)))
    slices = [
        slice(draw(st.integers(0, 2)), None, draw(st.integers(1, 3))) for _ in range(rank)
    ]
    return base_shape, permutation, slices


@settings(max_examples=150, deadline=None)
@given(
    case=strided_cases(),
    dtype=st.sampled_from(DTYPES),
    device=st.sampled_from(DEVICE_NAMES),
    reduction=st.sampled_from(REDUCTIONS),
    alpha=st.one_of(st.floats(0, 1), st.just(-1.0)),
    gamma=st.one_of(st.floats(0, 5), st.sampled_from([0.0, 1.0, 2.0])),
    scale=st.sampled_from([0.1, 3.0, 30.0]),
    soft=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_matches_reference_on_random_views(case, dtype, device, reduction, alpha, gamma, scale, soft, seed):
    base_shape, permutation, slices = case
    generator = torch.Generator().manual_seed(seed)
    base_x = torch.randn(base_shape, generator=generator, dtype=torch.float64) * scale
    # A known limit, pinned by test_extremes.py::test_target_gradient_where_q_is_subnormal_and_
    # gamma_below_one (strict xfail): on CPU, float32 math flushes a q = 1 - p_t below the
    # smallest normal (|x| beyond ~87) to 0, losing a target gradient |x| q^gamma for gamma < 1.
    assume(not (device == "cpu" and dtype != torch.float64 and gamma < 1 and bool((base_x.abs() > 87).any())))
    if soft:
        base_t = torch.rand(base_shape, generator=generator, dtype=torch.float64)
    else:
        base_t = (torch.rand(base_shape, generator=generator) < 0.5).double()
    view = lambda tensor: tensor.to(device=device, dtype=dtype).permute(permutation)[tuple(slices)]
    inputs, targets = view(base_x), view(base_t)

    # Differentiate with respect to the views themselves (leaves with their odd strides).
    x_view, t_view = inputs.detach().requires_grad_(), targets.detach().requires_grad_()
    loss = focal_cuda.sigmoid_focal_loss(x_view, t_view, alpha, gamma, reduction)
    assert loss.shape == (inputs.shape if reduction == "none" else ())
    if inputs.numel() == 0:
        return
    grad_output = torch.ones_like(loss)
    grad_x, grad_t = torch.autograd.grad(loss, (x_view, t_view), grad_output)
    ref_loss, ref_grad_x, ref_grad_t = reference_results(inputs, targets, alpha, gamma, reduction)
    assert torch.isfinite(loss).all() and torch.isfinite(grad_x).all() and torch.isfinite(grad_t).all()
    assert_matches(loss, ref_loss)
    # The derivatives sum terms that cancel (e.g. d/dt = (2 alpha - 1) CE - alpha_t x at a soft
    # target): their rounding is relative to the terms' magnitudes, not to the result.
    scale_x, scale_t = derivative_term_scales(inputs, targets, alpha, gamma, reduction=reduction,
                                              grad_output=grad_output)
    assert_matches(grad_x, ref_grad_x, scale=scale_x)
    assert_matches(grad_t, ref_grad_t, scale=scale_t)
