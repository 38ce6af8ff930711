"""The CIFAR-10 example end to end: data errors, exact resume, and a smoke run of both arms."""

from __future__ import annotations

import csv
import json
import signal
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import _cifar_example
import pytest
import torch
from se_cifar.data import DataError, load_cifar10
from se_cifar.engine import Interrupted, train_run
from se_cifar.models import TutorialCNN, build_model, count_parameters
from se_cifar.recipes import get_recipe
from se_cifar.stats import compare, t_quantile


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _cifar_example.make_image_folder(tmp_path_factory.mktemp("cifar"))


# --- data -----------------------------------------------------------------------------------


def test_image_folder_loads_as_uint8_with_class_names(tiny_data: Path, tmp_path: Path) -> None:
    train, test = load_cifar10(tiny_data, cache_dir=tmp_path)
    assert train.images.shape == (60, 3, 32, 32) and train.images.dtype == torch.uint8
    assert test.images.shape == (20, 3, 32, 32)
    assert train.classes == list(_cifar_example.CLASSES)
    assert torch.equal(train.labels.bincount(), torch.full((10,), 6))
    # the second load comes from the cache and is identical
    again, _ = load_cifar10(tiny_data, cache_dir=tmp_path)
    assert list(tmp_path.glob("*.pt"))
    assert torch.equal(again.images, train.images)


def test_subset_is_class_balanced(tiny_data: Path) -> None:
    train, test = load_cifar10(tiny_data, train_count=20, test_count=10, seed=3)
    assert len(train) == 20 and torch.equal(train.labels.bincount(), torch.full((10,), 2))
    assert len(test) == 10


def test_missing_folder_says_how_to_fix(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"does not exist.*train/ and test/"):
        load_cifar10(tmp_path / "nowhere")
    (tmp_path / "train").mkdir()
    with pytest.raises(DataError, match="no class folders"):
        load_cifar10(tmp_path)


def test_missing_test_split_and_empty_class(tiny_data: Path, tmp_path: Path) -> None:
    (tmp_path / "train" / "cat").mkdir(parents=True)
    (tmp_path / "train" / "cat" / "0.jpg").write_bytes(b"")
    with pytest.raises(DataError, match=r"could not decode .*0\.jpg"):
        load_cifar10(tmp_path)
    (tmp_path / "train" / "dog").mkdir()
    (tmp_path / "train" / "cat" / "0.jpg").unlink()
    with pytest.raises(DataError, match="has no images"):
        load_cifar10(tmp_path)


def test_the_example_reports_data_errors_without_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import cifar10_se

    code = cifar10_se.main(
        ["--data-dir", str(tmp_path / "missing"), "--out", str(tmp_path / "run"), "--no-progress"]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "error: --data-dir" in err and "Traceback" not in err


# --- models -----------------------------------------------------------------------------------


def test_models_match_the_tutorial() -> None:
    base = build_model("baseline")
    se = build_model("se")
    assert isinstance(base, TutorialCNN)
    assert count_parameters(base) == 1_147_914
    # SE after each of the three conv blocks, r = 16: hidden 2, 4, 8 (with biases)
    added = sum(2 * c * (c // 16) + c // 16 + c for c in (32, 64, 128))
    assert count_parameters(se) == count_parameters(base) + added
    x = torch.randn(2, 3, 32, 32)
    assert se(x).shape == (2, 10)


# --- exact resume ---------------------------------------------------------------------------


class _StopAfter:
    """A progress wrapper that presses Ctrl-C (sends SIGINT) after ``n`` batches."""

    def __init__(self, n: int) -> None:
        self.left = n

    def __call__(self, iterable: Iterable[Any], **_: object) -> Iterator[Any]:
        for item in iterable:
            if self.left == 0:
                signal.raise_signal(signal.SIGINT)
            self.left -= 1
            yield item


def test_interrupt_and_resume_give_the_same_model(tiny_data: Path, tmp_path: Path) -> None:
    train, test = load_cifar10(tiny_data)
    recipe = get_recipe("tutorial", epochs=2, batch_size=16, precision="fp32")
    kwargs = dict(
        recipe=recipe,
        seed=5,
        train=train,
        test=test,
        device=torch.device("cpu"),
        log=lambda _: None,
    )

    torch.manual_seed(5)
    straight, state = train_run(build_model("se"), checkpoint=tmp_path / "a.pt", **kwargs)

    torch.manual_seed(5)
    with pytest.raises(Interrupted):
        train_run(build_model("se"), checkpoint=tmp_path / "b.pt", progress=_StopAfter(5), **kwargs)
    assert (tmp_path / "b.pt").exists()
    torch.manual_seed(123)  # the resumed run must not depend on the global seed
    resumed, state_b = train_run(build_model("se"), checkpoint=tmp_path / "b.pt", **kwargs)

    assert state_b.complete and len(state_b.history) == 2
    for (name, a), (_, b) in zip(
        straight.state_dict().items(), resumed.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    assert [r["test_acc"] for r in state.history] == [r["test_acc"] for r in state_b.history]


# --- statistics -----------------------------------------------------------------------------


def test_t_quantiles_and_welch_interval() -> None:
    assert t_quantile(0.975, 1) == pytest.approx(12.706, abs=1e-3)
    assert t_quantile(0.975, 10) == pytest.approx(2.228, abs=1e-3)
    result = compare([0.80, 0.81, 0.82], [0.84, 0.85, 0.86], names=("b", "se"))
    assert result.difference == pytest.approx(0.04)
    assert result.ci_low is not None and result.ci_high is not None
    assert result.ci_low < 0.04 < result.ci_high and result.ci_low > 0
    single = compare([0.8], [0.81])
    assert single.ci_low is None and "fewer than 2" in single.note


# --- smoke run ----------------------------------------------------------------------------------


def test_smoke_run_writes_every_output(tmp_path: Path, tiny_data: Path) -> None:
    import cifar10_se

    data = _cifar_example.REAL_DATA if _cifar_example.REAL_DATA.is_dir() else tiny_data
    out = tmp_path / "run"
    code = cifar10_se.main(
        [
            "--data-dir",
            str(data),
            "--subset",
            "300",
            "--test-subset",
            "100",
            "--epochs",
            "1",
            "--out",
            str(out),
            "--no-progress",
            "--cache-dir",
            str(tmp_path / "cache"),
        ]
    )
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["arms"]) == {"baseline", "se"}
    for arm in ("baseline", "se"):
        info = summary["arms"][arm]
        assert 0.0 <= info["final_test_acc_mean"] <= 1.0
        assert info["runs"][0]["latency"]["batch1"]["latency_ms"] > 0
        assert (out / info["runs"][0]["checkpoint"]).exists()
    assert "comparison" in summary
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert {r["arm"] for r in rows} == {"baseline", "se"}
    assert list(csv.DictReader((out / "iterations.csv").open()))
    figures = sorted((out / "figures").glob("*.png"))
    assert len(figures) >= 8
    from PIL import Image

    for path in figures:
        with Image.open(path) as im:
            assert im.size[0] > 100 and im.size[1] > 100, path.name
    # a second run into the same folder is refused without --overwrite
    with pytest.raises(SystemExit, match="exists and is not empty"):
        cifar10_se.main(["--data-dir", str(data), "--out", str(out), "--no-progress"])
