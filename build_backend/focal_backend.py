"""PEP 517 build backend: setuptools' own, building the extension against the torch it will run with.

A compiled torch extension loads only beside the torch it was compiled against. Under pip's build
isolation the build runs in a fresh environment holding only the build requirements, so a torch
listed there is a second torch, possibly another release or build (+cpu, +cu130) than the one in
the environment being installed into; the extension then fails to import there with undefined
symbols. pip runs the backend with the interpreter of the environment it installs into
(sys.executable), so this backend asks that interpreter, outside the isolation, for its torch and
puts it on sys.path for setup.py. Only when that environment has no torch does the build
environment install one; the wheel then requires that very release (setup.py), so pip installs
the same one beside it.

Without build isolation (`pip install --no-build-isolation`), or where torch is importable in the
build environment already, this is setuptools' backend unchanged.
"""

import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile

from setuptools import build_meta as _setuptools

MIN_TORCH = (2, 11)  # as in setup.py

# Runs in the target environment: where its torch is and which version, without importing torch.
_PROBE = r"""
import importlib.util, json, os, re
spec = importlib.util.find_spec("torch")
if spec is None or not spec.origin:
    print(json.dumps(None))
else:
    package = os.path.dirname(spec.origin)
    with open(os.path.join(package, "version.py")) as f:
        version = re.search(r"__version__\s*=\s*['\"]([^'\"]+)['\"]", f.read()).group(1)
    print(json.dumps({"version": version, "site": os.path.dirname(package)}))
"""


def target_torch():
    """{"version", "site"} of the torch that sys.executable imports outside pip's isolation, or None.

    -E drops the PYTHONPATH and PYTHONNOUSERSITE that isolate the build; a temporary working
    directory keeps the source tree off sys.path.
    """
    with tempfile.TemporaryDirectory() as cwd:
        result = subprocess.run(
            [sys.executable, "-E", "-c", _PROBE], cwd=cwd, capture_output=True, text=True
        )
    if result.returncode != 0:
        raise RuntimeError(
            f"focal_cuda build: could not ask {sys.executable} for its torch:\n{result.stderr}"
        )
    return json.loads(result.stdout)


def check_torch_version(version, where):
    """Raise, with the fix, when torch `version` (found at `where`) is older than MIN_TORCH."""
    found = tuple(int(part) for part in re.match(r"(\d+)\.(\d+)", version).groups())
    if found < MIN_TORCH:
        minimum = ".".join(map(str, MIN_TORCH))
        raise RuntimeError(
            f"focal_cuda needs torch >= {minimum}; the environment it is being installed into "
            f"has torch {version} at {where}. Upgrade it first (`{sys.executable} -m pip "
            f"install 'torch>={minimum}'`), then install focal_cuda again."
        )


def torch_requirements(torch_in_build_env, target):
    """What the build environment must install on top of setuptools' needs: torch only when
    neither the build environment nor the target environment has it."""
    if torch_in_build_env:
        return []
    if target is not None:
        check_torch_version(target["version"], target["site"])
        return []
    return ["torch>=" + ".".join(map(str, MIN_TORCH))]


def _torch_in_build_env():
    return importlib.util.find_spec("torch") is not None


def _use_target_torch():
    """Before setup.py runs: make the target environment's torch importable if this one has none.

    Appended, so the build environment's own packages (setuptools) keep precedence.
    """
    if _torch_in_build_env():
        return
    target = target_torch()
    if target is not None:
        check_torch_version(target["version"], target["site"])
        sys.path.append(target["site"])
        print(f"focal_cuda build: compiling against the torch {target['version']} of "
              f"{sys.executable} ({target['site']})", flush=True)


def _build_torch_requirements():
    in_build_env = _torch_in_build_env()
    return torch_requirements(in_build_env, None if in_build_env else target_torch())


def get_requires_for_build_wheel(config_settings=None):
    return _setuptools.get_requires_for_build_wheel(config_settings) + _build_torch_requirements()


def get_requires_for_build_editable(config_settings=None):
    return _setuptools.get_requires_for_build_editable(config_settings) + _build_torch_requirements()


def get_requires_for_build_sdist(config_settings=None):
    return _setuptools.get_requires_for_build_sdist(config_settings)  # no torch: sources only


def prepare_metadata_for_build_wheel(metadata_directory, config_settings=None):
    _use_target_torch()  # the metadata requires the torch the extension is compiled against
    return _setuptools.prepare_metadata_for_build_wheel(metadata_directory, config_settings)


def prepare_metadata_for_build_editable(metadata_directory, config_settings=None):
    _use_target_torch()
    return _setuptools.prepare_metadata_for_build_editable(metadata_directory, config_settings)


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    _use_target_torch()
    return _setuptools.build_wheel(wheel_directory, config_settings, metadata_directory)


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    _use_target_torch()
    return _setuptools.build_editable(wheel_directory, config_settings, metadata_directory)


def build_sdist(sdist_directory, config_settings=None):
    return _setuptools.build_sdist(sdist_directory, config_settings)
