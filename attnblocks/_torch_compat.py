"""What attnblocks needs to know about the installed PyTorch, in one place.

The checks of the torch version, the features that only some supported releases
have, and every use of PyTorch's private API (names with a leading underscore,
aten kernels called directly) live here, so that supporting a new (or dropping an
old) release changes one file. Checked on torch 2.2.2 (the floor in
``pyproject.toml``, tested by ``.ci/floor.sh``) and torch 2.14.1
(``.ci/constraints.txt``). The private names are listed in :data:`PRIVATE_NAMES`
and :data:`ATEN_KERNELS`; ``tests/test_torch_compat.py`` fails if one of them is
missing on the installed torch, so a torch release that drops one breaks that
test, not users (where a fallback exists it is kept: a missing name then switches
an optimisation off rather than failing).

>>> from attnblocks._torch_compat import torch_at_least
>>> torch_at_least(2, 2)
True
"""

from __future__ import annotations

import functools
import importlib
import re
from collections.abc import Callable

import torch
from torch import nn

__all__ = [
    "ATEN_KERNELS",
    "EXPORT_DETECTABLE",
    "PRIVATE_NAMES",
    "RMS_NORMS",
    "TORCH_VERSION",
    "autocast_dtype",
    "forward_hooks",
    "function_transform_active",
    "has_cpu_float16_layer_norm",
    "has_global_module_hooks",
    "has_own_hooks",
    "is_compiling",
    "is_exporting",
    "missing_internals",
    "parse_release",
    "remove_forward_hook",
    "rowwise_dot",
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


# ---------------------------------------------------------------------------------------
# PyTorch's private API: every name attnblocks reads, and the functions that read them.

#: The private names attnblocks reads, as ``(where, attribute)`` pairs; ``where`` is a
#: module, or ``"torch.nn.Module()"`` for an attribute of every module instance.
PRIVATE_NAMES: tuple[tuple[str, str], ...] = (
    ("torch._C", "_are_functorch_transforms_active"),
    ("torch.autograd.forward_ad", "_current_level"),
    ("torch.nn.modules.module", "_global_forward_hooks"),
    ("torch.nn.modules.module", "_global_forward_pre_hooks"),
    ("torch.nn.modules.module", "_global_backward_hooks"),
    ("torch.nn.modules.module", "_global_backward_pre_hooks"),
    ("torch.nn.Module()", "_forward_hooks"),
    ("torch.nn.Module()", "_forward_pre_hooks"),
    ("torch.nn.Module()", "_backward_hooks"),
    ("torch.nn.Module()", "_backward_pre_hooks"),
    ("torch.nn.Module()", "_forward_hooks_with_kwargs"),
    ("torch.nn.Module()", "_forward_hooks_always_called"),
)

#: The aten kernels attnblocks calls directly (``torch.ops.aten.<name>``): the
#: batch-norm backward of :func:`rowwise_dot`, and the derivative kernels (the ones
#: autograd calls) of the fused SE rule in ``attnblocks/blocks/_se_function.py``.
ATEN_KERNELS: tuple[str, ...] = (
    "native_batch_norm_backward",
    "threshold_backward",
    "hardtanh_backward",
    "silu_backward",
    "gelu_backward",
    "leaky_relu_backward",
    "hardswish_backward",
    "mish_backward",
    "tanh_backward",
    "sigmoid_backward",
    "hardsigmoid_backward",
)


def missing_internals() -> list[str]:
    """The names of :data:`PRIVATE_NAMES` and :data:`ATEN_KERNELS` the installed torch lacks.

    >>> missing_internals()
    []
    """
    module = nn.Module()
    missing = []
    for where, name in PRIVATE_NAMES:
        owner = module if where == "torch.nn.Module()" else importlib.import_module(where)
        if not hasattr(owner, name):
            missing.append(f"{where}.{name}")
    missing += [
        f"torch.ops.aten.{name}" for name in ATEN_KERNELS if not hasattr(torch.ops.aten, name)
    ]
    return missing


def function_transform_active() -> bool:
    """Whether a ``torch.func`` transform (vmap, grad, jacrev, ...) or forward-mode AD is on.

    Without the private flags (a future torch) the answer is False.
    """
    functorch_active = getattr(torch._C, "_are_functorch_transforms_active", None)
    if functorch_active is not None and functorch_active():
        return True
    return getattr(torch.autograd.forward_ad, "_current_level", -1) >= 0


def has_global_module_hooks() -> bool:
    """Whether a global module hook is registered (``nn.modules.module.register_module_*_hook``).

    Without the private tables (a future torch) the answer is False.
    """
    module_globals = torch.nn.modules.module
    names = (
        "_global_forward_hooks",
        "_global_forward_pre_hooks",
        "_global_backward_hooks",
        "_global_backward_pre_hooks",
    )
    return any(getattr(module_globals, name, None) for name in names)


def has_own_hooks(module: nn.Module) -> bool:
    """Whether ``module`` itself has a forward, forward-pre, backward or backward-pre hook."""
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or module._backward_pre_hooks
    )


def forward_hooks(module: nn.Module) -> dict[int, Callable[..., object]]:
    """``module``'s forward hooks by id (its private ``_forward_hooks`` table, read only).

    >>> forward_hooks(nn.Identity())
    {}
    """
    return dict(module._forward_hooks)


def remove_forward_hook(module: nn.Module, hook_id: int) -> None:
    """Remove the forward hook ``hook_id`` from ``module``'s hook tables.

    What ``handle.remove()`` does, for a caller that holds the id but not the handle.
    """
    del module._forward_hooks[hook_id]
    module._forward_hooks_with_kwargs.pop(hook_id, None)
    module._forward_hooks_always_called.pop(hook_id, None)


def rowwise_dot(a: torch.Tensor, b: torch.Tensor, rows: int) -> torch.Tensor:
    """``(a * b)`` summed over each of ``rows`` rows, without the product tensor.

    ``a`` and ``b`` are contiguous CPU float32 or float64 tensors of ``rows * L``
    elements each. Viewed as ``(1, rows, L)``, the batch-norm backward's per-channel
    ``sum(grad * (input - mean) * invstd)`` with mean 0 and invstd 1 is exactly the
    per-row dot product, read in one pass over each operand.

    >>> rowwise_dot(torch.ones(2, 3), torch.full((2, 3), 2.0), 2)
    tensor([6., 6.])
    """
    zeros, ones = b.new_zeros(rows), b.new_ones(rows)
    return torch.ops.aten.native_batch_norm_backward.default(
        a.view(1, rows, -1),
        b.view(1, rows, -1),
        None,
        None,
        None,
        zeros,
        ones,
        True,
        0.0,
        [False, True, False],
    )[1]
