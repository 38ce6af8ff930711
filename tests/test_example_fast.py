"""The example's speed options: weight EMA, recipe overrides, time to accuracy, timing."""

from __future__ import annotations

import csv
import doctest
import json
import sys
from pathlib import Path

import _cifar_example
import cifar10_se
import pytest
import time_recipes
import torch
from se_cifar import ema as ema_module
from se_cifar import engine as engine_module
from se_cifar import progress as progress_module
from se_cifar import recipes as recipes_module
from se_cifar import rundir as rundir_module
from se_cifar import summary as summary_module
from se_cifar.data import load_cifar10
from se_cifar.ema import WeightEMA
from se_cifar.engine import Interrupted, make_scheduler, train_run
from se_cifar.models import build_model
from se_cifar.recipes import get_recipe, parse_setting
from se_cifar.system import keep_freed_memory
from torch import nn


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _cifar_example.make_image_folder(tmp_path_factory.mktemp("cifar"))


EXAMPLE_MODULES = [ema_module, recipes_module, engine_module, summary_module, progress_module]


@pytest.mark.parametrize("module", [*EXAMPLE_MODULES, rundir_module, cifar10_se])
def test_docstring_examples(module: object) -> None:
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)  # type: ignore[arg-type]
    assert result.attempted > 0 and result.failed == 0


# --- EMA ------------------------------------------------------------------------------------


def test_ema_follows_the_ramped_decay_and_averages_float_buffers() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    ema = WeightEMA(net, decay=0.5)
    start = [t.detach().clone() for t in ema.shadow.state_dict().values()]
    expected = dict(zip(ema.shadow.state_dict(), start, strict=True))
    for t in range(1, 6):
        net.train()
        net(torch.randn(8, 3)).sum().backward()  # moves BN's running stats
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        ema.update(net)
        d = min(0.5, (1 + t) / (10 + t))
        for name, value in net.state_dict().items():
            if value.is_floating_point():
                expected[name] = d * expected[name] + (1 - d) * value
            else:
                expected[name] = value.clone()
    for name, value in ema.shadow.state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=1e-5, atol=1e-6)
    assert int(ema.shadow[1].num_batches_tracked) == 5
    assert not ema.shadow.training
    assert all(not p.requires_grad for p in ema.shadow.parameters())


def test_ema_state_round_trip_and_bad_decay() -> None:
    net = nn.Linear(2, 2)
    ema = WeightEMA(net, decay=0.9)
    ema.update(net)
    other = WeightEMA(nn.Linear(2, 2), decay=0.9)
    other.load_state_dict(ema.state_dict())
    assert other.updates == 1
    assert torch.equal(other.shadow.weight, ema.shadow.weight)
    for bad in (0.0, 1.0, -0.1, 2.0):
        with pytest.raises(ValueError, match=r"decay must be in \(0, 1\)"):
            WeightEMA(net, decay=bad)


def test_ema_run_resumes_exactly_and_keeps_the_evaluated_weights(
    tiny_data: Path, tmp_path: Path
) -> None:
    from test_example_cifar10 import _StopAfter

    train, test = load_cifar10(tiny_data)
    recipe = get_recipe(
        "fast", epochs=2, batch_size=16, precision="fp32", channels_last=False, ema=0.9
    )
    kwargs = dict(
        recipe=recipe, seed=2, train=train, test=test, device=torch.device("cpu"), log=str
    )
    torch.manual_seed(2)
    straight, state = train_run(build_model("se"), checkpoint=tmp_path / "a.pt", **kwargs)
    torch.manual_seed(2)
    with pytest.raises(Interrupted):
        train_run(build_model("se"), checkpoint=tmp_path / "b.pt", progress=_StopAfter(5), **kwargs)
    resumed, state_b = train_run(build_model("se"), checkpoint=tmp_path / "b.pt", **kwargs)
    for (name, a), (_, b) in zip(
        straight.state_dict().items(), resumed.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    assert [r["test_acc"] for r in state.history] == [r["test_acc"] for r in state_b.history]
    # the returned model holds the moving average, which differs from the raw weights
    blob = torch.load(tmp_path / "a.pt", weights_only=False)
    assert blob["ema"]["updates"] == 2 * 4  # 60 images, batch 16: 4 steps per epoch
    shadow = blob["ema"]["shadow"]
    for name, value in straight.state_dict().items():
        assert torch.equal(value, shadow[name]), name
    # elapsed time is recorded, grows, and covers at least the training time
    elapsed = [r["elapsed_s"] for r in state.history]
    assert elapsed == sorted(elapsed) and elapsed[0] > 0
    assert elapsed[-1] >= sum(r["epoch_time_s"] for r in state.history)


# --- learning-rate schedules on short runs -----------------------------------------------


@pytest.mark.parametrize("schedule", ["onecycle", "plateau"])
@pytest.mark.parametrize("epochs", [1, 2, 3])
@pytest.mark.parametrize("steps_per_epoch", [*range(1, 13), 17, 40])
def test_every_run_of_at_least_one_step_gets_a_working_schedule(
    schedule: str, epochs: int, steps_per_epoch: int
) -> None:
    recipe = get_recipe("fast", epochs=epochs, schedule=schedule)
    optimizer = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=recipe.lr, momentum=0.9)
    scheduler = make_scheduler(optimizer, recipe, steps_per_epoch)
    rates = [optimizer.param_groups[0]["lr"]]
    for _ in range(epochs):
        for _ in range(steps_per_epoch):
            optimizer.step()
            if schedule == "onecycle":
                scheduler.step()
            rates.append(optimizer.param_groups[0]["lr"])
        if schedule == "plateau":
            scheduler.step(float("nan"))  # a diverged epoch: still no exception
    trained = rates[:-1]  # the rate of each of the epochs * steps_per_epoch steps
    assert all(0 < r <= recipe.lr * (1 + 1e-9) for r in trained)
    total = epochs * steps_per_epoch
    if schedule == "onecycle" and total >= 3:  # a warm-up to the peak, then down
        peak = trained.index(max(trained))
        assert peak >= 1 and max(trained) == pytest.approx(recipe.lr, rel=0.05)
        assert trained[0] < max(trained) and trained[-1] < max(trained)
    if schedule == "onecycle" and total >= 8:  # the recipe's own 25 % warm-up
        assert isinstance(scheduler, torch.optim.lr_scheduler.OneCycleLR)
        assert scheduler._schedule_phases[0]["end_step"] == 0.25 * total - 1


def test_a_run_without_steps_is_refused_by_name() -> None:
    recipe = get_recipe("fast", epochs=0)
    optimizer = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    with pytest.raises(ValueError, match="at least one step"):
        make_scheduler(optimizer, recipe, 4)


def test_a_four_step_one_cycle_run_trains(tiny_data: Path, tmp_path: Path) -> None:
    # 60 images, batch 15: 4 steps, where OneCycleLR's warm-up used to divide by zero
    train, test = load_cifar10(tiny_data)
    recipe = get_recipe(
        "fast", epochs=1, batch_size=15, precision="fp32", channels_last=False, ema=0.0
    )
    _, state = train_run(
        build_model("baseline"),
        recipe=recipe,
        seed=0,
        train=train,
        test=test,
        device=torch.device("cpu"),
        checkpoint=tmp_path / "run.pt",
        log=str,
    )
    assert state.complete and len(state.iterations) == 4


# --- recipe overrides and time to accuracy --------------------------------------------------


def test_settings_parse_to_field_types_and_bad_ones_are_named() -> None:
    assert parse_setting("weight-decay=1e-4") == ("weight_decay", 1e-4)
    assert parse_setting("epochs=12") == ("epochs", 12)
    assert parse_setting("compile=on") == ("compile", True)
    with pytest.raises(ValueError, match="KEY one of"):
        parse_setting("learning_rate=0.1")
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_setting("ema")
    with pytest.raises(ValueError, match="true or false"):
        parse_setting("test_flip=maybe")
    for bad in ("epochs=0", "batch_size=0", "batch-size=-3"):
        with pytest.raises(ValueError, match="must be >= 1"):
            parse_setting(bad)
    with pytest.raises(SystemExit):
        cifar10_se.parse_args(["--set", "nope=1"])
    with pytest.raises(SystemExit):
        cifar10_se.parse_args(["--targets", "eighty"])
    args = cifar10_se.parse_args(["--set", "ema=0.99", "--targets", "84.7,81.4"])
    assert args.settings == {"ema": 0.99}
    assert args.target_list == pytest.approx([0.814, 0.847])


def test_time_to_accuracy_takes_the_first_epoch_and_adds_loading() -> None:
    rows = [
        {"epoch": 1, "test_acc": 0.80, "elapsed_s": 10.0},
        {"epoch": 2, "test_acc": 0.85, "elapsed_s": 20.0},
        {"epoch": 3, "test_acc": 0.84, "elapsed_s": 30.0},
    ]
    got = summary_module.time_to_accuracy(rows, [0.5, 0.814, 0.849, 0.9], data_s=1.5)
    assert got == {
        "50": {"epoch": 1, "seconds": 11.5},
        "81.4": {"epoch": 2, "seconds": 21.5},
        "84.9": {"epoch": 2, "seconds": 21.5},
        "90": None,
    }


def test_keep_freed_memory_applies_on_linux() -> None:
    assert keep_freed_memory() is sys.platform.startswith("linux")


def test_cli_overrides_reach_the_run_and_its_summary(tiny_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    code = cifar10_se.main(
        [
            "--data-dir",
            str(tiny_data),
            "--arms",
            "baseline",
            "--epochs",
            "2",
            "--ema",
            "0.5",
            "--set",
            "test_flip=false",
            "--set",
            "weight_decay=0",
            "--set",
            "epochs=5",  # the dedicated --epochs 2 wins
            "--targets",
            "0,100",
            "--out",
            str(out),
            "--no-plots",
            "--no-progress",
        ]
    )
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    recipe = summary["recipe"]
    assert recipe["ema"] == 0.5 and recipe["test_flip"] is False and recipe["weight_decay"] == 0
    assert recipe["epochs"] == 2
    run = summary["arms"]["baseline"]["runs"][0]
    assert run["time_to_accuracy"]["0"]["epoch"] == 1
    assert run["time_to_accuracy"]["0"]["seconds"] >= summary["data"]["load_time_s"]
    assert run["time_to_accuracy"]["100"] is None
    saved = json.loads((out / "config.json").read_text())["args"]
    assert saved["settings"] == {"test_flip": False, "weight_decay": 0.0, "epochs": 5}


# --- the timing script ----------------------------------------------------------------------


def test_time_recipes_measures_both_recipes_and_writes_the_table(
    tiny_data: Path, tmp_path: Path
) -> None:
    curve = tmp_path / "tutorial-metrics.csv"
    with curve.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["arm", "seed", "epoch", "test_acc"])
        for epoch, acc in enumerate([0.5, 0.82, 0.83], start=1):
            writer.writerow(["baseline", 0, epoch, acc])
    out = tmp_path / "timing"
    code = time_recipes.main(
        [
            "--data-dir",
            str(tiny_data),
            "--out",
            str(out),
            "--arms",
            "baseline",
            "--tutorial-epochs",
            "1",
            "--tutorial-metrics",
            str(curve),
            "--extra",
            "--epochs 2 --set test_flip=false",
            "--threads",
            "1",
        ]
    )
    assert code == 0
    timing = json.loads((out / "timing.json").read_text())
    assert timing["decode_s"] > 0 and not timing["cache_was_warm"]
    assert (out / ".cache").is_dir()
    tutorial, fast = timing["rows"]
    assert tutorial["recipe"] == "tutorial" and tutorial["extrapolated"]
    assert tutorial["full_time_s"] > 50 * tutorial["epoch_time_s"]
    # the bundled curve first reached 81.4 % at epoch 2: two measured epochs plus loading
    reach = tutorial["time_to"]["81.4"]
    assert reach["reached"] == reach["runs"] == 1
    assert reach["mean_s"] == pytest.approx(2 * tutorial["epoch_time_all_in_s"], rel=0.5)
    assert tutorial["time_to"]["84.7"] is None
    assert fast["recipe"] == "fast" and fast["measured_epochs"] == 2
    # the markdown says how many seeds reached a target, and over what range
    assert time_recipes._fmt_reach(None) == "not reached"
    partial = {"mean_s": 378.0, "min_s": 371.0, "max_s": 385.0, "reached": 4, "runs": 5}
    assert time_recipes._fmt_reach(partial) == "378 s (6.3 min), 4/5 seeds (371-385 s)"
    md = (out / "timing.md").read_text()
    assert "| tutorial | baseline |" in md and "| fast | baseline |" in md
    assert "(extrapolated)" in md
