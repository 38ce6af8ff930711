"""Pieces shared by the benchmark scripts: the tutorial's SE block, allocator set-up, header."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

import torch
from torch import nn

import attnblocks

__all__ = ["TutorialSE", "describe_machine", "keep_freed_memory"]


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
    nothing to do with the code being timed. jemalloc/tcmalloc, or the environment
    variables ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_``, have the same effect.

    Returns:
        A line saying what was done.
    """
    name = ctypes.util.find_library("c")
    if name is None or platform.system() != "Linux":
        return "malloc: default (could not find glibc to configure)"
    libc = ctypes.CDLL(name)
    m_trim_threshold, m_mmap_threshold = -1, -3
    ok = libc.mallopt(m_mmap_threshold, 32 * 1024 * 1024)  # glibc's largest allowed value
    ok &= libc.mallopt(m_trim_threshold, 1 << 30)
    return (
        "malloc: glibc keeps freed memory (mmap threshold 32 MiB, trim threshold 1 GiB)"
        if ok
        else ("malloc: default (mallopt failed)")
    )


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
