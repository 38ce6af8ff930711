"""Train the tutorial's CNN on CIFAR-10 with and without Squeeze-and-Excitation, and compare.

The baseline is the tutorial's 3-conv-layer CNN; the SE arm is the same network
rewritten by attnblocks.insert_se (an SE block after each conv block's
activation, r = 16). Each arm is trained with one or more seeds; the run folder
gets per-epoch metrics, a JSON summary, checkpoints and figures.

Examples:
    python examples/cifar10_se.py --data-dir ../shared/data/cifar10
    python examples/cifar10_se.py --recipe tutorial --arms se --data-dir ../shared/data/cifar10
    python examples/cifar10_se.py --subset 500 --epochs 1 --no-progress   # a quick run
    python examples/cifar10_se.py --resume runs/20261130-120000         # continue after Ctrl-C
    python examples/cifar10_se.py --compare runs/base runs/se --out runs/both
    python examples/cifar10_se.py --model resnet20 --arms baseline,se,eca,cbam --seeds 5 \
        --data-dir ../shared/data/cifar10                # ResNet-20, its own recipe
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from se_cifar.data import DataError, Split, load_cifar10
from se_cifar.engine import (
    Interrupted,
    autocast_dtype,
    measure_latency,
    pick_device,
    train_run,
)
from se_cifar.models import MODELS, build_model, count_parameters, valid_arms
from se_cifar.progress import progress_factory
from se_cifar.recipes import RECIPES, Recipe, get_recipe, parse_setting
from se_cifar.rundir import new_run_dir, resume_hint, saved_args
from se_cifar.stats import comparisons
from se_cifar.summary import arm_summary, metrics_rows, print_summary, seed_record, write_csv


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _data_options(p.add_argument_group("data"))
    train = p.add_argument_group("training")
    _arm_options(train)
    _recipe_options(train)
    _machine_options(train)
    _run_options(p.add_argument_group("run folder"))
    args = p.parse_args(argv)
    _check_args(p, args)
    return args


def _data_options(data: argparse._ArgumentGroup) -> None:
    data.add_argument(
        "--data-dir",
        default=None,
        help="ImageFolder tree with train/ and test/ (default: download CIFAR-10 with torchvision)",
    )
    data.add_argument(
        "--download-root", default="data", help="where torchvision downloads to (default: data)"
    )
    data.add_argument(
        "--cache-dir", default=None, help="cache of decoded images (default: <out>/../.cache)"
    )
    data.add_argument(
        "--subset",
        type=int,
        default=None,
        help="train on a class-balanced subset of N images (a quick run)",
    )
    data.add_argument(
        "--test-subset",
        type=int,
        default=None,
        help="evaluate on N test images (default: all, or --subset/5 with --subset)",
    )


def _arm_options(train: argparse._ArgumentGroup) -> None:
    train.add_argument(
        "--model",
        choices=list(MODELS),
        default="tutorial",
        help="'tutorial': the tutorial's 3-conv-layer CNN; 'resnet20': the CIFAR ResNet-20 of "
        "He et al. 2016, attention after each residual branch's last BN (default: tutorial)",
    )
    train.add_argument(
        "--recipe",
        choices=sorted(RECIPES),
        default=None,
        help="'tutorial': the tutorial's Adam / batch 64 / 50 epochs / heavy augmentation; "
        "'fast': SGD one-cycle, batch 256, bf16 + channels_last; 'resnet20': the fast "
        "recipe's settings for ResNet-20, 24 epochs (default: fast, or resnet20 with "
        "--model resnet20)",
    )
    train.add_argument(
        "--arms",
        default="baseline,se",
        help="comma-separated arms: baseline, se, se_r4 (SE with r = 4), or a block name "
        "(default: baseline,se)",
    )
    train.add_argument(
        "--block",
        action="append",
        default=[],
        metavar="NAME",
        help="add an arm with this attention block (eca, cbam, scse, simam, coord, ge, gc, "
        "se) after each conv block; repeatable",
    )
    train.add_argument("--seeds", type=int, default=1, help="seeds per arm (default: 1)")
    train.add_argument("--seed", type=int, default=0, help="first seed (default: 0)")


def _recipe_options(train: argparse._ArgumentGroup) -> None:
    train.add_argument("--epochs", type=int, default=None, help="override the recipe's epochs")
    train.add_argument("--batch-size", type=int, default=None, help="override the batch size")
    train.add_argument("--lr", type=float, default=None, help="override the learning rate")
    train.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16", "fp16"],
        default=None,
        help="autocast precision (default: the recipe's)",
    )
    train.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="channels_last memory format (default: the recipe's)",
    )
    train.add_argument(
        "--ema",
        type=float,
        default=None,
        metavar="DECAY",
        help="evaluate and keep an exponential moving average of the weights with this "
        "decay per step, 0 for none (default: the recipe's)",
    )
    train.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="train through torch.compile (default: the recipe's)",
    )
    train.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any recipe field, e.g. --set weight_decay=1e-4 --set test_flip=false; "
        "repeatable; a dedicated flag (--epochs, --lr, ...) wins over --set",
    )
    train.add_argument(
        "--targets",
        default=None,
        help="test accuracies (%%) whose time to reach is reported (default: 81.4,84.7, "
        "or 90 with --model resnet20)",
    )


def _machine_options(train: argparse._ArgumentGroup) -> None:
    train.add_argument(
        "--keep-freed-memory",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="on Linux, tell glibc malloc to keep freed memory for reuse instead of "
        "returning it to the OS: large activations then stop paying page faults every "
        "step (default: on)",
    )
    train.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda", "mps"],
        default="auto",
        help="auto: cuda, then mps, then cpu (default: auto)",
    )
    train.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's)"
    )


def _run_options(run: argparse._ArgumentGroup) -> None:
    run.add_argument("--out", default=None, help="run folder (default: runs/<timestamp>)")
    run.add_argument("--overwrite", action="store_true", help="reuse a non-empty run folder")
    run.add_argument(
        "--resume",
        metavar="RUN_DIR",
        default=None,
        help="continue an interrupted run with its saved settings",
    )
    run.add_argument(
        "--compare",
        nargs="+",
        metavar="RUN_DIR",
        default=None,
        help="build the joint summary and figures of finished runs (any number of run "
        "folders, e.g. one per seed) into --out",
    )
    run.add_argument("--no-plots", action="store_true", help="skip the figures")
    run.add_argument(
        "--no-progress",
        action="store_true",
        help="plain log lines instead of progress bars (for CI)",
    )


def _check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Normalise the arms, fill the model's default recipe and targets, refuse bad values."""
    arms = [a.strip().lower() for a in args.arms.split(",") if a.strip()]
    arms += [b.lower() for b in args.block if b.lower() not in arms]
    valid = valid_arms()
    bad = [a for a in arms if a not in valid]
    if bad or not arms:
        p.error(f"--arms/--block: unknown arm(s) {bad}; valid arms are {valid}")
    args.arms = ",".join(arms)
    if args.recipe is None:
        args.recipe = "resnet20" if args.model == "resnet20" else "fast"
    if args.targets is None:
        args.targets = "90" if args.model == "resnet20" else "81.4,84.7"
    args.arm_list = arms
    try:
        args.settings = dict(parse_setting(item) for item in args.set)
    except ValueError as err:
        p.error(str(err))
    try:
        args.target_list = sorted(float(t) / 100.0 for t in args.targets.split(",") if t.strip())
    except ValueError:
        p.error(f"--targets takes comma-separated percentages, got {args.targets!r}")
    if args.seeds < 1:
        p.error(f"--seeds must be >= 1, got {args.seeds}")
    for name in ("subset", "test_subset", "epochs", "batch_size", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")


# --- run folder --------------------------------------------------------------------------------

SAVED_KEYS = (
    "data_dir",
    "download_root",
    "cache_dir",
    "subset",
    "test_subset",
    "model",
    "recipe",
    "arms",
    "seeds",
    "seed",
    "epochs",
    "batch_size",
    "lr",
    "precision",
    "channels_last",
    "ema",
    "compile",
    "settings",
    "targets",
)


def prepare_run_dir(args: argparse.Namespace) -> Path:
    """Create the run folder, or reopen it for --resume; never clobber without --overwrite."""
    if args.resume:
        run_dir = Path(args.resume)
        saved = saved_args(run_dir)
        saved.setdefault("model", "tutorial")  # run folders from before --model
        for key in SAVED_KEYS:
            setattr(args, key, saved.get(key, getattr(args, key, None)))
        args.settings = {
            k: tuple(v) if isinstance(v, list) else v for k, v in (args.settings or {}).items()
        }
        args.arm_list = [a for a in args.arms.split(",") if a]
        args.target_list = sorted(float(t) / 100.0 for t in args.targets.split(",") if t.strip())
        return run_dir
    run_dir = (
        Path(args.out) if args.out else Path("runs") / _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    )
    return new_run_dir(run_dir, overwrite=args.overwrite, stale=("checkpoints", "figures"))


def environment(device: torch.device) -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(device),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
    }


# --- torchrun -----------------------------------------------------------------------------------


def init_distributed(device_name: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device); sets up a process group when run under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = pick_device(device_name)
    if world == 1:
        return 0, 1, device
    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def _broadcast(value: Any, world: int) -> Any:
    if world == 1:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# --- main ----------------------------------------------------------------------------------------


@dataclass
class _Setup:
    """What every arm and seed of a run shares: the recipe, the data and where to train."""

    recipe: Recipe
    amp: torch.dtype | None
    device: torch.device
    train: Split
    test: Split
    data_s: float  # time to load the data


def _setup(
    args: argparse.Namespace, run_dir: Path, rank: int, world: int, device: torch.device
) -> tuple[_Setup, dict[str, Any]]:
    """The recipe (flags over ``--set`` over the named recipe) and the data; rank 0 writes
    config.json. Returns the set-up and the summary's header."""
    lead = rank == 0
    say: Any = print if lead else (lambda *_, **__: None)
    flags = {
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "precision": args.precision,
        "channels_last": args.channels_last,
        "ema": args.ema,
        "compile": args.compile,
    }
    recipe = get_recipe(args.recipe, **{**args.settings, **_given(flags)})
    amp = autocast_dtype(recipe.precision, device)
    env = {**environment(device), "world_size": world}
    if lead:
        config = {
            "args": {k: getattr(args, k) for k in SAVED_KEYS},
            "recipe": recipe.to_dict(),
            "environment": env,
        }
        (run_dir / "config.json").write_text(json.dumps(config, indent=2))
    test_count = args.test_subset or (max(100, args.subset // 5) if args.subset else None)
    cache = args.cache_dir or str(run_dir.parent / ".cache")
    t0 = time.perf_counter()
    train, test = load_cifar10(
        args.data_dir,
        download_root=args.download_root,
        cache_dir=cache if lead or world == 1 else None,
        train_count=args.subset,
        test_count=test_count,
        seed=args.seed,
    )
    data_s = time.perf_counter() - t0
    say(
        f"data: {len(train)} train / {len(test)} test images, {len(train.classes)} classes "
        f"({data_s:.1f}s)"
    )
    which = "" if args.model == "tutorial" else f"model {args.model}, "
    say(
        f"{which}recipe {recipe.name}: {recipe.epochs} epochs, batch {recipe.batch_size}"
        f"{f' per process x {world} processes' if world > 1 else ''}, "
        f"{recipe.optimizer} lr {recipe.lr}, precision {recipe.precision} "
        f"({amp or torch.float32}), channels_last {recipe.channels_last}, device {device}"
    )
    header = {
        "model": args.model,
        "recipe": recipe.to_dict(),
        "environment": env,
        "data": {
            "data_dir": args.data_dir,
            "load_time_s": data_s,
            "train": len(train),
            "test": len(test),
            "classes": train.classes,
        },
    }
    return _Setup(recipe, amp, device, train, test, data_s), header


def train_all(
    args: argparse.Namespace,
    run_dir: Path,
    *,
    rank: int = 0,
    world: int = 1,
    device: torch.device | None = None,
) -> dict[str, Any]:
    """Train every arm and seed; rank 0 writes config, metrics, summary and checkpoints."""
    lead = rank == 0
    say: Any = print if lead else (lambda *_, **__: None)
    setup, header = _setup(args, run_dir, rank, world, device or pick_device(args.device))
    progress = progress_factory(lead and not args.no_progress)
    summary: dict[str, Any] = {**header, "arms": {}}
    metrics: list[dict[str, Any]] = []
    iterations: list[dict[str, Any]] = []
    for arm in args.arm_list:
        arm_runs = []
        params = 0
        for seed in range(args.seed, args.seed + args.seeds):
            torch.manual_seed(seed)
            model = build_model(arm, model=args.model, num_classes=len(setup.train.classes))
            params = count_parameters(model)
            say(f"[{arm} seed {seed}] {params:,} parameters")
            ckpt = run_dir / "checkpoints" / f"{arm}-seed{seed}.pt"
            start = time.perf_counter()
            model, state = train_run(
                model,
                recipe=setup.recipe,
                seed=seed,
                train=setup.train,
                test=setup.test,
                device=setup.device,
                checkpoint=ckpt,
                progress=progress,
                log=lambda line, arm=arm, seed=seed: say(f"[{arm} seed {seed}] {line}"),
                rank=rank,
                world_size=world,
            )
            wall = time.perf_counter() - start
            if not lead:
                continue
            latency = {
                f"batch{bs}": measure_latency(
                    model,
                    setup.device,
                    batch_size=bs,
                    amp=setup.amp,
                    channels_last=setup.recipe.channels_last,
                )
                for bs in (1, 256)
            }
            epoch_rows, step_rows = metrics_rows(arm, seed, state)
            metrics += epoch_rows
            iterations += step_rows
            record = seed_record(
                seed,
                state.history,
                wall_s=wall,
                latency=latency,
                targets=args.target_list,
                data_s=setup.data_s,
                checkpoint=str(ckpt.relative_to(run_dir)),
            )
            arm_runs.append(record)
        if lead:
            summary["arms"][arm] = arm_summary(params, arm_runs)
    summary.update(comparisons(summary["arms"]))
    if lead:
        write_csv(run_dir / "metrics.csv", metrics)
        write_csv(run_dir / "iterations.csv", iterations)
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _given(options: dict[str, Any]) -> dict[str, Any]:
    """The options that were given (not None).

    >>> _given({"epochs": 3, "lr": None})
    {'epochs': 3}
    """
    return {k: v for k, v in options.items() if v is not None}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.run_dir = None
    rank, world, device = 0, 1, None
    try:
        if args.compare:
            from se_cifar.report import compare_runs

            if not args.out:
                raise SystemExit("--compare needs --out: the folder for the joint summary.")
            summary = compare_runs(
                [Path(d) for d in args.compare], Path(args.out), plots=not args.no_plots
            )
            print_summary(summary)
            return 0
        if args.keep_freed_memory:
            from se_cifar.system import keep_freed_memory

            keep_freed_memory()
        rank, world, device = init_distributed(args.device)
        if args.threads:
            torch.set_num_threads(args.threads)
        elif world > 1 and device.type == "cpu":
            local = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
        run_dir = prepare_run_dir(args) if rank == 0 else None
        run_dir = Path(_broadcast(str(run_dir) if run_dir else None, world))
        if rank != 0 and args.resume:
            prepare_run_dir(args)  # read the saved settings, as rank 0 did
        args.run_dir = run_dir
        if rank == 0:
            print(f"run folder: {run_dir}")
        summary = train_all(args, run_dir, rank=rank, world=world, device=device)
        if world > 1:  # no rank tears the process group down while another still trains
            import torch.distributed as dist

            dist.barrier()
        if rank != 0:
            return 0
        if not args.no_plots:
            from se_cifar.report import make_figures

            written = make_figures(run_dir)
            print(f"figures: {len(written)} PNG files in {run_dir / 'figures'}")
        print_summary(summary)
        return 0
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Interrupted as err:
        if rank == 0:
            print(resume_hint(err, args.run_dir), file=sys.stderr)
        return 130
    finally:
        if world > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
