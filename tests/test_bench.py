"""bench/bench.py's records, which its results.json carry into bench/results: the commit, the
GPU's state, results kept when a run is cut short, the bytes each design moves, the timing order.
The GPU's state is read through a stand-in nvidia-smi: the GPU machine runs the real one once a
slot, too late to find a broken parser."""

import importlib.util
import json
import os
import stat
import subprocess
import textwrap

import pytest
import torch

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "bench.py")
BENCH_FAMILY = os.path.join(os.path.dirname(BENCH), "bench_family.py")


@pytest.fixture(scope="module")
def bench():
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


def fake_nvidia_smi(directory, unknown_field=None):
    """An nvidia-smi on PATH that answers --query-gpu for two GPUs with each field's name
    upper-cased, and refuses the whole query (as the real one does) when it names unknown_field."""
    script = directory / "nvidia-smi"
    script.write_text(textwrap.dedent(f"""\
        #!/usr/bin/env python3
        import sys
        fields = next(a for a in sys.argv if a.startswith("--query-gpu=")).split("=", 1)[1].split(",")
        if {unknown_field!r} in fields:
            print('Field "{unknown_field}" is not a valid field to query.')
            sys.exit(2)
        for gpu in range(2):
            print(", ".join(f"{{field.upper()}}{{gpu}}" for field in fields))
        """))
    script.chmod(script.stat().st_mode | stat.S_IXUSR)


def test_gpu_state_reads_every_field_of_every_gpu(bench, tmp_path, monkeypatch):
    fake_nvidia_smi(tmp_path)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert bench.gpu_state() == [{field: f"{field.upper()}{gpu}" for field in bench.GPU_STATE} for gpu in range(2)]


def test_gpu_state_keeps_the_fields_a_driver_knows_when_it_refuses_one(bench, tmp_path, monkeypatch):
    """A field renamed by a later driver (clocks_throttle_reasons became clocks_event_reasons)
    must not cost the clocks and power."""
    unknown = "clocks_throttle_reasons.active"
    fake_nvidia_smi(tmp_path, unknown_field=unknown)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    state = bench.gpu_state()
    assert len(state) == 2
    for gpu, fields in enumerate(state):
        assert fields[unknown].startswith("exit 2: Field"), fields[unknown]
        assert {k: v for k, v in fields.items() if k != unknown} == {
            field: f"{field.upper()}{gpu}" for field in bench.GPU_STATE if field != unknown}


def test_gpu_state_says_why_without_nvidia_smi(bench, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert bench.gpu_state().startswith("nvidia-smi: ")


def test_results_are_written_after_each_size_and_marked_complete_at_the_end(bench, tmp_path):
    results = {"machine": {"device": "cpu"}, "complete": False, "cases": [{"rows": 1}]}
    bench.write_results(results, tmp_path)
    written = json.loads((tmp_path / "results.json").read_text())
    assert written["complete"] is False and written["cases"] == [{"rows": 1}]
    assert len(written["machine"]["load_average_end"]) == 3
    results["cases"].append({"rows": 2})
    bench.write_results(results, tmp_path, complete=True)
    written = json.loads((tmp_path / "results.json").read_text())
    assert written["complete"] is True and len(written["cases"]) == 2
    assert sorted(path.name for path in tmp_path.iterdir()) == ["results.json"]


def test_design_bytes_count_float16s_gradient_saved_in_float32(bench):
    """Per element: read x and t, write the saved gradient (float32 for float16), and where the
    backward scales or converts it, read it and write the inputs' gradient; "none" writes the loss,
    which the step's sum reads."""
    cases = {
        (torch.float32, "sum"): (4 + 4 + 4, 8),
        (torch.float32, "mean"): (4 + 4 + 4 + 4 + 4, 8),
        (torch.float32, "none"): (4 + 4 + 4 + 4 + 4, 12),
        (torch.bfloat16, "sum"): (2 + 2 + 2, 4),
        (torch.float16, "sum"): (2 + 2 + 4 + 4 + 2, 4),
        (torch.float16, "mean"): (2 + 2 + 4 + 4 + 2, 4),
    }
    for (dtype, reduction), expected in cases.items():
        assert bench.design_bytes("focal_cuda", dtype, reduction) == expected, (dtype, reduction)
    label = 8 / bench.CLASSES
    assert bench.design_bytes("focal_cuda labels", torch.float16, "sum") == (2 + label + 4 + 4 + 2, 2 + label)


def test_interleaved_rounds_vary_the_order(bench):
    """Every step timed once a round, and no step always after the same neighbour."""
    calls = []
    steps = {name: (lambda name=name: calls.append(name)) for name in "abcde"}
    samples = bench.interleaved_samples(steps, lambda step: step() or 1.0, repeats=12)
    assert samples == {name: [1.0] * 12 for name in "abcde"}
    rounds = [calls[i:i + 5] for i in range(0, len(calls), 5)]
    assert all(sorted(order) == list("abcde") for order in rounds)
    for name in "abcde":
        predecessors = {order[order.index(name) - 1] for order in rounds if order[0] != name}
        assert len(predecessors) > 1, (name, predecessors)


def test_family_benchmark_times_each_form_against_a_composite_of_the_same_loss():
    """bench/bench_family.py's cases (one per registered form, at the function's defaults): the
    composite it times gives the fused function's loss and gradient, so that a new coefficient
    or form cannot leave a case that fails, or times another loss."""
    spec = importlib.util.spec_from_file_location("focal_cuda_bench_family", BENCH_FAMILY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    import focal_cuda

    assert len(module.FORMS) == len(focal_cuda.reference.FAMILY) - 1  # all but the focal loss
    generator = torch.Generator().manual_seed(0)
    x = 3 * torch.randn(6, 5, generator=generator, dtype=torch.float64)
    t = torch.where(torch.rand(6, 5, generator=generator) < 0.5, 0.0,
                    torch.rand(6, 5, generator=generator, dtype=torch.float64))
    for name, (fused, composite) in module.FORMS.items():
        gradients = []
        for function in (fused, composite):
            inputs = x.clone().requires_grad_()
            loss = function(inputs, t)
            gradients.append((loss.detach(), *torch.autograd.grad(loss, inputs)))
        for ours, theirs in zip(*gradients):
            torch.testing.assert_close(ours, theirs, msg=lambda m: f"{name}: {m}")
