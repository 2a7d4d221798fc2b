"""focal_cuda: the sigmoid focal loss of RetinaNet fused with its gradient, on CUDA and CPU."""

import torch  # noqa: F401  (loads libtorch before the extension)

from . import _C, reference
from ._version import __version__
from .loss import sigmoid_focal_loss

__all__ = ["__version__", "backends", "reference", "sigmoid_focal_loss"]


def backends():
    """What this build contains and what this machine can run.

    Keys: ``version``; ``cuda`` (CUDA kernels compiled), ``cuda_version``, ``cuda_arch_list``;
    ``cpu_isas`` (CPU kernel variants compiled) and ``cpu_active_isa`` (the one in use);
    ``cuda_available`` (torch sees a GPU).
    """
    info = dict(_C.build_info())
    info["cuda_available"] = torch.cuda.is_available()
    return info
