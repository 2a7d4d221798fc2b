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

MAX_REGISTERS = 64  # 256 threads x 4 blocks (kMaxBlocksPerSM) in sm_90's 64K registers


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
    assert len(found) == 168, f"{len(found)} sm_90 kernels in the build; update this count with the kernels"
    return found


def packed_forward_kernels(kernels):
    return {name: k for name, k in kernels.items()
            if name.startswith("void focal_forward_kernel") and sass.pack_of(k) > 1}


def loop_bodies(kernel):
    spans = sass.loops(kernel)
    assert spans, f"no packed grid-stride loop found in {kernel.name}"
    return [[t for a, t in kernel.instructions if first <= a <= last] for first, last in spans]


# Under the register cap some kernels spill (bench/NOTES.md records which and how much): the
# float64 kernels, the label kernels that carry the scores' gradient and the family's code next to
# the focal loss's, and two 16-bit float-target kernels. The float-target kernels of the 32- and
# 16-bit training and inference paths must not; the others are held to the stack they use now.
SPILLING = {
    "focal_forward_kernel<BFloat16, BFloat16, BFloat16, (GammaMode)2, true, 8>": 16,
    "focal_forward_kernel<Half, Half, Half, (GammaMode)2, true, 8>": 16,
}
MAX_STACK_LABELS_OR_FLOAT64 = 144


def instance(kernel):
    return kernel.name[len("void "):kernel.name.index(">(") + 1]


def labels_or_float64(name):
    return ", long," in name or "<double," in name


def test_registers_fit_the_grid(kernels):
    too_many = {n: k.registers for n, k in kernels.items() if k.registers > MAX_REGISTERS}
    assert not too_many, f"kernels above {MAX_REGISTERS} registers (a second wave): {too_many}"


def test_stack_only_where_known(kernels):
    unexpected = {}
    for name, kernel in kernels.items():
        allowed = MAX_STACK_LABELS_OR_FLOAT64 if labels_or_float64(name) else SPILLING.get(instance(kernel), 0)
        if kernel.local or kernel.stack > allowed:
            unexpected[name] = (kernel.stack, kernel.local)
    assert not unexpected, f"kernels with unexpected local memory (stack, local): {unexpected}"
    present = {instance(k) for k in kernels.values()}
    assert set(SPILLING) <= present, f"SPILLING names instances the build lacks: {set(SPILLING) - present}"


def test_packed_loops_load_inputs_and_targets_in_16_byte_vectors(kernels):
    for name, kernel in packed_forward_kernels(kernels).items():
        x_type, t_type = [a.strip() for a in kernel.template_arguments.split(",")[:2]]
        pack = sass.pack_of(kernel)
        sizes = {"float": 4, "double": 8, "BFloat16": 2, "Half": 2}
        vectors = 1 + (0 if t_type == "long" else pack * sizes[t_type] // 16)
        for body in loop_bodies(kernel):
            wide = sum("LDG.E.128" in t for t in body)
            assert wide >= vectors, f"{name}: {wide} 128-bit loads per pack, expected {vectors}"


def test_label_check_is_out_of_the_hot_loop(kernels):
    for name, kernel in packed_forward_kernels(kernels).items():
        if ", long," not in name:
            continue
        for body in loop_bodies(kernel):
            inline_report = [t for t in body if re.search(r"\bCALL\.ABS", t)]
            assert not inline_report, f"{name}: printf/assert inlined in the packed loop: {inline_report[:3]}"


def test_no_spills_in_the_float_target_loops(kernels):
    """No local-memory traffic in the packed loops of the 32- and 16-bit float-target kernels
    but SPILLING's."""
    for name, kernel in packed_forward_kernels(kernels).items():
        if labels_or_float64(name) or instance(kernel) in SPILLING:
            continue
        for body in loop_bodies(kernel):
            spills = [t for t in body if re.search(r"\b(LDL|STL)\b", t)]
            assert not spills, f"{name}: local-memory traffic in the packed loop: {spills[:3]}"
