"""What the build reports, and every compiled CPU kernel variant computing the same loss."""

import json
import os
import subprocess
import sys

import pytest
import torch

import focal_cuda


def test_version_and_backends():
    info = focal_cuda.backends()
    assert focal_cuda.__version__ == info["version"]
    assert set(info) >= {"cuda", "cuda_version", "cuda_arch_list", "cpu_isas", "cpu_active_isa", "cuda_available"}
    assert info["cpu_active_isa"] in info["cpu_isas"].split(",")
    assert info["cuda_available"] == torch.cuda.is_available()  # the machine's, not the build's
    if info["cuda"]:
        assert info["cuda_arch_list"], "a CUDA build names the architectures it was compiled for"


CHECK_SCRIPT = """
import json, sys, torch, focal_cuda
sys.path.insert(0, TESTS_DIR)
from conftest import float32_ulp, worst_float32_softplus_sigmoid_ulp
g = torch.Generator().manual_seed(0)
x = (torch.randn(1000, 80, generator=g, dtype=torch.float64) * 4).requires_grad_()
t = (torch.rand(1000, 80, generator=g) < 0.1).double()
results = {}
for dtype in (torch.float32, torch.float64, torch.bfloat16):
    xd = x.detach().to(dtype).requires_grad_()
    loss = focal_cuda.sigmoid_focal_loss(xd, t.to(dtype), 0.25, 1.5, "sum")
    loss.backward()
    results[str(dtype)] = [loss.item(), xd.grad.double().abs().sum().item()]
# Soft targets near 1 at positive logits (and near 0 at negative ones): CE's linear part,
# (1 - t) x, must not come from x - t x, which cancels where no fused multiply-add rounds once.
k = torch.arange(1, 21, dtype=torch.float64)
xs = torch.linspace(0.5, 30, 50, dtype=torch.float64).reshape(-1, 1)
soft_x = torch.cat([xs.expand(-1, 20), -xs.expand(-1, 20)]).float()
soft_t = torch.cat([(1 - 2.0 ** -k).expand(50, -1), (2.0 ** -k).expand(50, -1)]).float()
ce = focal_cuda.sigmoid_focal_loss(soft_x, soft_t, -1, 0.0, "none").double()
x64, t64 = soft_x.double(), soft_t.double()
exact = torch.log1p(torch.exp(-x64.abs())) + torch.where(x64 >= 0, (1 - t64) * x64, -t64 * x64)
soft_ulp = ((ce - exact).abs() / float32_ulp(exact)).max().item()
isa = focal_cuda.backends()["cpu_active_isa"]
print(json.dumps({"isa": isa, "results": results, "worst_ulp": worst_float32_softplus_sigmoid_ulp("cpu"),
                  "soft_target_ulp": soft_ulp}))
"""


def run_with_capability(capability, cwd):
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
    # Run outside the source tree, so that the installed package is the one imported.
    script = CHECK_SCRIPT.replace("TESTS_DIR", repr(os.path.dirname(__file__)))
    output = subprocess.run(
        [sys.executable, "-c", script], env=env, cwd=cwd, capture_output=True, text=True, check=True
    ).stdout
    return json.loads(output.strip().splitlines()[-1])


ISA_ORDER = ["DEFAULT", "AVX2", "AVX512"]


def test_every_compiled_cpu_variant_agrees(tmp_path):
    machine = torch.backends.cpu.get_cpu_capability()
    machine_level = ISA_ORDER.index(machine) if machine in ISA_ORDER else 0
    runnable = [
        isa for isa in focal_cuda.backends()["cpu_isas"].split(",")
        if ISA_ORDER.index(isa) <= machine_level
    ]
    runs = {isa: run_with_capability(isa.lower(), tmp_path) for isa in runnable}
    baseline = runs["DEFAULT"]["results"]
    for isa, run in runs.items():
        assert run["isa"] == isa, f"ATEN_CPU_CAPABILITY={isa.lower()} should select the {isa} kernels"
        assert run["worst_ulp"] <= 4, (isa, run["worst_ulp"])
        assert run["soft_target_ulp"] <= 4, (isa, run["soft_target_ulp"])
        for dtype, values in run["results"].items():
            rtol = 1e-2 if "bfloat16" in dtype else 1e-5
            assert values == pytest.approx(baseline[dtype], rel=rtol), (isa, dtype)
