"""`python -m focal_cuda`: its options, its timing helpers and what it reports as not checked."""

import os
import subprocess
import sys

import pytest
import torch

from focal_cuda import __main__ as selfcheck


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


def test_unchecked_names_the_cuda_kernels_and_the_unused_cpu_variants():
    info = {"cuda": True, "cpu_isas": "DEFAULT,AVX2,AVX512", "cpu_active_isa": "AVX2"}
    lines = selfcheck.unchecked(info)
    cuda_lines = [line for line in lines if line.startswith("CUDA kernels")]
    if torch.cuda.is_available():
        assert cuda_lines == []
    else:
        assert cuda_lines == ["CUDA kernels: compiled, but no GPU is visible, so they did not run here"]
    assert lines[-1].startswith("CPU kernels DEFAULT, AVX512: compiled, not used on this CPU")


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
