"""The CUDA kernels, run on the CPU under the CUDA emulation (tests/cuda_emulation): every kernel
instance the op layer can launch, through the real op layer and kernel glue, checked against the
float64 reference and the CPU kernels, and re-run under a second schedule to be bitwise equal.

    pytest -m cuda_emulation tests                       # or tests/cuda_emulation/sweep.py
    python tests/cuda_emulation/sweep.py --sanitized     # under ASan + UBSan

The last test fails if any kernel instance was never launched.
"""

import decimal
import itertools
import math
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings

import cuda_emulation
import focal_cuda
from conftest import (
    assert_16_bit_results_are_correctly_rounded,
    assert_gradients_are_derivatives,
    assert_matches,
    coefficients_of,
    consistency_cases,
    derivative_term_scales,
    exact_focal_loss_and_grads,
    extreme_grid,
    family_term_scales,
    float32_ulp,
    softplus_sigmoid_logits,
    worst_softplus_sigmoid_ulp,
)
from focal_cuda._ops import GRAD_INPUTS, GRAD_TARGETS, outputs_mask

pytestmark = pytest.mark.cuda_emulation

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
CPP_TYPES = {F16: "c10::Half", BF16: "c10::BFloat16", F32: "float", F64: "double", torch.int64: "long int"}
# The General kernels take products for multiples of 1/2 (up to 8) and pow for the others.
GAMMA_MODES = {"zero": [0.0], "two": [2.0], "general": [0.5, 0.75, 1.0, 3.5, 8.5]}
GAMMA_NAMES = {"zero": "Zero", "two": "Two", "general": "General"}
WEIGHT_KINDS = {"none": 0, "element": 1, "row": 2, "class": 3}
REDUCTION_CODES = {"none": 0, "mean": 1, "sum": 2}
FORMS = focal_cuda.reference.FORMS

# (inputs dtype, targets: a floating dtype or "labels", float32_loss): the combinations the CUDA
# forward reads as they are. The loss dtype (and kernel out_t) follows from them.
FORWARD_TYPES = [
    (F16, F16, False), (BF16, BF16, False), (F32, F32, False), (F64, F64, False),
    (F16, F32, False), (BF16, F32, False),
    (F16, "labels", False), (BF16, "labels", False), (F32, "labels", False), (F64, "labels", False),
    (F16, "labels", True), (BF16, "labels", True),  # autocast: 16-bit logits, float32 loss
]
# Shapes (with tails for every pack size, sub-block, one element, 0-d) and emulated SM counts
# (1 and 2 give grids of 1-8 blocks; 132 is an H100). Each instance's first case is the
# GRID_STRIDE shape at one SM: more packs than the grid has threads, so its loop iterates.
GRID_STRIDE = (180, 101)  # 1,136 packs of sixteen, over the 1,024 threads of 4 blocks
SHAPES = [(50, 101), (37, 13), (3, 5), (1, 1), (7, 1), (9, 3, 7), ()]
MULTIPROCESSORS = [1, 2, 132, 1]
# The first logits of every case with more than two elements: saturated, and +-95, where q is
# subnormal in float (the float64 reference's torch.sigmoid gives 0 for the same in float64:
# test_extreme_logits_are_finite_and_exact covers that window).
SATURATED_LOGITS = torch.tensor([-40.0, 35.0, -95.0, 95.0], dtype=F64)


@pytest.fixture(scope="module")
def emulated():
    module = cuda_emulation.load()
    module.reset_launch_counts()
    module.set_schedule("forward", 0)
    yield module
    module.set_multiprocessor_count(132)
    module.set_schedule("forward", 0)


@pytest.fixture(autouse=True)
def fresh_context(emulated):
    """An error inside a kernel is sticky, as on a GPU: each test starts as a new process would."""
    emulated.reset_device()


def grid_blocks(module, work_items):
    """The grid the kernel glue launches for work_items (packs, or elements): its grid_size, for
    the 4 resident blocks per SM every kernel's launch bounds allow."""
    return max(1, min(-(-work_items // 256), module.multiprocessor_count() * 4))


def saved_dtype(dtype):
    """What the forward stores gradients and the unweighted loss in (float32 for float16)."""
    return F32 if dtype == F16 else dtype


def pack_size(dtype):
    return max(2, 16 // torch.empty((), dtype=dtype).element_size())


def forward_pack_size(dtype, labels=False, grad_inputs=True):
    """The forward's packs: float64 one element at a time (its packs spilled at 64 registers),
    labels eight elements whatever the inputs, sixteen for 16-bit inputs without the inputs'
    gradient."""
    if dtype == F64 or not labels:
        return 1 if dtype == F64 else pack_size(dtype)
    return 16 if dtype.itemsize == 2 and not grad_inputs else 8


def placed(values, misaligned):
    """A contiguous copy of values, starting one element into its storage when misaligned."""
    storage = torch.empty(values.numel() + 1, dtype=values.dtype)
    start = 1 if misaligned else 0
    view = storage[start:start + values.numel()].view(values.shape)
    view.copy_(values)
    return view


def loss_dtype(x_dtype, targets, float32_loss):
    dtype = x_dtype if targets == "labels" else torch.promote_types(x_dtype, targets)
    return F32 if float32_loss and dtype in (F16, BF16) else dtype


def may_track_rows(labels, weight_kind):
    """Whether the forward loops may track each element's row and class: for labels, and for a
    weight the op reads per row or per class (a scalar, or an element weight on rows of one
    class). Such loops are packed only for rows at least a pack long, so that a pack meets at
    most two rows."""
    return labels or weight_kind != "none"


def forward_kernel_name(x_dtype, targets, float32_loss, gamma_mode, grad_inputs, pack):
    t_type = CPP_TYPES[torch.int64 if targets == "labels" else targets]
    out = CPP_TYPES[loss_dtype(x_dtype, targets, float32_loss)]
    return (f"focal::cuda::{{anonymous}}::focal_forward_kernel<{CPP_TYPES[x_dtype]}, {t_type}, {out}, "
            f"focal::GammaMode::{GAMMA_NAMES[gamma_mode]}, {str(grad_inputs).lower()}, {pack}>")


def forward_launches(labels, packed):
    """Launches of a forward kernel instance per forward: a label forward's element kernel also
    runs the second launch, over rows (csrc/cuda/forward.cuh's labelled_rows)."""
    return 2 if labels and not packed else 1


def assert_forward_launches(launched, name, labels, packed, calls, describe=""):
    """The instance `name` ran `calls` forwards; a label forward's rows, in its element kernel."""
    assert launched.get(name) == calls * forward_launches(labels, packed), f"{describe}: launched {launched}"
    if labels and packed:
        rows_kernel = name[:name.rindex(",")] + ", 1>"
        assert launched.get(rows_kernel) == calls, f"{describe}: no second launch over rows: {launched}"


def launches_during(module, call):
    """What call launched: {instance name: count}."""
    before = module.kernel_instances()
    call()
    after = module.kernel_instances()
    return {name: after[name] - before[name] for name in after if after[name] != before[name]}


class Case:
    """One forward call: its arguments, and the float64 expectations of every output."""

    def __init__(self, *, x_dtype, targets, float32_loss, gamma, shape, misaligned, reduction,
                 weight_kind, alpha, label_smoothing, grad_inputs, grad_targets, ignore,
                 label_dtype=torch.int64, ignore_index=-100, seed=0, form="focal", beta=0.0,
                 scores=False):
        generator = torch.Generator().manual_seed(seed)
        labels = targets == "labels"
        self.shape = shape
        x = torch.randn(shape, generator=generator, dtype=F64) * 6
        if x.numel() > 2:  # SATURATED_LOGITS, with targets below that make q tiny
            x.view(-1)[:len(SATURATED_LOGITS)] = SATURATED_LOGITS[:x.numel()]
        self.inputs = placed(x.to(x_dtype), misaligned)
        classes = shape[-1] if shape else 1
        if labels:
            rows = shape[:-1]
            label_values = torch.randint(0, classes + 1, rows, generator=generator)  # C: background
            flat = label_values.view(-1)
            placements = {"none": [], "first": [0], "last": [flat.numel() - 1],
                          "spread": list(range(0, flat.numel(), 3)), "all": list(range(flat.numel()))}
            flat[placements[ignore]] = ignore_index
            self.targets = placed(label_values.to(label_dtype), misaligned)
            self.count = int((label_values != ignore_index).sum()) * classes
            # (labels, scores): in [0, 1], with exact zeros (VFL's negatives at the label).
            score_values = torch.rand(rows, generator=generator, dtype=F64)
            score_values.view(-1)[1::4] = 0.0
            self.scores = placed(score_values.to(x_dtype), misaligned) if scores else None
        else:
            soft = torch.rand(shape, generator=generator, dtype=F64)
            hard = (torch.rand(shape, generator=generator) < 0.3).double()
            values = torch.where(torch.rand(shape, generator=generator) < 0.5, soft, hard)
            if values.numel() > 2:  # confident and right at the saturated logits: q tiny
                values.view(-1)[:len(SATURATED_LOGITS)] = (SATURATED_LOGITS[:values.numel()] > 0).double()
            self.targets = placed(values.to(targets), misaligned)
            self.count = self.inputs.numel()
            self.scores = None
        weight_shapes = {"element": shape, "row": shape[:-1] + (1,) if shape else (), "class": shape[-1:],
                         "scalar": ()}
        self.weight = None
        if weight_kind != "none":
            self.weight = (torch.rand(weight_shapes[weight_kind], generator=generator, dtype=F64) + 0.5).to(x_dtype)
        self.options = dict(alpha=alpha, gamma=gamma, reduction=REDUCTION_CODES[reduction],
                            ignore_index=ignore_index, label_smoothing=label_smoothing,
                            float32_loss=float32_loss, form=FORMS[form], beta=beta)
        # The loss before the weight is also wanted alone: a weight requiring grad, inputs not.
        self.flags = dict(grad_inputs=grad_inputs, grad_targets=grad_targets,
                          unweighted_loss=self.weight is not None and (grad_inputs or seed % 2 == 0))
        self.reduction = reduction
        self.loss_dtype = loss_dtype(x_dtype, targets, float32_loss)
        self.x_dtype = x_dtype
        self.labels = labels
        # The dtype of what d(loss)/d(targets) differentiates: floating targets, or scores.
        self.target_dtype = x_dtype if self.scores is not None else None if labels else targets
        self.describe = (f"form={form} beta={beta} x={x_dtype} targets={targets}{'/' + str(label_dtype) if labels else ''} "
                         f"scores={scores} "
                         f"float32_loss={float32_loss} gamma={gamma} shape={shape} misaligned={misaligned} "
                         f"reduction={reduction} weight={weight_kind} alpha={alpha} smoothing={label_smoothing} "
                         f"grads=({grad_inputs}, {grad_targets}) ignore={ignore}")

    def arguments(self):
        o = self.options
        outputs = outputs_mask(self.flags["grad_inputs"], self.flags["grad_targets"],
                               self.flags["unweighted_loss"])
        return (self.inputs, self.targets, self.weight, self.scores, o["form"],
                coefficients_of(o["form"], o["alpha"], o["gamma"], o["beta"]), o["reduction"],
                o["ignore_index"], o["label_smoothing"], o["float32_loss"], outputs)

    def expected(self):
        """(loss, grad_inputs, grad_targets, unweighted_loss, count) in float64; the gradients
        elementwise and unscaled, as the op returns them."""
        o = self.options
        x = self.inputs.double().requires_grad_()
        t = self.targets if self.labels else self.targets.double().requires_grad_()
        scores = None if self.scores is None else self.scores.double().requires_grad_()
        weight = None if self.weight is None else self.weight.double()
        options = dict(form=o["form"], ignore_index=o["ignore_index"], label_smoothing=o["label_smoothing"],
                       coefficients=coefficients_of(o["form"], o["alpha"], o["gamma"], o["beta"]))
        loss_of = focal_cuda.reference.family_loss
        elementwise = loss_of(inputs=x, targets=t, weight=weight, reduction="none", scores=scores, **options)
        loss = loss_of(inputs=x, targets=t, weight=weight, reduction=self.reduction, scores=scores, **options)
        differentiable = None if self.target_dtype is None else scores if self.labels else t
        wrt = [x] if differentiable is None else [x, differentiable]
        grads = torch.autograd.grad(elementwise.sum(), wrt, allow_unused=True)
        unweighted = loss_of(inputs=x.detach(), targets=t.detach(), weight=None, reduction="none",
                             scores=None if scores is None else scores.detach(), **options)
        return (loss.detach(), grads[0], None if differentiable is None else grads[1], unweighted, self.count)

    def scales(self):
        """(loss, d/dinputs, d/dtargets) rounding scales for assert_matches: the loss's None
        for the focal loss (a product of well-conditioned factors), reduced like the loss."""
        o = self.options
        options = dict(weight=self.weight, ignore_index=o["ignore_index"], label_smoothing=o["label_smoothing"],
                       scores=self.scores)
        if o["form"] == FORMS["focal"]:
            loss = None
            scale_inputs, scale_targets = derivative_term_scales(self.inputs, self.targets, o["alpha"],
                                                                 o["gamma"], **options)
        else:
            loss, scale_inputs, scale_targets = family_term_scales(
                o["form"], self.inputs, self.targets, o["alpha"], o["gamma"], o["beta"], **options)
            if self.reduction != "none":
                loss = loss.sum() / (max(self.count, 1) if self.reduction == "mean" else 1)
        if self.scores is not None:  # d/dscores: the labelled element's d/dtarget
            classes = torch.arange(self.inputs.shape[-1])
            scale_targets = (scale_targets * (self.targets.long().unsqueeze(-1) == classes)).sum(-1)
        return loss, scale_inputs, scale_targets

    def unweighted_scale(self):
        """The rounding scale of the loss before the weight, elementwise (None: focal loss)."""
        o = self.options
        if o["form"] == FORMS["focal"]:
            return None
        return family_term_scales(o["form"], self.inputs, self.targets, o["alpha"], o["gamma"], o["beta"],
                                  ignore_index=o["ignore_index"], label_smoothing=o["label_smoothing"],
                                  scores=self.scores)[0]


def check_outputs(case, outputs, label):
    """Every output of the forward op against the float64 expectations."""
    loss, grad_inputs, grad_targets, unweighted, count = outputs
    expected_loss, expected_gx, expected_gt, expected_unweighted, expected_count = case.expected()
    scale_loss, scale_inputs, scale_targets = case.scales()
    assert loss.dtype == case.loss_dtype, f"{label}: loss dtype"
    assert count.item() == expected_count, f"{label}: count"
    if expected_loss.isnan().all():  # the mean of nothing: every row ignored
        assert loss.isnan().all(), f"{label}: expected NaN, got {loss}"
    else:
        assert_matches(loss, expected_loss.view(loss.shape), case.loss_dtype,
                       scale=None if scale_loss is None else scale_loss.view(loss.shape))
    if case.flags["grad_inputs"]:
        assert grad_inputs.dtype == saved_dtype(case.x_dtype)
        assert_matches(grad_inputs, expected_gx, saved_dtype(case.x_dtype), scale=scale_inputs)
    else:
        assert grad_inputs is None  # not computed, not allocated
    if case.flags["grad_targets"]:
        assert grad_targets.dtype == saved_dtype(case.target_dtype)
        assert_matches(grad_targets, expected_gt, saved_dtype(case.target_dtype), scale=scale_targets)
    else:
        assert grad_targets is None
    if case.flags["unweighted_loss"]:
        assert unweighted.dtype == saved_dtype(case.loss_dtype)
        assert_matches(unweighted, expected_unweighted, saved_dtype(case.loss_dtype), scale=case.unweighted_scale())
    else:
        assert unweighted is None


def check_against_cpu_kernels(case, outputs):
    """The same call on focal_cuda's CPU kernels: both within the tolerance of each other."""
    cpu = torch.ops.focal_cuda.sigmoid_focal_loss_forward(*case.arguments())
    scale_loss, scale_inputs, scale_targets = case.scales()
    scales = [scale_loss, scale_inputs, scale_targets, case.unweighted_scale(), None]
    dtypes = [case.loss_dtype, saved_dtype(case.x_dtype), case.target_dtype and saved_dtype(case.target_dtype),
              saved_dtype(case.loss_dtype), None]
    for ours, theirs, scale, dtype in zip(outputs, cpu, scales, dtypes):
        if ours is None:  # not requested: None from C++, empty from the op
            assert theirs.numel() == 0
            continue
        assert ours.shape == theirs.shape
        if dtype is None or ours.isnan().all():
            assert torch.equal(bits(ours), bits(theirs.to(ours.dtype)))
        elif ours.numel():
            assert_matches(ours, theirs.double(), dtype, scale=scale)


def bits(tensor):
    """The stored bytes, for bitwise comparison (NaN included)."""
    return tensor.contiguous().view(-1).view(torch.uint8) if tensor.numel() else tensor


def assert_same_bits(first, second, label):
    for index, (a, b) in enumerate(zip(first, second)):
        if a is None or b is None:  # an output not requested
            assert a is None and b is None, f"{label}: output {index} computed only once"
            continue
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b)), \
            f"{label}: output {index} differs between schedules (a race, or an order-dependent sum)"


def run_case(module, case, schedule_seed):
    """Forward schedule, checks, then a second schedule that must give the same bits."""
    module.set_schedule("forward", 0)
    outputs = module.sigmoid_focal_loss_forward(*case.arguments())
    check_outputs(case, outputs, case.describe)
    check_against_cpu_kernels(case, outputs)
    second = ("reverse", 0) if schedule_seed % 2 else ("shuffled", schedule_seed)
    module.set_schedule(*second)
    try:
        again = module.sigmoid_focal_loss_forward(*case.arguments())
    finally:
        module.set_schedule("forward", 0)
    assert_same_bits(outputs, again, f"{case.describe} under {second}")
    return outputs


FORWARD_INSTANCES = [
    (types, gamma_mode, grad_inputs, packed)
    for types, gamma_mode, grad_inputs, packed in itertools.product(
        FORWARD_TYPES, GAMMA_MODES, [False, True], [True, False])
    if not packed or forward_pack_size(types[0], types[1] == "labels") > 1
]


# The forms in the order the General element kernels' cases take them in turn.
FORM_ROTATION = ["focal", "star", "quality", "varifocal"]


def form_options(step, gamma, gamma_mode="general", packed=False):
    """(form, alpha, beta, label_smoothing) of a forward case: in the General element kernels
    the forms in turn (a run-time switch there; the host sends every form but the focal loss to
    them), each with the options it takes, elsewhere the focal loss; FL* needs gamma > 0, so
    where gamma is 0 the quality focal loss (plain BCE then) takes its turn."""
    family = gamma_mode == "general" and not packed
    form = FORM_ROTATION[step % len(FORM_ROTATION)] if family else "focal"
    if form == "star" and gamma == 0:
        form = "quality"
    alpha = [0.25, -1.0, 0.0, 1.0][step // 4 % 4]
    smoothing = 0.1 if step // 4 % 4 == 3 else 0.0
    if form == "quality":
        return form, -1.0, 0.0, 0.0
    if form == "varifocal":
        return form, 0.75 if alpha < 0 else alpha, 0.0, 0.0
    if form not in ("focal", "star"):
        raise KeyError(f"form_options has no options of the form {form!r}")
    return form, alpha, (0.5 if form == "star" else 0.0), smoothing


def instance_id(types, gamma_mode, grad_inputs):
    """A forward instance's test id, without its path: e.g. float16-labels-f32loss-two-grad."""
    x_dtype, targets, float32_loss = types
    return (f"{x_dtype}-{targets}-{'f32loss' if float32_loss else 'loss'}-{gamma_mode}-"
            f"{'grad' if grad_inputs else 'nograd'}").replace("torch.", "")


@pytest.mark.parametrize(
    "types, gamma_mode, grad_inputs, packed", FORWARD_INSTANCES,
    ids=[f"{instance_id(*instance[:3])}-{'packed' if instance[3] else 'element'}"
         for instance in FORWARD_INSTANCES],
)
def test_forward_instance(emulated, types, gamma_mode, grad_inputs, packed):
    """Each forward kernel instance, launched by the op layer in several configurations."""
    x_dtype, targets, float32_loss = types
    labels = targets == "labels"
    index = FORWARD_INSTANCES.index((types, gamma_mode, grad_inputs, packed))
    expected_kernel = forward_kernel_name(x_dtype, targets, float32_loss, gamma_mode, grad_inputs,
                                          forward_pack_size(x_dtype, labels, grad_inputs) if packed else 1)
    for variant in range(3):
        step = index * 3 + variant
        shape = GRID_STRIDE if variant == 0 else SHAPES[step % len(SHAPES)]
        if labels and not shape:
            shape = (1, 4)  # labels need a class dimension
        if not packed and shape in ((), (1, 1)):
            shape = (5, 7)  # one element is always aligned: give the misaligned view more
        weight_kind = ["none", "element", "row", "class", "scalar"][step % 5]
        pack = forward_pack_size(x_dtype, labels, grad_inputs)
        if packed and may_track_rows(labels, weight_kind) and (shape[-1] if shape else 1) < pack:
            shape = (5, 2 * pack + 1)  # rows shorter than a pack take the element path
        gamma = GAMMA_MODES[gamma_mode][step % len(GAMMA_MODES[gamma_mode])]
        form, alpha, beta, label_smoothing = form_options(step, gamma, gamma_mode, packed)
        case = Case(
            x_dtype=x_dtype, targets=targets, float32_loss=float32_loss, gamma=gamma,
            shape=shape, misaligned=not packed,
            reduction=["none", "mean", "sum"][step % 3],
            weight_kind=weight_kind,
            alpha=alpha, form=form, beta=beta, label_smoothing=label_smoothing,
            grad_inputs=grad_inputs,
            grad_targets=step % 2 == 0 and (not labels or step // 4 % 2 == 0),
            scores=labels and step // 4 % 2 == 0,  # (labels, scores) pairs, in every form
            ignore=["none", "first", "last", "spread", "all"][step % 5],
            label_dtype=[torch.int64, torch.int32][step % 2],
            ignore_index=[-100, -1][step // 2 % 2],
            seed=step,
        )
        emulated.set_multiprocessor_count(1 if variant == 0 else MULTIPROCESSORS[step % len(MULTIPROCESSORS)])
        if variant == 0:
            work = case.inputs.numel() // (forward_pack_size(x_dtype, labels, grad_inputs) if packed else 1)
            assert work > grid_blocks(emulated, work) * 256, "the grid-stride loop must iterate"
        launched = launches_during(emulated, lambda: run_case(emulated, case, step))
        assert_forward_launches(launched, expected_kernel, labels, packed, 2, case.describe)
        if variant == 0:  # the grid fills the one SM with the blocks the launch bounds allow
            grid = emulated.last_grids()[expected_kernel]
            # (a label element kernel's last launch is the one over the 180 rows: one block)
            expected = 1 if labels and not packed else 4
            assert grid == expected, f"{case.describe}: {grid} blocks, expected {expected}"


PACKED_INSTANCES = [instance for instance in FORWARD_INSTANCES if instance[3]]


@pytest.mark.parametrize(
    "types, gamma_mode, grad_inputs", [instance[:3] for instance in PACKED_INSTANCES],
    ids=[instance_id(*instance[:3]) for instance in PACKED_INSTANCES],
)
def test_packed_loops_of_every_weight_kind(emulated, types, gamma_mode, grad_inputs):
    """A packed kernel has loops for weights none or per element (no row and class, but for
    labels) and for weights per row or per class, with floating targets each with and without
    the target gradient (the scores' gradient of labels is their second launch's): every one of
    them runs, over packs that cross rows."""
    x_dtype, targets, float32_loss = types
    labels = targets == "labels"
    expected_kernel = forward_kernel_name(x_dtype, targets, float32_loss, gamma_mode, grad_inputs,
                                          forward_pack_size(x_dtype, labels, grad_inputs))
    for step, (weight_kind, grad_targets) in enumerate(
            [("none", False), ("element", True), ("row", False), ("class", True)]):
        gammas = GAMMA_MODES[gamma_mode]
        case = Case(
            x_dtype=x_dtype, targets=targets, float32_loss=float32_loss, gamma=gammas[step % len(gammas)],
            shape=(37, 19), misaligned=False, reduction=["none", "sum"][step % 2],
            weight_kind=weight_kind, alpha=0.25, label_smoothing=0.0, grad_inputs=grad_inputs,
            grad_targets=grad_targets, scores=labels and grad_targets, ignore="spread", seed=step,
        )
        emulated.set_multiprocessor_count(1)
        launched = launches_during(emulated, lambda: run_case(emulated, case, step))
        assert_forward_launches(launched, expected_kernel, labels, True, 2, case.describe)


@pytest.mark.parametrize("dtype", [F16, BF16, F32, F64], ids=lambda dtype: str(dtype)[len("torch."):])
@pytest.mark.parametrize("gamma", [0.0, 0.25, 0.5, 1.0, 2.0, 3.5, 7.5, 8.0])
@pytest.mark.parametrize("misaligned", [False, True], ids=["packed", "element"])
def test_extreme_logits_are_finite_and_exact(emulated, dtype, gamma, misaligned):
    """tests/test_extremes.py's grid on the CUDA kernels, which keep subnormals (the CPU kernels
    flush them): where q is subnormal, 1 / q overflows and a ratio bounded by 1 became inf, then
    q^gamma * inf = NaN."""
    inputs, targets = extreme_grid(dtype)
    loss, grad_inputs, grad_targets, _, _ = emulated.sigmoid_focal_loss_forward(
        placed(inputs, misaligned), placed(targets, misaligned), None, None, 0, [0.25, gamma],
        REDUCTION_CODES["none"], -100, 0.0, False, GRAD_INPUTS | GRAD_TARGETS)
    expected_loss, expected_gx, expected_gt = exact_focal_loss_and_grads(inputs, targets, 0.25, gamma)
    scale_inputs, scale_targets = derivative_term_scales(inputs, targets, 0.25, gamma)
    for name, output in (("loss", loss), ("grad_inputs", grad_inputs), ("grad_targets", grad_targets)):
        assert torch.isfinite(output).all(), f"{name}: {output}"
    assert_matches(loss, expected_loss, dtype)
    assert_matches(grad_inputs, expected_gx, saved_dtype(dtype), scale=scale_inputs)
    assert_matches(grad_targets, expected_gt, saved_dtype(dtype), scale=scale_targets)


# The fixture that resets the device per test runs once for all examples: fine, as none may fail.
@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=consistency_cases())
def test_gradients_are_the_derivatives_of_the_loss(emulated, case):
    """test_consistency.py's property on the CUDA kernels (float64: the Zero, Two and General
    element kernels, every form)."""
    assert_gradients_are_derivatives(emulated.sigmoid_focal_loss_forward, *case)


@pytest.mark.parametrize("misaligned", [False, True], ids=["packed", "element"])
def test_float32_softplus_and_sigmoid_are_within_4_ulp(emulated, misaligned):
    """tests/test_extremes.py's ulp check on the CUDA kernels' float32 math (with the emulated
    device intrinsics, emulation.h)."""
    x = softplus_sigmoid_logits()
    loss, grad_inputs, _, _, _ = emulated.sigmoid_focal_loss_forward(
        placed(x, misaligned), torch.zeros_like(x), None, None, 0, [-1.0, 0.0], REDUCTION_CODES["none"],
        -100, 0.0, False, GRAD_INPUTS)
    assert worst_softplus_sigmoid_ulp(x, loss, grad_inputs) <= 4


@pytest.mark.parametrize("dtype", [F16, BF16])
@pytest.mark.parametrize("gamma", [0.0, 2.0, 1.5, 0.7], ids=["zero", "two", "products", "pow"])
def test_16_bit_results_are_correctly_rounded(emulated, dtype, gamma):
    """The 16-bit kernels' math takes the GPU's exp2 and reciprocal estimates unrefined
    (StorageRoundedMath, csrc/cuda/forward.cuh), emulated at their documented worst error:
    conftest.assert_16_bit_results_are_correctly_rounded, at gamma 0 to |x| <= 93, where the
    loss is e = exp(-|x|) itself, a subnormal float that bfloat16 keeps."""
    def forward(inputs, targets):
        return emulated.sigmoid_focal_loss_forward(
            inputs, targets, None, None, 0, [0.25, gamma], REDUCTION_CODES["none"], -100, 0.0,
            False, GRAD_INPUTS | GRAD_TARGETS)[:3]
    assert_16_bit_results_are_correctly_rounded(forward, dtype, gamma, 93.0 if gamma == 0 else 87.0)


def test_float32_reciprocal_is_within_half_an_ulp(emulated):
    """The kernels' float32 reciprocal (csrc/cuda/forward.cuh): the GPU's estimate, emulated no
    better than its documented 1 ulp (1 ulp from the rounded value, so up to 1.5 from the exact
    one), then one Newton step, over the divisors the formulas have: 1 + e and 2 + v in [1, 3],
    q and |p - t| times 2^32 in [2^-117, 2^32] (targets in [0, 1]). The step squares the estimate's relative error
    (below 2^-44) and its last fused multiply-add rounds once: 0.5 ulp, and 2^-20 to spare."""
    generator = torch.Generator().manual_seed(0)
    divisors = torch.cat([
        torch.linspace(1.0, 3.0, 100_001, dtype=F64),
        2.0 ** torch.empty(100_001, dtype=F64).uniform_(-117.0, 32.0, generator=generator),
    ]).float()
    exact = 1.0 / divisors.double()
    errors = (emulated.device_reciprocal(divisors).double() - exact).abs() / float32_ulp(exact)
    worst = errors.max().item()
    assert worst <= 0.5 + 2.0 ** -20, f"worst {worst:.6f} ulp at {divisors[errors.argmax()].item()}"


def exact_power_and_ulp(base, exponent):
    """base^exponent to 40 digits (Decimal), and the spacing of doubles at it (2^-1074 where it
    is subnormal)."""
    if base == 0.0:
        return decimal.Decimal(0), 2.0 ** -1074
    with decimal.localcontext() as context:
        context.prec = 40
        exact = (decimal.Decimal(exponent) * decimal.Decimal(base).ln()).exp()
    mantissa, power_of_two = math.frexp(float(exact))
    ulp = 2.0 ** max(power_of_two - 53, -1074)
    if mantissa == 0.5 and exact < decimal.Decimal(float(exact)):  # rounded up to 2^k: below it
        ulp = max(ulp / 2, 2.0 ** -1074)
    return exact, ulp


@pytest.mark.parametrize("exponent", [0.1, 0.25, 0.75, 1.3, 2.2, 5.3, 9.7, 33.1])
def test_float64_pow_is_within_its_error_bound(emulated, exponent):
    """The kernels' float64 pow (focal_math.h's pow_double, DeviceMath<double>) against the exact
    power, over bases spread across every binade (subnormals too), in (0, 1) and next to 1, and
    the edges: 0, 1, the reduction's sqrt(1/2) boundary. Its error: half an ulp for the last
    rounding, the exp's (here the host's: glibc's, within 0.511 ulp by its source, 0.509 with
    FMA), and exponent / 32 ulp from the logarithm: its error, below 2^-58 absolute (the 3-4
    roundings of its series' tail, |tail| < 2^-8, give about 2^-59.4; 2^-59.5 measured), times
    the exponent is a relative error of the result, at up to 2^53 ulp per unit. Without y's
    second double it is 83 ulp off at exponent 0.1 already (the mutation check's
    pow_one_double)."""
    generator = torch.Generator().manual_seed(3)
    bases = torch.cat([
        2.0 ** -torch.empty(1000, dtype=F64).uniform_(0.0, 1074.0, generator=generator),
        torch.rand(500, dtype=F64, generator=generator),
        1.0 - torch.rand(200, dtype=F64, generator=generator) * 1e-6,
        torch.tensor([0.0, 1.0, 2.0 ** -1074, 2.0 ** -1022, 0.5, 0.7071067811865475,
                      0.7071067811865476, 1.0 - 2.0 ** -53], dtype=F64),
    ])
    powers = emulated.device_pow(bases, exponent)
    assert powers[bases == 0.0].eq(0.0).all() and powers[bases == 1.0].eq(1.0).all()
    bound = 0.5 + 0.511 + exponent / 32
    worst, worst_base = 0.0, None
    for base, power in zip(bases.tolist(), powers.tolist()):
        exact, ulp = exact_power_and_ulp(base, exponent)
        error = float(abs(decimal.Decimal(power) - exact)) / ulp
        if error > worst:
            worst, worst_base = error, base
    assert worst <= bound, f"worst {worst:.3f} ulp (bound {bound:.3f}) at base {worst_base!r}"


@pytest.mark.parametrize("x_dtype, target_dtype", [
    (F16, F64), (F32, F16), (BF16, F16), (F64, F32), (F32, BF16), (F16, BF16), (F32, F64),
])
def test_converted_dtype_pairs(emulated, x_dtype, target_dtype):
    """Pairs the CUDA kernels do not read directly are converted to the promoted dtype first."""
    assert not emulated.reads_dtype_pair(x_dtype, target_dtype)
    case = Case(x_dtype=x_dtype, targets=target_dtype, float32_loss=False, gamma=2.0, shape=(37, 13),
                misaligned=False, reduction="sum", weight_kind="class", alpha=0.25, label_smoothing=0.0,
                grad_inputs=True, grad_targets=True, ignore="none")
    outputs = run_case(emulated, case, 1)
    assert outputs[1].dtype == saved_dtype(x_dtype) and outputs[2].dtype == saved_dtype(target_dtype)


@pytest.mark.parametrize("dtype", [F16, BF16])
@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_autocast_reads_16_bit_soft_targets_as_float32(emulated, dtype, reduction):
    """Under autocast (float32_loss) the loss of 16-bit logits and 16-bit floating targets is
    float32, computed from the targets in float32: the op layer converts them, so that the
    kernels read a (16-bit, float32) pair, one they have an instance for."""
    case = Case(x_dtype=dtype, targets=dtype, float32_loss=True, gamma=2.0, shape=(37, 13),
                misaligned=False, reduction=reduction, weight_kind="class", alpha=0.25, label_smoothing=0.0,
                grad_inputs=True, grad_targets=True, ignore="none")
    outputs = run_case(emulated, case, 1)
    assert outputs[0].dtype == torch.float32


@pytest.mark.parametrize("output", ["loss", "grad_inputs", "grad_targets", "unweighted_loss"])
@pytest.mark.parametrize("dtype", [F16, F32, F64])
def test_one_misaligned_output_takes_the_element_path(emulated, output, dtype):
    """Aligned inputs, one output placed one element off: the kernel must not store it in packs
    (the sanitized sweep's alignment check would catch a misaligned 16-byte store)."""
    case = Case(x_dtype=dtype, targets=dtype, float32_loss=False, gamma=2.0, shape=(37, 13),
                misaligned=False, reduction="none", weight_kind="element", alpha=0.25,
                label_smoothing=0.0, grad_inputs=True, grad_targets=True, ignore="none")
    n = case.inputs.numel()
    outputs = {name: placed(torch.zeros(n, dtype=dtype if name == "loss" else saved_dtype(dtype)),
                            name == output).view(case.shape)
               for name in ("loss", "grad_inputs", "grad_targets", "unweighted_loss")}
    count = torch.zeros((), dtype=torch.int64)
    weight = case.weight.double() if dtype == F64 else case.weight.float()
    name = forward_kernel_name(dtype, dtype, False, "two", True, 1)
    launched = launches_during(emulated, lambda: emulated.forward_into(
        case.inputs, case.targets, weight, WEIGHT_KINDS["element"], 0.25, 2.0, 0.0, 0, -100,
        outputs["loss"], outputs["grad_inputs"], outputs["grad_targets"], outputs["unweighted_loss"], count))
    assert launched.get(name) == 1, launched
    check_outputs(case, (outputs["loss"], outputs["grad_inputs"], outputs["grad_targets"],
                         outputs["unweighted_loss"], count), case.describe)


@pytest.mark.parametrize("dtype", [F16, F32, F64])
def test_channels_last_is_read_in_place_through_the_op_layer(emulated, dtype):
    """The op layer's CUDA path hands the kernels channels-last inputs and targets as their
    contiguous permutation (csrc/focal_ops.cpp in_place_order), with a per-class weight permuted
    alike, and gives every per-element output the inputs' layout."""
    generator = torch.Generator().manual_seed(3)
    inputs = (torch.randn(2, 6, 3, 5, generator=generator, dtype=F64) * 4).to(dtype)
    targets = torch.rand(2, 6, 3, 5, generator=generator, dtype=F64).to(dtype)
    inputs, targets = (tensor.contiguous(memory_format=torch.channels_last) for tensor in (inputs, targets))
    weight = torch.rand(1, 6, 1, 1, generator=generator, dtype=F64).to(dtype)
    outputs = emulated.sigmoid_focal_loss_forward(
        inputs, targets, weight, None, 0, [0.25, 2.0], REDUCTION_CODES["none"], -100, 0.0, False,
        outputs_mask(True, True, True))
    x, t = inputs.double().requires_grad_(), targets.double().requires_grad_()
    unweighted = focal_cuda.reference.sigmoid_focal_loss(x, t, 0.25, 2.0, "none")
    expected = unweighted * weight.double()
    expected_grads = torch.autograd.grad(expected, (x, t), torch.ones_like(expected))
    for output, exact in zip(outputs[:4], (expected, *expected_grads, unweighted)):
        assert output.stride() == inputs.stride()
        assert_matches(output, exact.detach(), dtype)


@pytest.mark.parametrize("form, gamma", [("star", 2.0), ("quality", 2.0), ("quality", 0.0),
                                         ("varifocal", 2.0), ("varifocal", 0.0)])
@pytest.mark.parametrize("targets", [F32, "labels"])
def test_family_forms_run_in_the_general_element_kernels(emulated, form, gamma, targets):
    """The Zero, Two and packed kernels hold the focal loss alone: the family's forms at gamma 0
    and 2 (QFL's and VFL's defaults), on aligned tensors, must go to the General element
    kernels, and compute right there."""
    step = {"star": 1, "quality": 2, "varifocal": 3}[form]
    _, alpha, beta, _ = form_options(step, gamma)
    case = Case(x_dtype=F32, targets=targets, float32_loss=False, gamma=gamma, shape=(37, 13),
                misaligned=False, reduction="none", weight_kind="none", alpha=alpha, form=form,
                beta=beta, label_smoothing=0.0, grad_inputs=True, grad_targets=targets != "labels",
                ignore="spread", scores=targets == "labels")
    launched = launches_during(emulated, lambda: run_case(emulated, case, step))
    assert_forward_launches(launched, forward_kernel_name(F32, targets, False, "general", True, 1),
                            targets == "labels", False, 2)


@pytest.mark.parametrize("gamma", [1.5, 2.0])
@pytest.mark.parametrize("dtype", [F16, BF16, F32, F64], ids=lambda dtype: str(dtype)[len("torch."):])
def test_varifocal_detached_modulation(emulated, dtype, gamma):
    """VFL with detach_modulation (RT-DETR's), in the General element kernels: the loss and d/dt
    of the float64 reference, and on the negatives d/dx = alpha |p - t|^gamma (p - t)
    (tests/test_family.py checks the CPU kernels against RT-DETR's composite)."""
    generator = torch.Generator().manual_seed(9)
    x = 4 * torch.randn(37, 13, generator=generator, dtype=F64)
    t = torch.where(torch.rand(37, 13, generator=generator) < 0.5, torch.zeros_like(x),
                    torch.rand(37, 13, generator=generator, dtype=F64))
    x, t = x.to(dtype).double().requires_grad_(), t.to(dtype).double().requires_grad_()
    code = FORMS["varifocal"]
    arguments = (x.detach().to(dtype), t.detach().to(dtype), None, None, code,
                 coefficients_of(code, 0.75, gamma, detach_modulation=True), REDUCTION_CODES["none"],
                 -100, 0.0, False, outputs_mask(True, True, False))
    launched = launches_during(emulated, lambda: emulated.sigmoid_focal_loss_forward(*arguments))
    loss, grad_x, grad_t = emulated.sigmoid_focal_loss_forward(*arguments)[:3]
    assert any("General" in name for name in launched), launched
    expected = focal_cuda.reference.varifocal_loss(x, t, 0.75, gamma, "none", detach_modulation=True)
    expected_x, expected_t = torch.autograd.grad(expected, (x, t), torch.ones_like(expected))
    d = x.detach().sigmoid() - t.detach()
    negative = t.detach() <= 0
    assert_matches(expected_x[negative], (0.75 * d.abs() ** gamma * d)[negative])  # the oracle's
    # The undetached derivative's term scales bound the detached one's (a subset of its terms).
    scale_loss, scale_x, scale_t = family_term_scales(code, x, t, 0.75, gamma)
    assert_matches(loss, expected.detach(), dtype, scale=scale_loss)
    assert_matches(grad_x, expected_x, dtype, scale=scale_x)
    assert_matches(grad_t, expected_t, dtype, scale=scale_t)


@pytest.mark.parametrize("dtype", [F16, BF16, F32, F64], ids=lambda dtype: str(dtype)[len("torch."):])
def test_varifocal_detached_modulation_at_infinite_logits(emulated, dtype):
    """Detached, d/dx at x = +-inf is finite, the closed form with p = 1 or 0: t (p - t) on
    positives, alpha |p - t|^gamma (p - t) on negatives (the modulation's term left out, not 0
    times CE, which is inf or NaN there); gamma 1.5, the General kernels."""
    targets = [-0.5, 0.0, 0.5, 1.0, 1.5]
    x = torch.tensor([math.inf, -math.inf], dtype=F64).repeat_interleave(len(targets)).repeat(7)
    t = torch.tensor(targets, dtype=F64).repeat(14)
    code = FORMS["varifocal"]
    arguments = (x.to(dtype), t.to(dtype), None, None, code,
                 coefficients_of(code, 0.75, 1.5, detach_modulation=True), REDUCTION_CODES["none"],
                 -100, 0.0, False, outputs_mask(True, False, False))
    launched = launches_during(emulated, lambda: emulated.sigmoid_focal_loss_forward(*arguments))
    assert any("General" in name for name in launched), launched
    grad_x = emulated.sigmoid_focal_loss_forward(*arguments)[1]
    d = (x > 0).double() - t
    expected = torch.where(t > 0, t * d, 0.75 * d.abs() ** 1.5 * d)
    assert_matches(grad_x, expected, dtype)


@pytest.mark.parametrize("gamma", [0.5, 2.0])
@pytest.mark.parametrize("form", FORM_ROTATION)
@pytest.mark.parametrize("dtype", [F16, BF16, F32, F64], ids=lambda dtype: str(dtype)[len("torch."):])
def test_infinite_logits_give_the_cpu_kernels_results(emulated, form, dtype, gamma):
    """Logits of +-inf with targets in [0, 1] and beyond it, where some results are NaN
    (inf - inf, 0 * inf): the CPU kernels' results, NaN where theirs are (the scalar math's clamp
    once turned a NaN target gradient into float's largest, which the CPU's vector lanes kept
    NaN)."""
    # 70 elements: the CPU kernels' vector lanes and their scalar tail.
    targets = [-0.5, 0.0, 0.5, 1.0, 1.5]
    x = torch.tensor([math.inf, -math.inf], dtype=dtype).repeat_interleave(len(targets)).repeat(7)
    t = torch.tensor(targets, dtype=dtype).repeat(14)
    arguments = (x, t, None, None, FORMS[form], coefficients_of(FORMS[form], 0.25, gamma, 0.5),
                 REDUCTION_CODES["none"], -100, 0.0, False, outputs_mask(True, True, False))
    ours = emulated.sigmoid_focal_loss_forward(*arguments)
    cpu = torch.ops.focal_cuda.sigmoid_focal_loss_forward(*arguments)
    for name, on_device, on_cpu in zip(("loss", "d/dx", "d/dt"), ours, cpu):
        torch.testing.assert_close(on_device, on_cpu, equal_nan=True, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("grad_inputs", [True, False], ids=["grad", "nograd"])
@pytest.mark.parametrize("dtype", [F16, BF16, F32], ids=lambda dtype: str(dtype)[len("torch."):])
@pytest.mark.parametrize("targets, weight_kind", [("labels", "none"), ("same", "row"), ("same", "class")])
def test_rows_shorter_than_a_pack_take_the_element_path(emulated, dtype, targets, weight_kind, grad_inputs):
    """Loops that track rows (labels, weights per row or class) meet at most two rows per pack:
    rows one element shorter than a pack run one element at a time, rows a pack long in packs,
    and both give the reference's values."""
    pack = forward_pack_size(dtype, targets == "labels", grad_inputs)
    target_kind = "labels" if targets == "labels" else dtype
    for classes, expected_pack in [(pack - 1, 1), (pack, pack)]:
        case = Case(x_dtype=dtype, targets=target_kind, float32_loss=False, gamma=2.0,
                    shape=(41, classes), misaligned=False, reduction="sum", weight_kind=weight_kind,
                    alpha=0.25, label_smoothing=0.0, grad_inputs=grad_inputs, grad_targets=False,
                    ignore="spread", seed=classes)
        emulated.set_multiprocessor_count(1)
        launched = launches_during(emulated, lambda: run_case(emulated, case, classes))
        name = forward_kernel_name(dtype, target_kind, False, "two", grad_inputs, expected_pack)
        assert_forward_launches(launched, name, targets == "labels", expected_pack > 1, 2,
                                f"{classes} classes")


@pytest.mark.parametrize("grad_inputs", [True, False], ids=["grad", "nograd"])
@pytest.mark.parametrize("dtype", [F16, BF16, F32], ids=lambda dtype: str(dtype)[len("torch."):])
@pytest.mark.parametrize("ignore_index", [-100, 2])
def test_labels_at_the_ends_of_rows_in_packs_that_meet_two_rows(emulated, dtype, ignore_index, grad_inputs):
    """Rows one element longer than a pack, so that packs meet two rows, with labels at the
    rows' ends and starts (two labelled elements in one pack), the background, ignored rows
    and an ignore_index that is also a class: every output, the scores' gradient included."""
    pack = forward_pack_size(dtype, True, grad_inputs)
    classes = pack + 1
    pattern = [classes - 1, 0, classes, ignore_index, 1, classes - 1, ignore_index, 0, classes - 1]
    case = Case(x_dtype=dtype, targets="labels", float32_loss=False, gamma=2.0,
                shape=(4 * len(pattern), classes), misaligned=False, reduction="sum",
                weight_kind="row", alpha=0.25, label_smoothing=0.0, grad_inputs=grad_inputs,
                grad_targets=True, scores=True, ignore="none", ignore_index=ignore_index)
    labels = torch.tensor(pattern * 4)
    case.targets = placed(labels, False)
    case.count = int((labels != ignore_index).sum()) * classes
    emulated.set_multiprocessor_count(1)
    launched = launches_during(emulated, lambda: run_case(emulated, case, 1))
    name = forward_kernel_name(dtype, "labels", False, "two", grad_inputs, pack)
    assert_forward_launches(launched, name, True, True, 2)


@pytest.mark.parametrize("x_dtype, target_dtype", [(F16, F16), (F32, F32), (F64, F64), (BF16, F32)])
def test_misaligned_targets_take_the_element_path(emulated, x_dtype, target_dtype):
    """Aligned inputs and outputs, the targets one element off: the kernel must not load them in
    packs (the emulator reports a misaligned vector load)."""
    case = Case(x_dtype=x_dtype, targets=target_dtype, float32_loss=False, gamma=2.0, shape=(37, 13),
                misaligned=False, reduction="none", weight_kind="none", alpha=0.25,
                label_smoothing=0.0, grad_inputs=True, grad_targets=False, ignore="none")
    case.targets = placed(case.targets, True).view(case.shape)
    n = case.inputs.numel()
    loss = torch.zeros(n, dtype=target_dtype).view(case.shape)
    grad_inputs = torch.zeros(n, dtype=saved_dtype(x_dtype)).view(case.shape)
    count = torch.zeros((), dtype=torch.int64)
    name = forward_kernel_name(x_dtype, target_dtype, False, "two", True, 1)
    launched = launches_during(emulated, lambda: emulated.forward_into(
        case.inputs, case.targets, None, WEIGHT_KINDS["none"], 0.25, 2.0, 0.0, 0, -100,
        loss, grad_inputs, None, None, count))
    assert launched.get(name) == 1, launched
    expected_loss, expected_gx, *_ = case.expected()
    scale_loss, scale_inputs, _ = case.scales()
    assert_matches(loss, expected_loss.view(loss.shape), case.loss_dtype,
                   scale=None if scale_loss is None else scale_loss.view(loss.shape))
    assert_matches(grad_inputs, expected_gx.view(loss.shape), saved_dtype(x_dtype),
                   scale=None if scale_inputs is None else scale_inputs.view(loss.shape))


@pytest.mark.parametrize("x_dtype, shape", [(F32, (4000, 80)), (F64, (2000, 80))])
def test_grids_of_more_than_256_blocks(emulated, x_dtype, shape):
    """At an H100's 132 SMs these grids have >256 blocks, so the finish kernel's loop iterates."""
    emulated.set_multiprocessor_count(132)
    case = Case(x_dtype=x_dtype, targets=x_dtype, float32_loss=False, gamma=2.0, shape=shape,
                misaligned=False, reduction="mean", weight_kind="none", alpha=0.25, label_smoothing=0.0,
                grad_inputs=False, grad_targets=False, ignore="none")
    blocks = case.inputs.numel() // forward_pack_size(x_dtype) // 256
    assert blocks > 256
    run_case(emulated, case, 2)


@pytest.mark.parametrize("path", ["packed", "element"])
@pytest.mark.parametrize("targets", ["float32", "labels"])
def test_a_sum_of_thousands_of_losses_a_thread_stays_within_an_ulp(emulated, targets, path):
    """At one SM each of the 1,024 threads adds 4,096 losses (10^9 logits on an H100: ~7,000).
    The reduced loss against the float64 sum of the same kernels' elementwise losses: within one
    float32 ulp, as the CPU's (added in float, the threads' sums were 25 ulp off)."""
    emulated.set_multiprocessor_count(1)
    generator = torch.Generator().manual_seed(11)
    rows, classes = 2**17, 32
    x = placed(torch.randn(rows, classes, generator=generator) * 3, path == "element")
    if targets == "labels":
        t = torch.randint(0, classes + 1, (rows,), generator=generator)
    else:
        t = placed((torch.rand(rows, classes, generator=generator) < 0.05).float(), path == "element")
    assert x.numel() // grid_blocks(emulated, x.numel()) // 256 >= 4096

    def forward(reduction):
        return emulated.sigmoid_focal_loss_forward(x, t, None, None, 0, [0.25, 2.0], REDUCTION_CODES[reduction],
                                                   -100, 0.0, False, 0)[0]
    expected = forward("none").double().sum()
    assert abs(forward("sum").double() - expected) <= float32_ulp(expected)


def test_a_softmax_sum_of_a_thousand_positions_a_thread_stays_within_an_ulp(emulated):
    """The softmax loss's threads add a loss per position: 1,024 each at one SM."""
    emulated.set_multiprocessor_count(1)
    generator = torch.Generator().manual_seed(12)
    inputs = torch.randn(2**20, 3, generator=generator) * 3
    labels = torch.randint(0, 3, (2**20,), generator=generator)

    def forward(reduction):
        return emulated.softmax_focal_loss_forward(inputs, labels, None, [-1.0, 2.0], REDUCTION_CODES[reduction],
                                                   -100, 0.0, False, 0)[0]
    expected = forward("none").double().sum()
    assert abs(forward("sum").double() - expected) <= float32_ulp(expected)


def test_each_device_is_asked_its_multiprocessor_count_once(emulated):
    """grid_size keeps each device's SM count: a driver query on every launch would add to the
    per-call overhead that is the whole cost of small inputs. Each count below is an emulated
    device of its own that no other test uses; the grid must still be that device's."""
    x = torch.randn(2000, 13)
    targets = torch.rand(2000, 13)
    packs = x.numel() // 4  # 26 blocks of them: more than 1, 5 or 6 SMs hold, so each grid differs
    def forward():
        launched = launches_during(emulated, lambda: emulated.sigmoid_focal_loss_forward(
            x, targets, None, None, 0, [0.25, 2.0], 2, -100, 0.0, False, GRAD_INPUTS | GRAD_TARGETS))
        return emulated.last_grids()[next(name for name in launched if "focal_forward_kernel" in name)]
    for multiprocessors in (5, 6):
        emulated.set_multiprocessor_count(multiprocessors)
        before = emulated.multiprocessor_queries()
        grids = [forward() for _ in range(3)]
        assert emulated.multiprocessor_queries() == before + 1
        assert grids == [grid_blocks(emulated, packs)] * 3 == [4 * multiprocessors] * 3
        emulated.set_multiprocessor_count(1)  # another device in between
        assert forward() == grid_blocks(emulated, packs) == 4
        emulated.set_multiprocessor_count(multiprocessors)
        before = emulated.multiprocessor_queries()
        assert forward() == grid_blocks(emulated, packs)
        assert emulated.multiprocessor_queries() == before


# The backward: (saved dtype, grad_output dtype) pairs the kernels read, elementwise or one value.
BACKWARD_PAIRS = [(F16, F16), (BF16, BF16), (F32, F32), (F64, F64), (F16, F32), (BF16, F32)]


@pytest.mark.parametrize("stored, grad_dtype", BACKWARD_PAIRS + [(F32, F16), (F16, F64)])
@pytest.mark.parametrize("reduction, value", [("none", None)] + [
    (reduction, value) for reduction in ["expanded", "single", "mean", "sum"] for value in [0.75, 1.0]])
@pytest.mark.parametrize("misaligned", [False, True])
def test_backward(emulated, stored, grad_dtype, reduction, value, misaligned):
    """Functional and in-place backward of a saved gradient stored in `stored`: elementwise
    grad_output (none), one value (an expanded scalar, a single-element loss, mean, sum), 1
    among them (in place, the kernel leaves saved as it is; the functional one still copies
    it); packed and element paths; at one SM, so that the grid-stride loop iterates."""
    generator = torch.Generator().manual_seed(5)
    shape = (1,) if reduction == "single" else (64, 130)
    saved = placed((torch.randn(shape, generator=generator, dtype=F64) * 3).to(stored), misaligned)
    emulated.set_multiprocessor_count(1)
    work = saved.numel() // (1 if misaligned else pack_size(stored))
    assert reduction == "single" or work > grid_blocks(emulated, work) * 256
    code = {"none": 0, "expanded": 0, "single": 0, "mean": 1, "sum": 2}[reduction]
    if reduction == "none":
        grad_output = placed(torch.rand(shape, generator=generator, dtype=F64).to(grad_dtype), misaligned)
    elif reduction == "expanded":
        grad_output = torch.tensor(value, dtype=grad_dtype).expand(shape)
    elif reduction == "single":
        grad_output = torch.tensor([value], dtype=grad_dtype)
    else:
        grad_output = torch.tensor(value, dtype=grad_dtype)
    count = torch.tensor(123, dtype=torch.int64)
    expected = saved.double() * grad_output.double() / (123 if reduction == "mean" else 1)
    functional = emulated.sigmoid_focal_loss_backward(grad_output, saved, count, code)
    cpu = torch.ops.focal_cuda.sigmoid_focal_loss_backward(grad_output, saved, count, code)
    assert functional.dtype == stored
    assert_matches(functional, expected, stored)
    # One factor, rounded once, then one product per element: the CPU's values bit for bit.
    assert torch.equal(bits(functional), bits(cpu))
    emulated.set_schedule("reverse", 0)
    try:
        assert torch.equal(bits(functional), bits(emulated.sigmoid_focal_loss_backward(grad_output, saved, count, code)))
    finally:
        emulated.set_schedule("forward", 0)
    emulated.sigmoid_focal_loss_backward_(grad_output, saved, count, code)
    assert_matches(saved, expected, stored)


@pytest.mark.parametrize("grad_output", [1.0, math.nan, math.inf])
@pytest.mark.parametrize("dtype", [F16, F32, F64])
def test_mean_with_zero_count_gives_zero_gradient(emulated, dtype, grad_output):
    """The mean of nothing is NaN, so whatever follows it (a log, a sqrt) may send NaN back:
    every element was ignored, and its gradient is 0 all the same, on CUDA as on the CPU."""
    saved = torch.randn(37, 13).to(dtype)  # nonzero: a factor that is not 0 shows
    zero = torch.tensor(0, dtype=torch.int64)
    value = torch.tensor(grad_output, dtype=dtype)
    for backward in (emulated.sigmoid_focal_loss_backward, torch.ops.focal_cuda.sigmoid_focal_loss_backward):
        assert torch.equal(backward(value, saved, zero, 1), torch.zeros_like(saved))
    emulated.sigmoid_focal_loss_backward_(value, saved, zero, 1)
    assert torch.equal(saved, torch.zeros_like(saved))


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("targets", ["float32", "labels"])
def test_float16_gradients_survive_a_loss_scale(emulated, reduction, targets):
    """float16 logits: the saved gradient is float32, so scaling by GradScaler's 2^16 in the
    backward and rounding to float16 afterwards keeps what float16 storage would have flushed."""
    from test_loss_scaling import LOSS_SCALE, check_scaled_float16_gradient, float16_case

    x, t = float16_case(targets)
    code = REDUCTION_CODES[reduction]
    _, saved, _, _, count = emulated.sigmoid_focal_loss_forward(
        x, t, None, None, 0, [0.25, 2.0], code, -100, 0.0, False, GRAD_INPUTS)
    assert saved.dtype == F32
    scaled = emulated.sigmoid_focal_loss_backward(torch.tensor(float(LOSS_SCALE)), saved, count, code)
    check_scaled_float16_gradient(scaled.to(F16), x, t, reduction)


@pytest.mark.parametrize("ignore_index", [-100, 5])
def test_all_rows_ignored_mean_is_nan_with_zero_count(emulated, ignore_index):
    x = torch.randn(37, 13)
    labels = torch.full((37,), ignore_index, dtype=torch.int64)
    loss, grad, _, _, count = emulated.sigmoid_focal_loss_forward(
        x, labels, None, None, 0, [0.25, 2.0], 1, ignore_index, 0.0, False, GRAD_INPUTS)
    assert torch.isnan(loss) and count.item() == 0 and torch.equal(grad, torch.zeros_like(x))


def test_empty_inputs_launch_nothing(emulated):
    x = torch.empty(0, 13)
    launched = launches_during(emulated, lambda: emulated.sigmoid_focal_loss_forward(
        x, torch.empty(0, 13), None, None, 0, [0.25, 2.0], 2, -100, 0.0, False, GRAD_INPUTS))
    assert launched == {}


def test_label_rows_of_more_than_2_30_classes_are_refused(emulated):
    """The label kernels count a row's classes in 32 bits, a class and a grid stride's classes
    added: more classes would wrap. Refused by the op layer before any launch (the memory is
    never touched)."""
    x = torch.empty(1, 2**30 + 1, dtype=F16)
    labels = torch.zeros(1, dtype=torch.int64)
    before = emulated.kernel_instances()
    with pytest.raises(ValueError, match=r"the classes\) must be at most 1073741824, got 1073741825"):
        emulated.sigmoid_focal_loss_forward(x, labels, None, None, 0, [0.25, 2.0], 2, -100, 0.0, False, 0)
    assert emulated.kernel_instances() == before


@pytest.mark.parametrize("bad_label", [14, -1, -7])
def test_bad_label_raises_the_device_assert(emulated, capfd, bad_label):
    """As on a GPU: the kernel asserts, the error is sticky until the context is reset."""
    x = torch.randn(37, 13)
    labels = torch.randint(0, 14, (37,))
    labels[20] = bad_label
    with pytest.raises(RuntimeError, match="device-side assert triggered"):
        emulated.sigmoid_focal_loss_forward(x, labels, None, None, 0, [0.25, 2.0], 0, -100, 0.0, False, GRAD_INPUTS)
    printed = capfd.readouterr().out
    assert (f"targets holds the class label {bad_label}; valid labels are 0 to C - 1, C (background) and "
            "ignore_index, for the C classes of inputs") in printed
    assert "Assertion `*label >= 0 && *label < classes + with_background" in printed
    good = torch.randint(0, 14, (37,))
    with pytest.raises(RuntimeError, match="device-side assert triggered"):  # sticky
        emulated.sigmoid_focal_loss_forward(x, good, None, None, 0, [0.25, 2.0], 0, -100, 0.0, False, GRAD_INPUTS)
    emulated.reset_device()
    emulated.sigmoid_focal_loss_forward(x, good, None, None, 0, [0.25, 2.0], 0, -100, 0.0, False, GRAD_INPUTS)


# The softmax focal loss's kernel: (inputs dtype, soft targets, gradient, threads a position)
# instances, on NCHW (positions one stride apart), (N, C), channels-last and unbatched layouts,
# a thread a position; with a warp's worth of classes or more side by side, a warp a position.
SOFTMAX_LAYOUTS = {
    "nchw": ((3, 5, 4, 7), None),
    "rows": ((37, 13), None),
    "channels_last": ((2, 6, 3, 5), torch.channels_last),
    "unbatched": ((31,), None),
    "warp_rows": ((9, 70), None),
    "warp_channels_last": ((2, 32, 2, 3), torch.channels_last),
}


def softmax_case(shape, memory_format, dtype, kind, seed):
    from test_softmax import make_case

    inputs, targets = make_case(shape, dtype, "cpu", "probabilities" if kind == "probabilities" else "labels",
                                seed=seed)
    if memory_format is not None:
        inputs = inputs.contiguous(memory_format=memory_format)
        if kind == "probabilities":
            targets = targets.contiguous(memory_format=memory_format)
    return inputs, targets


@pytest.mark.parametrize("dtype", [F16, BF16, F32, F64], ids=lambda dtype: str(dtype)[len("torch."):])
@pytest.mark.parametrize("kind", ["labels", "smoothed", "probabilities"])
@pytest.mark.parametrize("grad", [False, True], ids=["loss", "grad"])
def test_softmax_instance(emulated, dtype, kind, grad):
    """Each instance on every layout, weighted and not, each reduction, against the float64
    definition (tests/test_softmax.py) and bitwise against a second schedule (reverse or
    shuffled, by turns). Ignored positions hold NaN and inf logits, which must leave no trace."""
    from test_softmax import expected_loss, gradient_scale, with_ignored_logits_poisoned

    smoothing = 0.1 if kind == "smoothed" else 0.0
    for seed, (layout, (shape, memory_format)) in enumerate(SOFTMAX_LAYOUTS.items()):
        inputs, targets = softmax_case(shape, memory_format, dtype, kind, seed)
        kernel_inputs = inputs if kind == "probabilities" else with_ignored_logits_poisoned(inputs, targets)
        classes = shape[0] if len(shape) == 1 else shape[1]
        for weight in (None, torch.rand(classes, dtype=torch.float64) + 0.5):
            for reduction in ("none", "mean", "sum"):
                emulated.set_multiprocessor_count(MULTIPROCESSORS[seed % len(MULTIPROCESSORS)])
                arguments = (kernel_inputs, targets, weight, [0.25, 1.5], REDUCTION_CODES[reduction], -100,
                             smoothing, False,
                             outputs_mask(grad, grad and kind == "probabilities", grad and weight is not None))
                emulated.set_schedule("forward", 0)
                outputs = emulated.softmax_focal_loss_forward(*arguments)
                # Reverse runs warp 0 last, after the other warps are into the block's next sum.
                emulated.set_schedule(*(("reverse", 0) if seed % 2 else ("shuffled", seed + 1)))
                try:
                    again = emulated.softmax_focal_loss_forward(*arguments)
                finally:
                    emulated.set_schedule("forward", 0)
                for first, second in zip(outputs, again):
                    assert (first is None and second is None or torch.equal(first, second)
                            or (first.isnan().all() and second.isnan().all()))
                loss, grad_inputs, grad_targets, unweighted, divisor = outputs
                x = inputs.double().clone().requires_grad_(grad)
                t = targets.double().clone().requires_grad_(grad) if kind == "probabilities" else targets
                options = dict(alpha=0.25, gamma=1.5, reduction=reduction, weight=weight,
                               label_smoothing=smoothing)
                expected = expected_loss(x, t, **options)
                assert_matches(loss, expected.detach(), dtype)
                if not grad:
                    assert grad_inputs is None
                    continue
                expected.backward(torch.ones_like(expected))
                # The op's gradients are unscaled (as for "sum"); backward scales them.
                unscaled = reduction if reduction == "none" else "sum"
                if reduction == "mean":
                    x.grad *= divisor.item()
                    if t is not targets:
                        t.grad *= divisor.item()
                scale = gradient_scale(inputs, targets, 0.25, 1.5, unscaled, weight, smoothing)
                assert_matches(grad_inputs, x.grad, dtype, scale=scale)
                if kind == "probabilities":
                    assert_matches(grad_targets, t.grad, dtype)
                if weight is not None:  # each class's loss before its weight
                    math_dtype = F64 if dtype == F64 else F32
                    assert_matches(unweighted, unweighted_terms(inputs, targets, 0.25, 1.5, smoothing), math_dtype)


def unweighted_terms(inputs, targets, alpha, gamma, label_smoothing):
    """alpha q_c (1 - p_c)^gamma (-log p_c) per element, in float64."""
    from test_softmax import dense_targets

    log_p = torch.log_softmax(inputs.double(), 0 if inputs.dim() == 1 else 1)
    q = dense_targets(inputs, targets, -100, label_smoothing)
    return -alpha * q * (-torch.expm1(log_p)) ** gamma * log_p


# More positions than one SM's grid has threads (1,024) or warps (32): a thread's (a warp's)
# positions step through the samples, by less than one sample (900 a sample) and by several,
# wrapping past a sample's end (9 a sample, 32 warps: 3 samples and 5 positions a step).
@pytest.mark.parametrize("shape, memory_format", [((2, 5, 30, 30), None), ((30, 5, 10, 10), None),
                                                  ((9, 40, 3, 3), torch.channels_last)])
def test_softmax_grid_stride_and_many_blocks(emulated, shape, memory_format):
    from test_softmax import expected_loss, gradient_scale

    inputs, labels = softmax_case(shape, memory_format, F32, "labels", 0)
    x = inputs.double().requires_grad_()
    expected = expected_loss(x, labels, None, 2.0, "sum")
    expected.backward()
    scale = gradient_scale(inputs, labels, 1.0, 2.0, "sum", None, 0.0)
    for multiprocessors in (1, 132):
        emulated.set_multiprocessor_count(multiprocessors)
        loss, grad, *_ = emulated.softmax_focal_loss_forward(inputs, labels, None, [-1.0, 2.0], 2, -100, 0.0,
                                                             False, GRAD_INPUTS)
        assert_matches(loss, expected.detach(), F32)
        assert_matches(grad, x.grad, F32, scale=scale)


def test_softmax_weighted_mean_divisor_scales_the_backward(emulated):
    """The float64 divisor of a weighted mean, folded into grad_output by the backward op; a
    mean of nothing (all ignored) is NaN with a zero divisor and zero gradients."""
    inputs, labels = softmax_case((37, 13), None, F32, "labels", 3)
    weight = torch.rand(13, dtype=torch.float64) + 0.5
    _, saved, _, _, divisor = emulated.softmax_focal_loss_forward(
        inputs, labels, weight, [0.25, 2.0], 1, -100, 0.0, False, GRAD_INPUTS)
    counted = labels != -100
    # The weights in float32 (the kernels' math type), summed in float64.
    torch.testing.assert_close(divisor, weight.float()[labels[counted]].double().sum(), rtol=1e-12, atol=0)
    scaled = emulated.sigmoid_focal_loss_backward(torch.tensor(2.0), saved, divisor, 1)
    torch.testing.assert_close(scaled, saved * (2.0 / divisor.item()), rtol=1e-6, atol=0)
    labels.fill_(-100)
    loss, saved, _, _, divisor = emulated.softmax_focal_loss_forward(
        inputs, labels, weight, [0.25, 2.0], 1, -100, 0.0, False, GRAD_INPUTS)
    assert loss.isnan() and divisor.item() == 0 and torch.equal(saved, torch.zeros_like(saved))
    assert torch.equal(emulated.sigmoid_focal_loss_backward(torch.tensor(1.0), saved, divisor, 1),
                       torch.zeros_like(saved))


def rows_spread_over_lanes(rows):
    """EXTREME_ROWS-like (logits, label) rows of 5 classes spread over 40 (classes 1, 10, 19, 28
    and 37: lanes 1, 10, 19, 28 and 5 of a warp, so that ties at the max lie in different
    lanes), the other classes at -1e30, whose probabilities are 0 in float."""
    spread = []
    for row, label in rows:
        wide = [-1e30] * 40
        for c, value in enumerate(row):
            wide[1 + 9 * c] = value
        spread.append((wide, 1 + 9 * label))
    return spread


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("gamma", [0.0, 0.25, 2.0])
@pytest.mark.parametrize("lanes", ["thread", "warp"])
def test_softmax_extreme_logits_are_finite_and_exact(emulated, dtype, gamma, lanes):
    from test_softmax import EXTREME_ROWS, assert_extreme_rows_exact

    rows = EXTREME_ROWS if lanes == "thread" else rows_spread_over_lanes(EXTREME_ROWS)
    inputs = torch.tensor([row for row, _ in rows], dtype=dtype)
    labels = torch.tensor([label for _, label in rows])
    loss, grad, *_ = emulated.softmax_focal_loss_forward(inputs, labels, None, [-1.0, gamma], 0, -100, 0.0,
                                                         False, GRAD_INPUTS)
    assert_extreme_rows_exact(loss, grad, dtype, gamma, rows)


@pytest.mark.parametrize("dtype", [F32, F64])
def test_softmax_class_masked_with_minus_inf_has_a_finite_gradient(emulated, dtype):
    """Label smoothing gives a class of -inf logits a target: the loss is inf, its gradient the
    limit, as the CPU kernels give it (tests/test_softmax.py checks the limit there)."""
    generator = torch.Generator().manual_seed(4)
    inputs = (torch.randn(37, 13, generator=generator) * 3).to(dtype)
    inputs[:, 5] = -math.inf
    labels = torch.randint(0, 13, (37,), generator=generator)
    labels[labels == 5] = 0
    arguments = (inputs, labels, None, [-1.0, 2.0], 0, -100, 0.1, False, GRAD_INPUTS)
    loss, grad, *_ = emulated.softmax_focal_loss_forward(*arguments)
    cpu_loss, cpu_grad, *_ = torch.ops.focal_cuda.softmax_focal_loss_forward(*arguments)
    assert loss.isinf().all() and torch.isfinite(grad).all()
    assert_matches(grad, cpu_grad.double(), dtype)


@pytest.mark.parametrize("bad_label", [13, -1])
def test_softmax_bad_label_raises_the_device_assert(emulated, capfd, bad_label):
    inputs, labels = softmax_case((37, 13), None, F32, "labels", 4)
    labels[20] = bad_label
    with pytest.raises(RuntimeError, match="device-side assert triggered"):
        emulated.softmax_focal_loss_forward(inputs, labels, None, [-1.0, 2.0], 0, -100, 0.0, False,
                                            GRAD_INPUTS)
    printed = capfd.readouterr().out
    assert (f"targets holds the class label {bad_label}; valid labels are 0 to C - 1 and ignore_index, "
            "for the C classes along inputs' class dimension") in printed
    assert "Assertion `*label >= 0 && *label < classes + with_background" in printed
    emulated.reset_device()


@pytest.mark.parametrize("kind", ["smoothed", "probabilities"])
@pytest.mark.parametrize("gamma", [0.0, 2.0])
def test_softmax_soft_target_gradient_at_a_confident_class_keeps_its_accuracy(emulated, kind, gamma):
    from test_softmax import CLASSES, assert_confident_class_gradient_exact, confident_soft_case

    for classes in (CLASSES, 131):
        inputs, targets, smoothing = confident_soft_case(kind, classes, "cpu")
        _, grad, *_ = emulated.softmax_focal_loss_forward(inputs, targets, None, [-1.0, gamma],
                                                          REDUCTION_CODES["sum"], -100, smoothing,
                                                          False, GRAD_INPUTS)
        assert_confident_class_gradient_exact(grad, inputs, targets, gamma, smoothing)


def assert_positions_of_many_classes_match(emulated, logits, labels, kind, layout):
    """logits (16, C) as 16 positions in layout ("nchw": a thread reads a position's classes one
    by one; "rows": a warp, each lane every 32nd class), with labels (16,), smoothed by 0.1 for
    "smoothed": float32 loss and gradient against the float64 definition at the float32
    tolerance."""
    from test_softmax import MANY_CLASSES_LAYOUTS, expected_loss, gradient_scale, labels_in_layout

    labels = labels_in_layout(layout, labels)
    inputs = MANY_CLASSES_LAYOUTS[layout](logits).float()
    smoothing = 0.1 if kind == "smoothed" else 0.0
    loss, grad, *_ = emulated.softmax_focal_loss_forward(inputs, labels, None, [-1.0, 2.0],
                                                         REDUCTION_CODES["sum"], -100, smoothing,
                                                         False, GRAD_INPUTS)
    x = inputs.double().requires_grad_()
    expected = expected_loss(x, labels, None, 2.0, "sum", label_smoothing=smoothing)
    expected.backward()
    assert_matches(loss, expected.detach(), F32)
    assert_matches(grad, x.grad, F32, scale=gradient_scale(inputs, labels, 1.0, 2.0, "sum", None, smoothing))


@pytest.mark.parametrize("kind", ["labels", "smoothed"])
@pytest.mark.parametrize("layout", ["nchw", "rows"])
def test_softmax_many_classes_a_thread(emulated, kind, layout):
    """5,000 classes a thread, or 156-157 a lane of a warp (a plain running sum drifts past the
    float32 tolerance)."""
    generator = torch.Generator().manual_seed(7)
    logits = torch.randn(16, 5000, generator=generator, dtype=torch.float64) * 3
    assert_positions_of_many_classes_match(emulated, logits, torch.randint(0, 5000, (16,), generator=generator),
                                           kind, layout)


@pytest.mark.parametrize("kind", ["labels", "smoothed"])
@pytest.mark.parametrize("layout", ["nchw", "rows"])
def test_softmax_thousands_of_tiny_terms_a_thread(emulated, kind, layout):
    """tests/test_softmax.py's rows of large exponentials, then 65,536 each below half an ulp of
    their running sum: the sums of exponentials and, with soft targets, of the 65,553 classes'
    losses stay compensated, in a thread and in each lane."""
    from test_softmax import tiny_terms_logits

    assert_positions_of_many_classes_match(emulated, tiny_terms_logits(), torch.zeros(16, dtype=torch.long), kind,
                                           layout)


def test_every_mutant_text_is_in_the_kernels_once():
    """mutate.py plants each mutant by replacing its text, which must occur exactly once in csrc:
    a kernel change that moves the text leaves the mutant unplantable (two had been, unnoticed)."""
    from cuda_emulation import mutate

    sources = [path.read_text() for path in mutate.CSRC.rglob("*") if path.is_file()]
    counts = {name: sum(source.count(old) for source in sources)
              for name, _, old, _ in mutate.MUTANTS + mutate.MATH_MUTANTS}
    assert all(count == 1 for count in counts.values()), {n: c for n, c in counts.items() if c != 1}


def test_mutate_refuses_a_name_it_does_not_define():
    """A retired or misspelt name in --only fails the script, where it once ran fewer mutants
    than asked without a word."""
    from cuda_emulation import mutate

    result = subprocess.run([sys.executable, mutate.__file__, "--only", "tail_skip", "float64_grid"],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "--only: no mutant named float64_grid" in result.stderr


def test_every_kernel_instance_was_launched(emulated):
    """Runs last: every focal_cuda kernel instance compiled into the module was launched by the
    tests above (a new instance without a case fails here). The counts go into the session's
    summary (tests/conftest.py)."""
    instances = {name: count for name, count in emulated.kernel_instances().items()
                 if name.startswith("focal::cuda::")}
    cuda_emulation.launch_counts = instances
    never = sorted(name for name, count in instances.items() if count == 0)
    assert len(instances) == 190, f"{len(instances)} kernel instances; update this count with the kernels"
    assert not never, f"{len(never)} of {len(instances)} kernel instances never launched: {never}"
