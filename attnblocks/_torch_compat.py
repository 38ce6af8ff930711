"""What attnblocks needs to know about the installed PyTorch, in one place.

The checks of the torch version, and the features that only some supported
releases have, live here, so that supporting a new (or dropping an old) release
changes one file. Checked on torch 2.2.2 (the floor in ``pyproject.toml``, tested
by ``.ci/floor.sh``) and torch 2.14.1 (``.ci/constraints.txt``).

>>> from attnblocks._torch_compat import torch_at_least
>>> torch_at_least(2, 2)
True
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable

import torch
from torch import nn

__all__ = [
    "EXPORT_DETECTABLE",
    "RMS_NORMS",
    "TORCH_VERSION",
    "autocast_dtype",
    "has_cpu_float16_layer_norm",
    "is_compiling",
    "is_exporting",
    "parse_release",
    "torch_at_least",
]


def parse_release(version: str) -> tuple[int, int, int]:
    """The ``(major, minor, patch)`` release of a torch version string.

    Local and pre-release tags are ignored: ``"2.2.2+cu121"`` and ``"2.5.0a0+git1"``
    give ``(2, 2, 2)`` and ``(2, 5, 0)``.

    >>> parse_release("2.2.2+cu121")
    (2, 2, 2)
    >>> parse_release("2.15")
    (2, 15, 0)
    """
    match = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", version)
    if match is None:
        raise ValueError(f"parse_release: not a torch version string: {version!r}")
    major, minor, patch = match.groups()
    return int(major), int(minor), int(patch or 0)


#: The installed torch's ``(major, minor, patch)``.
TORCH_VERSION: tuple[int, int, int] = parse_release(torch.__version__)


def torch_at_least(major: int, minor: int, patch: int = 0) -> bool:
    """Whether the installed torch is ``major.minor.patch`` or newer."""
    return (major, minor, patch) <= TORCH_VERSION


#: ``nn.RMSNorm`` where this torch has it (2.4 and newer), else nothing.
RMS_NORMS: tuple[type[nn.Module], ...] = (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()

#: Whether torch.compile or torch.export is tracing the current call.
#: ``torch.compiler.is_compiling`` (torch >= 2.3), else ``torch._utils.is_compiling``
#: (torch 2.2, where dynamo folds it to ``True`` while tracing). Both are looked up
#: here, once: dynamo before 2.3 cannot trace ``getattr`` on a module.
is_compiling: Callable[[], bool] = (
    getattr(torch.compiler, "is_compiling", None) or torch._utils.is_compiling
)

#: Whether ``torch.compiler.is_exporting`` exists (torch >= 2.7), so that an export
#: can be told apart from ``torch.compile``.
EXPORT_DETECTABLE: bool = hasattr(torch.compiler, "is_exporting")

#: Whether torch.export is tracing the current call: ``torch.compiler.is_exporting``
#: on torch >= 2.7; before it, :data:`is_compiling`, since every dynamo trace might be
#: an export (code that must not be exported then stays out of ``torch.compile`` too).
is_exporting: Callable[[], bool] = getattr(torch.compiler, "is_exporting", None) or is_compiling


def _autocast_dtype_by_device(device_type: str) -> torch.dtype | None:
    try:
        if not torch.is_autocast_enabled(device_type):
            return None
        return torch.get_autocast_dtype(device_type)
    except RuntimeError:  # a device without autocast, such as "meta"
        return None


def _autocast_dtype_per_backend(device_type: str) -> torch.dtype | None:
    if device_type == "cpu":
        return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None
    if device_type == "cuda":
        return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None
    return None


#: ``autocast_dtype(device_type)``: the autocast dtype active for ``device_type``, or
#: ``None`` when autocast is off there. torch >= 2.4 takes the device type
#: (``torch.get_autocast_dtype``); before, only the per-backend CPU and CUDA functions
#: exist. Chosen once here, so that torch.compile traces one plain function.
autocast_dtype: Callable[[str], torch.dtype | None] = (
    _autocast_dtype_by_device
    if hasattr(torch, "get_autocast_dtype")
    else _autocast_dtype_per_backend
)


@functools.cache
def has_cpu_float16_layer_norm() -> bool:
    """Whether ``F.layer_norm`` runs on float16 CPU tensors (not in torch 2.2).

    :class:`~attnblocks.GlobalContextBlock`'s transform has a LayerNorm, so in
    float16 on the CPU it needs this.
    """
    try:
        torch.nn.functional.layer_norm(torch.ones(1, 2, dtype=torch.float16), (2,))
    except RuntimeError:
        return False
    return True
