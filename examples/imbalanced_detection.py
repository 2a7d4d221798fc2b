"""Why focal loss: a dense classifier trained on 1:1000 foreground/background, focal vs plain BCE.

Synthetic "anchors" with 16 features each: one anchor in a thousand shows one of 3 object
classes; the rest is background, mostly easy but with some hard negatives that resemble
objects. The same MLP, from the same initialisation, is trained for the same number of SGD steps
with each loss, with integer class labels read directly by the fused kernel (label 3 =
background, no one-hot is built):

- BCE: focal_cuda.sigmoid_focal_loss(..., alpha=None, gamma=0), exactly binary cross-entropy;
- focal: focal_cuda.sigmoid_focal_loss(..., alpha=0.25, gamma=2), RetinaNet's setting;

both summed and normalised by the number of foreground anchors, as RetinaNet does. It prints the
average precision (AP) of each object class on held-out anchors, for two initialisations of the
classifier's bias:

- plain (probability 0.5 for every class): at the start, each of the ~200,000 background
  anchor-classes of a batch costs BCE log 2, and their gradient swamps the ~60 foreground ones;
  focal loss scales the easy ones down by (1 - p_t)^2 and still learns;
- RetinaNet's prior (probability 0.01): the remedy the paper pairs with focal loss, under which
  plain BCE trains too on this easy, separable toy problem.

Runs on CPU in about a minute and a half (2 cores):

    python examples/imbalanced_detection.py
"""

import math
import time

import torch

import focal_cuda

FEATURES = 16
CLASSES = 3
FOREGROUND_RATE = 1e-3
HARD_NEGATIVE_RATE = 1e-2
STEPS = 300
BATCH = 65_536


def make_anchors(count, centers, offsets, generator):
    """Features and labels (0..CLASSES-1 objects, CLASSES background)."""
    labels = torch.full((count,), CLASSES, dtype=torch.int64)
    kind = torch.rand(count, generator=generator)
    foreground = kind < FOREGROUND_RATE
    hard = (kind >= FOREGROUND_RATE) & (kind < FOREGROUND_RATE + HARD_NEGATIVE_RATE)
    labels[foreground] = torch.randint(0, CLASSES, (int(foreground.sum()),), generator=generator)
    features = torch.randn(count, FEATURES, generator=generator) - 3.0  # easy background
    features[foreground] = centers[labels[foreground]] + 0.5 * torch.randn(int(foreground.sum()), FEATURES, generator=generator)
    # Hard negatives look like objects, shifted off their center along a direction of their own.
    nearest = torch.randint(0, CLASSES, (int(hard.sum()),), generator=generator)
    features[hard] = centers[nearest] + offsets[nearest] + 0.5 * torch.randn(int(hard.sum()), FEATURES, generator=generator)
    return features, labels


def make_model(seed, prior):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(FEATURES, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64), torch.nn.ReLU(),
        torch.nn.Linear(64, CLASSES),
    )
    with torch.no_grad():  # every class starts at probability `prior`
        model[-1].bias.fill_(-math.log((1 - prior) / prior))
    return model


def average_precision(scores, positives):
    order = torch.argsort(scores, descending=True)
    hits = positives[order].double()
    if hits.sum() == 0:
        return float("nan")
    precision_at_hits = torch.cumsum(hits, 0) / torch.arange(1, len(hits) + 1)
    return float((precision_at_hits * hits).sum() / hits.sum())


def train(name, alpha, gamma, prior, train_set, test_set):
    features, labels = train_set
    model = make_model(seed=0, prior=prior)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    generator = torch.Generator().manual_seed(1)
    start = time.perf_counter()
    for _ in range(STEPS):
        index = torch.randint(0, len(labels), (BATCH,), generator=generator)
        logits, batch_labels = model(features[index]), labels[index]
        foreground = (batch_labels < CLASSES).sum().clamp_min(1)
        loss = focal_cuda.sigmoid_focal_loss(logits, batch_labels, alpha, gamma, "sum") / foreground
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    seconds = time.perf_counter() - start
    test_features, test_labels = test_set
    with torch.no_grad():
        scores = torch.sigmoid(model(test_features))
    aps = [average_precision(scores[:, c], test_labels == c) for c in range(CLASSES)]
    print(f"  {name:<6} " + "  ".join(f"AP(class {c}) {ap:.3f}" for c, ap in enumerate(aps))
          + f"  mean AP {sum(aps) / CLASSES:.3f}  ({seconds:.0f} s)", flush=True)
    return sum(aps) / CLASSES


def main():
    generator = torch.Generator().manual_seed(0)
    centers = torch.randn(CLASSES, FEATURES, generator=generator) * 1.2
    offsets = torch.randn(CLASSES, FEATURES, generator=generator)
    offsets = 3.0 * offsets / offsets.norm(dim=1, keepdim=True)
    train_set = make_anchors(2_000_000, centers, offsets, generator)
    test_set = make_anchors(1_000_000, centers, offsets, generator)
    foreground = int((train_set[1] < CLASSES).sum())
    print(f"{len(train_set[1]):,} training anchors, {foreground:,} foreground "
          f"(1:{len(train_set[1]) // foreground}); {STEPS} SGD steps of {BATCH:,} anchors x {CLASSES} classes")
    for title, prior in (("plain initialisation (p = 0.5)", 0.5), ("RetinaNet prior (p = 0.01)", 0.01)):
        print(title)
        bce = train("BCE", None, 0.0, prior, train_set, test_set)
        focal = train("focal", 0.25, 2.0, prior, train_set, test_set)
        print(f"  focal loss: mean AP {focal:.3f} vs {bce:.3f} with BCE "
              f"({'+' if focal >= bce else ''}{100 * (focal - bce):.1f} points)")


if __name__ == "__main__":
    main()
