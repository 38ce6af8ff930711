"""attnblocks.plot: every figure renders to a PNG of the expected size, headless.

Also: matplotlib stays optional (never imported by ``import attnblocks``, a clear
ImportError when missing) and figures show the numbers they were given.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _inspect_toys import toy_se_net

from attnblocks import ChannelMismatchError, InvalidArgumentError, InvalidInputError
from attnblocks.inspect import GateStats, grad_cam, record_features, record_gates
from attnblocks.plot import (
    channel_heatmaps,
    confusion_matrix,
    feature_map_grid,
    gate_class_profile,
    gate_heatmap,
    gate_profiles,
    gradcam_overlay,
    spatial_map_overlay,
    training_curves,
)

pytest.importorskip("matplotlib")

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
DPI = 40


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def recorded() -> dict[str, object]:
    net = toy_se_net(num_classes=3).eval()
    torch.manual_seed(0)
    images = torch.rand(6, 3, 8, 8)
    x = (images - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    with (
        torch.no_grad(),
        record_gates(net) as gates,
        record_features(net, ["stem.relu", "stage.relu"]) as feats,
    ):
        net(x)
    return {
        "net": net,
        "x": x,
        "labels": labels,
        "gates": gates.gates,
        "features": feats.features,
        "stats": GateStats.from_gates(gates.gates, labels),
    }


def _figures(r: dict) -> dict[str, object]:
    x, stats = r["x"], r["stats"]
    cams = grad_cam(r["net"], x[:3], [0, 1, 2], "stage.conv")
    return {
        "feature_map_grid": lambda: feature_map_grid(
            x[0], r["features"], channels=4, mean=MEAN, std=STD
        ),
        "channel_heatmaps_activation": lambda: channel_heatmaps(
            x[0], r["features"]["stem.relu"], k=3, mean=MEAN, std=STD, upsample="nearest"
        ),
        "channel_heatmaps_gate": lambda: channel_heatmaps(
            x[0],
            r["features"]["stage.relu"],
            k=4,
            rank_by="gate",
            gate=r["gates"]["stage.se"],
            mean=MEAN,
            std=STD,
            normalize="shared",
        ),
        "gradcam_overlay": lambda: gradcam_overlay(
            x[:3], {"a": cams, "b": 2 * cams}, titles=["0", "1", "2"], mean=MEAN, std=STD
        ),
        "gate_profiles": lambda: gate_profiles(stats, class_names=["a", "b", "c"]),
        "gate_class_profile": lambda: gate_class_profile(stats, 1),
        "gate_heatmap": lambda: gate_heatmap(stats, value="std"),
        "training_curves": lambda: training_curves(
            {
                "A": {
                    "iter_loss": [2.0, 1.5, 1.2, 1.0],
                    "train_acc": [0.5, 0.7],
                    "val_loss": [1.4, 1.1],
                },
                "B": {
                    "iter_loss": [2.1, 1.4, 1.0, 0.9],
                    "train_acc": [0.6, 0.8],
                    "val_loss": [1.3, 1.0],
                },
            },
            smooth=2,
        ),
        "confusion_matrix": lambda: confusion_matrix(r["labels"], torch.tensor([0, 1, 1, 0, 2, 2])),
    }


FIGURES = [
    "feature_map_grid",
    "channel_heatmaps_activation",
    "channel_heatmaps_gate",
    "gradcam_overlay",
    "gate_profiles",
    "gate_class_profile",
    "gate_heatmap",
    "training_curves",
    "confusion_matrix",
]


@pytest.mark.parametrize("name", FIGURES)
def test_figure_writes_png_of_expected_size(name: str, recorded: dict, tmp_path: Path) -> None:
    from matplotlib.figure import Figure

    fig = _figures(recorded)[name]()
    assert isinstance(fig, Figure)
    path = tmp_path / f"{name}.png"
    fig.savefig(path, dpi=DPI)
    width, height = fig.get_size_inches()
    assert path.stat().st_size > 1000
    got = _png_size(path)
    assert abs(got[0] - width * DPI) < 1 and abs(got[1] - height * DPI) < 1, got
    assert fig.get_suptitle() or any(ax.get_title() for ax in fig.axes)


def test_figsize_is_honoured(recorded: dict, tmp_path: Path) -> None:
    fig = gate_heatmap(recorded["gates"], figsize=(5, 3))
    fig.savefig(tmp_path / "h.png", dpi=20)
    assert _png_size(tmp_path / "h.png") == (100, 60)
    with pytest.raises(InvalidArgumentError, match="figsize"):
        gate_heatmap(recorded["gates"], figsize=(5, -1))


def test_figures_show_the_given_numbers(recorded: dict) -> None:
    stats = recorded["stats"]
    fig = gate_profiles(stats, sites=["stage.se"], classes=[2, 0])
    lines = fig.axes[0].lines
    torch.testing.assert_close(
        torch.as_tensor(lines[0].get_ydata()), stats["stage.se"].class_mean[2]
    )
    torch.testing.assert_close(torch.as_tensor(lines[2].get_ydata()), stats["stage.se"].mean)
    assert [t.get_text() for t in fig.legends[0].get_texts()] == [
        "class 2",
        "class 0",
        "all classes",
    ]

    fig = confusion_matrix([0, 0, 1, 1], [0, 1, 1, 1], normalize="none")
    counts = torch.as_tensor(fig.axes[0].images[0].get_array())
    torch.testing.assert_close(counts, torch.tensor([[1.0, 1.0], [0.0, 2.0]], dtype=torch.float64))
    fig = confusion_matrix([0, 0, 1, 1], [0, 1, 1, 1], normalize="true")
    rows = torch.as_tensor(fig.axes[0].images[0].get_array())
    torch.testing.assert_close(rows, torch.tensor([[0.5, 0.5], [0.0, 1.0]], dtype=torch.float64))
    assert "75.0%" in fig.axes[0].get_title()

    heat = gate_heatmap({"a": torch.tensor([0.1, 0.2]), "b": torch.tensor([0.3, 0.4, 0.5])})
    matrix = torch.as_tensor(heat.axes[0].images[0].get_array().filled(float("nan")))
    torch.testing.assert_close(
        matrix,
        torch.tensor([[0.1, 0.2, float("nan")], [0.3, 0.4, 0.5]], dtype=torch.float64),
        equal_nan=True,
    )

    # Grad-CAM panels are normalised per image by default, and the figure says so
    x = recorded["x"][:2]
    cams = torch.rand(2, 4, 4)
    cams[1] *= 0.01  # a much weaker map: nearly blank on a shared scale, not per image
    fig = gradcam_overlay(x, {"weak": cams, "strong": 2 * cams}, mean=MEAN, std=STD)
    for ax in fig.axes[2:6]:
        panel = ax.images[1].get_array()
        assert float(panel.min()) == pytest.approx(0.0) and float(panel.max()) == pytest.approx(1)
    assert "per image" in fig.get_suptitle()
    assert "each image on its own" in fig.axes[-1].get_ylabel()
    # shared normalisation keeps the weaker map weaker; the image row shows un-normalised RGB
    fig = gradcam_overlay(
        x, {"weak": cams, "strong": 2 * cams}, normalize="shared", mean=MEAN, std=STD
    )
    axes = fig.axes
    weak = max(float(ax.images[1].get_array().max()) for ax in axes[2:4])
    strong = max(float(ax.images[1].get_array().max()) for ax in axes[4:6])
    assert weak < 0.51 and strong == pytest.approx(1.0)
    assert float(axes[5].images[1].get_array().max()) < 0.02
    assert "shared" in fig.get_suptitle()
    assert gradcam_overlay(x, cams, title="mine", mean=MEAN, std=STD).get_suptitle() == "mine"
    shown = torch.as_tensor(axes[0].images[0].get_array())
    want = (x[0] * torch.tensor(STD).view(3, 1, 1) + torch.tensor(MEAN).view(3, 1, 1)).permute(
        1, 2, 0
    )
    torch.testing.assert_close(shown, want.clamp(0, 1))


def test_channel_heatmaps_rank_channels(recorded: dict) -> None:
    feature = torch.zeros(5, 4, 4)
    feature[3] += 2.0
    feature[1] += 1.0
    fig = channel_heatmaps(torch.rand(3, 8, 8), feature, k=2)
    assert [ax.get_title().split()[1] for ax in fig.axes[1:3]] == ["3", "1"]
    gate = torch.tensor([0.9, 0.1, 0.2, 0.3, 0.95])
    fig = channel_heatmaps(torch.rand(3, 8, 8), feature, k=2, rank_by="gate", gate=gate)
    assert [ax.get_title().split()[1] for ax in fig.axes[1:3]] == ["4", "0"]


def test_errors(recorded: dict) -> None:
    x = recorded["x"]
    with pytest.raises(InvalidInputError, match="mean= and std="):
        feature_map_grid(x[0], recorded["features"])  # still normalised
    with pytest.raises(InvalidArgumentError, match="3 channels"):
        feature_map_grid(x[0], recorded["features"], mean=(0.5, 0.5), std=STD)
    with pytest.raises(ChannelMismatchError, match="8 channels but the feature map has 16"):
        channel_heatmaps(
            x[0],
            recorded["features"]["stage.relu"],
            rank_by="gate",
            gate=recorded["gates"]["stem.se"],
            mean=MEAN,
            std=STD,
        )
    with pytest.raises(InvalidArgumentError, match="needs gate="):
        channel_heatmaps(
            x[0], recorded["features"]["stage.relu"], rank_by="gate", mean=MEAN, std=STD
        )
    with pytest.raises(InvalidInputError, match="one map per image"):
        gradcam_overlay(x[:3], torch.rand(2, 4, 4), mean=MEAN, std=STD)
    with pytest.raises(InvalidArgumentError, match="unknown history key 'val_top5'"):
        training_curves({"val_top5": [0.1]})
    with pytest.raises(InvalidInputError, match="3 targets but 2 predictions"):
        confusion_matrix([0, 1, 1], [0, 1])
    with pytest.raises(InvalidArgumentError, match="not among the 3 classes"):
        gate_class_profile(recorded["stats"], 5)
    with pytest.raises(InvalidArgumentError, match="unknown sites"):
        gate_profiles(recorded["stats"], sites=["nope"])


def test_import_attnblocks_never_imports_matplotlib() -> None:
    code = (
        "import sys\n"
        "import attnblocks, attnblocks.inspect, attnblocks.plot\n"
        "from attnblocks.plot import gate_profiles\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('matplotlib'))\n"
        "assert not loaded, loaded\n"
        "print('ok')\n"
    )
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=root,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_missing_matplotlib_gives_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError, match=r"pip install attnblocks\[examples\]"):
        confusion_matrix([0, 1], [0, 1])


def _with_cmap(recorded: dict, cmap: object) -> dict[str, object]:
    x, stats = recorded["x"], recorded["stats"]
    cams = torch.rand(2, 4, 4)
    feature = recorded["features"]["stem.relu"]
    return {
        "feature_map_grid": lambda: feature_map_grid(
            x[0], recorded["features"], mean=MEAN, std=STD, cmap=cmap
        ),
        "channel_heatmaps": lambda: channel_heatmaps(x[0], feature, mean=MEAN, std=STD, cmap=cmap),
        "gradcam_overlay": lambda: gradcam_overlay(x[:2], cams, mean=MEAN, std=STD, cmap=cmap),
        "spatial_map_overlay": lambda: spatial_map_overlay(
            x[:2], torch.rand(2, 1, 4, 4), mean=MEAN, std=STD, cmap=cmap
        ),
        "gate_heatmap": lambda: gate_heatmap(stats, cmap=cmap),
        "confusion_matrix": lambda: confusion_matrix([0, 1], [0, 1], cmap=cmap),
    }


CMAP_FIGURES = [
    "feature_map_grid",
    "channel_heatmaps",
    "gradcam_overlay",
    "spatial_map_overlay",
    "gate_heatmap",
    "confusion_matrix",
]


@pytest.mark.parametrize("name", CMAP_FIGURES)
def test_every_cmap_is_checked_and_colormap_objects_work(name: str, recorded: dict) -> None:
    import matplotlib as mpl

    for bad, match in (("virdis", r"cmap must be .*got 'virdis'. Did you mean"), (42, "got 42")):
        with pytest.raises(InvalidArgumentError, match=match):
            _with_cmap(recorded, bad)[name]()
    assert _with_cmap(recorded, mpl.colormaps["magma"])[name]() is not None


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda x: gradcam_overlay(x[:0], torch.rand(0, 4, 4)), InvalidInputError, "empty batch"),
        (
            lambda x: spatial_map_overlay(x[:0], torch.rand(0, 1, 4, 4)),
            InvalidInputError,
            "empty batch",
        ),
        (
            lambda x: gradcam_overlay(x[:2], torch.rand(2, 0, 4), mean=MEAN, std=STD),
            InvalidInputError,
            "no positions to draw",
        ),
        (
            lambda x: spatial_map_overlay(x[:2], torch.rand(2, 1, 4, 0), mean=MEAN, std=STD),
            InvalidInputError,
            "no positions to draw",
        ),
        (
            lambda x: gradcam_overlay(
                x[:2], torch.rand(2, 4, 4, device="meta"), mean=MEAN, std=STD
            ),
            InvalidInputError,
            "meta device",
        ),
        (
            lambda x: gradcam_overlay(x[:2], torch.rand(2, 4, 4), upsample="cubic"),
            InvalidArgumentError,
            "unknown upsample mode 'cubic'",
        ),
        (
            lambda x: channel_heatmaps(x[0], torch.rand(4, 0, 4), mean=MEAN, std=STD),
            InvalidInputError,
            "no positions to draw",
        ),
        (
            lambda x: feature_map_grid(
                x[0], {"a": torch.rand(1, 4, 4, 4, device="meta")}, mean=MEAN, std=STD
            ),
            InvalidInputError,
            "meta device",
        ),
        (
            lambda x: confusion_matrix([], []),
            InvalidInputError,
            "targets and predictions are empty",
        ),
        (
            lambda x: confusion_matrix([0, 10**9], [0, 1]),
            InvalidArgumentError,
            "largest class index found, 1000000000, asks for 1000000001 classes",
        ),
        (
            lambda x: confusion_matrix([0, 1], [0, 1], num_classes=10**9),
            InvalidArgumentError,
            "num_classes=1000000000 asks",
        ),
        (
            lambda x: confusion_matrix([0, 1], [0, 1], class_names=["a"]),
            InvalidArgumentError,
            "^confusion_matrix: 1 class_names is too few for class index 1",
        ),
        (
            lambda x: confusion_matrix([0, 2], [0, 1], num_classes=2),
            InvalidArgumentError,
            "num_classes=2 is too few for class index 2",
        ),
        (
            lambda x: confusion_matrix([0, 1, 2], [0, 1, 2], class_names="abc"),
            InvalidArgumentError,
            "class_names must be a list",
        ),
        (lambda x: confusion_matrix(None, None), InvalidInputError, "got NoneType"),
        (
            lambda x: confusion_matrix(torch.zeros(2, dtype=torch.long, device="meta"), [0, 1]),
            InvalidInputError,
            "meta device",
        ),
    ],
)
def test_more_errors(recorded: dict, call: object, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match) as info:
        call(recorded["x"])  # type: ignore[operator]
    assert "dtype" not in str(info.value) or "dtype" in match


def test_huge_channel_counts_draw_what_exists(recorded: dict) -> None:
    fig = feature_map_grid(
        recorded["x"][0], recorded["features"], channels=10**9, mean=MEAN, std=STD
    )
    widest = max(f.shape[1] for f in recorded["features"].values())
    assert len(fig.axes) == 1 + len(recorded["features"]) * widest
