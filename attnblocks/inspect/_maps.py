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

__all__ = ["MapNormalization", "UpsampleMode", "normalize_maps", "upsample_maps"]

#: ``"image"``: each map scaled to [0, 1] on its own; ``"shared"``: one scale for all
#: maps given together (so two models or two images can be compared); ``"none"``.
MapNormalization = Literal["image", "shared", "none"]
#: Interpolation used to bring maps to image resolution.
UpsampleMode = Literal["nearest", "bilinear", "bicubic", "area"]

_NORMALIZATIONS = ("image", "shared", "none")
_UPSAMPLE = ("nearest", "bilinear", "bicubic", "area")
M = TypeVar("M", torch.Tensor, Mapping[str, torch.Tensor])


def _check_maps(maps: object, *, owner: str, name: str = "maps") -> torch.Tensor:
    if not isinstance(maps, torch.Tensor) or maps.dim() < 2 or not maps.is_floating_point():
        got = (
            f"shape {tuple(maps.shape)}, dtype {maps.dtype}"
            if isinstance(maps, torch.Tensor)
            else type(maps).__name__
        )
        raise InvalidInputError(
            f"{owner}: {name} must be a floating tensor of shape (N, *spatial), got {got}."
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
    if mode not in _NORMALIZATIONS:
        raise InvalidArgumentError(
            f"{owner}: unknown mode {mode!r}; valid modes are {list(_NORMALIZATIONS)}."
        )
    if isinstance(maps, Mapping):
        checked = {k: _check_maps(v, owner=owner, name=f"maps[{k!r}]") for k, v in maps.items()}
        if mode == "shared" and checked:
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


def upsample_maps(
    maps: torch.Tensor, size: tuple[int, int], *, mode: UpsampleMode = "bilinear"
) -> torch.Tensor:
    """Resize ``(N, H, W)`` maps to ``size = (height, width)`` with an explicit mode.

    ``"bilinear"`` and ``"bicubic"`` use ``align_corners=False`` (pixel centres, as
    image libraries do); ``"bicubic"`` can overshoot the input range slightly and is
    clamped back to it.

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
    if mode not in _UPSAMPLE:
        raise InvalidArgumentError(
            f"{owner}: unknown mode {mode!r}; valid modes are {list(_UPSAMPLE)}."
        )
    if (
        not isinstance(size, (tuple, list))
        or len(size) != 2
        or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size)
    ):
        raise InvalidArgumentError(
            f"{owner}: size must be (height, width) with two positive ints, got {size!r}."
        )
    kwargs = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    out = F.interpolate(x[:, None].float(), size=tuple(size), mode=mode, **kwargs)[:, 0]
    if mode == "bicubic" and x.numel():
        out = out.clamp(float(x.min()), float(x.max()))
    return out.to(x.dtype)
