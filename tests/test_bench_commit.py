"""bench/bench.py's record of the benchmarked commit, which its results.json carry into bench/results."""

import importlib.util
import os
import subprocess

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "bench.py")


@pytest.fixture(scope="module")
def bench():
    pytest.importorskip("torchvision")  # bench.py exits without it
    spec = importlib.util.spec_from_file_location("focal_cuda_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_copy_without_git_records_the_commit_its_caller_names(bench, monkeypatch):
    """The GPU machine's copy has no .git: .ci/gpu-validate's COMMIT is the results' commit."""
    def no_git(*args, **kwargs):
        raise subprocess.CalledProcessError(128, args[0])

    monkeypatch.setattr(subprocess, "run", no_git)
    monkeypatch.setenv("COMMIT", "0123abc")
    assert bench.source_commit() == "0123abc"
    monkeypatch.delenv("COMMIT")
    assert bench.source_commit() is None
