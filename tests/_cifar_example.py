"""Helpers for the CIFAR-10 example's tests: its paths and a generated ImageFolder.

The example's modules (``cifar10_se``, ``se_cifar``...) are importable in the tests because
pyproject.toml puts ``examples/`` on the path (pytest's ``pythonpath`` option).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
REAL_DATA = ROOT.parent / "shared" / "data" / "cifar10"

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def make_image_folder(
    root: Path, per_class: int = 6, test_per_class: int = 2, seed: int = 0
) -> Path:
    """Write a tiny CIFAR-like ImageFolder tree whose classes differ by colour."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, count in (("train", per_class), ("test", test_per_class)):
        for c, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                base = np.zeros((32, 32, 3), dtype=np.float64)
                base[..., c % 3] = 60 + 18 * c
                noise = rng.normal(0, 25, size=(32, 32, 3))
                pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i:04d}.png")
    return root
