"""Pieces shared by the benchmark scripts: the tutorial's SE block, allocator set-up, header."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import sys
from argparse import ArgumentParser, Namespace
from collections.abc import Callable

import torch
from torch import nn

import attnblocks

__all__ = [
    "TutorialSE",
    "add_malloc_option",
    "describe_machine",
    "keep_freed_memory",
    "set_up_malloc",
    "timm_twins",
]


class TutorialSE(nn.Module):
    """The SE block of the usual PyTorch tutorial: AdaptiveAvgPool2d, Linear without bias.

    ``AdaptiveAvgPool2d(1)`` -> view (N, C) -> ``Linear(C, C // r, bias=False)`` ->
    ``ReLU(inplace=True)`` -> ``Linear(C // r, C, bias=False)`` -> ``Sigmoid`` -> view
    (N, C, 1, 1) -> ``x * y``.
    """

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Sequential(
            nn.Linear(channels, channels // reduction, bias=False),
            nn.ReLU(inplace=True),
            nn.Linear(channels // reduction, channels, bias=False),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, _, _ = x.shape
        y = self.avg_pool(x).view(b, c)
        return x * self.fc(y).view(b, c, 1, 1)


def keep_freed_memory() -> str:
    """Make glibc keep freed memory instead of returning it to the OS (``--malloc keep``).

    With glibc's defaults, a large tensor freed at the top of the heap (or allocated with
    mmap) is handed back to the kernel, and the next allocation of that size page-faults
    on every 4 KiB page it touches; on this VM that costs more than reading the tensor.
    Which calls pay it depends on what was allocated before, so it adds noise that has
    nothing to do with the code being timed. The mmap threshold is raised to its maximum
    (32 MiB) and trimming is turned off, as the CIFAR-10 example does for training (the
    benchmarks keep their own copy: they do not import the example).

    Returns:
        A line saying what was done.
    """
    if _mallopt_keep():
        return "malloc: glibc keeps freed memory (mmap threshold 32 MiB, no trimming)"
    return "malloc: default (glibc's mallopt is not available here)"


def add_malloc_option(parser: ArgumentParser) -> None:
    """``--malloc default|keep``: whether to call :func:`keep_freed_memory` first."""
    parser.add_argument(
        "--malloc",
        default="default",
        choices=["default", "keep"],
        help="'keep': make glibc keep freed memory, taking page faults out of the timings",
    )


def set_up_malloc(args: Namespace) -> str:
    """Apply ``--malloc``; returns the header's words for it."""
    return keep_freed_memory() if args.malloc == "keep" else "malloc: default"


def _mallopt_keep() -> bool:
    """glibc ``mallopt``: mmap threshold 32 MiB, no trimming, 64 MiB top pad; False off glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD and M_TOP_PAD of glibc's <malloc.h>
    settings = ((-3, 32 << 20), (-1, 2**31 - 1), (-2, 64 << 20))
    return all([bool(mallopt(param, value)) for param, value in settings])


def describe_machine(extra: str) -> str:
    """One header line: versions, CPU, threads, load average."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            models = [line.split(":", 1)[1].strip() for line in info if "model name" in line]
        cpu = models[0] if models else cpu
    except OSError:
        pass
    return (
        f"# torch {torch.__version__}, attnblocks {attnblocks.__version__}, {cpu}, "
        f"{os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, {extra}, "
        f"load average {os.getloadavg()[0]:.2f}"
    )


def timm_twins() -> dict[str, Callable[[int], nn.Module]]:
    """timm's implementation of each attnblocks block, as ``name -> factory(channels)``.

    Default options of timm 1.0.x, except where they do not build or compute another
    block: ``GatherExcite(channels)`` fails to build in timm 1.0.x (its default MLP,
    ``use_mlp=True``, passes its arguments to ``ConvMlp`` twice), and with
    ``use_mlp=False`` it is GE-theta-minus with global extent, attnblocks' default;
    ``GlobalContext`` fuses by multiplication by default, attnblocks' by addition, so
    the twin gets ``fuse_add=True, fuse_scale=False`` and attnblocks' reduction 16; SE
    gets attnblocks' reduction 16 without rounding the width to a multiple of 8.
    Empty when timm is not installed.
    """
    try:
        from timm.layers import EcaModule, GatherExcite, GlobalContext, SEModule
        from timm.layers.cbam import CbamModule
        from timm.layers.coord_attn import CoordAttn
    except ImportError:
        print("# timm is not installed: skipping timm's twins of the blocks")
        return {}
    return {
        "se": lambda c: SEModule(c, rd_ratio=1 / 16, rd_divisor=1),
        "eca": lambda c: EcaModule(c),
        "cbam": lambda c: CbamModule(c),
        "ge": lambda c: GatherExcite(c, use_mlp=False),
        "gc": lambda c: GlobalContext(c, fuse_add=True, fuse_scale=False, rd_ratio=1 / 16),
        "coord": lambda c: CoordAttn(c),
    }
