"""The run folder's tables and summary: metrics rows, per-seed records, per-arm means, printout."""

from __future__ import annotations

import csv
import statistics
from pathlib import Path
from typing import Any

from se_cifar.engine import RunState
from se_cifar.stats import mean_std

__all__ = [
    "arm_summary",
    "metrics_rows",
    "print_summary",
    "seed_record",
    "time_to_accuracy",
    "write_csv",
]


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write ``rows`` (dicts with the same keys) as a CSV table; nothing when there are none."""
    if not rows:
        return
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def metrics_rows(
    arm: str, seed: int, state: RunState
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The run's rows of metrics.csv (one per epoch) and of iterations.csv (one per step)."""
    metrics = [{"arm": arm, "seed": seed, **row} for row in state.history]
    iterations = [
        {"arm": arm, "seed": seed, "epoch": epoch + 1, "step": step, "loss": loss}
        for epoch, step, loss in state.iterations
    ]
    return metrics, iterations


def time_to_accuracy(
    history: list[dict[str, Any]], targets: list[float], data_s: float
) -> dict[str, dict[str, float] | None]:
    """For each target accuracy, the first epoch that reached it and the wall time until then.

    The time is all included: data loading (``data_s``, once per process) plus the
    run's ``elapsed_s`` at the end of that epoch's evaluation (model set-up,
    training, every evaluation). ``None`` when the run never reached the target.

    >>> rows = [{"epoch": 1, "test_acc": 0.5, "elapsed_s": 10.0},
    ...         {"epoch": 2, "test_acc": 0.82, "elapsed_s": 21.0}]
    >>> time_to_accuracy(rows, [0.814, 0.847], 2.0)
    {'81.4': {'epoch': 2, 'seconds': 23.0}, '84.7': None}
    """
    out: dict[str, dict[str, float] | None] = {}
    for target in targets:
        hit = next((r for r in history if r["test_acc"] >= target - 1e-12), None)
        key = f"{100 * target:g}"
        if hit is None or "elapsed_s" not in hit:
            out[key] = None
        else:
            out[key] = {"epoch": hit["epoch"], "seconds": data_s + hit["elapsed_s"]}
    return out


def seed_record(
    seed: int,
    history: list[dict[str, Any]],
    *,
    wall_s: float,
    latency: dict[str, dict[str, float]],
    targets: list[float],
    data_s: float,
    checkpoint: str,
) -> dict[str, Any]:
    """One run's entry in ``summary["arms"][arm]["runs"]``, from its per-epoch ``history``."""
    accs = [r["test_acc"] for r in history]
    return {
        "seed": seed,
        "final_test_acc": accs[-1],
        "best_test_acc": max(accs),
        "best_epoch": accs.index(max(accs)) + 1,
        "epochs": len(accs),
        "epoch_time_s": mean_std([r["epoch_time_s"] for r in history])[0],
        "epoch_time_s_median": statistics.median(r["epoch_time_s"] for r in history),
        "train_time_s": sum(r["epoch_time_s"] for r in history),
        "wall_time_s_this_session": wall_s,
        "train_images_per_s": mean_std([r["images_per_s"] for r in history])[0],
        "latency": latency,
        "time_to_accuracy": time_to_accuracy(history, targets, data_s),
        "checkpoint": checkpoint,
    }


def arm_summary(params: int, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """An arm's entry in ``summary["arms"]``: its runs (see :func:`seed_record`) and means.

    >>> s = arm_summary(10, [{"final_test_acc": 0.5, "best_test_acc": 0.6},
    ...                      {"final_test_acc": 0.7, "best_test_acc": 0.8}])
    >>> round(s["final_test_acc_mean"], 6), round(s["best_test_acc_mean"], 6)
    (0.6, 0.7)
    """
    mean, std = mean_std([r["final_test_acc"] for r in runs])
    return {
        "params": params,
        "runs": runs,
        "final_test_acc_mean": mean,
        "final_test_acc_std": std,
        "best_test_acc_mean": mean_std([r["best_test_acc"] for r in runs])[0],
    }


def _targets_of(runs: list[dict[str, Any]]) -> list[tuple[str, list[dict[str, float]], int]]:
    targets: list[str] = []
    for run in runs:
        targets += [t for t in run.get("time_to_accuracy", {}) if t not in targets]
    return [
        (
            t,
            [r["time_to_accuracy"][t] for r in runs if r.get("time_to_accuracy", {}).get(t)],
            len(runs),
        )
        for t in targets
    ]


def epoch_seconds(run: dict[str, Any]) -> float:
    """A run's seconds per epoch: its median epoch (the mean for runs recorded without it).

    The median, because an epoch that shared the machine with something else, or was
    paused, must not move a run's time per epoch.

    >>> epoch_seconds({"epoch_time_s": 90.0, "epoch_time_s_median": 42.0})
    42.0
    >>> epoch_seconds({"epoch_time_s": 90.0})
    90.0
    """
    return float(run.get("epoch_time_s_median", run["epoch_time_s"]))


def print_summary(summary: dict[str, Any]) -> None:
    """Print the arms' accuracy and time table, the times to accuracy and the comparisons."""
    print("\narm        params     final test acc (mean +/- std)  best    s/epoch (median)")
    for arm, info in summary["arms"].items():
        runs = info["runs"]
        print(
            f"{arm:9s} {info['params']:>9,}   {100 * info['final_test_acc_mean']:6.2f} +/- "
            f"{100 * info['final_test_acc_std']:.2f} % (n={len(runs)})       "
            f"{100 * info['best_test_acc_mean']:6.2f}  "
            f"{mean_std([epoch_seconds(r) for r in runs])[0]:7.1f}"
        )
    for arm, info in summary["arms"].items():
        parts = []
        for target, hits, n in _targets_of(info["runs"]):
            if hits:
                secs = mean_std([h["seconds"] for h in hits])[0]
                parts.append(f"{target} % in {secs:.0f} s ({len(hits)}/{n} runs)")
            else:
                parts.append(f"{target} % not reached")
        if parts:
            print(f"{arm}: time to accuracy, all included: " + "; ".join(parts))
    for arm, comp in summary.get("comparisons", {}).items():
        ci = (
            "n/a"
            if comp["ci_low"] is None
            else f"[{100 * comp['ci_low']:+.2f}, {100 * comp['ci_high']:+.2f}]"
        )
        print(
            f"{arm} - baseline: {100 * comp['difference']:+.2f} points, 95% CI {ci} "
            f"({comp['note']})"
        )
