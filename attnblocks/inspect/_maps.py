"""Post-processing of spatial maps (Grad-CAM, feature maps): normalisation and upsampling.

Both are explicit, separate steps: a tool that silently rescales every map to
[0, 1] hides the difference between a confident and a hesitant model, and one that
silently resizes picks an interpolation for you.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal, TypeVar, overload

import torch
import torch.nn.functional as F

from attnblocks._errors import InvalidArgumentError, InvalidInputError
from attnblocks._validation import check_choice

__all__ = [
    "MAP_NORMALIZATIONS",
    "MAX_UPSAMPLED_VALUES",
    "UPSAMPLE_MODES",
    "MapNormalization",
    "UpsampleMode",
    "check_upsample",
    "describe_maps",
    "normalize_maps",
    "upsample_maps",
]

#: ``"image"``: each map scaled to [0, 1] on its own; ``"shared"``: one scale for all
#: maps given together (so two models or two images can be compared); ``"none"``.
MapNormalization = Literal["image", "shared", "none"]
#: Interpolation used to bring maps to image resolution.
UpsampleMode = Literal["nearest", "bilinear", "bicubic", "area"]

#: The values of :data:`MapNormalization` and :data:`UpsampleMode`, for checking them.
MAP_NORMALIZATIONS = ("image", "shared", "none")
UPSAMPLE_MODES = ("nearest", "bilinear", "bicubic", "area")
M = TypeVar("M", torch.Tensor, Mapping[str, torch.Tensor])


def describe_maps(maps: object) -> str:
    """What was received instead of maps, for a message: a tensor's shape and dtype, or a type.

    >>> describe_maps(torch.zeros(2, 3)), describe_maps([1.0])
    ('shape (2, 3), dtype torch.float32', 'list')
    """
    if isinstance(maps, torch.Tensor):
        return f"shape {tuple(maps.shape)}, dtype {maps.dtype}"
    return type(maps).__name__


def _check_maps(maps: object, *, owner: str, name: str = "maps") -> torch.Tensor:
    if not isinstance(maps, torch.Tensor) or maps.dim() < 2 or not maps.is_floating_point():
        raise InvalidInputError(
            f"{owner}: {name} must be a floating tensor of shape (N, *spatial), got "
            f"{describe_maps(maps)}."
        )
    return maps


def _minmax(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    span = hi - lo
    return torch.where(span > 0, (x - lo) / torch.where(span > 0, span, 1), torch.zeros_like(x))


@overload
def normalize_maps(maps: torch.Tensor, mode: MapNormalization = ...) -> torch.Tensor: ...
@overload
def normalize_maps(
    maps: Mapping[str, torch.Tensor], mode: MapNormalization = ...
) -> dict[str, torch.Tensor]: ...
def normalize_maps(
    maps: torch.Tensor | Mapping[str, torch.Tensor], mode: MapNormalization = "image"
) -> torch.Tensor | dict[str, torch.Tensor]:
    """Min-max scale ``(N, *spatial)`` maps to [0, 1], per map or on one shared scale.

    Args:
        maps: a tensor of ``N`` maps, or a mapping of such tensors (e.g. Grad-CAM of two
            models on the same images); ``"shared"`` then uses one scale across all.
        mode: ``"image"`` scales each map by its own min and max, ``"shared"`` by the
            min and max over everything given, ``"none"`` returns the maps unchanged.
            A constant map becomes all zeros.

    Example:
        >>> from attnblocks.inspect import normalize_maps
        >>> import torch
        >>> maps = torch.tensor([[[0.0, 1.0]], [[0.0, 4.0]]])
        >>> normalize_maps(maps, "image").flatten().tolist()
        [0.0, 1.0, 0.0, 1.0]
        >>> normalize_maps(maps, "shared").flatten().tolist()
        [0.0, 0.25, 0.0, 1.0]
    """
    owner = "normalize_maps"
    check_choice(mode, "mode", MAP_NORMALIZATIONS, owner=owner)
    if isinstance(maps, Mapping):
        checked = {k: _check_maps(v, owner=owner, name=f"maps[{k!r}]") for k, v in maps.items()}
        if mode == "shared" and any(v.numel() for v in checked.values()):
            lo = min(v.min() for v in checked.values() if v.numel())
            hi = max(v.max() for v in checked.values() if v.numel())
            return {k: _minmax(v, lo, hi) for k, v in checked.items()}
        return {k: normalize_maps(v, mode) for k, v in checked.items()}
    x = _check_maps(maps, owner=owner)
    if mode == "none" or x.numel() == 0:
        return x
    if mode == "shared":
        return _minmax(x, x.min(), x.max())
    flat = x.flatten(1)
    shape = (-1,) + (1,) * (x.dim() - 1)
    return _minmax(x, flat.min(1).values.view(shape), flat.max(1).values.view(shape))


#: The most values :func:`upsample_maps` produces (2**31 float32 values are 8 GiB).
MAX_UPSAMPLED_VALUES = 1 << 31


def check_upsample(size: object, mode: object, *, owner: str) -> tuple[tuple[int, int] | None, str]:
    """Check an upsampling request, ``size`` (``None`` or two positive ints) and ``mode``.

    Called before any expensive work (a forward and backward pass), and also when
    ``size`` is ``None``: a misspelt mode is never silently ignored.

    >>> check_upsample([32, 32], "bilinear", owner="demo")
    ((32, 32), 'bilinear')
    """
    check_choice(mode, "upsample mode", UPSAMPLE_MODES, owner=owner)
    if size is None:
        return None, str(mode)
    if (
        not isinstance(size, (tuple, list, torch.Size))
        or len(size) != 2
        or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size)
    ):
        raise InvalidArgumentError(
            f"{owner}: size must be (height, width) with two positive ints, got {size!r}."
        )
    return (int(size[0]), int(size[1])), str(mode)


def upsample_maps(
    maps: torch.Tensor, size: tuple[int, int], *, mode: UpsampleMode = "bilinear"
) -> torch.Tensor:
    """Resize ``(N, H, W)`` maps to ``size = (height, width)`` with an explicit mode.

    ``"bilinear"`` and ``"bicubic"`` use ``align_corners=False`` (pixel centres, as
    image libraries do); ``"bicubic"`` can overshoot the input range slightly and is
    clamped back to it. Maps with no positions (``H`` or ``W`` of 0) cannot be
    resized, and a result of more than ``MAX_UPSAMPLED_VALUES`` values is refused.

    Example:
        >>> from attnblocks.inspect import upsample_maps
        >>> import torch
        >>> upsample_maps(torch.rand(2, 4, 4), (32, 32), mode="nearest").shape
        torch.Size([2, 32, 32])
    """
    owner = "upsample_maps"
    x = _check_maps(maps, owner=owner)
    if x.dim() != 3:
        raise InvalidInputError(f"{owner}: maps must have shape (N, H, W), got {tuple(x.shape)}.")
    checked, _ = check_upsample(size, mode, owner=owner)
    if checked is None:
        raise InvalidArgumentError(f"{owner}: size must be (height, width), got None.")
    if x.shape[0] and 0 in x.shape[1:]:
        raise InvalidInputError(
            f"{owner}: maps of shape {tuple(x.shape)} have no positions to resize."
        )
    if x.shape[0] * checked[0] * checked[1] > MAX_UPSAMPLED_VALUES:
        raise InvalidArgumentError(
            f"{owner}: resizing {x.shape[0]} maps to {checked} would make "
            f"{x.shape[0] * checked[0] * checked[1]:,} values, more than "
            f"{MAX_UPSAMPLED_VALUES:,}; ask for a smaller size or fewer maps at once."
        )
    if x.shape[0] == 0:
        return x.new_zeros((0, *checked))
    kwargs = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    out = F.interpolate(x[:, None].float(), size=checked, mode=mode, **kwargs)[:, 0]
    if mode == "bicubic" and x.numel():
        out = out.clamp(float(x.min()), float(x.max()))
    return out.to(x.dtype)
