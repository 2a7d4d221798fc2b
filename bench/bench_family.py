"""Benchmark the focal family (FL*, quality focal loss, varifocal loss) against the composite
PyTorch code that computes each today, eager and compiled.

    python bench/bench_family.py --device cpu                      # default CPU sweep
    python bench/bench_family.py --device cuda                     # 1e4 .. 1.6e8 elements
    python bench/bench_family.py --rows 100 --repeats 2 --warmup 1 # a quick check that it runs

Targets are what a dense detector assigns: one (label, IoU score) per anchor, most anchors
background. For every form, size (rows x 80 classes) and implementation it times a training
step (forward + backward, reduction="sum") and a no-grad forward, interleaved in one process
after a warm-up, and prints the medians and the speedups of focal_cuda over the composite code:

    focal_cuda          the fused op on the dense soft target (score at the label, else 0)
    focal_cuda pair     the fused op on the (labels, scores) pair: no dense target at all
    composite           the formula as fvcore (FL*) and mmdet (QFL, VFL) write it (a form
                        without such a peer: its focal_cuda.reference formula), on the dense
                        target, eager
    composite+compile   the same under torch.compile

Writes results.json to --out. Uses bench/bench.py's timer and machine description.
"""

import argparse
import functools
import inspect
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402

import focal_cuda  # noqa: E402

CLASSES = bench.CLASSES


def star_composite(x, t, alpha, gamma, beta):
    """fvcore's sigmoid_focal_loss_star: alpha -1 and beta 0 there, the function's defaults."""
    if alpha != -1 or beta != 0:
        raise ValueError(f"fvcore's FL* takes alpha -1 and beta 0, got alpha={alpha}, beta={beta}")
    return (-F.logsigmoid(gamma * x * (2 * t - 1)) / gamma).sum()


def quality_composite(x, t, beta):
    """mmdet's quality_focal_loss in its soft-target form."""
    return (F.binary_cross_entropy_with_logits(x, t, reduction="none") * (t - x.sigmoid()).abs().pow(beta)).sum()


def varifocal_composite(x, t, alpha, gamma, detach_modulation):
    """mmdet's varifocal_loss with iou_weighted=True (p detached in the modulation, as RT-DETR's,
    with detach_modulation)."""
    p = x.sigmoid().detach() if detach_modulation else x.sigmoid()
    focal_weight = t * (t > 0.0).to(t.dtype) + alpha * (p - t).abs().pow(gamma) * (t <= 0.0).to(t.dtype)
    return (F.binary_cross_entropy_with_logits(x, t, reduction="none") * focal_weight).sum()


# The composite code a form replaces in the wild, by form (focal_cuda.reference.FORMS's keys),
# taking the form's coefficients by name. A form without one is timed against its reference
# formula (focal_cuda.reference), which is composite PyTorch code too.
PEERS = {"star": star_composite, "quality": quality_composite, "varifocal": varifocal_composite}


def forms():
    """name -> (fused function, composite function), each fn(x, dense targets): the summed loss,
    for every form of the family but the focal loss itself (bench/bench.py times it against
    torchvision), at the public function's default coefficients."""
    cases = {}
    for form in focal_cuda.reference.FAMILY.values():
        if form.key == "focal":
            continue
        parameters = inspect.signature(form.function).parameters
        defaults = {name: parameters[name].default for name in form.coefficients}
        if form.key in PEERS:
            composite = functools.partial(PEERS[form.key], **defaults)
        else:
            composite = functools.partial(focal_cuda.reference.family_loss, form.code,
                                          coefficients=list(defaults.values()), reduction="sum",
                                          weight=None, ignore_index=-100, label_smoothing=0.0)
        name = f"{form.function.__name__} ({', '.join(f'{k} {v}' for k, v in defaults.items())})"
        cases[name] = (functools.partial(form.function, reduction="sum"), composite)
    return cases


FORMS = forms()


def implementations(form):
    """name -> fn(x, dense soft targets, (labels, scores)): the summed loss."""
    fused, composite = FORMS[form]

    def composite_on_dense(x, dense, pair):
        return composite(x, dense)

    # Dynamo keeps its compiled versions by code object, which every form's composite_on_dense
    # shares: each form starts from none (a static version at its first size, then a dynamic one).
    torch._dynamo.reset()
    return {
        "focal_cuda": lambda x, dense, pair: fused(x, dense),
        "focal_cuda pair": lambda x, dense, pair: fused(x, pair),
        "composite": composite_on_dense,
        "composite+compile": torch.compile(composite_on_dense),
    }


def make_inputs(rows, device, dtype, seed=0):
    """Logits; the dense soft target; the (labels, scores) pair it stands for (CLASSES =
    background for ~90% of the anchors, IoU scores in (0, 1])."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, CLASSES, generator=generator)
    labels = torch.randint(0, CLASSES + 1, (rows,), generator=generator)
    labels[torch.rand(rows, generator=generator) < 0.9] = CLASSES
    scores = 1 - torch.rand(rows, generator=generator)
    dense = F.one_hot(labels, CLASSES + 1)[:, :CLASSES] * scores.unsqueeze(-1)
    pair = (labels.to(device), scores.to(device=device, dtype=dtype))
    return x.to(device=device, dtype=dtype), dense.to(device=device, dtype=dtype), pair


def steps(fn, x, dense, pair):
    """(training step, no-grad forward) of fn."""
    def train():
        x.grad = None
        fn(x, dense, pair).backward()

    def forward():
        with torch.no_grad():
            fn(x, dense, pair)

    return train, forward


def run(args, results):
    device, dtype = args.device, getattr(torch, args.dtype)
    bench.never_eager_when_compiled(4)  # training step and no-grad forward, static and dynamic
    timer = bench.Timer(device)
    cases = results["cases"]
    for form in FORMS:
        fns = implementations(form)
        for rows in args.rows:
            x, dense, pair = make_inputs(rows, device, dtype)
            x.requires_grad_()
            timed = {}
            for name, fn in fns.items():
                timed[(name, "train")], timed[(name, "forward")] = steps(fn, x, dense, pair)
            for step in timed.values():  # warm-up, compilation included
                for _ in range(args.warmup):
                    step()
            bench.synchronize(device)
            samples = bench.interleaved_samples(timed, timer, args.repeats)
            medians = {key: statistics.median(times) for key, times in samples.items()}
            for (name, mode), times in samples.items():
                cases.append({"form": form, "implementation": name, "mode": mode, "rows": rows,
                              "classes": CLASSES, "elements": rows * CLASSES, "dtype": args.dtype,
                              "median_ms": medians[(name, mode)], "min_ms": min(times), "max_ms": max(times),
                              "samples_ms": times})
            line = [f"{form}, {rows * CLASSES:>11,} elements"]
            for mode in ("train", "forward"):
                ours = medians[("focal_cuda", mode)]
                line.append(f"{mode}: " + ", ".join(f"{name} {medians[(name, mode)]:.3f} ms" for name in fns)
                            + f"; speedup vs composite {medians[('composite', mode)] / ours:.1f}x, "
                            f"vs compiled {medians[('composite+compile', mode)] / ours:.1f}x, "
                            f"pair vs dense {ours / medians[('focal_cuda pair', mode)]:.2f}x")
            print("\n    ".join(line), flush=True)
            del x, dense, pair, timed
            bench.write_results(results, args.out)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--rows", type=int, nargs="+", help="rows of 80 classes (default: a sweep)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16", "float64"])
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 21 CPU, 30 GPU)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="directory for results.json")
    args = parser.parse_args()
    bench.require_device(args.device)
    args.rows = args.rows or bench.DEFAULT_ROWS[args.device]
    args.repeats = args.repeats or (21 if args.device == "cpu" else 30)
    args.out = args.out or Path("bench/scratch") / f"family-{args.device}-{args.dtype}"

    results = bench.start_results(args.device)
    run(args, results)
    bench.write_results(results, args.out, complete=True)
    print(f"wrote {args.out / 'results.json'}")


if __name__ == "__main__":
    main()
