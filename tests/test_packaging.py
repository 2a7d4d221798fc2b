"""Packaging: the import-time checks, the build backend's choice of torch, and (slow) an sdist that
holds the repository and builds, with build isolation, against a different torch."""

import json
import os
import shutil
import subprocess
import sys
import tarfile
import textwrap
import venv
from pathlib import Path

import pytest
import torch

import focal_cuda

REPO = Path(__file__).resolve().parent.parent
PACKAGE_DIR = Path(focal_cuda.__file__).resolve().parent
sys.path.insert(0, str(REPO / "build_backend"))
import focal_backend  # noqa: E402

# A torch release other than the running one, installable here without downloads (a CPU-only
# wheel on this project's machines: see the README's support matrix); overridable for elsewhere.
OTHER_TORCH = os.environ.get("FOCAL_TEST_OTHER_TORCH", "torch==2.13.0")


def run_python(code, cwd, env=None, python=sys.executable):
    return subprocess.run([python, "-c", textwrap.dedent(code)], cwd=cwd, env=env,
                          capture_output=True, text=True)


# Another release, and the same release of another build (e.g. +cpu against +cu130: other
# libraries, so another ABI).
@pytest.mark.parametrize("other_version", ["0.0.0+other", torch.__version__.split("+")[0] + "+other"])
def test_import_refuses_an_extension_built_against_another_torch(tmp_path, other_version):
    result = run_python(
        f"""
        import torch
        torch.__version__ = "{other_version}"
        import focal_cuda
        """,
        cwd=tmp_path,
    )
    assert result.returncode != 0
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("ImportError: focal_cuda's extension was built against torch "
                              f"{torch.__version__}, but this is torch {other_version}"), message
    assert f"{sys.executable} -m pip install" in message, message
    # What pip can resolve: the release without its local build label.
    assert f"pip install torch=={torch.__version__.split('+')[0]}`" in message, message


def unbuilt_copy(tmp_path):
    """The package's Python files in tmp_path/focal_cuda, without the extension."""
    source = tmp_path / "focal_cuda"
    source.mkdir(parents=True)
    for module in PACKAGE_DIR.glob("*.py"):
        shutil.copy(module, source)
    return source


def test_unbuilt_source_folder_in_front_of_a_built_one(tmp_path):
    """A source folder without the extension, first on sys.path (as under `python -m pytest`),
    in front of a built focal_cuda: the error names both and the commands, without Python's
    'circular import' guess."""
    source = unbuilt_copy(tmp_path)
    env = dict(os.environ, PYTHONPATH=str(PACKAGE_DIR.parent))
    result = run_python("import focal_cuda", cwd=tmp_path, env=env)
    assert result.returncode != 0
    assert "circular import" not in result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert f"imported from the source folder {source}" in message, message
    assert f"instead of the installed focal_cuda at {PACKAGE_DIR}" in message, message
    assert "Run `pytest tests` rather than `python -m pytest tests`" in message, message


def test_unbuilt_source_folder_alone(tmp_path):
    """No built focal_cuda anywhere: torch comes from a copy of its site-packages (links) that
    leaves focal_cuda out, imported without the site module (so no editable-install finder)."""
    source = unbuilt_copy(tmp_path / "clone")
    torch_site = Path(torch.__file__).resolve().parent.parent
    site = tmp_path / "site"
    site.mkdir()
    for entry in torch_site.iterdir():
        if "focal_cuda" not in entry.name:
            (site / entry.name).symlink_to(entry)
    result = subprocess.run([sys.executable, "-S", "-c", "import focal_cuda"], cwd=source.parent,
                            env=dict(os.environ, PYTHONPATH=str(site)), capture_output=True, text=True)
    assert result.returncode != 0
    assert "circular import" not in result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith(f"ImportError: focal_cuda's compiled extension (focal_cuda._C) is "
                              f"not built in {source}. Build it: "), message


def test_an_extension_without_its_build_record(tmp_path):
    """The package with its extension but not the _build.json beside it (a hand copy, an older
    setup.py): the import says what is missing and how to rebuild, instead of guessing."""
    source = unbuilt_copy(tmp_path)
    extension = next(PACKAGE_DIR.glob("_C.*"))
    (source / extension.name).symlink_to(extension)
    result = run_python("import focal_cuda", cwd=tmp_path)
    assert result.returncode != 0
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith(f"ImportError: focal_cuda's extension in {source} does not record "
                              "which torch it was built against (the _build.json that setup.py "
                              "writes beside it is missing or unreadable"), message
    assert "Rebuild it: `" in message, message


def test_an_extension_offered_from_another_folder_is_not_taken(tmp_path):
    """An unbuilt source folder first on sys.path, where a finder (another checkout's editable
    install) offers focal_cuda._C from the built package's folder: that extension belongs to
    another copy of the Python files, so the import names the two folders instead of loading it."""
    source = unbuilt_copy(tmp_path)
    extension = next(PACKAGE_DIR.glob("_C.*"))
    result = run_python(
        f"""
        import importlib.util, sys

        class OtherCheckout:
            def find_spec(self, name, path=None, target=None):
                if name == "focal_cuda._C":
                    return importlib.util.spec_from_file_location(name, {str(extension)!r})

        sys.meta_path.insert(0, OtherCheckout())
        import focal_cuda
        """,
        cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(PACKAGE_DIR.parent)),
    )
    assert result.returncode != 0
    message = result.stderr.strip().splitlines()[-1]
    assert f"imported from the source folder {source}" in message, message


def test_backend_finds_the_target_environments_torch():
    found = focal_backend.target_torch()
    assert found["version"] == torch.__version__
    assert Path(found["site"]) == Path(torch.__file__).resolve().parent.parent


def test_backend_adds_torch_to_the_build_only_where_none_is_found():
    target = {"version": "2.13.0+cpu", "site": "/somewhere"}
    assert focal_backend.torch_requirements(True, None) == []
    assert focal_backend.torch_requirements(False, target) == []
    assert focal_backend.torch_requirements(False, None) == ["torch>=2.11"]
    with pytest.raises(RuntimeError, match=r"has torch 2\.10\.1 at /old\. Upgrade it first "
                                           r"\(`.* -m pip install 'torch>=2\.11'`\)"):
        focal_backend.torch_requirements(False, {"version": "2.10.1", "site": "/old"})


def tracked_files():
    result = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"not a git checkout, nothing to compare the sdist with: {result.stderr.strip()}")
    return set(result.stdout.split()) - {".gitignore"}


def build_sdist(out_dir):
    result = subprocess.run(
        [sys.executable, "-m", "build", "--sdist", "--outdir", str(out_dir), str(REPO)],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, f"python -m build --sdist:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    (sdist,) = out_dir.glob("focal_cuda-*.tar.gz")
    return sdist


def make_venv(path):
    venv.EnvBuilder(with_pip=True, clear=True).create(path)
    return str(path / "bin" / "python")


@pytest.mark.slow
def test_sdist_builds_against_another_torch_with_build_isolation(tmp_path):
    """`python -m build --sdist`, then in a virtualenv that holds another torch, `pip wheel` from
    the sdist with build isolation on, install, import without a warning, and run tests from the
    sdist against the installed wheel."""
    expected = tracked_files()
    sdist = build_sdist(tmp_path / "dist")
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
        archive.extractall(tmp_path / "src", filter="data")
    assert not expected - names, f"missing from the sdist: {sorted(expected - names)}"
    built = [n for n in names if n.endswith((".so", ".o")) or n.endswith("_build.json")]
    assert not built, f"build outputs in the sdist: {built}"

    python = make_venv(tmp_path / "venv")
    env = {k: v for k, v in os.environ.items()
           if k not in ("FORCE_CUDA", "PYTHONPATH", "VIRTUAL_ENV")}
    env["MAX_JOBS"] = env.get("MAX_JOBS", "2")

    def pip(*args):
        result = subprocess.run([python, "-m", "pip", *args], env=env, capture_output=True, text=True)
        assert result.returncode == 0, f"pip {' '.join(args)}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        return result.stdout

    pip("install", "--quiet", OTHER_TORCH)
    other_torch = run_python("import torch; print(torch.__version__)", tmp_path, env, python)
    other_version = other_torch.stdout.split()[-1]
    assert other_version != torch.__version__, "the test needs a torch other than the running one"

    pip("wheel", "--no-deps", "--wheel-dir", str(tmp_path / "wheels"), str(sdist))
    (wheel,) = (tmp_path / "wheels").glob("focal_cuda-*.whl")
    pip("install", "--quiet", str(wheel), "pytest", "hypothesis")

    check = run_python(
        """
        import json, torch, focal_cuda
        x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
        t = torch.rand(4, 5, dtype=torch.float64)
        loss = focal_cuda.sigmoid_focal_loss(x, t, reduction="sum")
        loss.backward()
        expected = focal_cuda.reference.sigmoid_focal_loss(x.detach(), t, reduction="sum")
        print(json.dumps([torch.__version__, focal_cuda.__file__, (loss - expected).abs().item()]))
        """,
        cwd=tmp_path, env=env, python=f"{python}",
    )
    assert check.returncode == 0, check.stderr
    assert check.stderr == "", f"importing and using focal_cuda printed: {check.stderr}"
    version, location, error = json.loads(check.stdout)
    assert version == other_version
    assert location.startswith(str(tmp_path / "venv"))
    assert error < 1e-12

    # The venv's pytest script, as `pytest tests` runs it: the sdist's unbuilt focal_cuda folder
    # stays off sys.path, and the tests import the installed wheel.
    tests = subprocess.run(
        [str(Path(python).parent / "pytest"), "-q", "-p", "no:cacheprovider",
         "tests"],
        cwd=tmp_path / "src" / sdist.name[: -len(".tar.gz")], env=env, capture_output=True, text=True,
    )
    assert tests.returncode == 0, tests.stdout[-5000:]
