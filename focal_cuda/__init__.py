"""focal_cuda: the sigmoid focal loss of RetinaNet fused with its gradient, on CUDA and CPU."""

import torch  # noqa: F401  (loads libtorch before the extension)

try:
    from . import _C
except ImportError as error:  # pragma: no cover - depends on how the package was installed
    raise ImportError(
        "focal_cuda's compiled extension (focal_cuda._C) could not be loaded. Build and install it "
        "with `pip install --no-build-isolation .`; when running from the source tree, make sure "
        "the installed package, not the source folder, is the one imported."
    ) from error

from . import reference
from ._version import __version__
from .loss import SigmoidFocalLoss, sigmoid_focal_loss

__all__ = ["SigmoidFocalLoss", "__version__", "backends", "reference", "sigmoid_focal_loss"]


def backends():
    """What this build contains and what this machine can run.

    Keys: ``version``; ``cuda`` (CUDA kernels compiled), ``cuda_version``, ``cuda_arch_list``;
    ``cpu_isas`` (CPU kernel variants compiled) and ``cpu_active_isa`` (the one in use);
    ``cuda_available`` (torch sees a GPU).
    """
    info = dict(_C.build_info())
    info["cuda_available"] = torch.cuda.is_available()
    return info
