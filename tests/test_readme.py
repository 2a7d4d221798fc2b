"""README's code as a reader copies it: each Python block runs, the commands name files and options
that exist, and the example script trains. A renamed argument or option fails here, not in a
user's hands."""

import importlib.util
import re
from pathlib import Path

import pytest
import torch

import focal_cuda
from conftest import DEVICES

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()
BLOCKS = re.findall(r"^```(\w*)\n(.*?)^```", README, flags=re.M | re.S)
PYTHON_BLOCKS = [code for language, code in BLOCKS if language == "python" and not code.startswith(">>>")]
COMMANDS = [line for language, code in BLOCKS if language == "bash" for line in code.splitlines()]


def test_readme_has_the_blocks_these_tests_read():
    assert len(PYTHON_BLOCKS) >= 5, f"{len(PYTHON_BLOCKS)} Python blocks"
    assert any("python bench/" in command for command in COMMANDS)


@pytest.mark.parametrize("device", DEVICES)
def test_the_python_blocks_run_in_order(device):
    """The blocks build on one another (the segmentation `logits` feed the recipe's block); the
    names README leaves to the reader (a model, its images, an optimizer, alpha, gamma) are
    given small stand-ins. On the CPU the CUDA device becomes the CPU and the detection blocks'
    120,000 anchors 1,200 (614 MB of logits otherwise); on a GPU the blocks run as written."""
    model = torch.nn.Linear(8, 80).to(device)
    anchors = 120_000 if device == "cuda" else 1_200
    namespace = {
        "model": model,
        "images": torch.randn(16, anchors, 8, device=device),
        "optimizer": torch.optim.SGD(model.parameters(), lr=0.1),
        "alpha": 0.25,
        "gamma": 2.0,
    }
    before = model.weight.detach().clone()
    for number, code in enumerate(PYTHON_BLOCKS):
        if device == "cpu":
            code = code.replace('"cuda"', '"cpu"').replace("120_000", str(anchors))
        try:
            exec(compile(code, f"README python block {number}", "exec"), namespace)
        except Exception as error:
            raise AssertionError(f"README's Python block {number} failed:\n{code}") from error
    # The mixed-precision block's step reached the model through the scaler.
    assert not torch.equal(model.weight.detach(), before)
    assert torch.isfinite(namespace["loss"]).all()


def test_backends_has_the_keys_readme_shows():
    shown = re.search(r">>> focal_cuda.backends\(\)\n(\{.*?\})\n", README, flags=re.S).group(1)
    assert set(eval(shown)) == set(focal_cuda.backends())


COMMAND_SCRIPTS = sorted({(match[0], match[1].strip()) for command in COMMANDS
                          for match in re.findall(r"python ((?:bench|tests|examples)/[\w/]+\.py)([^#|&]*)", command)})


@pytest.mark.parametrize("script, arguments", COMMAND_SCRIPTS, ids=[" ".join(s).strip() for s in COMMAND_SCRIPTS])
def test_each_commanded_script_exists_with_its_options(script, arguments):
    path = REPO / script
    assert path.is_file(), f"README runs {script}, which does not exist"
    source = path.read_text()
    for option in re.findall(r"--[\w-]+", arguments):
        assert f'"{option}"' in source, f"README runs {script} {option}, an option the script does not define"


def test_the_example_trains_a_small_batch():
    """examples/imbalanced_detection.py's training loop, at a sixteenth of its batch for 20
    steps on a small data set: the calls it makes still exist and it reports an AP."""
    spec = importlib.util.spec_from_file_location("imbalanced_detection", REPO / "examples" / "imbalanced_detection.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    example.STEPS, example.BATCH = 20, 4_096
    generator = torch.Generator().manual_seed(0)
    centers = torch.randn(example.CLASSES, example.FEATURES, generator=generator)
    offsets = torch.randn(example.CLASSES, example.FEATURES, generator=generator)
    train_set = example.make_anchors(100_000, centers, offsets, generator)
    test_set = example.make_anchors(50_000, centers, offsets, generator)
    mean_ap = example.train("focal", 0.25, 2.0, 0.01, train_set, test_set)
    assert 0.0 <= mean_ap <= 1.0
