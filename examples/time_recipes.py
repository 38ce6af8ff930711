"""Time both recipes to a target accuracy on this machine, in the same conditions.

Runs, one after the other and each in its own process (nothing else should run on
the machine meanwhile):

1. the tutorial recipe, both arms, for ``--tutorial-epochs`` epochs (default 3):
   its 50-epoch time is extrapolated from the measured time per epoch (training,
   evaluation and set-up included) plus the measured data loading;
2. the fast recipe, both arms, in full, ``--seeds`` seeds each: its time to each
   target is measured (the first epoch whose test accuracy reached it, all included:
   data loading, model set-up, every evaluation).

The tutorial recipe's accuracies come from a full 50-epoch run given by
``--tutorial-metrics`` (a ``metrics.csv`` of ``cifar10_se.py --recipe tutorial``,
by default the bundled ``examples/results/tutorial/metrics.csv``): the epoch at
which that run first reached each target, times the measured time per epoch.

Before the runs, the images are decoded once into the uint8 cache the runs share (that
cold decoding time is reported separately); every run then loads from the cache,
which is what its "all included" times contain.

Writes ``timing.json`` and ``timing.md`` (a Markdown table) into ``--out``. A run whose
``summary.json`` already exists in ``--out`` is not repeated (so an interrupted timing
continues where it stopped); use a new ``--out`` to measure again.

Example:
    python examples/time_recipes.py --data-dir ../shared/data/cifar10 --out runs/timing
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from se_cifar.data import load_cifar10
from se_cifar.stats import mean_std

HERE = Path(__file__).resolve().parent

TUTORIAL_EPOCHS = 50


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data-dir", required=True, help="CIFAR-10 ImageFolder (train/, test/)")
    p.add_argument("--out", required=True, help="folder for the runs and the table")
    p.add_argument("--arms", default="baseline,se", help="arms to time (default: baseline,se)")
    p.add_argument("--seeds", type=int, default=1, help="fast-recipe seeds per arm (default: 1)")
    p.add_argument(
        "--tutorial-epochs",
        type=int,
        default=3,
        help="epochs of the tutorial recipe to measure (default: 3; 0 skips it)",
    )
    p.add_argument(
        "--tutorial-metrics",
        default=str(HERE / "results" / "tutorial" / "metrics.csv"),
        help="metrics.csv of a full tutorial-recipe run, for its accuracy per epoch",
    )
    p.add_argument("--targets", default="81.4,84.7", help="target accuracies in %%")
    p.add_argument("--threads", type=int, default=None, help="torch threads per run")
    p.add_argument(
        "--extra",
        default="",
        help='extra arguments for the fast-recipe runs, e.g. "--set ema=0"',
    )
    args = p.parse_args(argv)
    args.target_list = [t.strip() for t in args.targets.split(",") if t.strip()]
    return args


def _run(args: argparse.Namespace, recipe: str, arm: str, extra: list[str]) -> dict[str, Any]:
    out = Path(args.out) / f"{recipe}-{arm}"
    summary = out / "summary.json"
    if summary.exists():  # already measured: re-running the script only fills the gaps
        return json.loads(summary.read_text())
    cmd = [
        sys.executable,
        str(HERE / "cifar10_se.py"),
        "--recipe",
        recipe,
        "--arms",
        arm,
        "--data-dir",
        args.data_dir,
        "--out",
        str(out),
        "--overwrite",
        "--no-plots",
        "--no-progress",
        "--targets",
        args.targets,
        "--cache-dir",
        str(Path(args.out) / ".cache"),
        *(["--threads", str(args.threads)] if args.threads else []),
        *extra,
    ]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return json.loads(summary.read_text())


def _per_epoch_all_in(summary: dict[str, Any], arm: str, metrics: Path) -> list[float]:
    """Wall seconds per epoch with evaluation and set-up, one value per run."""
    rows = list(csv.DictReader(metrics.open()))
    values = []
    for run in summary["arms"][arm]["runs"]:
        mine = [r for r in rows if r["arm"] == arm and int(r["seed"]) == run["seed"]]
        values.append(float(mine[-1]["elapsed_s"]) / len(mine))
    return values


def _tutorial_curve(path: Path, arm: str) -> list[float]:
    if not path.exists():
        return []
    rows = [r for r in csv.DictReader(path.open()) if r["arm"] == arm]
    seeds = sorted({r["seed"] for r in rows})
    return [float(r["test_acc"]) for r in rows if r["seed"] == seeds[0]] if seeds else []


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    warm = any((out / ".cache").glob("*.pt"))
    tick = time.perf_counter()
    load_cifar10(args.data_dir, cache_dir=out / ".cache")
    cold_s = time.perf_counter() - tick
    print(f"{'loaded' if warm else 'decoded'} the images ({out / '.cache'}) in {cold_s:.1f} s")
    table: list[dict[str, Any]] = []
    for arm in arms:
        if args.tutorial_epochs > 0:
            s = _run(args, "tutorial", arm, ["--epochs", str(args.tutorial_epochs)])
            per_epoch = mean_std(
                _per_epoch_all_in(s, arm, out / f"tutorial-{arm}" / "metrics.csv")
            )[0]
            data_s = s["data"]["load_time_s"]
            run = s["arms"][arm]["runs"][0]
            curve = _tutorial_curve(Path(args.tutorial_metrics), arm)
            reach: dict[str, Any] = {}
            for t in args.target_list:
                first = next((i + 1 for i, a in enumerate(curve) if a >= float(t) / 100), None)
                reach[t] = None if first is None else _reached([data_s + first * per_epoch], 1)
            table.append(
                {
                    "recipe": "tutorial",
                    "arm": arm,
                    "measured_epochs": args.tutorial_epochs,
                    "epoch_time_s": run["epoch_time_s"],
                    "epoch_time_all_in_s": per_epoch,
                    "images_per_s": run["train_images_per_s"],
                    "full_time_s": data_s + TUTORIAL_EPOCHS * per_epoch,
                    "extrapolated": True,
                    "final_acc": curve[-1] if curve else None,
                    "final_acc_std": None,
                    "final_acc_n": 1 if curve else 0,
                    "time_to": reach,
                }
            )
        s = _run(args, "fast", arm, ["--seeds", str(args.seeds), *args.extra.split()])
        info = s["arms"][arm]
        runs = info["runs"]
        reach = {}
        for t in args.target_list:
            hits = [r["time_to_accuracy"].get(t) for r in runs]
            secs = [h["seconds"] for h in hits if h]
            reach[t] = _reached(secs, len(hits)) if secs else None
        per_epoch = mean_std(_per_epoch_all_in(s, arm, out / f"fast-{arm}" / "metrics.csv"))[0]
        table.append(
            {
                "recipe": "fast",
                "arm": arm,
                "measured_epochs": runs[0]["epochs"],
                "epoch_time_s": mean_std([r["epoch_time_s"] for r in runs])[0],
                "epoch_time_all_in_s": per_epoch,
                "images_per_s": mean_std([r["train_images_per_s"] for r in runs])[0],
                "full_time_s": s["data"]["load_time_s"] + runs[0]["epochs"] * per_epoch,
                "extrapolated": False,
                "final_acc": info["final_test_acc_mean"],
                "final_acc_std": info["final_test_acc_std"],
                "final_acc_n": len(runs),
                "time_to": reach,
                "time_to_per_seed": {
                    t: [(r["time_to_accuracy"].get(t) or {}).get("seconds") for r in runs]
                    for t in args.target_list
                },
            }
        )
    timing = {"decode_s": cold_s, "cache_was_warm": warm, "rows": table}
    (out / "timing.json").write_text(json.dumps(timing, indent=2))
    md = markdown(table, args.target_list)
    if not warm:
        md += f"\nDecoding the images into the cache (once): {cold_s:.0f} s, not in the above.\n"
    (out / "timing.md").write_text(md)
    print(md)
    return 0


def _reached(seconds: list[float], runs: int) -> dict[str, float]:
    """The mean time over the runs that reached a target, how many did, and the range."""
    return {
        "mean_s": mean_std(seconds)[0],
        "min_s": min(seconds),
        "max_s": max(seconds),
        "reached": len(seconds),
        "runs": runs,
    }


def _fmt_time(seconds: float | None) -> str:
    return "not reached" if seconds is None else f"{seconds:.0f} s ({seconds / 60:.1f} min)"


def _fmt_reach(reach: dict[str, float] | None) -> str:
    if reach is None:
        return "not reached"
    text = _fmt_time(reach["mean_s"])
    if reach["runs"] > 1:
        text += f", {reach['reached']:.0f}/{reach['runs']:.0f} seeds"
        if reach["reached"] > 1:
            text += f" ({reach['min_s']:.0f}-{reach['max_s']:.0f} s)"
    return text


def markdown(table: list[dict[str, Any]], targets: list[str]) -> str:
    """The timing table as Markdown."""
    head = (
        "| recipe | arm | s/epoch (train) | s/epoch (all in) | train images/s | "
        + " | ".join(f"time to {t} %" for t in targets)
        + " | 50-epoch / full run | final test acc |\n"
    )
    head += "|" + "---|" * (7 + len(targets)) + "\n"
    lines = []
    for row in table:
        acc = (
            "n/a"
            if row["final_acc"] is None
            else f"{100 * row['final_acc']:.2f} %"
            + (
                f" +/- {100 * row['final_acc_std']:.2f} (n={row['final_acc_n']})"
                if row["final_acc_std"] is not None
                else f" (n={row['final_acc_n']})"
            )
        )
        mark = " (extrapolated)" if row["extrapolated"] else ""
        lines.append(
            f"| {row['recipe']} | {row['arm']} | {row['epoch_time_s']:.1f} | "
            f"{row['epoch_time_all_in_s']:.1f} | {row['images_per_s']:.0f} | "
            + " | ".join(_fmt_reach(row["time_to"][t]) + mark for t in targets)
            + f" | {_fmt_time(row['full_time_s'])}{mark} | {acc} |"
        )
    return head + "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
