"""`python -m focal_cuda`: its options, its correctness check and verdict, its timing report and
what it reports as not checked."""

import os
import runpy
import subprocess
import sys
import warnings

import pytest
import torch

import focal_cuda
from focal_cuda import __main__ as selfcheck

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
LOSSES = ["sigmoid_focal_loss", "sigmoid_focal_loss_star", "quality_focal_loss", "varifocal_loss",
          "softmax_focal_loss"]
RIGHT = {name: getattr(focal_cuda, name) for name in LOSSES}


def test_rounds_alternate_the_order_of_the_steps():
    calls = []
    steps = [lambda: calls.append("a"), lambda: calls.append("b")]
    times = selfcheck.timed_rounds(steps, "cpu", rounds=3)
    assert calls == ["a", "b"] + ["a", "b", "b", "a", "a", "b"]  # warm-up, then flipping rounds
    assert [len(t) for t in times] == [3, 3]
    assert all(value >= 0 for t in times for value in t)


def test_spread_is_median_and_quartiles():
    assert selfcheck.spread([float(v) for v in (13, 1, 9, 5, 17, 3, 11, 7, 15)]) == (9.0, 5.0, 13.0)


def test_share_of_the_cpus_used_by_other_processes():
    cpus = os.cpu_count()
    # 6 CPU-seconds on the machine in 2 s, 2 of them ours: others used 4 of 2 * cpus.
    assert selfcheck.others_share((10.0, 1.0), (16.0, 3.0), 2.0) == 4.0 / (2.0 * cpus)
    assert selfcheck.others_share((None, 1.0), (None, 3.0), 2.0) is None
    machine, ours = selfcheck.cpu_seconds()
    assert ours > 0 and (machine is None or machine >= ours)


def test_this_processes_cpu_time_counts_user_and_system_time(monkeypatch):
    monkeypatch.setattr(os, "times", lambda: os.times_result((1.0, 2.0, 0.0, 0.0, 0.0)))
    assert selfcheck.cpu_seconds()[1] == 3.0


@pytest.mark.parametrize("cuda_available", [False, True])
def test_unchecked_names_the_cuda_kernels_and_the_unused_cpu_variants(cuda_available):
    info = {"cuda": True, "cuda_available": cuda_available, "cpu_isas": "DEFAULT,AVX2,AVX512",
            "cpu_active_isa": "AVX2"}
    expected = [] if cuda_available else ["CUDA kernels: compiled, but no GPU is visible, so they did not run here"]
    lines = selfcheck.unchecked(info)
    assert lines[:-1] == expected
    assert lines[-1].startswith("CPU kernels DEFAULT, AVX512: compiled, not used on this CPU")


def test_unchecked_names_a_cpu_only_build():
    info = {"cuda": False, "cuda_available": False, "cpu_isas": "AVX2", "cpu_active_isa": "AVX2"}
    assert selfcheck.unchecked(info) == ["CUDA kernels: not in this build, and no GPU is visible"]


def test_help_and_the_checks_without_timing(capsys):
    with pytest.raises(SystemExit) as exited:
        selfcheck.main(["--help"])
    assert exited.value.code == 0 and "--no-timing" in capsys.readouterr().out
    assert selfcheck.main(["--no-timing"]) == 0
    output = capsys.readouterr().out
    assert output.rstrip().endswith("PASS") and "speed:" not in output


def test_help_under_python_optimized_without_docstrings(tmp_path):
    # From another folder: under `python -m`, the current folder comes first on sys.path.
    result = subprocess.run([sys.executable, "-OO", "-m", "focal_cuda", "--help"], capture_output=True, text=True,
                            cwd=tmp_path)
    assert result.returncode == 0 and "--no-timing" in result.stdout, result.stderr


def wrong_losses(monkeypatch, change):
    """Every public loss replaced by change(loss function, inputs, targets, reduction, options)."""
    for name, right in RIGHT.items():
        def wrong(inputs, targets, reduction, right=right, **options):
            return change(right, inputs, targets, reduction, options)

        monkeypatch.setattr(focal_cuda, name, wrong)


def test_an_error_a_few_times_the_tolerance_fails_every_check(monkeypatch):
    """Each loss and gradient, in every dtype, case and reduction: a loosened tolerance, an
    absolute tolerance that swamps small values (a 'mean' gradient is ~4e-5 here), or a dtype,
    case or reduction left out of the loops would let some of these pass."""
    factor = {torch.float16: 1.01, torch.bfloat16: 1.1, torch.float32: 1 + 1e-4, torch.float64: 1 + 1e-9}
    wrong_losses(monkeypatch, lambda right, inputs, targets, reduction, options:
                 right(inputs, targets, reduction=reduction, **options) * factor[inputs.dtype])
    checks, failures = selfcheck.check_device("cpu")
    assert len(failures) == 2 * checks == 2 * len(DTYPES) * 9 * 3
    for dtype in DTYPES:
        for loss in LOSSES:
            assert f"cpu {dtype} {loss}" in "\n".join(failures)


def test_a_wrong_value_with_the_right_gradient_fails_as_the_loss(monkeypatch):
    wrong_losses(monkeypatch, lambda right, inputs, targets, reduction, options:
                 (lambda loss: loss + 0.1 * loss.detach())(right(inputs, targets, reduction=reduction, **options)))
    checks, failures = selfcheck.check_device("cpu")
    assert len(failures) == checks and all(failure.endswith(": loss differs") for failure in failures)


def test_float64_computed_in_float32_fails_every_float64_check_and_only_those(monkeypatch):
    def single(value):
        if isinstance(value, tuple):
            return tuple(map(single, value))
        return value.float() if isinstance(value, torch.Tensor) and value.is_floating_point() else value

    def in_float32(right, inputs, targets, reduction, options):
        if inputs.dtype != torch.float64:
            return right(inputs, targets, reduction=reduction, **options)
        options = {key: single(value) for key, value in options.items()}
        return right(single(inputs), single(targets), reduction=reduction, **options).double()

    wrong_losses(monkeypatch, in_float32)
    checks, failures = selfcheck.check_device("cpu")
    assert len(failures) == 2 * checks // len(DTYPES)
    assert all(failure.startswith("cpu torch.float64 ") for failure in failures)


@pytest.mark.parametrize("where", ["positives", "large logits"])
def test_the_check_covers_positive_targets_and_large_logits(monkeypatch, where):
    """An error confined to the float targets' ones, or to |x| > 6, must show: the checked inputs
    hold both (a few percent of positives, logits spread over about +-12)."""
    def wrong_there(right, inputs, targets, reduction, options):
        if not (isinstance(targets, torch.Tensor) and targets.is_floating_point()):
            return right(inputs, targets, reduction=reduction, **options)
        region = targets > 0.5 if where == "positives" else inputs.detach().abs() > 6
        loss = right(inputs, targets, reduction="none", **options) * (1 + 0.1 * region)
        return {"none": loss, "mean": loss.mean(), "sum": loss.sum()}[reduction]

    wrong_losses(monkeypatch, wrong_there)
    _, failures = selfcheck.check_device("cpu")
    for dtype in DTYPES:
        assert f"cpu {dtype} sigmoid_focal_loss gamma=2.0 none: loss differs" in failures


@pytest.mark.parametrize("change", ["weight left out", "ignored rows counted"])
def test_the_check_covers_the_weight_and_ignored_rows(monkeypatch, change):
    """A kernel that dropped the class weight, or took ignored rows for background (class 0 for
    the softmax loss), must fail the cases that have them."""
    def wrong(right, inputs, targets, reduction, options):
        if change == "weight left out":
            options = {key: value for key, value in options.items() if key != "weight"}
        else:
            labels, scores = targets if isinstance(targets, tuple) else (targets, None)
            if not labels.is_floating_point():
                background = 0 if right is RIGHT["softmax_focal_loss"] else inputs.shape[-1]
                labels = torch.where(labels == -100, background, labels)
            targets = labels if scores is None else (labels, scores)
        return right(inputs, targets, reduction=reduction, **options)

    wrong_losses(monkeypatch, wrong)
    _, failures = selfcheck.check_device("cpu")
    cases = ["sigmoid_focal_loss labels, weight", "softmax_focal_loss labels, weight"]
    if change == "ignored rows counted":
        cases += ["quality_focal_loss (labels, scores)", "varifocal_loss (labels, scores)"]
    for dtype in DTYPES:
        for case in cases:
            assert f"cpu {dtype} {case} none: loss differs" in failures


def test_a_loss_that_raises_is_a_failure_and_the_other_checks_still_run(monkeypatch):
    """A kernel missing for this GPU raises; the check names the cases it hit, not a traceback."""
    def raises(inputs, targets, reduction, **options):
        raise RuntimeError("no kernel image is available for execution on the device\nmore")

    monkeypatch.setattr(focal_cuda, "sigmoid_focal_loss", raises)
    checks, failures = selfcheck.check_device("cpu")
    assert checks == len(DTYPES) * 9 * 3
    cases = [f"sigmoid_focal_loss gamma={gamma}" for gamma in (0.0, 0.5, 2.0)] + ["sigmoid_focal_loss labels, weight"]
    assert failures == [
        f"cpu {dtype} {case} {reduction}: raised RuntimeError: no kernel image is available for execution on "
        "the device" for dtype in DTYPES for case in cases for reduction in ("none", "mean", "sum")]


def test_failures_are_listed_and_give_fail_and_exit_1(monkeypatch, capsys):
    """The verdict users and .ci/gpu-validate rely on: any failure prints FAIL and returns 1, with
    the count on each device's line and each failure on its own line."""
    monkeypatch.setattr(selfcheck, "check_device",
                        lambda device: (10, [f"{device} a: loss differs", f"{device} b: gradient differs"]))
    assert selfcheck.main(["--no-timing"]) == 1
    lines = capsys.readouterr().out.rstrip().splitlines()
    assert lines[-1] == "FAIL"
    for device in selfcheck.devices(focal_cuda.backends()):
        assert any(line.startswith(f"correctness on {device}: 8 of 10 checks ok (") for line in lines)
        assert f"  {device} a: loss differs" in lines and f"  {device} b: gradient differs" in lines


def test_python_m_focal_cuda_exits_1_when_a_check_fails(monkeypatch, capsys):
    """Run as `python -m focal_cuda` (in this process, for speed) with a wrong loss: the exit
    status, not only main()'s return value, is what CI steps see."""
    wrong_losses(monkeypatch, lambda right, inputs, targets, reduction, options:
                 right(inputs, targets, reduction=reduction, **options) * 1.1)
    monkeypatch.setattr(sys, "argv", ["focal_cuda", "--no-timing"])
    with warnings.catch_warnings(), pytest.raises(SystemExit) as exited:
        warnings.simplefilter("ignore", RuntimeWarning)  # focal_cuda.__main__ is imported already
        runpy.run_module("focal_cuda", run_name="__main__", alter_sys=True)
    assert exited.value.code == 1
    assert capsys.readouterr().out.rstrip().endswith("FAIL")


def test_a_visible_gpu_without_cuda_kernels_fails(monkeypatch, capsys):
    """A CPU-only build on a GPU machine passes every CPU check, yet must not print PASS."""
    info = dict(focal_cuda.backends(), cuda=False, cuda_available=True)
    monkeypatch.setattr(focal_cuda, "backends", lambda: info)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: "a GPU")
    monkeypatch.setattr(selfcheck, "check_device", lambda device: (1, []))
    assert selfcheck.main(["--no-timing"]) == 1
    output = capsys.readouterr().out
    assert "a GPU is visible but this build has no CUDA kernels" in output
    assert output.rstrip().endswith("FAIL")


@pytest.mark.parametrize("share", [0.5, 0.05, None])
def test_timing_report_from_given_times(monkeypatch, share):
    """The printed numbers from known per-round times (the real timing takes seconds): each side's
    median and quartiles, the speed-up as their time over ours, whom we are timed against, and the
    load warning above 10%."""
    def given_times(steps, device, rounds):
        assert len(steps) == 2 and rounds == 3
        return [[1.0, 2.0, 3.0], [4.0, 10.0, 9.0]]  # per-round ratios 4, 5, 3

    monkeypatch.setattr(selfcheck, "timed_rounds", given_times)
    monkeypatch.setattr(selfcheck, "others_share", lambda before, after, seconds: share)
    report = selfcheck.time_device("cpu", rounds=3)
    other = ("torchvision.ops.sigmoid_focal_loss" if selfcheck.torchvision_focal_loss is not None
             else "focal_cuda.reference (plain PyTorch)")
    assert "median of 3 interleaved rounds" in report
    assert "    focal_cuda 2.00 ms (1.50-2.50)\n" in report
    assert f"    {other} 9.00 ms (6.50-9.50)\n" in report
    assert "    speed-up 4.0x (per round 3.5x-4.5x)\n" in report
    assert ("the timing is unreliable" in report) == (share == 0.5)
    assert ("not measured" in report) == (share is None)


def test_torchvision_is_what_the_timing_compares_with_when_installed():
    """The import falls back to the reference quietly on ImportError: a wrong name there must not."""
    ops = pytest.importorskip("torchvision.ops")
    assert selfcheck.torchvision_focal_loss is ops.sigmoid_focal_loss


def test_other_processes_share_is_never_negative():
    """Tick granularity can make this process's CPU time exceed the machine's."""
    assert selfcheck.others_share((10.0, 1.0), (10.5, 2.0), 1.0) == 0.0
