"""`python -m focal_cuda`: what was built, a check of every loss's values and gradient on each
device it can run, what it did not check, and a timing against torchvision (or the plain-PyTorch
reference without it).

Exits 0 and prints PASS when every check passes, else prints FAIL and exits 1.
"""

import argparse
import os
import statistics
import sys
import time

import torch

import focal_cuda
from focal_cuda import reference

try:
    from torchvision.ops import sigmoid_focal_loss as torchvision_focal_loss
except ImportError:  # the plain-PyTorch reference stands in for the timing, and says so
    torchvision_focal_loss = None

# Relative error allowed per storage dtype: of each value against its float64 reference, plus the
# same share of the tensor's largest reference value (values near 0 and 16-bit subnormal gradients
# are judged on the tensor's scale). A check that the build works, coarser than the suite's bounds:
# a few ulp of 16-bit storage; the rounding of float32 and float64 sums of 24,000 terms.
CHECK_TOLERANCE = {
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
    torch.float32: 2e-5,
    torch.float64: 1e-10,
}
REDUCTIONS = ("none", "mean", "sum")
ROWS, CLASSES = 301, 80


def devices(info):
    return ["cpu"] + (["cuda"] if info["cuda_available"] and info["cuda"] else [])


def check_cases(generator):
    """(name, loss function's name, targets, options) for each kind of work the kernels do: float
    targets at gammas with code paths of their own, class labels with ignored rows and a class
    weight, each family form, the family's (labels, scores) pairs, softmax labels and
    probabilities. Tensors in float64, on the CPU."""
    hard = (torch.rand(ROWS, CLASSES, generator=generator) < 0.05).double()
    labels = torch.randint(0, CLASSES + 1, (ROWS,), generator=generator)  # CLASSES: background
    labels[::10] = -100
    scores = torch.rand(ROWS, generator=generator, dtype=torch.float64)
    weight = torch.rand(CLASSES, generator=generator, dtype=torch.float64) + 0.5
    classes = torch.randint(0, CLASSES, (ROWS,), generator=generator)
    classes[::10] = -100
    probabilities = torch.randn(ROWS, CLASSES, generator=generator, dtype=torch.float64).softmax(1)
    return [
        *[(f"sigmoid_focal_loss gamma={gamma}", "sigmoid_focal_loss", hard, dict(alpha=0.25, gamma=gamma))
          for gamma in (0.0, 0.5, 2.0)],
        ("sigmoid_focal_loss labels, weight", "sigmoid_focal_loss", labels, dict(alpha=0.25, weight=weight)),
        ("sigmoid_focal_loss_star", "sigmoid_focal_loss_star", hard, dict(gamma=2.0, beta=1.0)),
        ("quality_focal_loss (labels, scores)", "quality_focal_loss", (labels, scores), {}),
        ("varifocal_loss (labels, scores)", "varifocal_loss", (labels, scores), {}),
        ("softmax_focal_loss labels, weight", "softmax_focal_loss", classes, dict(weight=weight)),
        ("softmax_focal_loss probabilities", "softmax_focal_loss", probabilities, {}),
    ]


def on(value, device, dtype):
    """value (a tensor, a (labels, scores) pair, a number) on device, floating tensors in dtype."""
    if isinstance(value, tuple):
        return tuple(on(part, device, dtype) for part in value)
    if isinstance(value, torch.Tensor):
        return value.to(device, dtype if value.is_floating_point() else value.dtype)
    return value


def loss_and_gradient(function, inputs, targets, options, reduction):
    inputs = inputs.detach().requires_grad_()
    loss = function(inputs, targets, reduction=reduction, **options)
    loss.backward(torch.ones_like(loss))
    return loss.detach(), inputs.grad


def check_device(device):
    """(checks run, failures): each case's loss and d(loss)/d(inputs) in every dtype and
    reduction against the float64 reference formula on the same rounded operands. A case that
    raises is a failure, and the others still run."""
    generator = torch.Generator().manual_seed(0)
    x64 = torch.randn(ROWS, CLASSES, generator=generator, dtype=torch.float64) * 4
    cases = check_cases(generator)
    failures = []
    for dtype, rtol in CHECK_TOLERANCE.items():
        for name, function, targets, options in cases:
            operands = [on(value, device, dtype) for value in (x64, targets, options)]
            exact = [on(value, device, torch.float64) for value in operands]
            for reduction in REDUCTIONS:
                where = f"{device} {dtype} {name} {reduction}"
                try:
                    ours = loss_and_gradient(getattr(focal_cuda, function), *operands, reduction)
                    expected = loss_and_gradient(getattr(reference, function), *exact, reduction)
                except Exception as error:  # reported, so that the remaining checks still run
                    first_line = str(error).partition("\n")[0]
                    failures.append(f"{where}: raised {type(error).__name__}: {first_line}")
                else:
                    for what, value, wanted in zip(("loss", "gradient"), ours, expected):
                        scale = wanted.abs().max().item()
                        if not torch.allclose(value.double(), wanted, rtol=rtol, atol=rtol * scale):
                            failures.append(f"{where}: {what} differs")
    return len(CHECK_TOLERANCE) * len(cases) * len(REDUCTIONS), failures


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
    times = os.times()
    ours = times.user + times.system
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
    """(median, first quartile, third quartile) of at least two numbers: the middle half of the
    rounds, which one stall of a shared machine does not stretch as it does min-max."""
    first, median, third = statistics.quantiles(values, n=4, method="inclusive")
    return median, first, third


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
    if not info["cuda_available"]:
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
        description="What was built, a check of every loss's values and gradient on each device it "
                    "can run, what it did not check, and a timing against torchvision.")
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
    gpu = torch.cuda.get_device_name() if info["cuda_available"] else "none visible"
    print(f"GPU: {gpu}")
    print(f"CPU kernels compiled: {info['cpu_isas']}; in use: {info['cpu_active_isa']}; "
          f"threads: {torch.get_num_threads()}")

    failures = []
    if info["cuda_available"] and not info["cuda"]:
        failures.append("a GPU is visible but this build has no CUDA kernels: rebuild with "
                        "FORCE_CUDA=1 pip install --no-build-isolation .")
    for device in devices(info):
        checks, device_failures = check_device(device)
        print(f"correctness on {device}: {checks - len(device_failures)} of {checks} checks ok "
              f"(each loss form and target kind in {len(CHECK_TOLERANCE)} dtypes and {len(REDUCTIONS)} "
              "reductions, loss and gradient against the float64 reference)")
        failures += device_failures
    for failure in failures:
        print(f"  {failure}")
    for line in unchecked(info):
        print(f"not checked: {line}")

    if timing:
        print("speed:")
        for device in devices(info):
            print(time_device(device, rounds=50 if device == "cuda" else 21))
        if torchvision_focal_loss is None:
            print("  (torchvision is not installed: `pip install torchvision` to time against it)")

    print("PASS" if not failures else "FAIL")
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
