"""Benchmark the softmax focal loss against F.cross_entropy (the cost floor it aims at) and the
common recipe built on it, eager and compiled.

    python bench/bench_softmax.py --device cpu                       # both cases
    python bench/bench_softmax.py --device cuda
    python bench/bench_softmax.py --cases classification --scale 0.1 --repeats 3   # a quick run

Cases (float32 logits, labels):
    segmentation    8 x 19 x 512 x 512 NCHW logits, labels with ~5% ignored (255)
    classification  16,384 x 1,000 logits
--scale shrinks the batch (N) for a quicker run. For each case and implementation it times a
training step (forward + backward, reduction "mean", gamma 2) and a no-grad forward,
interleaved in one process after a warm-up, and a training step's peak memory above its inputs
(CUDA: the allocator's peak; CPU: the process's peak RSS, in a fresh process per
implementation):

    focal_cuda          focal_cuda.softmax_focal_loss(x, y, gamma=2, ignore_index=255)
    cross_entropy       F.cross_entropy(x, y, ignore_index=255): no focal term, the floor
    recipe              ce = F.cross_entropy(..., reduction="none"); pt = exp(-ce);
                        ((1 - pt) ** 2 * ce).mean() over the positions not ignored
    recipe+compile      the same under torch.compile

Prints medians and ratios; writes results.json and (with matplotlib) plot.png to --out.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402

import focal_cuda  # noqa: E402

IGNORE = 255
GAMMA = 2.0
CASES = {"segmentation": (8, 19, (512, 512)), "classification": (16384, 1000, ())}


def focal(x, y):
    return focal_cuda.softmax_focal_loss(x, y, gamma=GAMMA, ignore_index=IGNORE)


def cross_entropy(x, y):
    return F.cross_entropy(x, y, ignore_index=IGNORE)


def recipe(x, y):
    ce = F.cross_entropy(x, y, ignore_index=IGNORE, reduction="none")
    pt = torch.exp(-ce)
    return ((1 - pt) ** GAMMA * ce).sum() / (y != IGNORE).sum()


IMPLEMENTATIONS = {"focal_cuda": focal, "cross_entropy": cross_entropy, "recipe": recipe,
                   "recipe+compile": recipe}


def implementation(name):
    return torch.compile(IMPLEMENTATIONS[name]) if name.endswith("+compile") else IMPLEMENTATIONS[name]


def make_inputs(case, scale, device, seed=0):
    batch, classes, spatial = CASES[case]
    batch = max(1, int(batch * scale))
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn((batch, classes) + spatial, generator=generator) * 2
    y = torch.randint(0, classes, (batch,) + spatial, generator=generator)
    y[torch.rand(y.shape, generator=generator) < 0.05] = IGNORE
    return x.to(device).requires_grad_(), y.to(device)


def steps(fn, x, y):
    def train():
        x.grad = None
        fn(x, y).backward()

    def forward():
        with torch.no_grad():
            fn(x, y)

    return train, forward


def peak_memory_child(name, case, scale):
    """In a fresh process: a training step's peak RSS above the inputs (and a warm-up step's
    leftovers), printed as JSON."""
    x, y = make_inputs(case, scale, "cpu")
    train, _ = steps(implementation(name), x, y)
    train()
    train()
    x.grad = None
    print(json.dumps({"peak_extra_bytes": bench.peak_rss_of(train)}))


def peak_extra_bytes(name, case, scale, device, train, x):
    if device == "cuda":
        return bench.cuda_peak_extra_bytes(train, x)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")  # freed buffers go back to the OS
    result = subprocess.run([sys.executable, __file__, "--peak-memory-child", name, case, str(scale)],
                            capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"peak memory of {name} failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_extra_bytes"]


def run(args, results):
    # Per case (a rank of its own), training step and no-grad forward: 4 compiled versions.
    bench.never_eager_when_compiled(4)
    timer = bench.Timer(args.device)
    cases = results["cases"]
    for case in args.cases:
        x, y = make_inputs(case, args.scale, args.device)
        timed = {}
        for name in IMPLEMENTATIONS:
            timed[(name, "train")], timed[(name, "forward")] = steps(implementation(name), x, y)
        for step in timed.values():  # warm-up, compilation included
            for _ in range(args.warmup):
                step()
        bench.synchronize(args.device)
        samples = bench.interleaved_samples(timed, timer, args.repeats)
        medians = {key: statistics.median(times) for key, times in samples.items()}
        gradient_bytes = x.numel() * x.element_size()
        for (name, mode), times in samples.items():
            entry = {"case": case, "shape": list(x.shape), "implementation": name, "mode": mode,
                     "median_ms": medians[(name, mode)], "min_ms": min(times), "max_ms": max(times),
                     "samples_ms": times}
            if mode == "train":
                extra = peak_extra_bytes(name, case, args.scale, args.device, timed[(name, "train")], x)
                entry["peak_extra_bytes"] = extra
                entry["peak_extra_gradients"] = extra / gradient_bytes
            cases.append(entry)
        print(f"{case} {tuple(x.shape)}:")
        for mode in ("train", "forward"):
            ours = medians[("focal_cuda", mode)]
            print(f"  {mode}: " + ", ".join(f"{name} {medians[(name, mode)]:.2f} ms" for name in IMPLEMENTATIONS)
                  + f"; focal_cuda / cross_entropy {ours / medians[('cross_entropy', mode)]:.2f}x, recipe / "
                  f"focal_cuda {medians[('recipe', mode)] / ours:.1f}x, recipe+compile / focal_cuda "
                  f"{medians[('recipe+compile', mode)] / ours:.2f}x")
        peaks = {e["implementation"]: e["peak_extra_gradients"] for e in cases
                 if e["case"] == case and e["mode"] == "train"}
        print("  peak extra memory of a step, in gradient-sized buffers: "
              + ", ".join(f"{name} {value:.2f}" for name, value in peaks.items()), flush=True)
        del x, y, timed
        bench.write_results(results, args.out)


def plot(results, path):
    """Bars of the median times, one panel per case, training step and no-grad forward."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(dict.fromkeys(entry["case"] for entry in results["cases"]))
    fig, axes = plt.subplots(1, len(cases), figsize=(5.5 * len(cases), 4.5), squeeze=False)
    for axis, case in zip(axes[0], cases):
        entries = [e for e in results["cases"] if e["case"] == case]
        for offset, mode in ((-0.2, "train"), (0.2, "forward")):
            times = [next(e["median_ms"] for e in entries if e["implementation"] == name and e["mode"] == mode)
                     for name in IMPLEMENTATIONS]
            axis.bar([i + offset for i in range(len(IMPLEMENTATIONS))], times, width=0.4,
                     label="training step" if mode == "train" else "no-grad forward")
        axis.set_xticks(range(len(IMPLEMENTATIONS)), list(IMPLEMENTATIONS), rotation=15)
        axis.set_title(f"{case} {tuple(entries[0]['shape'])}")
        axis.set_ylabel("median time (ms)")
        axis.grid(True, axis="y", alpha=0.3)
    axes[0][0].legend()
    machine = results["machine"]
    where = machine.get("gpu") if machine["device"] == "cuda" else f"{machine['cpu']}, {machine['cpu_threads']} threads"
    fig.suptitle(f"softmax focal loss, float32, gamma {GAMMA}, mean: {where}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    if len(sys.argv) == 5 and sys.argv[1] == "--peak-memory-child":
        peak_memory_child(sys.argv[2], sys.argv[3], float(sys.argv[4]))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the batch (N) to run")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 7 CPU, 30 GPU)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="directory for results.json and plot.png")
    args = parser.parse_args()
    bench.require_device(args.device)
    args.repeats = args.repeats or (7 if args.device == "cpu" else 30)
    args.out = args.out or Path("bench/scratch") / f"softmax-{args.device}"
    results = bench.start_results(args.device)
    run(args, results)
    bench.write_results(results, args.out, complete=True)
    print(f"wrote {args.out / 'results.json'}")
    bench.save_plot(plot, results, args.out / "plot.png")


if __name__ == "__main__":
    main()
