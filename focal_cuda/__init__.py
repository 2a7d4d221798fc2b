"""focal_cuda: focal losses fused with their gradients, on CUDA and CPU: the sigmoid focal loss of
RetinaNet (torchvision's), its family (FL*, quality and varifocal losses) and the multi-class
softmax focal loss (F.cross_entropy's arguments with the focal factor)."""

import importlib.machinery
import importlib.metadata
import importlib.util
import json
import os
import sys
from typing import Dict, Optional, Union

import torch  # loads libtorch before the extension

from ._version import __version__

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def _rebuild_command() -> str:
    """The command that rebuilds this installation against the running interpreter's torch."""
    pip = f"{sys.executable} -m pip install"
    source_root = os.path.dirname(_PACKAGE_DIR)
    if os.path.exists(os.path.join(source_root, "setup.py")):  # a source tree, built in place
        return f"{pip} --no-build-isolation -e {source_root}"
    try:  # installed from a local folder or file: pip recorded which (PEP 610)
        url = json.loads(importlib.metadata.distribution("focal_cuda").read_text("direct_url.json"))["url"]
    except (importlib.metadata.PackageNotFoundError, TypeError, KeyError, ValueError):
        url = None
    # --no-cache-dir: pip may otherwise reuse a wheel it built earlier against another torch.
    reinstall = f"{pip} --force-reinstall --no-deps --no-cache-dir"
    if url is None:  # from an index: build its sdist here
        return f"{reinstall} --no-binary focal_cuda focal_cuda=={__version__}"
    source = url[len("file://"):] if url.startswith("file://") else url
    if source.endswith(".whl"):  # a wheel cannot be rebuilt: its sources are needed
        return f"{reinstall} PATH_TO_FOCAL_CUDA_SOURCE (a clone or sdist; {source} is a wheel)"
    return f"{reinstall} {source}"


def _installed_copy_elsewhere() -> Optional[str]:
    """A built focal_cuda on sys.path other than this (unbuilt) folder, if any."""
    others = [p for p in sys.path if os.path.abspath(p or os.curdir) != os.path.dirname(_PACKAGE_DIR)]
    spec = importlib.machinery.PathFinder.find_spec("focal_cuda", others)
    if spec is None or not spec.submodule_search_locations:
        return None
    location = list(spec.submodule_search_locations)[0]
    built = any(
        name.startswith("_C.") and name.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))
        for name in os.listdir(location)
    )
    return location if built else None


def _check_extension() -> None:
    """Before loading the extension: is there one, and was it compiled against this torch?

    A mismatched build fails to load with undefined C++ symbols, or loads and misbehaves; the
    torch version recorded at build time (setup.py) tells it apart first.
    """
    extension = importlib.util.find_spec("focal_cuda._C")
    # Another checkout's editable-install finder may offer its own _C: only one here counts.
    if extension is None or os.path.dirname(extension.origin or "") != _PACKAGE_DIR:
        elsewhere = _installed_copy_elsewhere()
        if elsewhere is not None:
            raise ImportError(
                f"focal_cuda was imported from the source folder {_PACKAGE_DIR}, which has no "
                f"compiled extension, instead of the installed focal_cuda at {elsewhere}: the "
                "current folder comes first on sys.path under `python -m ...` and `python -c`. "
                "Run `pytest tests` rather than `python -m pytest tests`, or run from another "
                "folder, or build the source folder in place: "
                f"`{sys.executable} -m pip install --no-build-isolation -e {os.path.dirname(_PACKAGE_DIR)}`."
            )
        raise ImportError(
            f"focal_cuda's compiled extension (focal_cuda._C) is not built in {_PACKAGE_DIR}. "
            f"Build it: `{_rebuild_command()}`."
        )
    try:
        with open(os.path.join(_PACKAGE_DIR, "_build.json")) as record:
            built_against = json.load(record)["torch_version"]
    except (OSError, ValueError, KeyError):
        raise ImportError(
            f"focal_cuda's extension in {_PACKAGE_DIR} does not record which torch it was built "
            f"against (the _build.json that setup.py writes beside it is missing or unreadable: "
            f"built by an older setup.py, or copied without it). "
            f"Rebuild it: `{_rebuild_command()}`."
        ) from None
    if built_against != torch.__version__:
        raise ImportError(
            f"focal_cuda's extension was built against torch {built_against}, but this is torch "
            f"{torch.__version__} ({os.path.dirname(torch.__file__)}); an extension loads only "
            f"beside the torch it was compiled against. Rebuild it for this torch: "
            f"`{_rebuild_command()}`, or install the torch it was built against instead "
            f"(`{sys.executable} -m pip install torch=={built_against.split('+')[0]}` with the "
            "index of its build, e.g. CUDA or CPU)."
        )


_check_extension()
from . import _C  # noqa: E402

from . import loss, reference  # noqa: E402
from .loss import *  # noqa: E402,F401,F403  (the losses and their modules: loss.__all__)

__all__ = ["__version__", "backends", "reference"]
__all__ += loss.__all__


def backends() -> Dict[str, Union[str, bool, None]]:
    """What this build contains and what this machine can run.

    Keys: ``version``; ``cuda`` (CUDA kernels compiled), ``cuda_version``, ``cuda_arch_list``;
    ``cpu_isas`` (CPU kernel variants compiled) and ``cpu_active_isa`` (the one in use);
    ``cuda_available`` (torch sees a GPU).
    """
    info: Dict[str, Union[str, bool, None]] = dict(_C.build_info())
    info["cuda_available"] = torch.cuda.is_available()
    return info
