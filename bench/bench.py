"""Benchmark focal_cuda against torchvision's sigmoid_focal_loss, eager and compiled.

    python bench/bench.py --device cpu            # default CPU sweep, a few minutes on 2 cores
    python bench/bench.py --device cuda           # 1e4 .. 1.6e8 elements
    python bench/bench.py --tiny                  # per-call overhead: 80 .. 1e4 elements

For every size (rows x 80 classes) and implementation it times a training step (forward +
backward, reduction="sum" by default) and a no-grad forward, interleaving the implementations in
one process after a warm-up, and reports the median and the spread (min, max) of the repeats, the
time per element, the effective bandwidth of the bytes each design must move against the
measured copy bandwidth (and the time's ratio to that floor), the peak memory of a training step
above the inputs, and speedups. --tiny times sizes where the per-call overhead is the cost, each
sample the mean of many back-to-back calls, with two yardsticks beside: a bare autograd.Function
(focal_cuda's training step / its step is printed) and a plain (x * t).sum() (the no-grad call /
its call). `--reduction sum none` times each reduction in the same interleaved rounds and prints
the no-grad ratio between them; the first one is plotted and gives the peak memory and the
per-call ratios. Writes results.json, then (with matplotlib) plot.png, to --out.
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import focal_cuda

# Checked before minutes of timing, not when the results are plotted.
try:
    import torchvision
    from torchvision.ops import sigmoid_focal_loss as torchvision_focal_loss
except ImportError as error:
    sys.exit(f"the benchmark needs {error.name} (it compares with torchvision): "
             "pip install -r requirements-bench.txt")
try:
    import matplotlib
except ImportError:  # a machine without network (a lent GPU) may lack it: the timings still count
    matplotlib = None

CLASSES = 80
DEFAULT_ROWS = {
    "cpu": [125, 1_250, 12_500, 100_000],
    "cuda": [125, 1_250, 12_500, 125_000, 500_000, 2_000_000],
}
TINY_ROWS = [1, 12, 125]  # 80 .. 1e4 elements
TINY_CALLS = 200  # back-to-back calls per timed sample


def element_bytes(dtype):
    return torch.tensor([], dtype=dtype).element_size()


# Each implementation takes (logits, float one-hot targets, integer labels, gamma, reduction)
# and uses the targets it is designed for.
def focal_float(x, targets, labels, gamma, reduction):
    return focal_cuda.sigmoid_focal_loss(x, targets, 0.25, gamma, reduction)


def focal_labels(x, targets, labels, gamma, reduction):
    return focal_cuda.sigmoid_focal_loss(x, labels, 0.25, gamma, reduction)


def torchvision_eager(x, targets, labels, gamma, reduction):
    return torchvision_focal_loss(x, targets, 0.25, gamma, reduction)


def torchvision_one_hot(x, targets, labels, gamma, reduction):
    """What a labels user of torchvision writes: build the one-hot, then the loss."""
    one_hot = torch.nn.functional.one_hot(labels, CLASSES + 1)[:, :CLASSES].to(x.dtype)
    return torchvision_focal_loss(x, one_hot, 0.25, gamma, reduction)


IMPLEMENTATIONS = {
    "focal_cuda": focal_float,
    "focal_cuda labels": focal_labels,
    "torchvision": torchvision_eager,
    "torchvision+compile": torchvision_eager,
    "torchvision+compile one-hot": torchvision_one_hot,
}
COMPILED = {"torchvision+compile", "torchvision+compile one-hot"}


class BareFunction(torch.autograd.Function):
    """The least a custom autograd.Function costs per call: a forward and a backward of one
    small expression each, no checks (the yardstick of focal_cuda's per-call cost)."""

    @staticmethod
    def forward(ctx, x, t):
        ctx.save_for_backward(t)
        return (x * t).sum()

    @staticmethod
    def backward(ctx, grad):
        (t,) = ctx.saved_tensors
        return grad * t, None


def bare_function(x, targets, labels, gamma, reduction):
    return BareFunction.apply(x, targets)


def plain_product(x, targets, labels, gamma, reduction):
    return (x * targets).sum()


# Timed beside the losses with --tiny: focal_cuda's training step against the bare Function's,
# its no-grad call against a plain expression's.
BASELINES = {"bare autograd.Function": bare_function, "(x * t).sum()": plain_product}


def design_bytes(name, dtype, reduction):
    """Bytes per element the fused design must move: a training step (train_step's, whose
    backward() gives the loss a gradient of 1), a no-grad forward."""
    size = element_bytes(dtype)
    label = 8 / CLASSES  # one int64 label per row of CLASSES logits
    loss = size if reduction == "none" else 0  # the loss of every element written
    # The backward reads and writes the saved gradient where it scales it: by the mean's 1 / count
    # here; a factor of 1 (sum, none) leaves it as it is.
    backward = 2 * size if reduction == "mean" else 0
    if name == "focal_cuda":
        # forward: read x, t, write the saved gradient.
        return 3 * size + backward + loss, 2 * size + loss
    if name == "focal_cuda labels":
        # The same with one label per row in place of a target per element.
        return 2 * size + label + backward + loss, size + label + loss
    return None, None


def synchronize(device):
    if device == "cuda":
        torch.cuda.synchronize()


class Timer:
    """Wall time per call of `calls` back-to-back calls, in ms: CUDA events on GPU,
    perf_counter on CPU."""

    def __init__(self, device, calls=1):
        self.device = device
        self.calls = calls

    def __call__(self, fn):
        if self.device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(self.calls):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / self.calls
        start = time.perf_counter()
        for _ in range(self.calls):
            fn()
        return (time.perf_counter() - start) * 1e3 / self.calls


def copy_bandwidth_gbs(device, numel=50_000_000):
    """Device-to-device (or memory-to-memory on CPU) copy bandwidth: bytes read + written."""
    src = torch.empty(numel, device=device, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    timer = Timer(device)
    for _ in range(3):
        dst.copy_(src)
    synchronize(device)
    times = [timer(lambda: dst.copy_(src)) for _ in range(10)]
    return 2 * src.numel() * src.element_size() / (statistics.median(times) * 1e-3) / 1e9


def make_inputs(rows, device, dtype, seed=0):
    """Logits, and the same targets as labels (class CLASSES = background) and as a one-hot."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, CLASSES, generator=generator).to(device=device, dtype=dtype)
    labels = torch.randint(0, CLASSES + 1, (rows,), generator=generator)
    labels[torch.rand(rows, generator=generator) < 0.9] = CLASSES  # mostly background anchors
    t = torch.nn.functional.one_hot(labels, CLASSES + 1)[:, :CLASSES].to(dtype)
    return x, t.to(device), labels.to(device)


def train_step(fn, x, t, labels, gamma, reduction):
    def run():
        x.grad = None
        loss = fn(x, t, labels, gamma, reduction)
        (loss if loss.dim() == 0 else loss.sum()).backward()

    return run


def forward_only(fn, x, t, labels, gamma, reduction):
    def run():
        with torch.no_grad():
            fn(x, t, labels, gamma, reduction)

    return run


def process_status(key):
    """A field of /proc/self/status in bytes (Linux)."""
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def peak_rss_of(step):
    """The process's peak RSS while step runs, above its RSS before (Linux)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak RSS (VmHWM) to the current RSS
    baseline = process_status("VmRSS:")
    step()
    return process_status("VmHWM:") - baseline


PEAK_MEMORY_SCRIPT = r"""
import gc, json, os, sys, torch
sys.path.insert(0, sys.argv[1])
import bench
name, rows, dtype, gamma, reduction = sys.argv[2], int(sys.argv[3]), getattr(torch, sys.argv[4]), float(sys.argv[5]), sys.argv[6]
fn = bench.implementation(name)
x, t, labels = bench.make_inputs(rows, "cpu", dtype)
x.requires_grad_()
step = bench.train_step(fn, x, t, labels, gamma, reduction)
step(); step()          # warm-up (and compilation) outside the measured window
x.grad = None
gc.collect()
print(json.dumps({"peak_extra_bytes": bench.peak_rss_of(step)}))
"""


def cpu_peak_extra_bytes(name, rows, dtype, gamma, reduction):
    """Peak RSS of a training step above the inputs, in a fresh process per implementation."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")  # freed buffers go back to the OS
    result = subprocess.run(
        [sys.executable, "-c", PEAK_MEMORY_SCRIPT, str(Path(__file__).parent), name, str(rows),
         str(dtype).split(".")[1], str(gamma), reduction],
        capture_output=True, text=True, env=env,
    )
    if result.returncode != 0:
        raise RuntimeError(f"peak memory measurement of {name} failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_extra_bytes"]


def cuda_peak_extra_bytes(step, inputs):
    """The allocator's peak during step above what was allocated before it: the inputs'
    gradient freed first, as step frees it (a baseline holding it would hide one buffer)."""
    step()
    inputs.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    baseline = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - baseline


_COMPILED = {}


def implementation(name):
    if name in COMPILED:
        if name not in _COMPILED:
            _COMPILED[name] = torch.compile(IMPLEMENTATIONS[name])
        return _COMPILED[name]
    return IMPLEMENTATIONS[name] if name in IMPLEMENTATIONS else BASELINES[name]


def describe_machine(device):
    info = {
        "date": datetime.date.today().isoformat(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "torchvision": torchvision.__version__,
        "focal_cuda": focal_cuda.__version__,
        "focal_cuda_backends": focal_cuda.backends(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "device": device,
    }
    try:
        model = next(line for line in open("/proc/cpuinfo") if line.startswith("model name"))
        info["cpu"] = model.split(":", 1)[1].strip()
    except (OSError, StopIteration):
        pass
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    info["commit"] = source_commit()
    return info


SOURCE_PATHS = ["csrc", "focal_cuda", "setup.py", "bench/bench.py"]


def source_commit():
    """The git commit of the benchmarked source, marked dirty when the source differs from it
    (results already written under bench/results do not count); outside a git checkout (the GPU
    machine's copy) the COMMIT its caller names, else None."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", *SOURCE_PATHS], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("COMMIT")
    return commit + ("-dirty" if dirty else "")


def run(args):
    device, dtype = args.device, getattr(torch, args.dtype)
    # Each reduction and grad mode is a compiled version of its own, at two sizes (static, then
    # dynamic): past Dynamo's limit of 8 per function a third reduction would run eagerly.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit,
                                                4 * len(args.reduction))
    names = list(IMPLEMENTATIONS) + (list(BASELINES) if args.tiny else [])
    timer = Timer(device, calls=TINY_CALLS if args.tiny else 1)
    copy_gbs = copy_bandwidth_gbs(device)
    print(f"copy bandwidth on {device}: {copy_gbs:.1f} GB/s", flush=True)
    cases = []
    overheads = []  # --tiny: focal_cuda's per-call cost against the baselines
    for rows in args.rows:
        numel = rows * CLASSES
        x, t, labels = make_inputs(rows, device, dtype)
        x.requires_grad_()
        steps = {}
        for reduction in args.reduction:
            for name in names:
                fn = implementation(name)
                steps[(name, "train", reduction)] = train_step(fn, x, t, labels, args.gamma, reduction)
                steps[(name, "forward", reduction)] = forward_only(fn, x, t, labels, args.gamma,
                                                                   reduction)
        for step in steps.values():  # warm-up, compilation included
            for _ in range(args.warmup):
                step()
        synchronize(device)
        samples = {key: [] for key in steps}
        for _ in range(args.repeats):  # interleaved: each round times every implementation once
            for key, step in steps.items():
                samples[key].append(timer(step))
        for (name, mode, reduction), times in samples.items():
            median = statistics.median(times)
            train_bytes, forward_bytes = design_bytes(name, dtype, reduction)
            per_element = train_bytes if mode == "train" else forward_bytes
            moved = None if per_element is None else per_element * numel
            effective_gbs = None if moved is None else moved / (median * 1e-3) / 1e9
            case = {
                "implementation": name, "mode": mode, "rows": rows, "classes": CLASSES,
                "elements": numel, "dtype": args.dtype, "gamma": args.gamma,
                "reduction": reduction, "calls_per_sample": timer.calls,
                "median_ms": median, "min_ms": min(times),
                "max_ms": max(times), "ns_per_element": median * 1e6 / numel,
                "design_bytes": moved,
                "effective_gbs": effective_gbs,
                "copy_fraction": None if effective_gbs is None else effective_gbs / copy_gbs,
            }
            cases.append(case)
        print(f"{numel:>11,} elements: median (min-max) {'us' if args.tiny else 'ms'} per call", flush=True)
        unit = 1e3 if args.tiny else 1.0
        first = args.reduction[0]  # gives the peak memory and the per-call ratios
        for reduction in args.reduction:
            for mode in ("train", "forward"):
                for name in names:
                    times = samples[(name, mode, reduction)]
                    case = next(c for c in cases if c["implementation"] == name and c["mode"] == mode
                                and c["rows"] == rows and c["reduction"] == reduction)
                    floor = "" if case["copy_fraction"] is None else f", {1 / case['copy_fraction']:.2f}x its floor"
                    print(f"    {reduction:<4} {mode:<8} {name:<28} {statistics.median(times) * unit:9.3f} "
                          f"({min(times) * unit:.3f}-{max(times) * unit:.3f}){floor}", flush=True)
                ours = statistics.median(samples[("focal_cuda", mode, reduction)])
                print(f"    {reduction:<4} {mode:<8} speedup vs torchvision "
                      f"{statistics.median(samples[('torchvision', mode, reduction)]) / ours:.1f}x, "
                      f"vs compiled {statistics.median(samples[('torchvision+compile', mode, reduction)]) / ours:.1f}x",
                      flush=True)
        for reduction in args.reduction[1:]:
            for name in ("focal_cuda", "focal_cuda labels"):
                ratio = (statistics.median(samples[(name, "forward", first)])
                         / statistics.median(samples[(name, "forward", reduction)]))
                print(f"    no-grad {name}: reduction {first} takes {ratio:.2f}x {reduction}'s time",
                      flush=True)
        if args.tiny:
            step_ratio = (statistics.median(samples[("focal_cuda", "train", first)])
                          / statistics.median(samples[("bare autograd.Function", "train", first)]))
            call_ratio = (statistics.median(samples[("focal_cuda", "forward", first)])
                          / statistics.median(samples[("(x * t).sum()", "forward", first)]))
            overheads.append({"rows": rows, "train_vs_bare_function": step_ratio,
                              "no_grad_vs_plain_expression": call_ratio})
            print(f"    per call: training step {step_ratio:.2f}x a bare autograd.Function's, "
                  f"no-grad call {call_ratio:.2f}x (x * t).sum()'s", flush=True)
        if args.memory and not args.tiny and rows == max(args.rows):  # peak memory at the largest size
            for name in names:
                if device == "cuda":
                    extra = cuda_peak_extra_bytes(steps[(name, "train", first)], x)
                else:
                    extra = cpu_peak_extra_bytes(name, rows, dtype, args.gamma, first)
                grad_bytes = numel * element_bytes(dtype)
                for case in cases:
                    if (case["implementation"] == name and case["rows"] == rows
                            and case["mode"] == "train" and case["reduction"] == first):
                        case["peak_extra_bytes"] = extra
                        case["peak_extra_in_grad_buffers"] = extra / grad_bytes
                print(f"    peak memory above inputs, {name}: {extra / 2**20:.1f} MiB "
                      f"({extra / grad_bytes:.2f} gradient-sized buffers)", flush=True)
        del x, t, steps
    results = {"machine": describe_machine(device), "copy_gbs": copy_gbs,
               "reductions": args.reduction, "cases": cases}
    if overheads:
        results["per_call_ratios"] = overheads
    return results


def plot(results, path):
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reduction = results["reductions"][0]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    for axis, mode in zip(axes, ("train", "forward")):
        for name in [*IMPLEMENTATIONS, *BASELINES]:
            points = sorted(
                (c["elements"], c["median_ms"]) for c in results["cases"]
                if c["implementation"] == name and c["mode"] == mode and c["reduction"] == reduction
            )
            if points:
                axis.loglog(*zip(*points), marker="o", label=name)
        axis.set_title(f"{'training step' if mode == 'train' else 'no-grad forward'}")
        axis.set_xlabel("elements (rows x 80)")
        axis.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("median time (ms)")
    axes[0].legend()
    machine = results["machine"]
    where = machine.get("gpu") if machine["device"] == "cuda" else f"{machine['cpu']}, {machine['cpu_threads']} threads"
    fig.suptitle(f"sigmoid focal loss, {results['cases'][0]['dtype']}, reduction={reduction}: {where}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--rows", type=int, nargs="+", help="rows of 80 classes (default: a sweep)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16", "float64"])
    parser.add_argument("--gamma", type=float, default=2.0)
    parser.add_argument("--reduction", nargs="+", default=["sum"], choices=["none", "mean", "sum"],
                        help="one or more, timed in the same rounds (the first is plotted)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 21 CPU, 30 GPU)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--no-memory", dest="memory", action="store_false",
                        help="skip the peak memory measurement (made at the largest size)")
    parser.add_argument("--out", type=Path, default=None, help="directory for results.json and plot.png")
    parser.add_argument("--tiny", action="store_true",
                        help=f"per-call overhead: rows {TINY_ROWS}, each sample {TINY_CALLS} calls")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device visible")
    args.reduction = list(dict.fromkeys(args.reduction))  # each once
    args.rows = args.rows or (TINY_ROWS if args.tiny else DEFAULT_ROWS[args.device])
    args.repeats = args.repeats or (21 if args.device == "cpu" else 30)
    args.out = args.out or Path("bench/scratch") / (
        f"{args.device}-{args.dtype}-gamma{args.gamma:g}" + ("-tiny" if args.tiny else ""))

    results = run(args)
    results["command"] = " ".join(["python"] + sys.argv)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out / 'results.json'}")
    save_plot(plot, results, args.out / "plot.png")


def save_plot(plot_function, results, path):
    """plot_function(results, path) where matplotlib is installed, else a line that says why not."""
    if matplotlib is None:
        print(f"no {path}: matplotlib is not installed (pip install -r requirements-bench.txt)")
        return
    plot_function(results, path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
