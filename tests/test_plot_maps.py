"""spatial_map_overlay: a PNG of the expected size, the numbers it was given, clear errors."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
import torch
from torch import nn

from attnblocks import CBAMBlock, InvalidArgumentError, InvalidInputError, SimAMBlock
from attnblocks.inspect import record_maps
from attnblocks.plot import spatial_map_overlay

pytest.importorskip("matplotlib")

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
DPI = 40


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def recorded() -> dict[str, object]:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        CBAMBlock(6, reduction=2),
        nn.Conv2d(6, 6, 3, stride=2, padding=1),
        SimAMBlock(6),
    ).eval()
    images = torch.rand(4, 3, 16, 16)
    x = (images - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)
    with torch.no_grad(), record_maps(net) as rec:
        net(x)
    return {"x": x, "maps": rec.maps}


@pytest.mark.parametrize("normalize", ["site", "none", "image"])
def test_figure_writes_png_of_expected_size(normalize: str, recorded: dict, tmp_path: Path) -> None:
    from matplotlib.figure import Figure

    x, maps = recorded["x"], recorded["maps"]
    fig = spatial_map_overlay(
        x, maps, titles=["a", "b", "c", "d"], normalize=normalize, mean=MEAN, std=STD
    )
    assert isinstance(fig, Figure)
    bars = 2 if normalize == "site" else 1
    assert len(fig.axes) == 3 * 4 + bars  # input row + 2 sites, 4 images, colour bars
    path = tmp_path / f"maps_{normalize}.png"
    fig.savefig(path, dpi=DPI)
    width, height = fig.get_size_inches()
    assert path.stat().st_size > 1000
    got = _png_size(path)
    assert abs(got[0] - width * DPI) < 1 and abs(got[1] - height * DPI) < 1, got
    assert [fig.axes[j].get_title() for j in range(4)] == ["a", "b", "c", "d"]

    fig = spatial_map_overlay(x[0], {"one": maps["1"][:1]}, mean=MEAN, std=STD, figsize=(4, 3))
    fig.savefig(tmp_path / "small.png", dpi=20)
    assert _png_size(tmp_path / "small.png") == (80, 60)


def test_figure_shows_the_given_numbers(recorded: dict) -> None:
    x = recorded["x"][:2]
    low = torch.rand(2, 1, 16, 16) * 0.1
    high = 0.5 + torch.rand(2, 3, 16, 16)  # three channels: shown as their mean (or max)
    fig = spatial_map_overlay(x, {"low": low, "high": high}, upsample="nearest", mean=MEAN, std=STD)
    axes = fig.axes
    row_low, row_high = axes[2:4], axes[4:6]
    torch.testing.assert_close(torch.as_tensor(row_low[1].images[1].get_array()), low[1, 0])
    torch.testing.assert_close(torch.as_tensor(row_high[0].images[1].get_array()), high[0].mean(0))
    # "site": each row on its own range, the raw values
    assert row_low[0].images[1].get_clim() == pytest.approx((float(low.min()), float(low.max())))
    assert row_high[0].images[1].get_clim() == pytest.approx(
        (float(high.mean(1).min()), float(high.mean(1).max()))
    )
    assert "16x16, mean of 3 ch" in row_high[0].get_ylabel()
    assert row_low[0].get_ylabel() == "low\n16x16"
    # the image row shows the un-normalised RGB
    want = (x[0] * torch.tensor(STD).view(3, 1, 1) + torch.tensor(MEAN).view(3, 1, 1)).permute(
        1, 2, 0
    )
    torch.testing.assert_close(torch.as_tensor(axes[0].images[0].get_array()), want.clamp(0, 1))

    fig = spatial_map_overlay(x, {"low": low, "high": high}, normalize="none", reduce="max",
                              mean=MEAN, std=STD)  # fmt: skip
    shared = (float(low.min()), float(high.amax(1).max()))
    assert fig.axes[2].images[1].get_clim() == pytest.approx(shared)
    assert fig.axes[4].images[1].get_clim() == pytest.approx(shared)
    assert "max of 3 ch" in fig.axes[4].get_ylabel()

    fig = spatial_map_overlay(x, {"low": low}, normalize="image", mean=MEAN, std=STD)
    for ax in fig.axes[2:4]:
        values = torch.as_tensor(ax.images[1].get_array())
        assert float(values.min()) == 0.0 and float(values.max()) == pytest.approx(1.0)

    # a constant map (a block at its identity start) still draws
    fig = spatial_map_overlay(x, torch.ones(2, 1, 4, 4), mean=MEAN, std=STD)
    lo, hi = fig.axes[2].images[1].get_clim()
    assert lo < 1.0 < hi


def test_errors(recorded: dict) -> None:
    x, maps = recorded["x"], recorded["maps"]
    with pytest.raises(InvalidInputError, match="one map per image"):
        spatial_map_overlay(x[:3], maps, mean=MEAN, std=STD)
    with pytest.raises(InvalidInputError, match="Only 2D maps"):
        spatial_map_overlay(x, torch.rand(4, 1, 2, 4, 4), mean=MEAN, std=STD)
    with pytest.raises(InvalidInputError, match="floating"):
        spatial_map_overlay(x, torch.ones(4, 1, 4, 4, dtype=torch.int64), mean=MEAN, std=STD)
    with pytest.raises(InvalidInputError, match="empty mapping"):
        spatial_map_overlay(x, {}, mean=MEAN, std=STD)
    with pytest.raises(InvalidArgumentError, match=r"unknown normalize 'shared'.*'site'"):
        spatial_map_overlay(x, maps, normalize="shared", mean=MEAN, std=STD)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match=r"unknown reduce 'sum'"):
        spatial_map_overlay(x, maps, reduce="sum", mean=MEAN, std=STD)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="one title per image"):
        spatial_map_overlay(x, maps, titles=["a"], mean=MEAN, std=STD)
    with pytest.raises(InvalidInputError, match="mean= and std="):
        spatial_map_overlay(x, maps)  # still normalised
