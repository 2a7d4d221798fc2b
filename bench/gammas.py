"""The cost of the focusing exponent: focal_cuda's training step and no-grad forward per gamma.

    python bench/gammas.py [--device cpu|cuda] [--rows 100000] [--gammas 2 1 0.5 ...]

gamma 0 and 2 have kernels of their own (and gamma 1 on the CPU); multiples of 1/2 up to 8 take
products and one square root; any other gamma takes pow (exp and log). All gammas are interleaved in one process after
a warm-up; prints median (min-max) per call and the ratio to gamma 2, and writes results.json.
"""

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402

DEFAULT_GAMMAS = [2.0, 0.0, 1.0, 0.5, 1.5, 2.5, 3.0, 4.0, 0.75, 1.3]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--rows", type=int, default=100_000, help="rows of 80 classes")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16", "float64"])
    parser.add_argument("--gammas", type=float, nargs="+", default=DEFAULT_GAMMAS)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", type=Path, default=None, help="directory for results.json")
    args = parser.parse_args()
    bench.require_device(args.device)
    out = args.out or Path("bench/scratch") / f"gammas-{args.device}-{args.dtype}"
    results = bench.start_results(args.device, elements=args.rows * bench.CLASSES, dtype=args.dtype)
    x, t, labels = bench.make_inputs(args.rows, args.device, getattr(torch, args.dtype))
    x.requires_grad_()
    steps = {}
    for gamma in args.gammas:
        steps[(gamma, "train")] = bench.train_step(bench.focal_float, x, t, labels, gamma, "sum")
        steps[(gamma, "forward")] = bench.forward_only(bench.focal_float, x, t, labels, gamma, "sum")
    for step in steps.values():
        step()
        step()
    bench.synchronize(args.device)
    samples = bench.interleaved_samples(steps, bench.Timer(args.device), args.repeats)
    print(f"{x.numel():,} elements, {args.dtype}, reduction='sum': median (min-max) ms, ratio to gamma 2")
    for mode in ("train", "forward"):
        base = statistics.median(samples[(2.0, mode)]) if (2.0, mode) in samples else None
        for gamma in args.gammas:
            times = samples[(gamma, mode)]
            median = statistics.median(times)
            ratio = f"  {median / base:.2f}x" if base else ""
            print(f"  {mode:<8} gamma {gamma:<5g} {median:7.2f} ({min(times):.2f}-{max(times):.2f}){ratio}")
            results["cases"].append({"mode": mode, "gamma": gamma, "median_ms": median, "min_ms": min(times),
                                     "max_ms": max(times), "samples_ms": times})
    bench.write_results(results, out, complete=True)
    print(f"wrote {out / 'results.json'}")


if __name__ == "__main__":
    main()
