"""The CUDA kernels' machine code, checked without a GPU: the sm_90 cubin of the build, read by
cuobjdump (bench/sass.py). Runs wherever the extension was built with its CUDA kernels for 9.0
(CI builds them); the numbers it guards are recorded in bench/NOTES.md."""

import re
import sys
from pathlib import Path

import pytest

import focal_cuda

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import sass  # noqa: E402

# 64K registers on an SM of sm_90, shared by the 4 resident blocks of 256 threads that every
# kernel's __launch_bounds__ and grid are sized for: 64 registers a thread.
MAX_REGISTERS = 64


def _built_for_sm90():
    info = focal_cuda.backends()
    return info["cuda"] and re.search(r"(^|;)9\.0", info["cuda_arch_list"] or "") is not None


pytestmark = [
    pytest.mark.skipif(not _built_for_sm90(), reason="needs a build with CUDA kernels for sm_90"),
    pytest.mark.skipif(sass.cuobjdump_path() is None, reason="needs cuobjdump (CUDA toolkit or triton)"),
]


@pytest.fixture(scope="module")
def kernels():
    found = sass.read_kernels(sass.installed_binary())
    assert len(found) == 190, f"{len(found)} sm_90 kernels in the build; update this count with the kernels"
    return found


def packed_forward_kernels(kernels):
    return {name: k for name, k in kernels.items()
            if name.startswith("void focal_forward_kernel") and sass.pack_of(k) > 1}


def loop_bodies(kernel):
    spans = sass.loops(kernel)
    assert spans, f"no packed grid-stride loop found in {kernel.name}"
    return [[t for a, t in kernel.instructions if first <= a <= last] for first, last in spans]


# SASS instructions per element a packed label loop may spend beyond the float-target loop of
# the same inputs dtype, gamma mode, gradients and weight handling without target gradient: the
# label loops compute every element as a negative, their only label work a read of the labels
# of the (at most two) rows a pack meets and a bit test per element; the labelled and ignored
# elements, and the scores' gradient, are a second launch's, over rows (bench/NOTES.md).
LABEL_LOOP_EXTRA = 8


def register_cap(name):
    """The registers a thread of the kernel may use: 64, or 128 for the float64 softmax kernels,
    whose launch bounds and grid are sized for 2 blocks per SM (csrc/cuda/softmax.cu)."""
    return 2 * MAX_REGISTERS if name.startswith("void softmax_focal_kernel<double,") else MAX_REGISTERS


def test_registers_fit_the_grid(kernels):
    too_many = {n: k.registers for n, k in kernels.items() if k.registers > register_cap(n)}
    assert not too_many, f"kernels above their register cap (a second wave): {too_many}"


def test_no_local_memory(kernels):
    """No spills, and no stack: the label kernels' out-of-line bad-label report prints the label
    from targets itself, without printf's argument buffer."""
    unexpected = {name: (kernel.stack, kernel.local) for name, kernel in kernels.items()
                  if kernel.stack or kernel.local}
    assert not unexpected, f"kernels with local memory (stack, local): {unexpected}"


def test_packed_loops_load_inputs_and_targets_in_16_byte_vectors(kernels):
    for name, kernel in packed_forward_kernels(kernels).items():
        x_type, t_type = [a.strip() for a in kernel.template_arguments.split(",")[:2]]
        pack = sass.pack_of(kernel)
        sizes = {"float": 4, "double": 8, "BFloat16": 2, "Half": 2}
        vectors = pack * sizes[x_type] // 16 + (0 if t_type == "long" else pack * sizes[t_type] // 16)
        for body in loop_bodies(kernel):
            wide = sum("LDG.E.128" in t for t in body)
            assert wide >= vectors, f"{name}: {wide} 128-bit loads per pack, expected {vectors}"


def weight_loop(body, pack):
    """Which weights a packed loop's body reads (csrc/cuda/forward.cuh's WeightLoop), told by its
    4-byte loads: "any" kind through the per-element switch (a load on each of its three paths,
    per element), one per "element", or "none" (labels load at most two scores a pack)."""
    loads = sum(bool(re.search(r"\bLDG\.E\s", t)) for t in body)
    return "any" if loads >= 3 * pack else "element" if loads >= pack else "none"


def test_packed_forward_kernels_have_a_loop_per_weight_kind(kernels):
    """Each packed forward kernel has a grid-stride loop for no weights, one for weights per
    element (neither with the per-element switch over the weight kinds; labels take the switch
    for those) and one for any kind; with floating targets each with and without the target
    gradient (the scores' gradient of labels is the second launch's). Fewer would mean the common
    cases lost their own loops; more, that the label loops were compiled twice."""
    wrong = {}
    for name, kernel in packed_forward_kernels(kernels).items():
        kinds = sorted(weight_loop(body, sass.pack_of(kernel)) for body in loop_bodies(kernel))
        expected = ["any", "none"] if ", long," in name else ["any"] * 2 + ["element"] * 2 + ["none"] * 2
        if kinds != expected:
            wrong[name] = kinds
    assert not wrong, wrong


# SASS instructions per element of the cheapest loop (no weights, no target gradient) of the
# packed kernels that store 16-bit results, gamma 0 or 2: the GPU's exp2 and reciprocal
# estimates unrefined, a shorter log1p (csrc/cuda/forward.cuh). At 4.2 TB/s and 3.3e13
# lane-instructions per second an H200 is memory-bound below ~7 instructions per byte: 35 and
# 45 keep the 4 and 6 bytes per element of a no-grad and a training forward near that.
SIXTEEN_BIT_LOOP_BUDGET = {False: 35, True: 45}  # by whether the kernel writes d(loss)/d(inputs)


def test_16_bit_loops_fit_their_budget(kernels):
    checked = 0
    for name, kernel in packed_forward_kernels(kernels).items():
        x_type, t_type, out_type, gamma_mode, grad_inputs, _ = [
            a.strip() for a in kernel.template_arguments.split(",")]
        if out_type not in ("BFloat16", "Half") or gamma_mode == "(GammaMode)2":
            continue
        cheapest = min(per for per, _ in sass.loop_summary(kernel, sass.pack_of(kernel)))
        budget = SIXTEEN_BIT_LOOP_BUDGET[grad_inputs == "true"]
        assert cheapest <= budget, f"{name}: {cheapest} SASS instructions per element, budget {budget}"
        checked += 1
    assert checked == 16, f"{checked} 16-bit kernels checked"


def test_label_check_is_out_of_the_hot_loop(kernels):
    for name, kernel in packed_forward_kernels(kernels).items():
        if ", long," not in name:
            continue
        for body in loop_bodies(kernel):
            inline_report = [t for t in body if re.search(r"\bCALL\.ABS", t)]
            assert not inline_report, f"{name}: printf/assert inlined in the packed loop: {inline_report[:3]}"


def test_no_local_memory_traffic_in_the_packed_loops(kernels):
    """Spilled values reloaded per pack would cost a load per iteration."""
    for name, kernel in packed_forward_kernels(kernels).items():
        for body in loop_bodies(kernel):
            spills = [t for t in body if re.search(r"\b(LDL|STL)\b", t)]
            assert not spills, f"{name}: local-memory traffic in the packed loop: {spills[:3]}"


def costs_by_weight_loop(kernel):
    """{weight loop: sorted SASS instructions per element of its loops}."""
    pack = sass.pack_of(kernel)
    costs = {}
    for body, (per_element, _) in zip(loop_bodies(kernel), sass.loop_summary(kernel, pack)):
        costs.setdefault(weight_loop(body, pack), []).append(per_element)
    return {kind: sorted(values) for kind, values in costs.items()}


def test_label_loops_cost_about_what_float_target_loops_do(kernels):
    """A label costs a bit test per element and a load per row, so a packed label loop must stay
    within LABEL_LOOP_EXTRA instructions per element of its float-target counterpart: the loop
    of the same weights (none, or any kind) without target gradient, the cheaper of the two."""
    packed = packed_forward_kernels(kernels)
    # By template arguments but the pack, which is 8 for float32 labels, 4 for float32 targets.
    by_arguments = {tuple(a.strip() for a in kernel.template_arguments.split(",")[:-1]): kernel
                    for kernel in packed.values()}
    checked = 0
    for arguments, kernel in by_arguments.items():
        x_type, t_type, out_type, *rest = arguments
        if t_type != "long":
            continue
        # Targets of the loss's dtype: the same math (the unrefined estimates for 16-bit results).
        partner = by_arguments[(x_type, out_type, out_type, *rest)]
        labels, floats = costs_by_weight_loop(kernel), costs_by_weight_loop(partner)
        for kind in ("none", "any"):
            assert labels[kind][0] - floats[kind][0] <= LABEL_LOOP_EXTRA, \
                f"{kernel.name}: {labels} against {floats} per element"
        checked += 1
    assert checked == 30, f"{checked} packed label kernels paired"
