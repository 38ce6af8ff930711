"""Model-level benchmark: what adding SE costs in a training step and in inference.

Models: the tutorial's CIFAR-10 CNN (three Conv3x3 + BN + ReLU + MaxPool2 blocks with
32, 64 and 128 channels, then FC 2048 -> 512 -> 10 with dropout 0.5), with SE (r = 16)
after each block's activation; and torchvision's resnet18 / resnet50 (random weights)
with SE after every ``layer*.*.bn2`` (BasicBlock) or ``layer*.*.bn3`` (Bottleneck), i.e.
on the residual branch before the addition, as in SE-ResNet.

Variants: ``baseline`` (no SE), ``attnblocks`` (SEBlock, fused path), ``attnblocks
(plain)`` (SEBlock with ``fast_path = False``) and ``tutorial`` (the tutorial's SE). All
variants of a model share the baseline's weights and run in the same process in
interleaved rounds; ratios to the baseline are taken within each round and the median
over rounds is reported.

``--blocks NAME...`` adds, for each block, the variants ``attnblocks NAME`` (the block
with default options, ``attnblocks.create_block``) and ``timm NAME`` (timm's twin, see
``_common.timm_twins``) at the same places. ``--clock cpu`` times the CPU time of the
calling thread (with ``--threads 1`` on a machine shared with other jobs).

Optionally (``--insert-se``, on by default) times :func:`attnblocks.insert_se` on a
resnet152 when this version of attnblocks has it.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import random
import statistics
import time
from collections.abc import Callable

import torch
from _common import TutorialSE, add_malloc_option, describe_machine, set_up_malloc, timm_twins
from torch import nn

import attnblocks

VARIANTS = ("baseline", "attnblocks", "attnblocks (plain)", "tutorial")


def make_se(variant: str, channels: int) -> nn.Module:
    """One SE block of the given variant for ``channels`` channels, r = 16.

    ``"attnblocks NAME"`` and ``"timm NAME"`` give block NAME of attnblocks or timm instead.
    """
    source, _, block = variant.partition(" ")
    if block and source == "attnblocks" and not block.startswith("("):
        return attnblocks.create_block(block, channels)
    if block and source == "timm":
        return timm_twins()[block](channels)
    if variant == "tutorial":
        return TutorialSE(channels)
    block = attnblocks.SEBlock(channels, reduction=16)
    block.fast_path = variant == "attnblocks"
    return block


def tutorial_cnn(num_classes: int = 10) -> nn.Sequential:
    """The tutorial's CIFAR-10 CNN (input 3 x 32 x 32)."""
    layers: list[nn.Module] = []
    for c_in, c_out in ((3, 32), (32, 64), (64, 128)):
        layers += [
            nn.Conv2d(c_in, c_out, 3, padding=1),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        ]
    return nn.Sequential(
        *layers,
        nn.Flatten(),
        nn.Linear(128 * 4 * 4, 512),
        nn.ReLU(inplace=True),
        nn.Dropout(0.5),
        nn.Linear(512, num_classes),
    )


def add_se_to_tutorial_cnn(model: nn.Sequential, variant: str) -> nn.Sequential:
    """A copy of the tutorial CNN with an SE block after each block's ReLU."""
    layers: list[nn.Module] = []
    channels = 0
    for layer in copy.deepcopy(model):
        layers.append(layer)
        if isinstance(layer, nn.BatchNorm2d):
            channels = layer.num_features
        if isinstance(layer, nn.ReLU) and channels:
            layers.append(make_se(variant, channels))
            channels = 0
    return nn.Sequential(*layers)


def add_se_to_resnet(model: nn.Module, variant: str) -> nn.Module:
    """A copy of a torchvision ResNet with SE after the last BN of every residual block."""
    model = copy.deepcopy(model)
    for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
        for block in stage:
            name = "bn3" if hasattr(block, "bn3") else "bn2"
            bn = getattr(block, name)
            setattr(block, name, nn.Sequential(bn, make_se(variant, bn.num_features)))
    return model


def build_models(
    name: str, variants: list[str], image_size: int
) -> tuple[dict[str, nn.Module], tuple[int, ...]]:
    """The variants of model ``name`` and its input shape without the batch dimension."""
    if name == "tutorial_cnn":
        cnn = tutorial_cnn()
        models: dict[str, nn.Module]
        models = {v: cnn if v == "baseline" else add_se_to_tutorial_cnn(cnn, v) for v in variants}
        return models, (3, 32, 32)
    import torchvision

    resnet = getattr(torchvision.models, name)(weights=None)
    models: dict[str, nn.Module]
    models = {v: resnet if v == "baseline" else add_se_to_resnet(resnet, v) for v in variants}
    return models, (3, image_size, image_size)


CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}
_clock = time.perf_counter


def _timed(fn: Callable[[], object], repeats: int) -> float:
    start = _clock()
    for _ in range(repeats):
        fn()
    return (_clock() - start) / repeats


def bench_model(name: str, args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    models, in_shape = build_models(name, args.variants, args.image_size)
    fmt = torch.channels_last if args.memory_format == "channels_last" else torch.contiguous_format
    x = torch.randn(args.batch, *in_shape).contiguous(memory_format=fmt)
    num_classes = 10 if name == "tutorial_cnn" else 1000
    target = torch.randint(0, num_classes, (args.batch,))
    loss_fn = nn.CrossEntropyLoss()
    amp = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.autocast]

    def autocast() -> contextlib.AbstractContextManager[object]:
        if amp is None:
            return contextlib.nullcontext()
        return torch.autocast(x.device.type, dtype=amp)

    def train_step_of(model: nn.Module) -> Callable[[], object]:
        model = model.to(memory_format=fmt).train()
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

        def step() -> object:
            opt.zero_grad(set_to_none=True)
            with autocast():
                logits = model(x)
            loss = loss_fn(logits.float(), target)
            loss.backward()
            opt.step()
            return loss

        return step

    def inference_of(model: nn.Module) -> Callable[[], object]:
        model = model.to(memory_format=fmt).eval()

        def run() -> object:
            with torch.inference_mode(), autocast():
                return model(x)

        return run

    for mode, make in (("train step", train_step_of), ("inference", inference_of)):
        steps = {v: make(m) for v, m in models.items()}
        for step in steps.values():  # warm-up
            step()
        samples: dict[str, list[float]] = {v: [] for v in steps}
        names = list(steps)
        shuffler = random.Random(0)
        for _ in range(args.rounds):
            for v in shuffler.sample(names, len(names)):  # a new random order every round
                steps[v]()  # untimed: the allocator settles on this model's pattern
                samples[v].append(_timed(steps[v], args.steps))
        base = samples["baseline"]
        title = f"{name}, {mode}, batch {args.batch}, input {'x'.join(map(str, in_shape))}"
        precision = "float32" if amp is None else f"{args.autocast} autocast"
        print(f"\n#### {title}, {args.memory_format}, {precision}\n")
        print("| variant | median ms | IQR ms | ratio to baseline |")
        print("|---|---:|---:|---:|")
        for v in names:
            t = samples[v]
            q = statistics.quantiles(t, n=4) if len(t) > 1 else [t[0]] * 3
            ratio = statistics.median(s / b for s, b in zip(t, base, strict=True))
            print(
                f"| {v} | {statistics.median(t) * 1e3:.1f} | {(q[2] - q[0]) * 1e3:.1f} | "
                f"{ratio:.3f}x |"
            )


def bench_insert_se(args: argparse.Namespace) -> None:
    """Time ``attnblocks.insert_se`` on a fresh resnet152, if attnblocks provides it."""
    insert_se = getattr(attnblocks, "insert_se", None)
    if insert_se is None:
        print("\n# insert_se: not available in this version of attnblocks; skipped.")
        return
    import torchvision

    times = []
    for _ in range(args.insert_se_repeats):
        model = torchvision.models.resnet152(weights=None)
        start = time.perf_counter()
        insert_se(model, ["layer*.*.bn3"], reduction=16)
        times.append(time.perf_counter() - start)
    added = sum(isinstance(m, attnblocks.SEBlock) for m in model.modules())
    print(
        f"\n# insert_se on resnet152 ({added} SE blocks after layer*.*.bn3): median "
        f"{statistics.median(times) * 1e3:.1f} ms over {len(times)} runs"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--models",
        nargs="*",
        default=["tutorial_cnn", "resnet18", "resnet50"],
        choices=["tutorial_cnn", "resnet18", "resnet34", "resnet50", "resnet101"],
        help="models to time (default: tutorial_cnn resnet18 resnet50; none: only insert_se)",
    )
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument(
        "--blocks",
        nargs="*",
        default=[],
        metavar="NAME",
        help="also time each of these attnblocks blocks and its timm twin (e.g. eca cbam)",
    )
    parser.add_argument(
        "--clock",
        default="wall",
        choices=sorted(CLOCKS),
        help="'wall' (default) or 'cpu' (CPU time of the calling thread; use --threads 1)",
    )
    parser.add_argument("--batch", type=int, default=64, help="batch size (default 64)")
    parser.add_argument(
        "--image-size", type=int, default=64, help="ResNet input size (default 64; CNN: 32)"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument(
        "--memory-format", default="contiguous", choices=["contiguous", "channels_last"]
    )
    parser.add_argument(
        "--autocast",
        default="none",
        choices=["none", "bf16", "fp16"],
        help="run the models under torch.autocast with this dtype (default: none, float32)",
    )
    parser.add_argument("--rounds", type=int, default=10, help="interleaved rounds (default 10)")
    parser.add_argument("--steps", type=int, default=2, help="steps per timed sample (default 2)")
    parser.add_argument(
        "--no-insert-se", dest="insert_se", action="store_false", help="skip the insert_se timing"
    )
    parser.add_argument("--insert-se-repeats", type=int, default=3)
    add_malloc_option(parser)
    args = parser.parse_args(argv)
    if "baseline" not in args.variants:
        args.variants.insert(0, "baseline")
    unknown = sorted(set(args.blocks) - set(attnblocks.available_blocks()))
    if unknown:
        parser.error(f"--blocks: unknown {unknown}; registered: {attnblocks.available_blocks()}")
    twins = timm_twins()
    for block in args.blocks:
        args.variants.append(f"attnblocks {block}")
        if block in twins:
            args.variants.append(f"timm {block}")
    global _clock
    _clock = CLOCKS[args.clock]

    torch.set_num_threads(args.threads)
    malloc = set_up_malloc(args)
    print(
        describe_machine(
            f"{args.rounds} rounds of {args.steps} steps, {malloc}, {args.clock} clock"
        )
    )
    for name in args.models:
        bench_model(name, args)
    if args.insert_se:
        bench_insert_se(args)
    print(f"\n# load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
