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
import random
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import focal_cuda

# main() refuses to start without it (the other benchmarks, which import this module for its
# timer, run without it).
try:
    import torchvision
    from torchvision.ops import sigmoid_focal_loss as torchvision_focal_loss
except ImportError:
    torchvision = None
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
    # float16's gradient is saved in float32 (focal_ops.cpp's saved_dtype), out of a loss
    # scale's reach until the backward scales it.
    saved = element_bytes(torch.float32) if dtype == torch.float16 else size
    # The backward reads the saved gradient and writes the inputs' where it scales it (by the
    # mean's 1 / count) or converts it; a factor of 1 in the inputs' dtype leaves it as it is.
    backward = saved + size if reduction == "mean" or saved != size else 0
    # "none" writes the loss of every element, which the step's .sum() reads back.
    loss = size if reduction == "none" else 0
    if name == "focal_cuda":
        reads = 2 * size  # x, t
    elif name == "focal_cuda labels":
        reads = size + 8 / CLASSES  # x, one int64 label per row of CLASSES logits
    else:
        return None, None
    return reads + saved + backward + 2 * loss, reads + loss


def require_device(device):
    """Exit, before any timing, where --device cuda finds no GPU."""
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device visible")


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


def interleaved_samples(steps, timer, repeats):
    """{key: [ms per call, one per round]}: each round times every step once, in an order of
    its own (seeded), so that no step always inherits one neighbour's allocator, page and cache
    state."""
    order, samples = list(steps), {key: [] for key in steps}
    shuffle = random.Random(0).shuffle
    for _ in range(repeats):
        shuffle(order)
        for key in order:
            samples[key].append(timer(steps[key]))
    return samples


def copy_bandwidth_gbs(device, numel=50_000_000):
    """Device-to-device (or memory-to-memory on CPU) copy bandwidth: bytes read + written, ten
    copies a sample (one copy's launch from an idle GPU would count against its bandwidth)."""
    src = torch.empty(numel, device=device, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    timer = Timer(device, calls=10)
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


# The environment variables that change what a benchmark measures.
ENVIRONMENT = ["OMP_NUM_THREADS", "MKL_NUM_THREADS", "ATEN_CPU_CAPABILITY", "THP_MEM_ALLOC_ENABLE",
               "MALLOC_MMAP_THRESHOLD_", "CUDA_VISIBLE_DEVICES", "CUDA_LAUNCH_BLOCKING",
               "PYTORCH_CUDA_ALLOC_CONF", "TORCHINDUCTOR_COMPILE_THREADS", "TORCHINDUCTOR_MAX_AUTOTUNE"]
# The GPU's driver, clocks and throttling, read by nvidia-smi at the start and at each write.
GPU_STATE = ["driver_version", "clocks.sm", "clocks.mem", "clocks.max.sm", "power.draw", "power.limit",
             "temperature.gpu", "clocks_throttle_reasons.active"]


def describe_machine(device):
    """What the numbers depend on, besides the source: versions, CPU model, threads, load,
    environment; on CUDA the GPU's properties and state."""
    try:
        import triton
    except ImportError:
        triton = None
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "torchvision": getattr(torchvision, "__version__", None),
        "triton": getattr(triton, "__version__", None),
        "focal_cuda": focal_cuda.__version__,
        "focal_cuda_backends": focal_cuda.backends(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
        "environment": {name: os.environ[name] for name in ENVIRONMENT if name in os.environ},
        "device": device,
    }
    try:  # name, family and model: one name covers several generations ("Intel Xeon Processor")
        fields = dict(line.split(":", 1) for line in open("/proc/cpuinfo").read().split("\n\n")[0].splitlines()
                      if ":" in line)
        fields = {key.strip(): value.strip() for key, value in fields.items()}
        info["cpu"] = fields["model name"]
        info["cpu_family_model"] = f"{fields['cpu family']}/{fields['model']}"
    except (OSError, KeyError):
        pass
    if device == "cuda":
        properties = torch.cuda.get_device_properties()
        info["gpu"] = properties.name
        info["gpu_properties"] = {
            "capability": f"{properties.major}.{properties.minor}",
            "multiprocessors": properties.multi_processor_count,
            "memory_bytes": properties.total_memory,
            "l2_cache_bytes": properties.L2_cache_size,
        }
        info["gpu_state"] = gpu_state()
    info["commit"] = source_commit()
    return info


def gpu_state():
    """nvidia-smi's GPU_STATE for each GPU it sees: {field: value} (a field this driver does not
    know, such as a renamed one, read as its error), or why nvidia-smi could not run."""
    def query(fields):
        try:
            result = subprocess.run(["nvidia-smi", "--format=csv,noheader", "--query-gpu=" + ",".join(fields)],
                                    capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired) as error:
            return None, f"nvidia-smi: {error}"
        if result.returncode != 0:
            return None, f"exit {result.returncode}: {(result.stdout + result.stderr).strip()[:200]}"
        return [[value.strip() for value in line.split(",")] for line in result.stdout.strip().splitlines()], None

    rows, error = query(GPU_STATE)
    if rows is not None:
        return [dict(zip(GPU_STATE, row)) for row in rows]
    if error.startswith("nvidia-smi"):
        return error
    # One field at a time: the rest still read where one is unknown.
    columns = {field: query([field]) for field in GPU_STATE}
    gpus = max((len(rows) for rows, _ in columns.values() if rows), default=1)
    return [{field: rows[gpu][0] if rows else error for field, (rows, error) in columns.items()}
            for gpu in range(gpus)]


def start_results(device, **fields):
    """The results of this run so far, which write_results writes as they grow."""
    return {"machine": describe_machine(device), "command": " ".join(["python"] + sys.argv),
            "complete": False, **fields, "cases": []}


def write_results(results, out, complete=False):
    """out/results.json, written again after each size or case: a run cut at its time limit
    (.ci/gpu-validate's caps) keeps what it had measured, marked incomplete."""
    results["complete"] = complete
    results["machine"]["load_average_end"] = os.getloadavg()
    if results["machine"]["device"] == "cuda":
        results["machine"]["gpu_state_end"] = gpu_state()
    out.mkdir(parents=True, exist_ok=True)
    partial = out / "results.json.partial"
    # Lists of numbers (the samples) on one line each: .ci/gpu-validate prints some files whole.
    text = re.sub(r"\[\s+([^\[\]{}\"]*?)\s+\]", lambda m: "[" + " ".join(m.group(1).split()) + "]",
                  json.dumps(results, indent=1))
    partial.write_text(text + "\n")
    partial.replace(out / "results.json")  # never a half-written file


SOURCE_PATHS = ["csrc", "focal_cuda", "setup.py", "bench/*.py"]


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


def never_eager_when_compiled(versions):
    """Room for `versions` compiled versions of each function, and an error past it: at Dynamo's
    limit a compiled baseline would otherwise go on eagerly, timed as if compiled."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 2 * versions)
    torch._dynamo.config.fail_on_recompile_limit_hit = True


def run(args, results):
    device, dtype = args.device, getattr(torch, args.dtype)
    # Each reduction and grad mode is a compiled version of its own, at two sizes (static, then
    # dynamic).
    never_eager_when_compiled(4 * len(args.reduction))
    names = list(IMPLEMENTATIONS) + (list(BASELINES) if args.tiny else [])
    timer = Timer(device, calls=TINY_CALLS if args.tiny else 1)
    copy_gbs = copy_bandwidth_gbs(device)
    print(f"copy bandwidth on {device}: {copy_gbs:.1f} GB/s", flush=True)
    results["copy_gbs"] = copy_gbs
    cases = results["cases"]
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
        samples = interleaved_samples(steps, timer, args.repeats)
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
                "max_ms": max(times), "samples_ms": times, "ns_per_element": median * 1e6 / numel,
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
            results.setdefault("per_call_ratios", []).append(
                {"rows": rows, "train_vs_bare_function": step_ratio, "no_grad_vs_plain_expression": call_ratio})
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
        write_results(results, args.out)


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
    if torchvision is None:  # before minutes of timing
        sys.exit("the benchmark compares with torchvision: pip install -r requirements-bench.txt")
    require_device(args.device)
    args.reduction = list(dict.fromkeys(args.reduction))  # each once
    args.rows = args.rows or (TINY_ROWS if args.tiny else DEFAULT_ROWS[args.device])
    args.repeats = args.repeats or (21 if args.device == "cpu" else 30)
    args.out = args.out or Path("bench/scratch") / (
        f"{args.device}-{args.dtype}-gamma{args.gamma:g}" + ("-tiny" if args.tiny else ""))

    results = start_results(args.device, reductions=args.reduction)
    run(args, results)
    write_results(results, args.out, complete=True)
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
