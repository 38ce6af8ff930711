"""The example's ResNet-20 (issue 17): shapes, parameters, sites, identity arms, a smoke run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import _cifar_example
import pytest
import torch
from se_cifar.models import (
    RESNET20_SITES,
    ResNet20,
    attention_sites,
    build_model,
    count_parameters,
)
from se_cifar.recipes import get_recipe

from attnblocks import AttentionBlock, plan_attention

ARMS = ("se", "se_r4", "eca", "cbam")
SITES = [f"layer{s}.{b}.bn2" for s in (1, 2, 3) for b in range(3)]
CHANNELS = [16] * 3 + [32] * 3 + [64] * 3


def test_resnet20_shapes_and_parameter_count() -> None:
    model = ResNet20()
    # He et al. 2016, option A: 0.27 M; counted by hand: stem 432 + 32, stage 1 14,016,
    # stage 2 51,072, stage 3 203,520, fc 650
    assert count_parameters(model) == 269_722
    assert count_parameters(build_model("baseline", model="resnet20")) == 269_722
    shapes = {}
    hooks = [
        getattr(model, name).register_forward_hook(
            lambda _m, _i, out, name=name: shapes.__setitem__(name, tuple(out.shape))
        )
        for name in ("layer1", "layer2", "layer3")
    ]
    out = model(torch.randn(2, 3, 32, 32))
    for h in hooks:
        h.remove()
    assert out.shape == (2, 10)
    assert shapes == {
        "layer1": (2, 16, 32, 32),
        "layer2": (2, 32, 16, 16),
        "layer3": (2, 64, 8, 8),
    }
    # 6n + 2 = 20 weighted layers: 19 convolutions and the linear layer
    assert sum(isinstance(m, torch.nn.Conv2d) for m in model.modules()) == 19
    assert sum(isinstance(m, torch.nn.Linear) for m in model.modules()) == 1


def test_option_a_shortcut_subsamples_and_zero_pads() -> None:
    block = ResNet20().layer2[0]
    x = torch.randn(2, 16, 32, 32)
    short = block.shortcut(x)
    assert short.shape == (2, 32, 16, 16)
    assert count_parameters(block.shortcut) == 0
    assert torch.equal(short[:, 8:24], x[:, :, ::2, ::2])
    assert not short[:, :8].any() and not short[:, 24:].any()


def test_resnet20_runs_channels_last_in_bfloat16() -> None:
    model = ResNet20().eval()
    x = torch.randn(2, 3, 32, 32)
    ref = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model.to(memory_format=torch.channels_last)(
            x.contiguous(memory_format=torch.channels_last)
        )
    assert low.dtype == torch.bfloat16 and torch.allclose(low.float(), ref, atol=0.1, rtol=0.1)


@pytest.mark.parametrize("arm", ARMS)
def test_every_arm_has_one_block_after_each_residual_branch(arm: str) -> None:
    model = build_model(arm, model="resnet20")
    found = [
        name for name, m in model.named_modules() if isinstance(m, AttentionBlock) and name != ""
    ]
    assert [name.rsplit(".", 1)[0] for name in found] == SITES
    block = "se" if arm == "se_r4" else arm
    options = {"reduction": 4} if arm == "se_r4" else {}
    plan = plan_attention(ResNet20(), RESNET20_SITES, block=block, **options)
    assert [site.name for site in plan.sites] == SITES
    assert count_parameters(model) == 269_722 + plan.params_added
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_se_arms_add_the_expected_parameters() -> None:
    for arm, r in (("se", 16), ("se_r4", 4)):
        added = sum(2 * c * (c // r) + c // r + c for c in CHANNELS)
        assert count_parameters(build_model(arm, model="resnet20")) == 269_722 + added
    assert attention_sites("resnet20") == RESNET20_SITES


@pytest.mark.parametrize("arm", ["se", "se_r4", "eca", "cbam"])
def test_identity_arm_gives_the_plain_resnet_bitwise(arm: str) -> None:
    torch.manual_seed(0)
    base = build_model("baseline", model="resnet20")
    attn = build_model(arm, model="resnet20", init="identity")
    missing, unexpected = attn.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and missing and all(".bn2." in k for k in missing)
    x = torch.randn(4, 3, 32, 32)
    for train in (False, True):
        base.train(train)
        attn.train(train)
        with torch.no_grad():
            assert torch.equal(attn(x), base(x)), (arm, train)


def test_unknown_model_and_arm_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown model 'resnet56'"):
        build_model("baseline", model="resnet56")
    with pytest.raises(ValueError, match="unknown arm 'nope'"):
        build_model("nope", model="resnet20")
    with pytest.raises(ValueError, match="blocks must be an int >= 1, got 0"):
        ResNet20(blocks=0)


def test_model_flag_picks_its_recipe_and_targets() -> None:
    import cifar10_se

    plain = cifar10_se.parse_args([])
    assert (plain.model, plain.recipe, plain.targets) == ("tutorial", "fast", "81.4,84.7")
    res = cifar10_se.parse_args(["--model", "resnet20", "--arms", "baseline,se_r4"])
    assert (res.model, res.recipe, res.targets) == ("resnet20", "resnet20", "90")
    assert res.arm_list == ["baseline", "se_r4"]
    assert cifar10_se.parse_args(["--model", "resnet20", "--recipe", "fast"]).recipe == "fast"
    recipe = get_recipe("resnet20")
    assert (recipe.optimizer, recipe.nesterov, recipe.schedule) == ("sgd", True, "onecycle")
    assert (recipe.batch_size, recipe.weight_decay, recipe.channels_last) == (256, 5e-4, True)
    assert recipe.ema > 0 and recipe.crop_padding == 4 and recipe.flip
    with pytest.raises(SystemExit):
        cifar10_se.parse_args(["--model", "resnet56"])


def test_resnet20_smoke_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import cifar10_se
    from se_cifar.engine import measure_latency

    def quick_latency(*args: Any, batch_size: int, **kwargs: Any) -> dict[str, float]:
        # latency at batch 256 costs seconds per arm and is covered by the tutorial's smoke run
        return measure_latency(*args, batch_size=min(batch_size, 2), **{**kwargs, "repeats": 1})

    monkeypatch.setattr(cifar10_se, "measure_latency", quick_latency)

    data = _cifar_example.make_image_folder(tmp_path / "data", per_class=4, test_per_class=2)
    out = tmp_path / "run"
    code = cifar10_se.main(
        [
            "--data-dir",
            str(data),
            "--model",
            "resnet20",
            "--arms",
            "se",
            "--precision",
            "fp32",  # bf16 + channels_last: see test_resnet20_runs_channels_last_in_bfloat16
            "--no-channels-last",
            "--epochs",
            "1",
            "--batch-size",
            "20",
            "--out",
            str(out),
            "--no-progress",
            "--no-plots",
            "--cache-dir",
            str(tmp_path / "cache"),
        ]
    )
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    config = json.loads((out / "config.json").read_text())
    assert summary["model"] == config["args"]["model"] == "resnet20"
    assert summary["recipe"]["name"] == config["args"]["recipe"] == "resnet20"
    assert summary["recipe"]["epochs"] == 1 and summary["recipe"]["precision"] == "fp32"
    assert summary["arms"]["se"]["params"] == 272_095
    assert "90" in summary["arms"]["se"]["runs"][0]["time_to_accuracy"]
    run = summary["arms"]["se"]["runs"][0]
    assert run["epoch_time_s_median"] == run["epoch_time_s"] > 0  # one epoch
    # the figures' inputs from ResNet-20's feature, Grad-CAM and gate sites; the drawing
    # itself (seconds per figure, the same code as the tutorial's) is stubbed out here
    from se_cifar import report

    import attnblocks.plot

    def nothing(*_: Any, **__: Any) -> Any:
        return _Blank()

    for name in attnblocks.plot.__all__:
        monkeypatch.setattr(attnblocks.plot, name, nothing)
    monkeypatch.setattr(report, "summary_figure", nothing)
    written = report.make_figures(out)
    names = {p.name for p in written}
    assert {"gradcam.png", "gate_profiles_se.png", "feature_maps_se_0.png"} <= names

    # gate_specificity.py: per-site specificity with true and with shuffled labels
    import gate_specificity

    result = gate_specificity.main([str(out), "--out", str(tmp_path / "gates")])
    sites = result["seeds"]["0"]
    assert list(sites) == [f"layer{s}.{b}.bn2.se" for s in (1, 2, 3) for b in range(3)]
    for row in sites.values():
        assert row["specificity"] >= 0 and row["specificity_shuffled_labels"] >= 0
        assert 0 <= row["variance_explained_by_class"] <= 1
        assert 0 < row["mean_gate"] < 1 and 0 <= row["saturation"] <= 1
    assert (tmp_path / "gates" / "gate_profiles_se.png").exists()
    saved = json.loads((tmp_path / "gates" / "gate_specificity.json").read_text())
    assert saved["seeds"] == result["seeds"] and saved["model"] == "resnet20"
    with pytest.raises(SystemExit, match="has the arm 'eca'"):
        gate_specificity.main([str(out), "--arm", "eca", "--out", str(tmp_path / "g2")])


class _Blank:
    def savefig(self, path: Path, **_: Any) -> None:
        Path(path).write_bytes(b"")


def _fake_summary(arm_seeds: dict[str, list[int]], recipe: str = "resnet20") -> dict[str, Any]:
    arms = {
        arm: {
            "params": 1000 + len(arm),
            "runs": [
                {"seed": s, "final_test_acc": 0.9 + s / 100, "best_test_acc": 0.91 + s / 100}
                for s in seeds
            ],
        }
        for arm, seeds in arm_seeds.items()
    }
    return {"recipe": {"name": recipe}, "arms": arms}


def test_compare_takes_any_number_of_run_folders() -> None:
    # The study joins 8 folders in one --compare (examples/resnet20_study.sh).
    import cifar10_se

    folders = [f"runs/s{k}" for k in range(8)]
    args = cifar10_se.parse_args(["--compare", *folders, "--out", "all"])
    assert args.compare == folders and args.out == "all"


def test_merge_arms_joins_seeds_of_one_arm_across_run_folders() -> None:
    from se_cifar.report import merge_arms

    parts = [
        _fake_summary({"baseline": [1], "se": [1]}),
        _fake_summary({"baseline": [0], "se": [0]}),
        _fake_summary({"eca": [0, 2]}),
    ]
    arms = merge_arms(parts, [Path("s1"), Path("s0"), Path("eca")])
    assert sorted(arms) == ["baseline", "eca", "se"]
    assert [r["seed"] for r in arms["baseline"]["runs"]] == [0, 1]
    assert [r["source"] for r in arms["baseline"]["runs"]] == ["s0", "s1"]
    assert arms["baseline"]["final_test_acc_mean"] == pytest.approx(0.905)
    assert arms["baseline"]["final_test_acc_std"] == pytest.approx(0.01 / 2**0.5)
    assert arms["eca"]["best_test_acc_mean"] == pytest.approx(0.92)
    assert arms["se"]["params"] == 1002


def test_merge_arms_refuses_a_seed_twice_and_mixed_recipes() -> None:
    from se_cifar.report import merge_arms

    with pytest.raises(SystemExit, match="seed 0 is in more than one run"):
        merge_arms(
            [_fake_summary({"se": [0]}), _fake_summary({"se": [0, 1]})], [Path("a"), Path("b")]
        )
    with pytest.raises(SystemExit, match="different recipes"):
        merge_arms(
            [_fake_summary({"se": [0]}), _fake_summary({"se": [1]}, recipe="fast")],
            [Path("a"), Path("b")],
        )


def test_seconds_per_epoch_are_each_runs_median_epoch(tmp_path: Path) -> None:
    # A run with a paused epoch (500 s): its time per epoch is its median epoch. Runs
    # recorded without the median get it from their folder's metrics.csv.
    from se_cifar.report import _add_epoch_medians
    from se_cifar.summary import epoch_seconds, write_csv

    rows = [
        {"arm": arm, "seed": seed, "epoch": e, "epoch_time_s": t}
        for arm, seed, times in (("se", 0, [40.0, 41.0, 500.0, 42.0]), ("baseline", 0, [9.0]))
        for e, t in enumerate(times, 1)
    ]
    write_csv(tmp_path / "metrics.csv", rows)
    old = {"seed": 0, "epoch_time_s": 155.75, "source": str(tmp_path)}
    recorded = {"seed": 1, "epoch_time_s": 60.0, "epoch_time_s_median": 43.0}
    moved = {"seed": 2, "epoch_time_s": 70.0, "source": str(tmp_path / "gone")}
    arms = {"se": {"runs": [old, recorded, moved]}}
    _add_epoch_medians(arms)
    assert old["epoch_time_s_median"] == 41.5 and epoch_seconds(old) == 41.5
    assert epoch_seconds(recorded) == 43.0
    assert "epoch_time_s_median" not in moved and epoch_seconds(moved) == 70.0
