"""Turn image tensors into displayable RGB arrays, and check plot arguments."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from attnblocks._errors import InvalidArgumentError, InvalidInputError
from attnblocks._validation import is_real

if TYPE_CHECKING:
    import numpy as np

__all__ = ["as_batch", "check_figsize", "check_fraction", "host", "to_rgb"]

#: How far outside [0, 1] an image may reach before it is taken for a still-normalised one.
_RANGE_SLACK = 0.02


def check_figsize(
    figsize: object, default: tuple[float, float], *, owner: str
) -> tuple[float, float]:
    """Return ``figsize`` (or ``default`` when ``None``) as two positive floats."""
    if figsize is None:
        return default
    if (
        isinstance(figsize, (tuple, list))
        and len(figsize) == 2
        and all(is_real(v) for v in figsize)
    ):
        width, height = float(figsize[0]), float(figsize[1])
        if 0 < width < float("inf") and 0 < height < float("inf"):
            return width, height
    raise InvalidArgumentError(
        f"{owner}: figsize must be (width, height) in inches, two positive numbers, "
        f"got {figsize!r}."
    )


def check_fraction(value: object, name: str, *, owner: str) -> float:
    """Return ``value`` as a float in [0, 1]."""
    if not is_real(value) or not 0 <= float(value) <= 1:
        raise InvalidArgumentError(f"{owner}: {name} must be a number in [0, 1], got {value!r}.")
    return float(value)


def host(
    t: torch.Tensor, *, owner: str, name: str, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """A detached CPU copy of ``t`` in ``dtype`` to draw; a meta tensor (no values) is refused."""
    if t.is_meta:
        raise InvalidInputError(
            f"{owner}: {name} is on the meta device, which holds shapes but no values; "
            "there is nothing to draw."
        )
    return t.detach().to(device="cpu", dtype=dtype)


def _stat(
    value: Sequence[float] | torch.Tensor | None, channels: int, name: str, owner: str
) -> torch.Tensor | None:
    if value is None:
        return None
    t = torch.as_tensor(value, dtype=torch.float32).flatten()
    if t.numel() == 1:
        t = t.expand(channels)
    if t.numel() != channels:
        raise InvalidArgumentError(
            f"{owner}: {name} has {t.numel()} values but the image has {channels} channels; "
            "give one value per channel (e.g. the Normalize(mean, std) of your transform)."
        )
    return t.view(channels, 1, 1)


def to_rgb(
    image: Any,
    *,
    mean: Sequence[float] | torch.Tensor | None = None,
    std: Sequence[float] | torch.Tensor | None = None,
    owner: str,
) -> np.ndarray:
    """A ``(H, W, 3)`` (or ``(H, W)`` grey) float array in [0, 1] for ``imshow``.

    Args:
        image: ``(3, H, W)`` RGB or ``(1, H, W)`` / ``(H, W)`` grey, float (in [0, 1]
            once un-normalised) or uint8 (0..255). Channels are taken as RGB, the
            torchvision order; convert BGR (OpenCV) images before.
        mean, std: the per-channel normalisation applied to the image, undone here as
            ``image * std + mean``.
        owner: the plot function, for messages.
    """
    if not isinstance(image, torch.Tensor):
        raise InvalidInputError(
            f"{owner}: image must be a torch.Tensor (C, H, W), got {type(image).__name__}."
        )
    if image.is_meta:
        raise InvalidInputError(
            f"{owner}: image is on the meta device, which holds shapes but no values."
        )
    x = image.detach().cpu()
    if x.dim() == 2:
        x = x[None]
    if x.dim() != 3 or x.shape[0] not in (1, 3):
        raise InvalidInputError(
            f"{owner}: image must have shape (3, H, W), (1, H, W) or (H, W), got "
            f"{tuple(image.shape)}. For a batch, pick one image, e.g. images[0]."
        )
    if x.dtype == torch.uint8:
        x = x.float() / 255.0
    elif not x.is_floating_point():
        raise InvalidInputError(f"{owner}: image must be float or uint8, got dtype {image.dtype}.")
    x = x.float()
    c = x.shape[0]
    m = _stat(mean, c, "mean", owner)
    s = _stat(std, c, "std", owner)
    if s is not None:
        x = x * s
    if m is not None:
        x = x + m
    lo, hi = float(x.min()), float(x.max())
    if lo < -_RANGE_SLACK or hi > 1 + _RANGE_SLACK:
        raise InvalidInputError(
            f"{owner}: the image's values span [{lo:.3g}, {hi:.3g}], not [0, 1]. If it was "
            "normalised, pass the mean= and std= used (e.g. mean=(0.4914, 0.4822, 0.4465), "
            "std=(0.2470, 0.2435, 0.2616) for CIFAR-10); otherwise scale it to [0, 1]."
        )
    x = x.clamp(0, 1)
    if c == 1:
        return x[0].numpy()
    return x.permute(1, 2, 0).numpy()


def as_batch(images: Any, *, owner: str, name: str = "images") -> torch.Tensor:
    """``(N, C, H, W)`` from a batch or a single ``(C, H, W)`` image."""
    if not isinstance(images, torch.Tensor) or images.dim() not in (3, 4):
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise InvalidInputError(
            f"{owner}: {name} must be a tensor (N, C, H, W) or one image (C, H, W), got {got}."
        )
    batch = images[None] if images.dim() == 3 else images
    if batch.shape[0] == 0:
        raise InvalidInputError(
            f"{owner}: {name} is an empty batch (shape {tuple(images.shape)}); give at least "
            "one image."
        )
    return batch
