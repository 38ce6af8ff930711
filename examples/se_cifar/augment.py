"""Batched data augmentation on image tensors, with independent random parameters per image.

Each transform draws its random parameters per image, like torchvision's per-image
transforms (RandomCrop, RandomHorizontalFlip, ColorJitter, RandomRotation), but
runs on a whole batch at once on the training device: no PIL, no loader workers.
Random numbers come from an explicit ``torch.Generator`` on the CPU, so a seed
gives the same augmentation on every device and a resumed run continues exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "Augment",
    "adjust_hue",
    "color_jitter",
    "hsv_to_rgb",
    "normalize",
    "random_crop",
    "random_flip",
    "random_rotation",
    "rgb_to_hsv",
]

_GRAY = (0.2989, 0.587, 0.114)  # ITU-R 601-2 luma, as torchvision's rgb_to_grayscale


def _uniform(
    n: int, lo: float, hi: float, gen: torch.Generator, device: torch.device
) -> torch.Tensor:
    return (torch.rand(n, generator=gen) * (hi - lo) + lo).to(device)


def random_crop(x: torch.Tensor, size: int, padding: int, gen: torch.Generator) -> torch.Tensor:
    """Zero-pad by ``padding`` then crop a random ``size`` x ``size`` window per image."""
    n, c = x.shape[:2]
    padded = F.pad(x, (padding, padding, padding, padding))
    hp, wp = padded.shape[-2:]
    top = torch.randint(0, hp - size + 1, (n,), generator=gen).to(x.device)
    left = torch.randint(0, wp - size + 1, (n,), generator=gen).to(x.device)
    span = torch.arange(size, device=x.device)
    flat = (top[:, None] + span)[:, :, None] * wp + (left[:, None] + span)[:, None, :]
    index = flat.reshape(n, 1, size * size).expand(-1, c, -1)
    return padded.flatten(2).gather(2, index).view(n, c, size, size)


def random_flip(x: torch.Tensor, gen: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """Flip each image left-right with probability ``p``."""
    rows = (torch.rand(x.shape[0], generator=gen) < p).nonzero().flatten().to(x.device)
    out = x.clone()
    out[rows] = x[rows].flip(-1)
    return out


def _grayscale(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    return (_GRAY[0] * r + _GRAY[1] * g + _GRAY[2] * b).unsqueeze(1)


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    """RGB in [0, 1] to HSV with every channel in [0, 1], batched over (N, 3, H, W)."""
    r, g, b = x.unbind(1)
    maxc, _ = x.max(dim=1)
    minc, _ = x.min(dim=1)
    chroma = maxc - minc
    sat = chroma / torch.where(maxc == 0, torch.ones_like(maxc), maxc)
    safe = torch.where(chroma == 0, torch.ones_like(chroma), chroma)
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    hue = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    hue = torch.where(chroma == 0, torch.zeros_like(hue), hue)
    hue = torch.remainder(hue / 6.0, 1.0)
    return torch.stack((hue, sat, maxc), dim=1)


def hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`rgb_to_hsv`.

    Uses the closed form ``f(n) = v - v s max(0, min(k, 4 - k, 1))`` with
    ``k = (n + 6 h) mod 6`` and ``n = 5, 3, 1`` for red, green and blue.
    """
    h, s, v = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    n = torch.tensor((5.0, 3.0, 1.0), device=x.device, dtype=x.dtype)[None, :, None, None]
    k = torch.remainder(n + 6.0 * h, 6.0)
    return v - v * s * torch.minimum(k, 4.0 - k).clamp(0.0, 1.0)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue of each image by ``shift`` (N,) turns, in [-0.5, 0.5]."""
    hsv = rgb_to_hsv(x)
    hue = torch.remainder(hsv[:, 0] + shift[:, None, None], 1.0)
    return hsv_to_rgb(torch.stack((hue, hsv[:, 1], hsv[:, 2]), dim=1))


def color_jitter(
    x: torch.Tensor,
    gen: torch.Generator,
    *,
    brightness: float = 0.0,
    contrast: float = 0.0,
    saturation: float = 0.0,
    hue: float = 0.0,
) -> torch.Tensor:
    """ColorJitter on a float batch in [0, 1], with per-image factors and per-image order.

    The factors follow torchvision: brightness, contrast and saturation factors are
    uniform in ``[max(0, 1 - v), 1 + v]``, the hue shift uniform in ``[-hue, hue]``,
    and the four adjustments are applied in a random order drawn per image.
    """
    n, device = x.shape[0], x.device
    factors = [
        _uniform(n, max(0.0, 1 - v), 1 + v, gen, device) for v in (brightness, contrast, saturation)
    ]
    shift = _uniform(n, -hue, hue, gen, device)
    order = torch.argsort(torch.rand(n, 4, generator=gen), dim=1).to(device)
    enabled = (brightness > 0, contrast > 0, saturation > 0, hue > 0)

    def apply(op: int, img: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        if op == 0:
            return (img * factors[0][rows, None, None, None]).clamp(0, 1)
        if op == 1:
            mean = _grayscale(img).mean(dim=(1, 2, 3), keepdim=True)
            c = factors[1][rows, None, None, None]
            return (c * img + (1 - c) * mean).clamp(0, 1)
        if op == 2:
            s = factors[2][rows, None, None, None]
            return (s * img + (1 - s) * _grayscale(img)).clamp(0, 1)
        return adjust_hue(img, shift[rows])

    out = x.clone()
    for position in range(4):
        for op in range(4):
            if not enabled[op]:
                continue
            rows = (order[:, position] == op).nonzero().flatten()
            if rows.numel():
                out[rows] = apply(op, out[rows], rows)
    return out


def random_rotation(x: torch.Tensor, degrees: float, gen: torch.Generator) -> torch.Tensor:
    """Rotate each image about its centre by an angle uniform in ``[-degrees, degrees]``.

    Nearest-neighbour sampling and zero fill, as torchvision's RandomRotation defaults.
    """
    n = x.shape[0]
    angle = _uniform(n, -degrees, degrees, gen, x.device) * (math.pi / 180.0)
    cos, sin = torch.cos(angle), torch.sin(angle)
    zero = torch.zeros_like(cos)
    theta = torch.stack((torch.stack((cos, -sin, zero), 1), torch.stack((sin, cos, zero), 1)), 1)
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def normalize(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """``(x - mean) / std`` per channel."""
    m = torch.tensor(mean, device=x.device, dtype=x.dtype)[None, :, None, None]
    s = torch.tensor(std, device=x.device, dtype=x.dtype)[None, :, None, None]
    return (x - m) / s


@dataclass(frozen=True)
class Augment:
    """A batched augmentation pipeline: uint8 (N, 3, H, W) in, normalised float out.

    Order as in the tutorial: crop (with zero padding), flip, colour jitter, rotation,
    then conversion to [0, 1] and normalisation.
    """

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_padding: int = 0
    flip: bool = False
    jitter: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    rotation: float = 0.0

    def __call__(
        self, images: torch.Tensor, gen: torch.Generator | None, *, train: bool
    ) -> torch.Tensor:
        x = images
        if train and gen is not None:
            if self.crop_padding:
                x = random_crop(x, x.shape[-1], self.crop_padding, gen)
            if self.flip:
                x = random_flip(x, gen)
        x = x.float().div_(255.0)
        if train and gen is not None:
            if any(self.jitter):
                b, c, s, h = self.jitter
                x = color_jitter(x, gen, brightness=b, contrast=c, saturation=s, hue=h)
            if self.rotation:
                x = random_rotation(x, self.rotation, gen)
        return normalize(x, self.mean, self.std)
