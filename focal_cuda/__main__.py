"""`python -m focal_cuda`: what was built, a correctness check on every device, a quick timing.

Exits 0 and prints PASS when every check passes, else prints FAIL and exits 1.
"""

import sys
import time

import torch

import focal_cuda
from focal_cuda import reference

try:
    from torchvision.ops import sigmoid_focal_loss as torchvision_focal_loss
except ImportError:  # the composite reference stands in for the timing
    torchvision_focal_loss = None

CHECK_TOLERANCE = {
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
    torch.float32: 2e-5,
    torch.float64: 1e-10,
}


def devices():
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() and focal_cuda.backends()["cuda"] else [])


def check_device(device):
    """Loss and gradient against the float64 reference for every dtype, reduction, a few gammas."""
    failures = []
    generator = torch.Generator().manual_seed(0)
    x64 = torch.randn(301, 80, generator=generator, dtype=torch.float64) * 4
    t64 = (torch.rand(301, 80, generator=generator) < 0.05).double()
    for dtype, rtol in CHECK_TOLERANCE.items():
        for gamma in (0.0, 0.5, 2.0):
            for reduction in ("none", "mean", "sum"):
                x = x64.to(device=device, dtype=dtype).detach().requires_grad_()
                t = t64.to(device=device, dtype=dtype)
                loss = focal_cuda.sigmoid_focal_loss(x, t, 0.25, gamma, reduction)
                loss.backward(torch.ones_like(loss))
                xr = x.detach().double().requires_grad_()
                expected = reference.sigmoid_focal_loss(xr, t.double(), 0.25, gamma, reduction)
                expected.backward(torch.ones_like(expected))
                for name, ours, ref in (("loss", loss, expected), ("grad", x.grad, xr.grad)):
                    ok = torch.isfinite(ours).all() and torch.allclose(
                        ours.double(), ref.detach(), rtol=rtol, atol=1e-5
                    )
                    if not ok:
                        failures.append(f"{device} {dtype} gamma={gamma} {reduction}: {name} differs")
    return failures


def median_ms(step, device, repeats):
    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    step()  # warm-up
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def time_device(device):
    rows = 2_000_000 if device == "cuda" else 100_000
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(rows, 80, generator=generator).to(device).requires_grad_()
    t = (torch.rand(rows, 80, generator=generator) < 0.01).float().to(device)
    other_name = "torchvision" if torchvision_focal_loss else "reference (torchvision missing)"
    other = torchvision_focal_loss or reference.sigmoid_focal_loss

    def step(function):
        def run():
            x.grad = None
            function(x, t, 0.25, 2.0, "sum").backward()

        return run

    repeats = 20 if device == "cuda" else 5
    ours = median_ms(step(focal_cuda.sigmoid_focal_loss), device, repeats)
    theirs = median_ms(step(other), device, repeats)
    return (
        f"  {device}: {rows} x 80 float32, forward + backward, reduction='sum': "
        f"focal_cuda {ours:.2f} ms, {other_name} {theirs:.2f} ms ({theirs / ours:.1f}x)"
    )


def main():
    info = focal_cuda.backends()
    print(f"focal_cuda {focal_cuda.__version__}")
    print(f"torch {torch.__version__}, CUDA runtime of torch: {torch.version.cuda or 'none'}")
    cuda_line = (
        f"yes (CUDA {info['cuda_version']}, architectures {info['cuda_arch_list']})"
        if info["cuda"] else "no (CPU-only build)"
    )
    print(f"CUDA kernels compiled: {cuda_line}")
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none visible"
    print(f"GPU: {gpu}")
    print(f"CPU kernels compiled: {info['cpu_isas']}; in use: {info['cpu_active_isa']}; "
          f"threads: {torch.get_num_threads()}")

    failures = []
    if torch.cuda.is_available() and not info["cuda"]:
        failures.append("a GPU is visible but this build has no CUDA kernels: rebuild with "
                        "FORCE_CUDA=1 pip install --no-build-isolation .")
    for device in devices():
        device_failures = check_device(device)
        status = "ok" if not device_failures else f"{len(device_failures)} failures"
        print(f"correctness on {device} (4 dtypes x 3 gammas x 3 reductions vs reference): {status}")
        failures += device_failures
    for failure in failures:
        print(f"  {failure}")

    print("speed:")
    for device in devices():
        print(time_device(device))

    print("PASS" if not failures else "FAIL")
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
