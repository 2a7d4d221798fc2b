"""Runs every CUDA kernel variant on small, awkward inputs and checks each result: the program
to run under compute-sanitizer, where the test suite would take hours. "Every" by the host's
dispatch rules in csrc/cuda (rows at least a pack long, aligned focal losses packed, at least 32
classes side by side for the softmax's warps); the emulated sweep, not this, counts launches.

    cd tests && compute-sanitizer --tool memcheck python drive_cuda_kernels.py

Covers input dtypes x target kinds (float targets of the inputs' dtype, float32 targets with
16-bit inputs, int64 and int32 labels, (int64 labels, scores) pairs) x gamma modes (0, 2; 1.5 by
products, 0.75 by pow) x gradients (none, inputs, inputs and targets), the focal loss at the
first three and the other forms (FL*, quality focal, varifocal without and with
detach_modulation) in turn at 0.75, on aligned tensors (the vectorised loads) and misaligned
views (the scalar path) at a size no vector width divides, with the weight kinds and reductions
cycled through (weights requiring grad, so the unweighted loss is written too); then the
functional and in-place backward with elementwise and scalar grad_output on aligned and
misaligned buffers, autocast with labels (16-bit logits, float32 loss; each gamma mode), an
all-ignored mean and an empty tensor; then the softmax focal loss's instances on three layouts (a
thread or a warp per position).
Every loss and gradient is compared with the float64 reference at the tolerance of
tests/conftest.py. Prints one line per failure and a summary; exits 1 on any failure.
"""

import itertools
import sys

import torch

import focal_cuda
from conftest import assert_matches, coefficients_of, derivative_term_scales, family_term_scales

# 629 elements: odd, so every vector loop has a tail; 17 classes, so that rows are at least as
# long as the longest pack (16-bit labels without gradient: 16), which the label loops need.
ROWS, CLASSES = 37, 17
DEVICE = "cuda"
FLOAT_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
GAMMAS = [0.0, 2.0, 1.5, 0.75]
REDUCTIONS = ["none", "mean", "sum"]
WEIGHT_KINDS = [None, "element", "row", "class"]
# The public functions of the forms, with arguments each takes (FL* needs gamma > 0: at gamma 0
# the quality focal loss, plain BCE then, takes its turn). The form is a run-time switch inside
# every kernel instance, and so is VFL's detach_modulation, which takes a turn of its own.
FORMS = ["focal", "star", "quality", "varifocal"]
# The turns at gamma 0.75 (the focal loss runs every instance at the other gammas).
FAMILY_TURNS = [*((form, False) for form in FORMS if form != "focal"), ("varifocal", True)]


def form_call(form, gamma, detach=False):
    """(form, the public function with its options bound, op-level (alpha, gamma, beta)); detach:
    VFL's detach_modulation."""
    if form == "star" and gamma == 0:
        form = "quality"
    if form == "focal":
        return form, lambda x, t, reduction, weight: focal_cuda.sigmoid_focal_loss(
            x, t, 0.25, gamma, reduction, weight=weight), (0.25, gamma, 0.0)
    if form == "star":
        return form, lambda x, t, reduction, weight: focal_cuda.sigmoid_focal_loss_star(
            x, t, 0.25, gamma, reduction, beta=0.5, weight=weight), (0.25, gamma, 0.5)
    if form == "quality":
        return form, lambda x, t, reduction, weight: focal_cuda.quality_focal_loss(
            x, t, gamma, reduction, weight=weight), (-1.0, gamma, 0.0)
    if form == "varifocal":
        return form, lambda x, t, reduction, weight: focal_cuda.varifocal_loss(
            x, t, 0.75, gamma, reduction, weight=weight, detach_modulation=detach), (0.75, gamma, 0.0)
    raise KeyError(f"form_call has no call of the form {form!r}")


def placed(values, misaligned):
    """values on the GPU, at an odd element offset into its allocation when misaligned."""
    storage = torch.empty(values.numel() + 1, dtype=values.dtype, device=DEVICE)
    start = 1 if misaligned else 0
    view = storage[start:start + values.numel()].view(values.shape)
    view.copy_(values)
    return view


def make_case(dtype, target_kind, misaligned, generator):
    """(logits, targets, scores): scores (of the inputs' dtype) for a "pair" only, else None."""
    x = torch.randn(ROWS, CLASSES, generator=generator, dtype=torch.float64) * 4
    scores = None
    if target_kind in ("int64", "int32", "pair"):
        labels = torch.randint(0, CLASSES + 1, (ROWS,), generator=generator)
        labels[::5] = -100  # ignored rows
        targets = labels.to(torch.int64 if target_kind == "pair" else getattr(torch, target_kind))
        if target_kind == "pair":
            scores = placed(torch.rand(ROWS, generator=generator, dtype=torch.float64).to(dtype), misaligned)
    else:
        target_dtype = dtype if target_kind == "same" else torch.float32
        targets = torch.rand(ROWS, CLASSES, generator=generator, dtype=torch.float64)
        targets[:, ::3] = 0  # negatives: VFL's other branch
        targets = targets.to(target_dtype)
    return placed(x.to(dtype), misaligned), placed(targets, misaligned), scores


def make_weight(kind, dtype, generator):
    shapes = {"element": (ROWS, CLASSES), "row": (ROWS, 1), "class": (CLASSES,)}
    if kind is None:
        return None
    weight = torch.rand(shapes[kind], generator=generator, dtype=torch.float64) + 0.5
    return weight.to(dtype).to(DEVICE)


def synchronize():
    """Surfaces an asynchronous kernel error at the call that caused it."""
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def compare(name, actual, expected, dtype, failures, scale=None):
    """assert_matches at dtype's tolerance, recording a mismatch instead of raising."""
    try:
        assert_matches(actual.cpu(), expected.cpu(), dtype, scale=scale)
    except AssertionError as error:
        failures.append(f"{name}: {str(error).splitlines()[0]}")


def run_forward_cases(failures):
    generator = torch.Generator().manual_seed(0)
    cycle = itertools.count()
    family_turns = itertools.count()
    calls = 0
    for dtype, target_kind, gamma, grads, misaligned in itertools.product(
        FLOAT_DTYPES, ["same", "float32", "int64", "int32", "pair"], GAMMAS,
        ["none", "inputs", "inputs+targets"], [False, True],
    ):
        labels = target_kind in ("int64", "int32", "pair")
        if (target_kind == "float32" and dtype in (torch.float32, torch.float64)) or (
            target_kind.startswith("int") and grads == "inputs+targets"
        ):
            continue
        step = next(cycle)
        reduction = REDUCTIONS[step % len(REDUCTIONS)]
        # A case and its misaligned twin are consecutive steps: both get the same weight kind,
        # and the same form. The focal loss at gammas 0, 2 and 1.5 runs every instance, packed
        # (aligned) and element by element (misaligned); the forms take turns at 0.75.
        pair = step // 2
        weight_kind = WEIGHT_KINDS[pair % len(WEIGHT_KINDS)]
        form, detach = "focal", False
        if gamma == 0.75:  # each form meets each weight kind
            if not misaligned:
                turn = next(family_turns)
            form, detach = FAMILY_TURNS[turn % len(FAMILY_TURNS)]
            weight_kind = WEIGHT_KINDS[turn // len(FAMILY_TURNS) % len(WEIGHT_KINDS)]
        x, targets, scores = make_case(dtype, target_kind, misaligned, generator)
        weight = make_weight(weight_kind, dtype, generator)
        grad_inputs, grad_targets = grads != "none", grads == "inputs+targets"
        x.requires_grad_(grad_inputs)
        # What d(loss)/d(targets) differentiates: the scores of a pair.
        differentiable = targets if scores is None else scores
        differentiable.requires_grad_(grad_targets)
        if weight is not None:
            weight.requires_grad_(grad_inputs)  # the kernels then also write the unweighted loss
        form, loss_fn, (alpha, op_gamma, beta) = form_call(form, gamma, detach)
        code = focal_cuda.reference.FORMS[form]
        name = (f"{form}{' detached' if detach else ''} {dtype} targets={target_kind} gamma={gamma} "
                f"grads={grads} misaligned={misaligned} reduction={reduction} weight={weight_kind}")
        try:
            loss = loss_fn(x, targets if scores is None else (targets, scores), reduction, weight)
            reference_x = x.detach().cpu().double().requires_grad_(grad_inputs)
            reference_t = targets.detach().cpu()
            if not labels:
                reference_t = reference_t.double().requires_grad_(grad_targets)
            reference_s = None if scores is None else scores.detach().cpu().double().requires_grad_(grad_targets)
            reference_w = None
            if weight is not None:
                reference_w = weight.detach().cpu().double().requires_grad_(grad_inputs)
            expected = focal_cuda.reference.family_loss(
                code, reference_x, reference_t, coefficients_of(code, alpha, op_gamma, beta, detach), reduction,
                reference_w, -100, 0.0, scores=reference_s,
            )
            scale_loss = None
            if form != "focal":
                scale_loss = family_term_scales(code, reference_x, reference_t, alpha, op_gamma, beta,
                                                weight=reference_w, scores=reference_s)[0]
                if reduction != "none":
                    counted = int((reference_t != -100).sum()) * CLASSES if labels else scale_loss.numel()
                    scale_loss = scale_loss.sum() / (max(counted, 1) if reduction == "mean" else 1)
            compare(name + " loss", loss, expected.detach(), dtype, failures, scale=scale_loss)
            if grad_inputs:
                grad_output = torch.rand(loss.shape, generator=generator, dtype=torch.float64) + 0.5
                wrt, expected_wrt = [x], [reference_x]
                if grad_targets:
                    wrt = wrt + [differentiable]
                    expected_wrt = expected_wrt + [reference_t if scores is None else reference_s]
                if weight is not None:
                    wrt, expected_wrt = wrt + [weight], expected_wrt + [reference_w]
                actual_grads = torch.autograd.grad(loss, wrt, grad_output.to(loss.dtype).to(DEVICE))
                expected_grads = torch.autograd.grad(expected, expected_wrt, grad_output)
                # Derivatives of inputs and targets are sums of terms that can cancel.
                scale_options = dict(weight=reference_w, reduction=reduction, grad_output=grad_output,
                                     scores=reference_s)
                if form == "focal":
                    scales = derivative_term_scales(reference_x, reference_t, alpha, op_gamma, **scale_options)
                else:
                    scales = family_term_scales(code, reference_x, reference_t, alpha, op_gamma, beta,
                                                **scale_options)[1:]
                if scores is not None:  # d/dscores: the labelled element's d/dtarget
                    labelled = reference_t.unsqueeze(-1) == torch.arange(CLASSES)
                    scales = (scales[0], (scales[1] * labelled).sum(-1))
                scales = scales[:1 + grad_targets] + (None,)
                for index, (actual, wanted) in enumerate(zip(actual_grads, expected_grads)):
                    compare(f"{name} grad[{index}]", actual, wanted, dtype, failures, scale=scales[index])
            synchronize()
        except Exception as error:  # a launch or device-side error: report it and go on
            failures.append(f"{name}: raised {type(error).__name__}: {error}")
        calls += 1
    return calls


def run_backward_cases(failures):
    """The functional and in-place backward ops, packed (aligned) and element by element."""
    generator = torch.Generator().manual_seed(1)
    calls = 0
    for dtype, misaligned, reduction in itertools.product(FLOAT_DTYPES, [False, True], [0, 1, 2]):
        # reduction codes of the ops: 0 none (elementwise grad_output), 1 mean, 2 sum (0-d)
        x, targets, _ = make_case(dtype, "same", False, generator)
        args = (x, targets, None, None, 0, [0.25, 2.0], reduction, -100, 0.0, False, focal_cuda._ops.GRAD_INPUTS)
        _, saved, _, _, count = torch.ops.focal_cuda.sigmoid_focal_loss_forward(*args)
        saved = placed(saved, misaligned)  # the packed path needs the saved gradient aligned
        shape = (ROWS, CLASSES) if reduction == 0 else ()
        grad_output = placed(torch.rand(shape, generator=generator).to(dtype), misaligned)
        expected = saved.double() * grad_output.double() / (count.double() if reduction == 1 else 1)
        name = f"{dtype} misaligned={misaligned} reduction code {reduction}"
        try:
            backward_args = (grad_output, saved, count, reduction)
            functional = torch.ops.focal_cuda.sigmoid_focal_loss_backward(*backward_args)
            compare(f"backward {name}", functional, expected, dtype, failures)
            torch.ops.focal_cuda.sigmoid_focal_loss_backward_(*backward_args)
            compare(f"in-place backward {name}", saved, expected, dtype, failures)
            synchronize()
        except Exception as error:
            failures.append(f"backward {name}: raised {type(error).__name__}: {error}")
        calls += 3
    return calls


def run_edge_cases(failures):
    """Autocast with labels (16-bit logits, float32 loss), an all-ignored mean, empty input."""
    generator = torch.Generator().manual_seed(2)
    autocast_dtypes = [torch.bfloat16] + ([torch.float16] if DEVICE == "cuda" else [])
    # The instances of 16-bit logits with a float32 loss: each gamma mode, with and without the
    # gradient, packed and element by element.
    autocast_cases = list(itertools.product(autocast_dtypes, GAMMAS[:3], [False, True], [False, True]))
    for dtype, gamma, grad, misaligned in autocast_cases:
        x, labels, _ = make_case(dtype, "int64", misaligned, generator)
        x.requires_grad_(grad)
        name = f"autocast {dtype} labels gamma={gamma} grad={grad} misaligned={misaligned}"
        with torch.autocast(DEVICE, dtype=dtype):
            loss = focal_cuda.sigmoid_focal_loss(x, labels, 0.25, gamma, "sum")
        reference_x = x.detach().cpu().double().requires_grad_(grad)
        expected = focal_cuda.reference.sigmoid_focal_loss(reference_x, labels.cpu(), 0.25, gamma, "sum")
        if loss.dtype != torch.float32:
            failures.append(f"{name}: loss dtype {loss.dtype}, expected float32")
        compare(f"{name} loss", loss, expected.detach(), dtype, failures)
        if grad:
            loss.backward()
            expected.backward()
            compare(f"{name} grad", x.grad, reference_x.grad, dtype, failures)
    labels = torch.full((ROWS,), -100, device=DEVICE)  # every row ignored: the mean is NaN
    x = torch.randn(ROWS, CLASSES, device=DEVICE, requires_grad=True)
    mean = focal_cuda.sigmoid_focal_loss(x, labels, 0.25, 2.0, "mean")
    mean.backward()
    if not (torch.isnan(mean).item() and (x.grad == 0).all().item()):
        failures.append("all-ignored mean: expected NaN loss and zero gradient")
    empty = torch.empty(0, CLASSES, device=DEVICE, requires_grad=True)
    empty_targets = torch.empty(0, CLASSES, device=DEVICE)
    empty_loss = focal_cuda.sigmoid_focal_loss(empty, empty_targets, reduction="sum")
    empty_loss.backward()
    if empty_loss.item() != 0 or empty.grad.shape != empty.shape:
        failures.append("empty input: expected a zero sum and an empty gradient")
    synchronize()
    return len(autocast_cases) + 2


def run_softmax_cases(failures):
    """The softmax focal loss: every kernel instance (dtype x labels, smoothed labels or
    probabilities x with and without gradient) on NCHW, (N, C) and channels-last layouts, with
    weights and each reduction, against the float64 definition of tests/test_softmax.py."""
    from test_softmax import expected_loss, gradient_scale, make_case as softmax_case, with_ignored_logits_poisoned

    calls = 0
    # NCHW and channels-last with few classes: a thread per position; (9, 70), classes side by
    # side and at least 32 of them: a warp per position.
    layouts = [((3, 5, 4, 7), None), ((9, 70), None), ((2, 6, 3, 5), torch.channels_last)]
    for dtype, kind, grad, (shape, memory_format), reduction in itertools.product(
            FLOAT_DTYPES, ["labels", "smoothed", "probabilities"], [False, True], layouts, REDUCTIONS):
        inputs, targets = softmax_case(shape, dtype, "cpu", "probabilities" if kind == "probabilities" else "labels")
        classes = shape[1]
        weight = torch.rand(classes, dtype=torch.float64) + 0.5
        smoothing = 0.1 if kind == "smoothed" else 0.0
        # Ignored positions hold NaN and inf logits, which must leave no trace.
        poisoned = inputs if kind == "probabilities" else with_ignored_logits_poisoned(inputs, targets)
        x = poisoned.to(DEVICE).clone(memory_format=memory_format or torch.contiguous_format)
        x.requires_grad_(grad)
        name = f"softmax {dtype} {kind} grad={grad} {tuple(shape)} {reduction}"
        try:
            loss = focal_cuda.softmax_focal_loss(x, targets.to(DEVICE), 0.25, 1.5, reduction,
                                                 weight.to(DEVICE), -100, smoothing)
            reference_x = inputs.double().clone().requires_grad_(grad)
            expected = expected_loss(reference_x, targets, 0.25, 1.5, reduction, weight, -100, smoothing)
            compare(f"{name} loss", loss, expected.detach(), dtype, failures)
            if grad:
                loss.backward(torch.ones_like(loss))
                expected.backward(torch.ones_like(expected))
                scale = gradient_scale(inputs, targets, 0.25, 1.5, reduction, weight, smoothing)
                compare(f"{name} grad", x.grad, reference_x.grad, dtype, failures, scale=scale)
            synchronize()
        except Exception as error:
            failures.append(f"{name}: raised {type(error).__name__}: {error}")
        calls += 1
    return calls


def main():
    global DEVICE
    if sys.argv[1:] == ["--device", "cpu"]:  # the driver's own check, where there is no GPU
        DEVICE = "cpu"
    elif not torch.cuda.is_available():
        sys.exit("drive_cuda_kernels.py: no CUDA device visible (--device cpu checks the driver)")
    failures = []
    calls = run_forward_cases(failures) + run_backward_cases(failures) + run_edge_cases(failures)
    calls += run_softmax_cases(failures)
    for failure in failures:
        print("FAIL", failure)
    print(f"{calls} kernel-driving calls, {len(failures)} failures")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
