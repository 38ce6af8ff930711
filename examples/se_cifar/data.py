"""CIFAR-10 as uint8 tensors: from an ImageFolder tree or torchvision's download, cached once.

The whole data set (60 000 images of 3x32x32 bytes, 184 MB) lives in memory as a
``uint8`` tensor; augmentation and normalisation happen in batches on the device.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = ["DataError", "Split", "load_cifar10", "subset"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp")
CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)


class DataError(RuntimeError):
    """The data set is missing, empty or corrupt; the message says how to fix it."""


@dataclass
class Split:
    """One split of the data: ``images`` (N, 3, H, W) uint8, ``labels`` (N,) int64."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]

    def __len__(self) -> int:
        return int(self.labels.numel())


def _balanced_indices(labels: list[int], count: int, seed: int) -> list[int]:
    """Indices of ``count`` items, drawn at random and round-robin over the classes."""
    gen = torch.Generator().manual_seed(seed)
    per_class: dict[int, list[int]] = {}
    for i in torch.randperm(len(labels), generator=gen).tolist():
        per_class.setdefault(labels[i], []).append(i)
    chosen: list[int] = []
    rank = 0
    while len(chosen) < count:
        for c in sorted(per_class):
            if rank < len(per_class[c]) and len(chosen) < count:
                chosen.append(per_class[c][rank])
        rank += 1
    return sorted(chosen)


def subset(split: Split, count: int | None, *, seed: int = 0) -> Split:
    """A class-balanced random subset of ``count`` images (all of them if ``count`` is None)."""
    if count is None or count >= len(split):
        return split
    chosen = torch.tensor(_balanced_indices(split.labels.tolist(), count, seed))
    return Split(split.images[chosen], split.labels[chosen], split.classes)


def _list_folder(root: Path, split: str) -> tuple[list[str], list[tuple[Path, int]]]:
    folder = root / split
    if not folder.is_dir():
        raise DataError(
            f"no '{split}' folder in {root}. --data-dir must hold train/ and test/ folders "
            "with one sub-folder of images per class (ImageFolder layout), e.g. "
            "../shared/data/cifar10."
        )
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"{folder} has no class folders; expected {folder}/<class>/<image>.jpg.")
    files: list[tuple[Path, int]] = []
    for index, name in enumerate(classes):
        images = sorted(p for p in (folder / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise DataError(
                f"class folder {folder / name} has no images (looked for {IMAGE_SUFFIXES})."
            )
        files.extend((p, index) for p in images)
    return classes, files


def _decode(files: list[tuple[Path, int]], size: int) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image, UnidentifiedImageError

    images = np.empty((len(files), size, size, 3), dtype=np.uint8)
    labels = np.empty(len(files), dtype=np.int64)
    for i, (path, label) in enumerate(files):
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
                if im.size != (size, size):
                    raise DataError(
                        f"{path} is {im.size[0]}x{im.size[1]} pixels; every image must be "
                        f"{size}x{size}."
                    )
                images[i] = np.asarray(im)
        except (UnidentifiedImageError, OSError) as err:
            raise DataError(
                f"could not decode {path} ({err}). Remove or replace the file and run again."
            ) from None
        labels[i] = label
    return images, labels


def _cache_key(root: Path, split: str, files: list[tuple[Path, int]]) -> str:
    digest = hashlib.sha1(str(root.resolve()).encode())
    digest.update(split.encode())
    digest.update(str(len(files)).encode())
    for path, label in files[:: max(1, len(files) // 512)]:
        stat = path.stat()
        digest.update(f"{path.name}{label}{stat.st_size}{int(stat.st_mtime)}".encode())
    return digest.hexdigest()[:16]


def _load_folder_split(
    root: Path, split: str, cache_dir: Path | None, size: int, count: int | None, seed: int
) -> Split:
    classes, files = _list_folder(root, split)
    if count is not None and count < len(files):
        # a quick run decodes only the images it uses, and caches nothing
        chosen = _balanced_indices([label for _, label in files], count, seed)
        images, labels = _decode([files[i] for i in chosen], size)
        return Split(
            torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
            torch.from_numpy(labels),
            classes,
        )
    cache = None
    if cache_dir is not None:
        cache = cache_dir / f"{root.name}-{split}-{_cache_key(root, split, files)}.pt"
        if cache.exists():
            try:
                blob = torch.load(cache, weights_only=True)
                return Split(blob["images"], blob["labels"], list(blob["classes"]))
            except Exception:  # a broken cache is rebuilt, never trusted
                cache.unlink(missing_ok=True)
    images, labels = _decode(files, size)
    result = Split(
        torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
        torch.from_numpy(labels),
        classes,
    )
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".tmp{os.getpid()}")
        torch.save({"images": result.images, "labels": result.labels, "classes": classes}, tmp)
        tmp.replace(cache)
    return result


def _load_torchvision(root: Path) -> tuple[Split, Split]:
    try:
        from torchvision.datasets import CIFAR10
    except ImportError as err:
        raise DataError(
            "torchvision is needed to download CIFAR-10: pip install attnblocks[examples], "
            "or pass --data-dir with an ImageFolder copy of the data."
        ) from err
    splits = []
    for train in (True, False):
        try:
            ds = CIFAR10(str(root), train=train, download=True)
        except Exception as err:
            raise DataError(
                f"could not download CIFAR-10 into {root} ({type(err).__name__}: {err}). "
                "Without internet access, pass --data-dir PATH with an ImageFolder tree "
                "(PATH/train/<class>/*.jpg and PATH/test/<class>/*.jpg), e.g. "
                "--data-dir ../shared/data/cifar10."
            ) from None
        images = torch.from_numpy(np.asarray(ds.data)).permute(0, 3, 1, 2).contiguous()
        labels = torch.as_tensor(ds.targets, dtype=torch.int64)
        splits.append(Split(images, labels, list(ds.classes)))
    return splits[0], splits[1]


def load_cifar10(
    data_dir: str | os.PathLike[str] | None,
    *,
    download_root: str | os.PathLike[str] = "data",
    cache_dir: str | os.PathLike[str] | None = None,
    image_size: int = 32,
    train_count: int | None = None,
    test_count: int | None = None,
    seed: int = 0,
) -> tuple[Split, Split]:
    """Load the train and test splits as uint8 tensors.

    Args:
        data_dir: an ImageFolder tree with ``train/`` and ``test/``; None downloads
            CIFAR-10 through torchvision into ``download_root``.
        download_root: where torchvision keeps its download.
        cache_dir: where decoded ImageFolder splits are cached (None: no cache).
        image_size: the expected image side.
        train_count: use a class-balanced random subset of this many training images.
        test_count: likewise for the test split.
        seed: the seed of the subsets.

    Raises:
        DataError: the data set is missing, empty, corrupt or inconsistent.
    """
    if data_dir is None:
        train, test = _load_torchvision(Path(download_root))
        return subset(train, train_count, seed=seed), subset(test, test_count, seed=seed)
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(
            f"--data-dir {root} does not exist or is not a folder. Pass the folder that holds "
            "train/ and test/ (ImageFolder layout), or leave --data-dir out to download "
            "CIFAR-10 with torchvision."
        )
    cache = Path(cache_dir) if cache_dir is not None else None
    train = _load_folder_split(root, "train", cache, image_size, train_count, seed)
    test = _load_folder_split(root, "test", cache, image_size, test_count, seed)
    if train.classes != test.classes:
        raise DataError(
            f"train/ and test/ in {root} have different class folders: {train.classes} vs "
            f"{test.classes}."
        )
    return train, test
