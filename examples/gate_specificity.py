"""Are an attention arm's gates class-specific? Per-site statistics of finished runs.

For every seed of one arm (``se`` by default) in one or more finished run folders of
``cifar10_se.py``, this runs the trained model over the test set with
:func:`attnblocks.inspect.gate_statistics` and records, per attention site, the
class specificity of the gates (between-class / within-class variance of the gate,
totals over channels) next to the same number with the labels shuffled (what chance
alone gives for this many images), the share of the gate variance that the class explains
(``r / (1 + r)`` for the ratio ``r``), the mean gate and the share of saturated gates.
The SE paper (Hu et al., Fig. 6) found ResNet-50's gates class-agnostic in early
stages and class-specific in late ones on ImageNet; this asks the same of a CIFAR model.

Writes ``gate_specificity.json`` and, for the first seed, ``gate_profiles_<arm>.png``
(mean gate per channel for four classes and for all, at the first and last site of
every stage) into ``--out``::

    python examples/gate_specificity.py runs/r20/s0 runs/r20/s1 --out runs/r20/gates
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import torch
from se_cifar.augment import normalize
from se_cifar.data import load_cifar10
from se_cifar.models import build_model
from se_cifar.recipes import CIFAR10_MEAN, CIFAR10_STD

from attnblocks import inspect, plot


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="finished run folders (summary.json)")
    p.add_argument("--arm", default="se", help="the arm to inspect (default: se)")
    p.add_argument("--out", type=Path, required=True, help="folder for the JSON and figure")
    p.add_argument("--data-dir", default=None, help="CIFAR-10 folder (default: the run's)")
    p.add_argument("--shuffle-seed", type=int, default=0, help="seed of the label shuffle")
    return p.parse_args(argv)


def _site_rows(stats: inspect.GateStats, shuffled: inspect.GateStats) -> dict[str, Any]:
    rows: dict[str, Any] = {}
    chance = shuffled.summary()
    for site, row in stats.summary().items():
        ratio = row["specificity"]
        rows[site] = {
            "specificity": ratio,
            "variance_explained_by_class": 1.0 if math.isinf(ratio) else ratio / (1 + ratio),
            "specificity_shuffled_labels": chance[site]["specificity"],
            "mean_gate": row["mean"],
            "gate_std": row["std"],
            "saturation": row["saturation"],
        }
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"arm": args.arm, "seeds": {}}
    test = None
    drawn = False
    for run_dir in args.runs:
        summary = json.loads((run_dir / "summary.json").read_text())
        info = summary["arms"].get(args.arm)
        if info is None:
            continue
        config = json.loads((run_dir / "config.json").read_text())["args"]
        if test is None:
            _, test = load_cifar10(
                args.data_dir or config["data_dir"],
                cache_dir=config["cache_dir"] or str(run_dir.parent / ".cache"),
                train_count=1,
                test_count=None,
            )
            x = normalize(test.images.float() / 255, CIFAR10_MEAN, CIFAR10_STD)
            gen = torch.Generator().manual_seed(args.shuffle_seed)
            shuffled_labels = test.labels[torch.randperm(len(test), generator=gen)]
            result["model"] = summary.get("model", "tutorial")
            result["test_images"] = len(test)
        for run in info["runs"]:
            model = build_model(args.arm, model=result["model"], num_classes=len(test.classes))
            blob = torch.load(run_dir / run["checkpoint"], weights_only=False, map_location="cpu")
            model.load_state_dict(blob["model"])
            model.eval()
            stats, chance = (
                inspect.gate_statistics(
                    model,
                    [(x[i : i + 500], y[i : i + 500]) for i in range(0, len(test), 500)],
                    num_classes=len(test.classes),
                )
                for y in (test.labels, shuffled_labels)
            )
            result["seeds"][str(run["seed"])] = _site_rows(stats, chance)
            print(f"{args.arm} seed {run['seed']} ({run_dir}):")
            for site, row in result["seeds"][str(run["seed"])].items():
                print(
                    f"  {site:16s} specificity {row['specificity']:8.3f} "
                    f"(shuffled labels {row['specificity_shuffled_labels']:.3f}, "
                    f"class explains {100 * row['variance_explained_by_class']:.0f} %)  "
                    f"mean gate {row['mean_gate']:.3f}  saturation {row['saturation']:.3f}"
                )
            if not drawn:
                sites = list(stats)
                picked = sorted({sites[0], sites[-1], *(s for s in sites if ".0." in s)})
                picked = [s for s in sites if s in picked]
                fig = plot.gate_profiles(
                    stats,
                    sites=picked,
                    classes=[0, 1, 3, 8],
                    class_names=test.classes,
                    title=f"{args.arm}, seed {run['seed']}: mean gate per channel by class "
                    "(cf. SE paper, Fig. 6)",
                )
                fig.savefig(args.out / f"gate_profiles_{args.arm}.png", dpi=110)
                drawn = True
    if not result["seeds"]:
        raise SystemExit(f"no run in {[str(r) for r in args.runs]} has the arm {args.arm!r}.")
    (args.out / "gate_specificity.json").write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
