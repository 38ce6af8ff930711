"""Retrofit SE into the trained baseline of cifar10_se.py, fine-tune briefly, measure if it pays.

Starting from a trained baseline checkpoint (the fast recipe's), every arm is
fine-tuned with the same short one-cycle schedule, the same batches and the same
augmentations per seed:

  control           the baseline itself, fine-tuned the same way (more training, no SE)
  se_identity       + SE (r = 16, after each conv block's ReLU), init="identity", all trained
  se_random         + SE with the default (random) init, all trained
  se_identity_attn  + SE, init="identity", only the SE blocks trained (the rest frozen,
                    BatchNorm statistics kept)

Step 0 (before any update) is evaluated for every arm and compared with the
baseline's logits on every test image: the identity arms must give them exactly.
The run folder gets curves.csv (test accuracy at every evaluation), summary.json
(step-0 checks, final accuracy mean +/- std, Welch 95 % intervals against the
control, seconds per epoch, file sizes), the saved attention weights and a figure.

Examples:
    python examples/cifar10_se.py --arms baseline --data-dir ../shared/data/cifar10 --out runs/base
    python examples/retrofit.py --base runs/base --data-dir ../shared/data/cifar10 --out runs/rf
    python examples/retrofit.py --resume runs/rf                  # continue after Ctrl-C
    python examples/retrofit.py --report runs/rf                  # summary and figure again
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from se_cifar.data import DataError, load_cifar10
from se_cifar.engine import EvalResult, Interrupted, autocast_dtype, evaluate, make_augment
from se_cifar.finetune import ARMS, attention_blocks, build_arm, finetune_run
from se_cifar.models import TutorialCNN
from se_cifar.progress import progress_factory
from se_cifar.recipes import Recipe, parse_setting
from se_cifar.rundir import new_run_dir, resume_hint, saved_args
from se_cifar.stats import compare, mean_std
from se_cifar.summary import write_csv

#: The fine-tune measured in examples/README.md: one epoch of the base recipe's one-cycle
#: schedule at a peak lr of 0.01 (tuned on the control arm, seed 99: 0.01 -> 84.89 %,
#: 0.05 -> 84.36 %; the base recipe's peak is 0.2).
DEFAULT_EPOCHS = 1
DEFAULT_LR = 0.01


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--base",
        default=None,
        help="the baseline: a cifar10_se.py run folder (its checkpoints/baseline-seed<S>.pt) "
        "or a checkpoint file",
    )
    p.add_argument("--base-seed", type=int, default=0, help="which baseline seed (default: 0)")
    p.add_argument("--data-dir", default=None, help="ImageFolder tree with train/ and test/")
    p.add_argument("--download-root", default="data", help="torchvision download folder")
    p.add_argument("--cache-dir", default=None, help="decoded images (default: <out>/../.cache)")
    p.add_argument("--subset", type=int, default=None, help="class-balanced training subset")
    p.add_argument("--test-subset", type=int, default=None, help="evaluate on N test images")
    p.add_argument(
        "--arms", default=",".join(ARMS), help=f"comma-separated (default: {','.join(ARMS)})"
    )
    p.add_argument("--seeds", type=int, default=5, help="fine-tuning seeds per arm (default: 5)")
    p.add_argument("--seed", type=int, default=0, help="first seed (default: 0)")
    p.add_argument(
        "--epochs",
        type=int,
        default=DEFAULT_EPOCHS,
        help=f"fine-tuning epochs (default: {DEFAULT_EPOCHS})",
    )
    p.add_argument(
        "--lr", type=float, default=DEFAULT_LR, help=f"peak learning rate (default: {DEFAULT_LR})"
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a field of the baseline's recipe, e.g. --set ema=0 (repeatable)",
    )
    p.add_argument(
        "--evals-per-epoch", type=int, default=4, help="test-set evaluations (default: 4)"
    )
    p.add_argument(
        "--early-evals",
        default="25",
        help="extra evaluations after these steps, comma-separated (default: 25)",
    )
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", default=None, help="run folder (default: runs/retrofit-<time>)")
    p.add_argument("--overwrite", action="store_true", help="reuse a non-empty run folder")
    p.add_argument("--resume", metavar="RUN_DIR", default=None, help="continue a run")
    p.add_argument(
        "--report", metavar="RUN_DIR", default=None, help="rebuild summary and figure only"
    )
    p.add_argument(
        "--time-steps",
        type=int,
        default=None,
        metavar="K",
        help="instead of the experiment: time K training steps per arm, the arms interleaved "
        "over 5 rounds, and write timing.json into --out",
    )
    p.add_argument("--no-plots", action="store_true", help="skip the figure")
    p.add_argument("--no-progress", action="store_true", help="log lines, no progress bars")
    args = p.parse_args(argv)
    args.arm_list = [a.strip() for a in args.arms.split(",") if a.strip()]
    bad = [a for a in args.arm_list if a not in ARMS]
    if bad or not args.arm_list:
        p.error(f"--arms: unknown arm(s) {bad}; valid arms are {list(ARMS)}")
    for name in (
        "seeds",
        "epochs",
        "evals_per_epoch",
        "subset",
        "test_subset",
        "threads",
        "time_steps",
    ):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if not args.lr > 0:
        p.error(f"--lr must be > 0, got {args.lr}")
    try:
        args.settings = dict(parse_setting(item) for item in args.set)
        args.early = tuple(int(s) for s in args.early_evals.split(",") if s.strip())
    except ValueError as err:
        p.error(str(err))
    if not (args.base or args.resume or args.report):
        p.error("give --base (a baseline run folder or checkpoint), --resume or --report")
    return args


SAVED = (
    "base",
    "base_seed",
    "data_dir",
    "download_root",
    "cache_dir",
    "subset",
    "test_subset",
    "arms",
    "seeds",
    "seed",
    "epochs",
    "lr",
    "settings",
    "evals_per_epoch",
    "early",
)


def _base_checkpoint(base: str, seed: int) -> Path:
    path = Path(base)
    if path.is_dir():
        path = path / "checkpoints" / f"baseline-seed{seed}.pt"
    if not path.is_file():
        raise SystemExit(f"--base: no baseline checkpoint at {path}; train one with cifar10_se.py")
    return path


def load_base(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The baseline's evaluated weights (the EMA's, if it had one) and its recipe."""
    blob = torch.load(path, weights_only=False, map_location="cpu")
    if not blob["state"].complete:
        raise SystemExit(f"--base: {path} is an unfinished run; finish it with --resume first")
    return blob["model"], blob["recipe"]


def prepare_run_dir(args: argparse.Namespace) -> Path:
    if args.resume:
        run_dir = Path(args.resume)
        saved = saved_args(run_dir)
        for key in SAVED:
            setattr(args, key, saved[key])
        args.early = tuple(args.early)
        args.arm_list = args.arms.split(",")
        return run_dir
    run_dir = Path(args.out or f"runs/retrofit-{time.strftime('%Y%m%d-%H%M%S')}")
    return new_run_dir(run_dir, overwrite=args.overwrite, stale=("checkpoints",))


def save_attention_file(model: torch.nn.Module, directory: Path) -> Path:
    """Save only the inserted blocks; ``attnblocks.save_attention`` when the library has it.

    Otherwise (older attnblocks) the blocks' parameters and buffers go into one
    safetensors file, keyed by their names in the model.
    """
    import attnblocks

    directory.mkdir(parents=True, exist_ok=True)
    if hasattr(attnblocks, "save_attention"):
        attnblocks.save_attention(model, directory)
        return directory
    from safetensors.torch import save_file

    tensors = {
        f"{name}.{key}": value.detach().to("cpu").contiguous()
        for name, block in attention_blocks(model).items()
        for key, value in block.state_dict().items()
    }
    save_file(tensors, str(directory / "attention.safetensors"))
    return directory


def reloaded_equal(
    model: torch.nn.Module, base_state: dict[str, torch.Tensor], folder: Path
) -> bool | None:
    """Whether the baseline with the saved attention loaded equals ``model``, bit for bit.

    ``None`` when attnblocks has no ``load_attention`` (older versions).
    """
    import attnblocks

    if not hasattr(attnblocks, "load_attention"):
        return None
    fresh = TutorialCNN(num_classes=int(base_state["classifier.fc2.bias"].numel()))
    fresh.load_state_dict(base_state)
    attnblocks.load_attention(fresh.eval(), folder, example_input=torch.zeros(1, 3, 32, 32))
    mine, theirs = model.state_dict(), fresh.state_dict()
    return list(mine) == list(theirs) and all(torch.equal(mine[k].cpu(), theirs[k]) for k in mine)


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path.stat().st_size


def finetune_recipe(base_recipe: dict[str, Any], args: argparse.Namespace) -> Recipe:
    """The baseline's recipe with the fine-tune's epochs, peak lr and ``--set`` overrides."""
    fields = {**base_recipe, **args.settings, "epochs": args.epochs, "lr": args.lr}
    fields["jitter"] = tuple(fields["jitter"])
    fields["name"] = f"retrofit from {base_recipe['name']}"
    return Recipe(**fields)


def time_arms(args: argparse.Namespace, out: Path, rounds: int = 5) -> dict[str, Any]:
    """Median seconds per training step of each arm, the arms interleaved round by round.

    Each step is what a fine-tuning step does (augmentation, forward, backward, SGD
    step, EMA update) on one fixed batch; the first round is a warm-up and not counted.
    """
    from se_cifar.ema import WeightEMA
    from se_cifar.engine import pick_device, train_step
    from se_cifar.finetune import train_mode, trainable_parameters

    device = pick_device(args.device)
    base_state, base_recipe = load_base(_base_checkpoint(args.base, args.base_seed))
    recipe = finetune_recipe(base_recipe, args)
    amp = autocast_dtype(recipe.precision, device)
    augment = make_augment(recipe)
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (recipe.batch_size, 3, 32, 32), generator=gen).to(
        device, torch.uint8
    )
    labels = torch.randint(0, 10, (recipe.batch_size,), generator=gen).to(device)
    setups = {}
    for name in args.arm_list:
        model = build_arm(ARMS[name], base_state, num_classes=10, seed=0)
        if recipe.channels_last:
            model = model.to(memory_format=torch.channels_last)
        model = model.to(device)
        params, kept = trainable_parameters(model, ARMS[name])
        optimizer = torch.optim.SGD(
            params, lr=1e-4, momentum=recipe.momentum, nesterov=recipe.nesterov,
            weight_decay=recipe.weight_decay,
        )  # fmt: skip
        ema = WeightEMA(model, recipe.ema) if recipe.ema > 0 else None
        setups[name] = (model, kept, optimizer, ema)
    steps = args.time_steps
    times: dict[str, list[float]] = {name: [] for name in setups}
    for round_ in range(rounds + 1):
        for name, (model, kept, optimizer, ema) in setups.items():
            train_mode(model, kept)
            tick = time.perf_counter()
            for _ in range(steps):
                x = augment(images, gen, train=True)
                if recipe.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                train_step(model, optimizer, x, labels, amp=amp)
                if ema is not None:
                    ema.update(model)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if round_ > 0:
                times[name].append((time.perf_counter() - tick) / steps)
    steps_per_epoch = 50_000 // recipe.batch_size + (50_000 % recipe.batch_size > 0)
    medians = {name: sorted(t)[len(t) // 2] for name, t in times.items()}
    result = {
        "steps_per_round": steps,
        "rounds": rounds,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "precision": str(amp or torch.float32),
        "seconds_per_step": times,
        "median_seconds_per_step": medians,
        "seconds_per_epoch_of_50000": {n: m * steps_per_epoch for n, m in medians.items()},
        "ratio_to_control": (
            {n: m / medians["control"] for n, m in medians.items()} if "control" in medians
            else {}
        ),
    }  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    (out / "timing.json").write_text(json.dumps(result, indent=2))
    for name, m in medians.items():
        ratio = result["ratio_to_control"].get(name)
        print(
            f"{name:17s} {1000 * m:7.1f} ms/step  {m * steps_per_epoch:6.1f} s/epoch"
            + ("" if ratio is None else f"  {ratio:.2f}x control")
        )
    return result


def run(args: argparse.Namespace, run_dir: Path) -> None:
    from safetensors.torch import save_file
    from se_cifar.engine import pick_device

    device = pick_device(args.device)
    base_path = _base_checkpoint(args.base, args.base_seed)
    base_state, base_recipe = load_base(base_path)
    recipe = finetune_recipe(base_recipe, args)
    (run_dir / "config.json").write_text(
        json.dumps(
            {
                "args": {k: getattr(args, k) for k in SAVED},
                "recipe": recipe.to_dict(),
                "base_checkpoint": str(base_path),
                "environment": {
                    "torch": torch.__version__,
                    "device": str(device),
                    "threads": torch.get_num_threads(),
                },
            },
            indent=2,
        )
    )
    cache = args.cache_dir or str(run_dir.parent / ".cache")
    test_count = args.test_subset or (max(100, args.subset // 5) if args.subset else None)
    train, test = load_cifar10(
        args.data_dir,
        download_root=args.download_root,
        cache_dir=cache,
        train_count=args.subset,
        test_count=test_count,
        seed=args.base_seed,
    )
    amp = autocast_dtype(recipe.precision, device)
    print(
        f"data: {len(train)} train / {len(test)} test; fine-tune {recipe.epochs} epochs, peak lr "
        f"{recipe.lr}, batch {recipe.batch_size}, {amp or torch.float32}, channels_last "
        f"{recipe.channels_last}, EMA {recipe.ema}, test flip {recipe.test_flip}"
    )
    # the reference: the baseline's logits under exactly the evaluation every arm gets
    base = TutorialCNN(num_classes=len(train.classes))
    base.load_state_dict(base_state)
    if recipe.channels_last:
        base = base.to(memory_format=torch.channels_last)
    base = base.to(device)
    reference: EvalResult = evaluate(
        base,
        test,
        make_augment(recipe),
        device,
        amp=amp,
        channels_last=recipe.channels_last,
        test_flip=recipe.test_flip,
        keep_logits=True,
    )
    print(f"baseline: test accuracy {reference.accuracy:.4f}")
    sizes = run_dir / "sizes"
    sizes.mkdir(exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in base_state.items()}, str(sizes / "baseline.safetensors")
    )
    progress = progress_factory(not args.no_progress)
    for seed in range(args.seed, args.seed + args.seeds):  # seeds outside: arms stay balanced
        for name in args.arm_list:
            arm = ARMS[name]
            done = run_dir / "runs" / f"{name}-seed{seed}.json"
            if done.exists():
                continue
            model = build_arm(arm, base_state, num_classes=len(train.classes), seed=seed)
            model, state = finetune_run(
                model,
                arm=arm,
                recipe=recipe,
                seed=seed,
                train=train,
                test=test,
                device=device,
                checkpoint=run_dir / "checkpoints" / f"{name}-seed{seed}.pt",
                reference=reference,
                per_epoch=args.evals_per_epoch,
                early=args.early,
                progress=progress,
                log=lambda line, name=name, seed=seed: print(f"[{name} seed {seed}] {line}"),
            )
            files: dict[str, Any] = {}
            if arm.init is not None:
                folder = save_attention_file(model, run_dir / "attention" / f"{name}-seed{seed}")
                files["attention_bytes"] = _size(folder)
                if arm.attention_only:  # the baseline + this small file = the fine-tuned model
                    files["reloaded_equal"] = reloaded_equal(model, base_state, folder)
            full = sizes / f"{name}-seed{seed}.safetensors"
            save_file({k: v.contiguous().cpu() for k, v in model.state_dict().items()}, str(full))
            files["model_bytes"] = _size(full)
            trainable = sum(
                p.numel() for p in model.parameters() if p.requires_grad
            )  # after the freeze of an attention-only arm
            result = {
                "arm": name,
                "seed": seed,
                "check": state.check,
                "history": state.history,
                "train_time_s": state.train_time_s,
                "epochs": recipe.epochs,
                "params": sum(p.numel() for p in model.parameters()),
                "trainable_params": trainable,
                **files,
            }
            done.parent.mkdir(exist_ok=True)
            done.write_text(json.dumps(result, indent=2))
            print(
                f"[{name} seed {seed}] step 0 {100 * state.check['accuracy']:.2f} % "
                f"(logits equal to the baseline's: {state.check['logits_equal']}), final "
                f"{100 * state.history[-1]['test_acc']:.2f} %, "
                f"{state.train_time_s / recipe.epochs:.1f} s/epoch"
            )
    base_ckpt_bytes = base_path.stat().st_size
    (run_dir / "sizes" / "baseline.json").write_text(
        json.dumps(
            {
                "baseline_checkpoint_bytes": base_ckpt_bytes,
                "baseline_safetensors_bytes": _size(sizes / "baseline.safetensors"),
            }
        )
    )


def summarize(run_dir: Path) -> dict[str, Any]:
    """curves.csv and summary.json from the finished runs of ``run_dir``."""
    results = [json.loads(p.read_text()) for p in sorted((run_dir / "runs").glob("*.json"))]
    if not results:
        raise SystemExit(f"{run_dir}: no finished fine-tune run yet")
    config = json.loads((run_dir / "config.json").read_text())
    order = [a for a in ARMS if any(r["arm"] == a for r in results)]
    rows = [{"arm": r["arm"], "seed": r["seed"], **row} for r in results for row in r["history"]]
    rows.sort(key=lambda row: (order.index(row["arm"]), row["seed"], row["step"]))
    write_csv(run_dir / "curves.csv", rows)
    sizes_file = run_dir / "sizes" / "baseline.json"
    sizes = json.loads(sizes_file.read_text()) if sizes_file.exists() else {}
    arms: dict[str, Any] = {}
    for name in order:
        mine = sorted((r for r in results if r["arm"] == name), key=lambda r: r["seed"])
        finals = [r["history"][-1]["test_acc"] for r in mine]
        step0 = [r["check"]["accuracy"] for r in mine]
        per_epoch = [r["train_time_s"] / r["epochs"] for r in mine]
        mean, std = mean_std(finals)
        arms[name] = {
            "label": ARMS[name].label,
            "seeds": [r["seed"] for r in mine],
            "params": mine[0]["params"],
            "trainable_params": mine[0]["trainable_params"],
            "step0_test_acc": step0,
            "step0_logits_equal_to_baseline": [r["check"]["logits_equal"] for r in mine],
            "step0_same_predictions": [r["check"]["same_predictions"] for r in mine],
            "step0_max_abs_logit_difference": [
                r["check"]["max_abs_logit_difference"] for r in mine
            ],
            "final_test_acc": finals,
            "final_test_acc_mean": mean,
            "final_test_acc_std": std,
            "seconds_per_epoch": per_epoch,
            "seconds_per_epoch_mean": mean_std(per_epoch)[0],
            "attention_bytes": mine[0].get("attention_bytes"),
            "reloaded_equal": [r["reloaded_equal"] for r in mine if "reloaded_equal" in r],
            "model_bytes": mine[0]["model_bytes"],
        }
    if "control" in arms:  # paired by seed: the arms of one seed run one after the other
        control = arms["control"]
        control_time = dict(zip(control["seeds"], control["seconds_per_epoch"], strict=True))
        for info in arms.values():
            ratios = [
                t / control_time[seed]
                for seed, t in zip(info["seeds"], info["seconds_per_epoch"], strict=True)
                if seed in control_time
            ]
            info["time_ratio_to_control"] = ratios
            info["time_ratio_to_control_median"] = (
                sorted(ratios)[len(ratios) // 2] if ratios else None
            )
    comparisons = {}
    if "control" in arms:
        for name in order:
            if name != "control":
                comparisons[name] = compare(
                    arms["control"]["final_test_acc"],
                    arms[name]["final_test_acc"],
                    names=("control", name),
                ).to_dict()
    summary = {
        "recipe": config["recipe"],
        "base_checkpoint": config["base_checkpoint"],
        "environment": config["environment"],
        "baseline_test_acc": results[0]["check"]["reference_accuracy"],
        "test_images": results[0]["check"]["images"],
        "sizes": sizes,
        "arms": arms,
        "comparisons": comparisons,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    (run_dir / "table.md").write_text(markdown_table(summary))
    return summary


def print_summary(summary: dict[str, Any]) -> None:
    print(f"\nbaseline: {100 * summary['baseline_test_acc']:.2f} %")
    print("arm               step 0    equal logits  final (mean +/- std)   n  s/epoch")
    for name, info in summary["arms"].items():
        eq = sum(info["step0_logits_equal_to_baseline"])
        print(
            f"{name:17s} {100 * mean_std(info['step0_test_acc'])[0]:6.2f} %  "
            f"{eq}/{len(info['seeds'])} runs     {100 * info['final_test_acc_mean']:6.2f} +/- "
            f"{100 * info['final_test_acc_std']:.2f} %   {len(info['seeds'])}  "
            f"{info['seconds_per_epoch_mean']:6.1f}"
        )
    for name, comp in summary["comparisons"].items():
        ci = (
            "n/a"
            if comp["ci_low"] is None
            else f"[{100 * comp['ci_low']:+.2f}, {100 * comp['ci_high']:+.2f}]"
        )
        print(f"{name} - control: {100 * comp['difference']:+.2f} points, 95% CI {ci}")


def markdown_table(summary: dict[str, Any]) -> str:
    """The README's table: one row per arm, from summary.json."""
    lines = [
        "| arm | trained parameters | step 0: test accuracy | step 0: logits equal to the "
        "baseline's (all test images) | final test accuracy, mean ± std (n) | − control, "
        "Welch 95 % CI | s/epoch (× control, median) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, info in summary["arms"].items():
        n = len(info["seeds"])
        step0 = [100 * a for a in info["step0_test_acc"]]
        lo, hi = min(step0), max(step0)
        step0_text = f"{lo:.2f} %" if hi - lo < 0.005 else f"{lo:.2f}–{hi:.2f} %"
        equal = sum(info["step0_logits_equal_to_baseline"])
        same = min(info["step0_same_predictions"])
        images = summary["test_images"]
        equal_text = f"{equal}/{n} runs" + ("" if equal == n else f" (≥ {same}/{images} same)")
        comp = summary["comparisons"].get(name)
        if comp is None:
            diff = "—"
        elif comp["ci_low"] is None:
            diff = f"{100 * comp['difference']:+.2f}"
        else:
            diff = (
                f"{100 * comp['difference']:+.2f} [{100 * comp['ci_low']:+.2f}, "
                f"{100 * comp['ci_high']:+.2f}]"
            )
        ratio = info.get("time_ratio_to_control_median")
        ratio_text = "" if ratio is None else f" ({ratio:.2f}×)"
        lines.append(
            f"| {info['label']} | {info['trainable_params']:,} | {step0_text} | {equal_text} | "
            f"{100 * info['final_test_acc_mean']:.2f} ± {100 * info['final_test_acc_std']:.2f} % "
            f"({n}) | {diff} | {info['seconds_per_epoch_mean']:.1f}{ratio_text} |"
        )
    return "\n".join(lines) + "\n"


def figure(run_dir: Path, summary: dict[str, Any]) -> Path:
    """Test accuracy against the fine-tuning step: every seed faint, the mean bold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with (run_dir / "curves.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    colours = {
        "control": "tab:gray",
        "se_identity": "tab:blue",
        "se_random": "tab:red",
        "se_identity_attn": "tab:green",
    }
    fig, (ax, zoom) = plt.subplots(1, 2, figsize=(12, 4.6), width_ratios=(1.2, 1))
    steps_per_epoch = None
    for name in summary["arms"]:
        mine = [r for r in rows if r["arm"] == name]
        seeds = sorted({int(r["seed"]) for r in mine})
        curves = {
            s: [(int(r["step"]), 100 * float(r["test_acc"])) for r in mine if int(r["seed"]) == s]
            for s in seeds
        }
        steps = [s for s, _ in curves[seeds[0]]]
        mean = [sum(c[i][1] for c in curves.values()) / len(curves) for i in range(len(steps))]
        if steps_per_epoch is None and len(mine) > 1:
            r = next(r for r in mine if float(r["epoch"]) > 0)
            steps_per_epoch = int(r["step"]) / float(r["epoch"])
        for target in (ax, zoom):
            for c in curves.values():
                target.plot(
                    [s for s, _ in c], [a for _, a in c], color=colours[name], alpha=0.25, lw=0.8
                )
            target.plot(  # the control dashed and on top: b follows it closely
                steps,
                mean,
                color=colours[name],
                lw=2,
                ls="--" if name == "control" else "-",
                zorder=3 if name == "control" else 2,
                marker="o",
                ms=3,
                label=f"{ARMS[name].label} (n={len(seeds)}, mean)",
            )
    base = 100 * summary["baseline_test_acc"]
    for target in (ax, zoom):
        target.axhline(base, color="black", ls=":", lw=1)
        target.set_xlabel(
            "fine-tuning step"
            + (f" ({steps_per_epoch:.0f} steps = 1 epoch)" if steps_per_epoch else "")
        )
        target.set_ylabel("test accuracy (%)")
        target.grid(alpha=0.3)
    ax.set_title(f"SE inserted into the trained baseline (dotted: its {base:.2f} %)")
    ax.legend(loc="lower right", fontsize=8)
    accs = [100 * float(r["test_acc"]) for r in rows]
    ax.set_ylim(max(0.0, min(accs) - 2), max(accs) + 1)
    zoom.set_ylim(base - 1.5, max(accs) + 0.3)
    zoom.set_title("zoom around the baseline (faint: each seed)")
    fig.tight_layout()
    out = run_dir / "retrofit.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.report:
            summary = summarize(Path(args.report))
            if not args.no_plots:
                figure(Path(args.report), summary)
            print_summary(summary)
            return 0
        from se_cifar.system import keep_freed_memory

        keep_freed_memory()
        if args.threads:
            torch.set_num_threads(args.threads)
        if args.time_steps:
            if not args.base:
                raise SystemExit("--time-steps needs --base")
            time_arms(args, Path(args.out or "runs/retrofit-timing"))
            return 0
        run_dir = prepare_run_dir(args)
        args.run_dir = run_dir
        print(f"run folder: {run_dir}")
        run(args, run_dir)
        summary = summarize(run_dir)
        if not args.no_plots:
            print(f"figure: {figure(run_dir, summary)}")
        print_summary(summary)
        return 0
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Interrupted as err:
        print(resume_hint(err, args.run_dir), file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
