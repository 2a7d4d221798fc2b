"""`python -m focal_cuda`: what was built, a correctness check on each device it can run, what
it did not check, and a timing against torchvision (or the plain-PyTorch reference without it).

Exits 0 and prints PASS when every check passes, else prints FAIL and exits 1.
"""

import argparse
import os
import sys
import time

import torch

import focal_cuda
from focal_cuda import reference

try:
    from torchvision.ops import sigmoid_focal_loss as torchvision_focal_loss
except ImportError:  # the plain-PyTorch reference stands in for the timing, and says so
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


def timed_rounds(steps, device, rounds):
    """Milliseconds of each step in each of `rounds` rounds, after one warm-up call each.

    The steps alternate within a round (their order flips every round), so a slow spell of a
    shared machine lands on both sides instead of skewing the ratio."""
    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    for step in steps:
        step()
    sync()
    times = [[] for _ in steps]
    for round_index in range(rounds):
        order = range(len(steps)) if round_index % 2 == 0 else reversed(range(len(steps)))
        for index in order:
            start = time.perf_counter()
            steps[index]()
            sync()
            times[index].append((time.perf_counter() - start) * 1e3)
    return times


def cpu_seconds():
    """(CPU seconds used by the whole machine, by this process) so far; the first is None where
    /proc/stat is not available (not Linux)."""
    ours = os.times().user + os.times().system
    try:
        with open("/proc/stat") as stat:
            ticks = [int(value) for value in stat.readline().split()[1:]]
    except OSError:
        return None, ours
    user, nice, system, _idle, _iowait, irq, softirq, steal = ticks[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK"), ours


def others_share(before, after, seconds):
    """Share of the machine's CPUs that other processes used between two cpu_seconds()."""
    if before[0] is None or after[0] is None:
        return None
    others = (after[0] - before[0]) - (after[1] - before[1])
    return max(others, 0.0) / (seconds * (os.cpu_count() or 1))


def spread(values):
    """(median, first quartile, third quartile) of a list of numbers: the middle half of the
    rounds, which one stall of a shared machine does not stretch as it does min-max."""
    ordered = sorted(values)
    count = len(ordered)
    return ordered[count // 2], ordered[count // 4], ordered[(3 * count) // 4]


def time_device(device, rounds):
    rows = 2_000_000 if device == "cuda" else 100_000
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(rows, 80, generator=generator).to(device).requires_grad_()
    t = (torch.rand(rows, 80, generator=generator) < 0.01).float().to(device)
    if torchvision_focal_loss is not None:
        other_name, other = "torchvision.ops.sigmoid_focal_loss", torchvision_focal_loss
    else:
        other_name, other = "focal_cuda.reference (plain PyTorch)", reference.sigmoid_focal_loss

    def step(function):
        def run():
            x.grad = None
            function(x, t, 0.25, 2.0, "sum").backward()

        return run

    before, start = cpu_seconds(), time.perf_counter()
    ours, theirs = timed_rounds([step(focal_cuda.sigmoid_focal_loss), step(other)], device, rounds)
    share = others_share(before, cpu_seconds(), time.perf_counter() - start)
    if share is None:
        load = "    load from other processes: not measured (no /proc/stat)"
    else:
        load = f"    other processes used {share:.0%} of the {os.cpu_count()} CPUs meanwhile" + (
            ": the timing is unreliable, rerun on a quiet machine" if share > 0.1 else "")
    ratios = [b / a for a, b in zip(ours, theirs)]
    (ours_ms, ours_low, ours_high), (theirs_ms, theirs_low, theirs_high) = spread(ours), spread(theirs)
    ratio, ratio_low, ratio_high = spread(ratios)
    return (
        f"  {device}: training step (forward + backward, reduction='sum') on {rows:,} x 80 float32, "
        f"median of {rounds} interleaved rounds (middle half of the rounds):\n"
        f"    focal_cuda {ours_ms:.2f} ms ({ours_low:.2f}-{ours_high:.2f})\n"
        f"    {other_name} {theirs_ms:.2f} ms ({theirs_low:.2f}-{theirs_high:.2f})\n"
        f"    speed-up {ratio:.1f}x (per round {ratio_low:.1f}x-{ratio_high:.1f}x)\n"
        f"{load}"
    )


def unchecked(info):
    """What this run does not exercise, and why."""
    lines = []
    if not torch.cuda.is_available():
        if info["cuda"]:
            lines.append("CUDA kernels: compiled, but no GPU is visible, so they did not run here")
        else:
            lines.append("CUDA kernels: not in this build, and no GPU is visible")
    others = [isa for isa in info["cpu_isas"].split(",") if isa != info["cpu_active_isa"]]
    if others:
        lines.append(f"CPU kernels {', '.join(others)}: compiled, not used on this CPU "
                     "(`pytest tests/test_build.py` runs each variant)")
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(  # not from __doc__, which python -OO drops
        prog="python -m focal_cuda",
        description="What was built, a correctness check on each device it can run, what it did "
                    "not check, and a timing against torchvision.")
    parser.add_argument("--no-timing", action="store_true", help="skip the timing (the checks only)")
    timing = not parser.parse_args(argv).no_timing
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
    for line in unchecked(info):
        print(f"not checked: {line}")

    if timing:
        print("speed:")
        for device in devices():
            print(time_device(device, rounds=50 if device == "cuda" else 21))
        if torchvision_focal_loss is None:
            print("  (torchvision is not installed: `pip install torchvision` to time against it)")

    print("PASS" if not failures else "FAIL")
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
