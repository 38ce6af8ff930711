"""Figures and the joint summary of a finished run, built with attnblocks' inspect and plot API."""

from __future__ import annotations

import csv
import json
import shutil
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from se_cifar.augment import normalize
from se_cifar.data import Split, load_cifar10
from se_cifar.models import build_model
from se_cifar.recipes import CIFAR10_MEAN, CIFAR10_STD
from se_cifar.stats import comparisons, mean_std
from se_cifar.summary import arm_summary, epoch_seconds, write_csv

__all__ = ["compare_runs", "make_figures", "merge_arms", "summary_figure"]

FEATURE_SITES = ["features.block1.relu", "features.block2.relu", "features.block3.relu"]
LAST_SITE = "features.block3.relu"
#: Per model: the three feature maps drawn, the Grad-CAM layer, and the attention site
#: whose gate is profiled (for ResNet-20 the last residual branch of the last stage).
SITES = {
    "tutorial": (FEATURE_SITES, LAST_SITE, LAST_SITE),
    "resnet20": (["layer1", "layer2", "layer3"], "layer3", "layer3.2.bn2"),
}
SHOW_IMAGES = 6


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as fh:
        return list(csv.DictReader(fh))


def _histories(run_dirs: list[Path]) -> dict[str, dict[str, list[float]]]:
    """{arm: history} for the first seed of each arm, in attnblocks.plot's format."""
    out: dict[str, dict[str, list[float]]] = {}
    first: dict[str, int] = {}
    for run_dir in run_dirs:
        epochs = _read_csv(run_dir / "metrics.csv")
        iters = _read_csv(run_dir / "iterations.csv")
        for arm in dict.fromkeys(r["arm"] for r in epochs):
            seed = min(int(r["seed"]) for r in epochs if r["arm"] == arm)
            if arm in first and first[arm] <= seed:
                continue
            first[arm] = seed
            rows = [r for r in epochs if r["arm"] == arm and int(r["seed"]) == seed]
            hist: dict[str, list[float]] = {
                key: [float(r[key]) for r in rows]
                for key in ("train_loss", "test_loss", "train_acc", "test_acc")
            }
            hist["iter_loss"] = [
                float(r["loss"]) for r in iters if r["arm"] == arm and int(r["seed"]) == seed
            ]
            out[arm] = hist
    return out


def _load_models(run_dirs: list[Path], num_classes: int) -> dict[str, nn.Module]:
    models: dict[str, nn.Module] = {}
    first: dict[str, int] = {}
    for run_dir in run_dirs:
        summary = json.loads((run_dir / "summary.json").read_text())
        for arm, info in summary["arms"].items():
            if arm in first and first[arm] <= info["runs"][0]["seed"]:
                continue
            first[arm] = info["runs"][0]["seed"]
            model = build_model(
                arm, model=summary.get("model", "tutorial"), num_classes=num_classes
            )
            blob = torch.load(
                run_dir / info["runs"][0]["checkpoint"], weights_only=False, map_location="cpu"
            )
            model.load_state_dict(blob["model"])
            models[arm] = model.eval()
    return models


def _test_split(run_dir: Path) -> Split:
    config = json.loads((run_dir / "config.json").read_text())["args"]
    test_count = config["test_subset"] or (
        max(100, config["subset"] // 5) if config["subset"] else None
    )
    _, test = load_cifar10(
        config["data_dir"],
        download_root=config["download_root"],
        cache_dir=config["cache_dir"] or str(run_dir.parent / ".cache"),
        train_count=config["subset"],
        test_count=test_count,
        seed=config["seed"],
    )
    return test


def _has(model: nn.Module, flag: str) -> bool:
    """Whether an attention block in ``model`` has ``flag`` (has_channel_gate, has_spatial_map)."""
    from attnblocks import AttentionBlock

    return any(isinstance(m, AttentionBlock) and getattr(m, flag) for m in model.modules())


def summary_figure(summary: dict[str, Any]) -> Any:
    """One figure comparing the arms: accuracy (mean +/- std over seeds), cost and latency."""
    from matplotlib.figure import Figure

    arms = list(summary["arms"])
    info = [summary["arms"][a] for a in arms]
    palette = [
        "#4C72B0",
        "#DD8452",
        "#55A868",
        "#C44E52",
        "#8172B3",
        "#937860",
        "#DA8BC3",
        "#8C8C8C",
        "#CCB974",
        "#64B5CD",
    ]
    colors = [palette[k % len(palette)] for k in range(len(arms))]
    labels = [f"{a}\n(n={len(i['runs'])})" for a, i in zip(arms, info, strict=True)]
    comps = summary.get("comparisons", {})
    fig = Figure(
        figsize=(max(9.0, 1.5 * len(arms) + 4), 7.2 + 0.22 * len(comps)), layout="constrained"
    )
    axes = fig.subplots(2, 2).flatten()
    acc = [100 * i["final_test_acc_mean"] for i in info]
    err = [100 * i["final_test_acc_std"] for i in info]
    axes[0].bar(labels, acc, yerr=err, color=colors, capsize=6)
    for k, i in enumerate(info):
        seeds = [100 * r["final_test_acc"] for r in i["runs"]]
        axes[0].scatter([k] * len(seeds), seeds, color="black", s=12, zorder=3)
        axes[0].annotate(
            f"{acc[k]:.2f}%",
            (k, acc[k] + err[k]),
            xytext=(0, 4),
            textcoords="offset points",
            ha="center",
        )
    low = min(min(100 * r["final_test_acc"] for r in i["runs"]) for i in info)
    high = max(max(100 * r["final_test_acc"] for r in i["runs"]) for i in info)
    axes[0].set_ylim(max(0.0, low - 3), min(100.0, high + 2))
    axes[0].set_title("final test accuracy (mean +/- std over seeds; dots: seeds)")
    axes[0].set_ylabel("accuracy (%)")
    base_params = summary["arms"].get("baseline", info[0])["params"]
    added = [i["params"] - base_params for i in info]
    axes[1].bar(labels, [a / 1e3 for a in added], color=colors)
    for k, a in enumerate(added):
        axes[1].annotate(
            f"{a:+,}", (k, a / 1e3), xytext=(0, 3), textcoords="offset points", ha="center"
        )
    axes[1].set_title(f"parameters added to the baseline's {base_params / 1e6:.2f} M")
    axes[1].set_ylabel("thousands")
    seconds = [mean_std([epoch_seconds(r) for r in i["runs"]])[0] for i in info]
    axes[2].bar(labels, seconds, color=colors)
    axes[2].set_title("training time per epoch (each run's median epoch)")
    axes[2].set_ylabel("seconds")
    axes[3].bar(
        labels, [i["runs"][0]["latency"]["batch1"]["latency_ms"] for i in info], color=colors
    )
    axes[3].set_title("inference latency, batch 1 (median)")
    axes[3].set_ylabel("ms")
    lines = []
    for arm, comp in comps.items():
        ci = (
            "no CI (one seed per arm)"
            if comp["ci_low"] is None
            else f"95% CI [{100 * comp['ci_low']:+.2f}, {100 * comp['ci_high']:+.2f}]"
        )
        lines.append(f"{arm} - baseline: {100 * comp['difference']:+.2f} points, {ci}")
    recipe = summary.get("recipe", {}).get("name", "?")
    model = summary.get("model", "tutorial")
    where = "CIFAR-10" if model == "tutorial" else f"CIFAR-10, {model}"
    head = f"{where}, recipe '{recipe}': " + " vs ".join(arms)
    fig.suptitle("\n".join([head, *lines]))
    return fig


class _Saver:
    """Saves each figure as ``<out>/<name>.png`` and lists the files written, in order."""

    def __init__(self, out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        self.out = out
        self.written: list[Path] = []

    def __call__(self, fig: Any, name: str) -> None:
        path = self.out / f"{name}.png"
        fig.savefig(path, dpi=110)
        self.written.append(path)


@dataclass
class _Shown:
    """The test split, normalised, and the images of the per-image figures (one per class)."""

    test: Split
    all_x: torch.Tensor
    images: torch.Tensor
    targets: torch.Tensor

    @classmethod
    def of(cls, test: Split) -> _Shown:
        picks = [
            int((test.labels == c).nonzero()[0])
            for c in range(len(test.classes))
            if bool((test.labels == c).any())
        ][:SHOW_IMAGES]
        images = normalize(test.images[picks].float() / 255, CIFAR10_MEAN, CIFAR10_STD)
        all_x = normalize(test.images.float() / 255, CIFAR10_MEAN, CIFAR10_STD)
        return cls(test, all_x, images, test.labels[picks])

    @property
    def titles(self) -> list[str]:
        return [self.test.classes[int(t)] for t in self.targets]


def _confusion_figure(save: _Saver, arm: str, model: nn.Module, shown: _Shown) -> None:
    import attnblocks.plot as plot

    test, all_x = shown.test, shown.all_x
    with torch.no_grad():
        logits = torch.cat([model(all_x[i : i + 1000]) for i in range(0, len(test), 1000)])
    save(
        plot.confusion_matrix(
            test.labels,
            logits.argmax(1),
            class_names=test.classes,
            title=f"{arm}: confusion matrix (test, row-normalised)",
        ),
        f"confusion_{arm}",
    )


def _feature_figures(
    save: _Saver, arm: str, model: nn.Module, shown: _Shown, sites: list[str]
) -> dict[str, torch.Tensor]:
    """Feature maps of two test images and the most active channels; returns the features."""
    import attnblocks.inspect as inspect
    import attnblocks.plot as plot

    images = shown.images
    with inspect.record_features(model, sites) as rec, torch.no_grad():
        model(images)
    features = {f"conv{k + 1}": rec.features[s] for k, s in enumerate(sites)}
    for j in range(2):
        save(
            plot.feature_map_grid(
                images[j],
                features,
                index=j,
                mean=CIFAR10_MEAN,
                std=CIFAR10_STD,
                title=f"{arm}: feature maps, test image {j} ({shown.titles[j]})",
            ),
            f"feature_maps_{arm}_{j}",
        )
    save(_channel_heatmaps(arm, shown, features, "activation"), f"heatmap_activation_{arm}")
    return features


def _channel_heatmaps(
    arm: str,
    shown: _Shown,
    features: dict[str, torch.Tensor],
    rank_by: Literal["activation", "gate"],
    gate: torch.Tensor | None = None,
) -> Any:
    """The first shown image's top 3 channels of the last feature map, ranked by ``rank_by``."""
    import attnblocks.plot as plot

    return plot.channel_heatmaps(
        shown.images[0],
        features["conv3"],
        k=3,
        rank_by=rank_by,
        gate=gate,
        index=0,
        upsample="bilinear",
        mean=CIFAR10_MEAN,
        std=CIFAR10_STD,
        layer=f"{arm} conv3",
    )


def _spatial_map_figure(save: _Saver, arm: str, model: nn.Module, shown: _Shown) -> None:
    import attnblocks.inspect as inspect
    import attnblocks.plot as plot

    with inspect.record_maps(model) as mrec, torch.no_grad():
        model(shown.images)
    save(
        plot.spatial_map_overlay(
            shown.images, mrec.maps, titles=shown.titles, mean=CIFAR10_MEAN, std=CIFAR10_STD
        ),
        f"spatial_maps_{arm}",
    )


def _gate_figures(
    save: _Saver,
    arm: str,
    model: nn.Module,
    shown: _Shown,
    features: dict[str, torch.Tensor],
    gate_site: str,
) -> None:
    """The channels ranked by the gate at ``gate_site``, and the gate's profiles by class."""
    import attnblocks.inspect as inspect
    import attnblocks.plot as plot

    with inspect.record_gates(model) as grec, torch.no_grad():
        model(shown.images)
    last = [g for name, g in grec.gates.items() if name.startswith(gate_site)]
    if not last:
        return
    test, all_x, classes = shown.test, shown.all_x, shown.test.classes
    save(_channel_heatmaps(arm, shown, features, "gate", last[0]), f"heatmap_gate_{arm}")
    batches = [(all_x[i : i + 500], test.labels[i : i + 500]) for i in range(0, len(test), 500)]
    stats = inspect.gate_statistics(model, batches, num_classes=len(classes))
    shown_classes = list(range(min(4, len(classes))))
    save(
        plot.gate_profiles(
            stats,
            classes=shown_classes,
            class_names=classes,
            title=f"{arm}: mean gate per channel by class (cf. SE paper, Fig. 6)",
        ),
        f"gate_profiles_{arm}",
    )
    save(
        plot.gate_class_profile(
            stats,
            0,
            class_name=classes[0],
            title=f"{arm}: gate mean +/- std, class {classes[0]} (cf. Fig. 7)",
        ),
        f"gate_class_profile_{arm}",
    )
    save(
        plot.gate_heatmap(stats, title=f"{arm}: mean gate, sites x channels"),
        f"gate_heatmap_{arm}",
    )


def _figures(
    summary: dict[str, Any],
    histories: dict[str, dict[str, list[float]]],
    models: dict[str, nn.Module],
    test: Split,
    out: Path,
) -> list[Path]:
    import attnblocks.inspect as inspect
    import attnblocks.plot as plot

    save = _Saver(out)
    feature_sites, cam_site, gate_site = SITES[summary.get("model", "tutorial")]
    save(
        plot.training_curves(histories, smooth=25, title="training: " + " vs ".join(histories)),
        "training_curves",
    )
    save(summary_figure(summary), "summary")
    shown = _Shown.of(test)
    cams: dict[str, torch.Tensor] = {}
    for arm, model in models.items():
        _confusion_figure(save, arm, model, shown)
        features = _feature_figures(save, arm, model, shown, feature_sites)
        cams[arm] = inspect.grad_cam(
            model,
            shown.images,
            shown.targets,
            cam_site,
            size=(shown.images.shape[-2], shown.images.shape[-1]),
        )
        if _has(model, "has_spatial_map"):
            _spatial_map_figure(save, arm, model, shown)
        if _has(model, "has_channel_gate"):  # rank the channels by the gate, and profile it
            _gate_figures(save, arm, model, shown, features, gate_site)
    save(
        plot.gradcam_overlay(
            shown.images,
            cams,
            titles=shown.titles,
            normalize="image",  # each panel on its own scale, as Grad-CAM figures are drawn
            mean=CIFAR10_MEAN,
            std=CIFAR10_STD,
        ),
        "gradcam",
    )
    return save.written


def make_figures(run_dir: Path) -> list[Path]:
    """Draw every figure of a finished run into ``run_dir / "figures"``."""
    summary = json.loads((run_dir / "summary.json").read_text())
    test = _test_split(run_dir)
    models = _load_models([run_dir], len(test.classes))
    return _figures(summary, _histories([run_dir]), models, test, run_dir / "figures")


def merge_arms(summaries: list[dict[str, Any]], run_dirs: list[Path]) -> dict[str, Any]:
    """The arms of several finished runs joined into one ``summary["arms"]``.

    An arm found in several runs (e.g. one run folder per seed) gets all their seeds, its
    mean and std recomputed over them; each run records its ``source`` folder (its checkpoint
    path is relative to that). Refused: runs of different recipes, and a seed of an arm twice.
    """
    recipes = {json.dumps(s.get("recipe"), sort_keys=True) for s in summaries}
    if len(recipes) > 1:
        raise SystemExit("--compare: the runs used different recipes; compare like with like.")
    runs: dict[str, list[dict[str, Any]]] = {}
    params: dict[str, int] = {}
    for summary, run_dir in zip(summaries, run_dirs, strict=True):
        for arm, info in summary["arms"].items():
            seen = {r["seed"] for r in runs.get(arm, [])}
            for run in info["runs"]:
                if run["seed"] in seen:
                    raise SystemExit(
                        f"--compare: arm {arm!r} seed {run['seed']} is in more than one run "
                        f"(again in {run_dir})."
                    )
                runs.setdefault(arm, []).append({**run, "source": str(run_dir)})
            params[arm] = info["params"]
    for arm_runs in runs.values():
        arm_runs.sort(key=lambda r: r["seed"])
    return {arm: arm_summary(params[arm], arm_runs) for arm, arm_runs in runs.items()}


def _add_epoch_medians(arms: dict[str, Any]) -> None:
    """Give each run recorded without ``epoch_time_s_median`` the median of its epochs, from
    the ``metrics.csv`` of its ``source`` folder (runs of older versions)."""
    for arm, info in arms.items():
        for run in info["runs"]:
            if "epoch_time_s_median" in run or "source" not in run:
                continue
            path = Path(run["source"]) / "metrics.csv"
            rows = _read_csv(path) if path.exists() else []
            times = [
                float(r["epoch_time_s"])
                for r in rows
                if r["arm"] == arm and int(r["seed"]) == run["seed"]
            ]
            if times:
                run["epoch_time_s_median"] = statistics.median(times)


def compare_runs(run_dirs: list[Path], out: Path, *, plots: bool = True) -> dict[str, Any]:
    """Join finished runs (one per arm, one per seed, ...) into one summary and figures."""
    summaries = []
    for run_dir in run_dirs:
        path = run_dir / "summary.json"
        if not path.exists():
            raise SystemExit(f"--compare: {run_dir} has no summary.json; is the run finished?")
        summaries.append(json.loads(path.read_text()))
    kinds = {s.get("model", "tutorial") for s in summaries}
    if len(kinds) > 1:
        raise SystemExit(f"--compare: the runs trained different models {sorted(kinds)}.")
    arms = merge_arms(summaries, run_dirs)
    _add_epoch_medians(arms)
    joint: dict[str, Any] = {
        **summaries[0],
        "arms": arms,
        "sources": [str(d) for d in run_dirs],
    }
    joint.pop("comparison", None)
    joint.pop("comparisons", None)
    joint.update(comparisons(joint["arms"]))
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(joint, indent=2))
    for name in ("metrics.csv", "iterations.csv"):
        rows: list[dict[str, str]] = []
        for run_dir in run_dirs:
            rows.extend(_read_csv(run_dir / name))
        write_csv(out / name, rows)
    shutil.copy(run_dirs[0] / "config.json", out / "config.json")
    if plots:
        test = _test_split(run_dirs[0])
        models = _load_models(run_dirs, len(test.classes))
        _figures(joint, _histories(run_dirs), models, test, out / "figures")
    return joint
