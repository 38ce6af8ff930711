"""Micro-benchmark: one SE block, forward and forward+backward, against timm, torchvision
and the tutorial's SE, with a plain tensor copy as the memory-bandwidth reference.

Every implementation runs in the same process on the same tensors, in interleaved rounds
(in a new random order every round, so slow phases of a shared machine hit all of them
alike);
the tables report the median time per call over the rounds, the speed-up over the fastest
competitor (tutorial, timm, torchvision; by median time) taken as the median of the
per-round ratios, and the achieved bandwidth as a fraction of a plain copy's.

Achieved bandwidth counts the bytes an ideal implementation must move: 3 passes over x
forward (read for the mean; read, write for x * s) and 7 for forward+backward (3 + read
grad and x for dL/ds, read grad and write dL/dx). ``% copy`` is that figure divided by the
bandwidth of ``dst.copy_(x)`` measured in the same rounds; 100 % means "as fast as the
memory allows", and an implementation that moves more bytes than needed scores lower.

Caches: by default (``--cache warm``) every sample repeats the call on the same tensors,
which then stay in the last-level cache (a (64, 32, 32, 32) float32 map is 8 MiB): that
measures the arithmetic and the framework overhead. Inside a network the block's input
has just been written by the layer before and its gradient by the layer after, and the
other activations have pushed the rest out of the cache, so the memory system dominates;
``--cache cold`` reproduces that: before every timed call it writes over a buffer several
times the size of the cache (``--flush-mib``), times that one call alone, and the copy
reference is flushed and timed the same way.

``--blocks`` adds other attention blocks of attnblocks (default options) and, where timm
has one, timm's implementation of the same block (its "twin", see ``TIMM_TWINS``), in the
same rounds; a second table per case gives each block's speed-up over its twin.
``--reference-se DIR`` adds ``SEBlock`` from another checkout of attnblocks (say, the
main branch extracted with ``git archive``), for a paired before/after comparison.
``--clock cpu`` times the CPU time of the calling thread instead of wall-clock time: on a
machine shared with other jobs it leaves out the time the thread waits to be scheduled
(use it with ``--threads 1``; with more threads the workers' time is not counted).

Run ``python benchmarks/bench_se.py --help`` for the options; the README has the tables.
"""

from __future__ import annotations

import argparse
import importlib
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from _common import TutorialSE, add_malloc_option, describe_machine, set_up_malloc, timm_twins
from torch import nn

import attnblocks

PASSES = {"forward": 3, "forward+backward": 7}
COMPETITORS = ("tutorial", "timm", "torchvision")


def build_implementations(channels: int, reduction: int) -> dict[str, nn.Module]:
    """The SE implementations to compare, by name; missing optional packages are skipped."""
    impls: dict[str, nn.Module] = {"tutorial": TutorialSE(channels, reduction)}
    try:
        from timm.layers import SEModule

        impls["timm"] = SEModule(channels, rd_ratio=1 / reduction, rd_divisor=1)
    except ImportError:
        print("# timm is not installed: skipping timm.layers.SEModule")
    try:
        from torchvision.ops import SqueezeExcitation

        impls["torchvision"] = SqueezeExcitation(channels, channels // reduction)
    except ImportError:
        print("# torchvision is not installed: skipping torchvision.ops.SqueezeExcitation")
    impls["attnblocks"] = attnblocks.SEBlock(channels, reduction=reduction)
    plain = attnblocks.SEBlock(channels, reduction=reduction)
    plain.fast_path = False
    impls["attnblocks (plain)"] = plain
    return impls


TIMM_TWINS = timm_twins()


def load_reference_se(directory: str) -> type[nn.Module]:
    """``SEBlock`` of the attnblocks package in ``directory``, beside the one imported here.

    The other copy is imported under the same package name with the current one's modules
    set aside, then those are put back; the reference class keeps its own modules.
    """
    if not os.path.isfile(os.path.join(directory, "attnblocks", "__init__.py")):
        raise SystemExit(f"--reference-se: no attnblocks package in {directory}")
    saved = {
        n: m for n, m in sys.modules.items() if n == "attnblocks" or n.startswith("attnblocks.")
    }
    for name in saved:
        del sys.modules[name]
    sys.path.insert(0, directory)
    try:
        reference = importlib.import_module("attnblocks")
        if not os.path.samefile(
            os.path.dirname(reference.__file__ or ""), os.path.join(directory, "attnblocks")
        ):
            raise SystemExit(f"--reference-se: no attnblocks package in {directory}")
        return reference.SEBlock
    finally:
        sys.path.remove(directory)
        for name in [n for n in sys.modules if n == "attnblocks" or n.startswith("attnblocks.")]:
            del sys.modules[name]
        sys.modules.update(saved)


@dataclass
class Case:
    shape: tuple[int, ...]
    memory_format: str
    mode: str


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _make_step(
    module: nn.Module | None, x: torch.Tensor, grad: torch.Tensor, mode: str, copy_dst: torch.Tensor
) -> Callable[[], object]:
    if module is None:  # the bandwidth reference
        return lambda: copy_dst.copy_(x)
    if mode == "forward":

        def forward() -> object:
            with torch.no_grad():
                return module(x)

        return forward
    x_grad = x.detach().requires_grad_(True)
    inputs = [x_grad, *module.parameters()]

    def forward_backward() -> object:
        return torch.autograd.grad(module(x_grad), inputs, grad)

    return forward_backward


CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}
_clock = time.perf_counter


def _time(step: Callable[[], object], inner: int, device: torch.device) -> float:
    _sync(device)
    start = _clock()
    for _ in range(inner):
        step()
    _sync(device)
    return (_clock() - start) / inner


def make_flush(device: torch.device, mib: int) -> Callable[[], None]:
    """A function that evicts the caches: it reads and writes ``mib`` MiB of other memory.

    An in-place add, not a fill: large fills may use non-temporal stores, which bypass
    the cache instead of evicting it.
    """
    buffer = torch.zeros(mib * (1 << 20) // 4, dtype=torch.float32, device=device)

    def flush() -> None:
        buffer.add_(1.0)
        _sync(device)

    return flush


def run_case(case: Case, args: argparse.Namespace) -> list[dict[str, object]]:
    """Time every implementation on one case; return one row per implementation."""
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    fmt = torch.channels_last if case.memory_format == "channels_last" else torch.contiguous_format
    torch.manual_seed(0)
    x = torch.randn(case.shape, device=device, dtype=dtype).contiguous(memory_format=fmt)
    grad = torch.randn_like(x)
    copy_dst = torch.empty_like(x)
    channels = case.shape[1]
    built = build_implementations(channels, args.reduction)
    modules: dict[str, nn.Module | None] = {
        n: m for n, m in built.items() if args.impls is None or n in args.impls
    }
    if args.reference_se_class is not None:
        modules["attnblocks (reference)"] = args.reference_se_class(
            channels, reduction=args.reduction
        )
    for block in args.blocks:  # the rest of the attention family, default options
        modules[f"attnblocks {block}"] = attnblocks.create_block(block, channels)
        if block in TIMM_TWINS and block != "se":
            modules[f"timm {block}"] = TIMM_TWINS[block](channels)
    for name, module in list(modules.items()):
        if module is not None:
            modules[name] = module.to(device=device, dtype=dtype, memory_format=fmt)
    modules["copy"] = None
    steps = {n: _make_step(m, x, grad, case.mode, copy_dst) for n, m in modules.items()}

    # Warm up, and pick a per-sample repeat count so one sample lasts ~args.sample_ms. All
    # SE implementations get the same count (the copy its own), so that whatever the
    # first call after a switch costs (cold caches, allocator) weighs the same on each.
    once: dict[str, float] = {}
    for name, step in steps.items():
        for _ in range(3):
            step()
        once[name] = statistics.median(_time(step, 1, device) for _ in range(5))
    se_once = statistics.median(t for n, t in once.items() if n != "copy")
    inner = {n: max(1, round(args.sample_ms / 1e3 / max(se_once, 1e-7))) for n in steps}
    inner["copy"] = max(1, round(args.sample_ms / 1e3 / max(once["copy"], 1e-7)))
    flush = make_flush(device, args.flush_mib) if args.cache == "cold" else None
    if flush is not None:  # one call per sample, each after the caches were flushed
        inner = dict.fromkeys(steps, 1)

    names = list(steps)
    samples: dict[str, list[float]] = {n: [] for n in names}
    shuffler = random.Random(0)
    for _ in range(args.rounds):
        # A fresh random order every round, and one untimed call before each sample, so
        # that no implementation always follows the same neighbour (whose allocations
        # leave the allocator, and its page faults, in a state that favours some).
        order = shuffler.sample(names, len(names))
        for name in order:
            steps[name]()
            if flush is not None:
                flush()
            samples[name].append(_time(steps[name], inner[name], device))

    # Ratios are taken within each round (paired), then the median over rounds: a slow
    # phase of the machine then slows both sides of a ratio instead of one of them.
    median = {n: statistics.median(v) for n, v in samples.items()}
    competitors = [n for n in COMPETITORS if n in median] or [names[0]]
    fastest = min(competitors, key=median.__getitem__)
    nbytes = x.numel() * x.element_size()
    rows = []
    for name in names:
        t = samples[name]
        ideal = 2 if name == "copy" else PASSES[case.mode]
        q = statistics.quantiles(t, n=4) if len(t) > 1 else [t[0]] * 3
        speedup = [f / s for f, s in zip(samples[fastest], t, strict=True)]
        # achieved bandwidth (ideal bytes / time) over the copy's (2 passes / its time)
        pct_copy = [100 * ideal * c / (2 * s) for c, s in zip(samples["copy"], t, strict=True)]
        rows.append(
            {
                "impl": name,
                "median_ms": median[name] * 1e3,
                "iqr_ms": (q[2] - q[0]) * 1e3,
                "speedup": statistics.median(speedup),
                "pct_copy": statistics.median(pct_copy),
                "gbps": ideal * nbytes / median[name] / 1e9,
                "fastest": fastest,
                "samples": t,
            }
        )
    return rows


def print_table(case: Case, rows: list[dict[str, object]], args: argparse.Namespace) -> None:
    shape = "x".join(str(s) for s in case.shape)
    fastest = rows[0]["fastest"]
    where = f"{args.dtype}, {args.device}, {args.cache} cache"
    print(f"\n#### {shape}, {case.memory_format}, {case.mode} ({where})\n")
    print(
        f"| implementation | median ms | IQR ms | speed-up vs {fastest} | GB/s (ideal bytes) "
        "| % of copy bandwidth |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['impl']} | {row['median_ms']:.3f} | {row['iqr_ms']:.3f} | "
            f"{row['speedup']:.2f}x | {row['gbps']:.1f} | {row['pct_copy']:.0f} % |"
        )


def print_pairs(case: Case, rows: list[dict[str, object]]) -> None:
    """Each block against its twin (timm's, or the reference SEBlock): per-round ratios."""
    by_name = {str(row["impl"]): row for row in rows}
    pairs: list[tuple[str, str]] = []
    for name in by_name:
        if name.startswith("timm ") and f"attnblocks {name[5:]}" in by_name:
            pairs.append((f"attnblocks {name[5:]}", name))
    if "timm" in by_name:
        pairs.insert(0, ("attnblocks", "timm"))
    if "attnblocks (reference)" in by_name:
        pairs.append(("attnblocks", "attnblocks (reference)"))
    if not pairs:
        return
    shape = "x".join(str(s) for s in case.shape)
    print(f"\n{shape}, {case.memory_format}, {case.mode}: each block against its twin\n")
    print("| block | ms | twin | twin ms | speed-up (twin time / block time) |")
    print("|---|---:|---|---:|---:|")
    for mine, twin in pairs:
        a, b = by_name[mine], by_name[twin]
        ratio = statistics.median(
            t / s
            for s, t in zip(a["samples"], b["samples"], strict=True)  # type: ignore[call-overload]
        )
        print(f"| {mine} | {a['median_ms']:.3f} | {twin} | {b['median_ms']:.3f} | {ratio:.2f}x |")


def parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"shape must look like 64,32,32,32, got {text!r}"
        ) from None
    if len(shape) != 4:
        raise argparse.ArgumentTypeError(f"shape must be N,C,H,W (4 numbers), got {text!r}")
    return shape


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--shapes",
        type=parse_shape,
        nargs="+",
        default=[(64, 32, 32, 32), (64, 64, 16, 16), (64, 128, 8, 8)],
        help="input shapes N,C,H,W (default: the tutorial's three SE inputs)",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument(
        "--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16"]
    )
    parser.add_argument(
        "--memory-format",
        default="both",
        choices=["both", "contiguous", "channels_last"],
        help="input memory format (default: both)",
    )
    parser.add_argument(
        "--mode",
        default="both",
        choices=["both", "forward", "forward+backward"],
        help="what to time (default: both)",
    )
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--rounds", type=int, default=40, help="interleaved rounds (default 40)")
    parser.add_argument(
        "--sample-ms", type=float, default=3.0, help="target length of one timed sample (ms)"
    )
    parser.add_argument(
        "--cache",
        default="warm",
        choices=["warm", "cold"],
        help="'warm' (default): repeated calls on cache-resident tensors; 'cold': flush the "
        "caches before every timed call, as inside a network",
    )
    parser.add_argument(
        "--flush-mib",
        type=int,
        default=128,
        help="MiB written to flush the caches with --cache cold (default 128; use several "
        "times the last-level cache)",
    )
    parser.add_argument("--reduction", type=int, default=16, help="SE reduction ratio r")
    parser.add_argument(
        "--impls",
        nargs="+",
        default=None,
        choices=[*COMPETITORS, "attnblocks", "attnblocks (plain)"],
        help="implementations to time (default: all); the copy reference always runs",
    )
    parser.add_argument(
        "--blocks",
        nargs="*",
        default=[],
        metavar="NAME",
        help="also time these attention blocks of attnblocks with default options, e.g. "
        "--blocks eca cbam, or --blocks all for every registered block (default: none)",
    )
    parser.add_argument(
        "--reference-se",
        default=None,
        metavar="DIR",
        help="also time SEBlock from the attnblocks package in DIR (another checkout), in "
        "the same rounds",
    )
    parser.add_argument(
        "--clock",
        default="wall",
        choices=sorted(CLOCKS),
        help="'wall' (default): elapsed time; 'cpu': CPU time of the calling thread (use "
        "with --threads 1 on a busy machine)",
    )
    add_malloc_option(parser)
    args = parser.parse_args(argv)
    if args.blocks == ["all"]:
        args.blocks = [b for b in attnblocks.available_blocks() if b != "se"]
    unknown = sorted(set(args.blocks) - set(attnblocks.available_blocks()))
    if unknown:
        parser.error(f"--blocks: unknown {unknown}; registered: {attnblocks.available_blocks()}")

    args.reference_se_class = None
    if args.reference_se is not None:
        args.reference_se_class = load_reference_se(os.path.abspath(args.reference_se))
    global _clock
    _clock = CLOCKS[args.clock]
    if args.flush_mib < 1:
        parser.error(f"--flush-mib must be a positive number of MiB, got {args.flush_mib}")
    cache = "warm cache"
    if args.cache == "cold":
        cache = f"cold cache (flushed by writing {args.flush_mib} MiB before every timed call)"
    torch.set_num_threads(args.threads)
    malloc = set_up_malloc(args)
    both = ["contiguous", "channels_last"]
    formats = both if args.memory_format == "both" else [args.memory_format]
    modes = ["forward", "forward+backward"] if args.mode == "both" else [args.mode]
    print(
        describe_machine(
            f"device {args.device}, dtype {args.dtype}, {args.rounds} rounds, {cache}, {malloc}, "
            f"{args.clock} clock"
        )
    )
    for shape in args.shapes:
        for fmt in formats:
            for mode in modes:
                case = Case(shape, fmt, mode)
                rows = run_case(case, args)
                print_table(case, rows, args)
                if args.blocks or args.reference_se_class is not None:
                    print_pairs(case, rows)
    print(f"\n# load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
