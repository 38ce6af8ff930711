"""insert_se / remove_se over a table of toy models: round trip, identity law, checkpoints."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from _models import LayerNorm2d, TinyResNet, TutorialCNN, small_cnn, trained_like_
from _surgery_helpers import assert_unchanged, se_blocks, snapshot
from torch import nn

from attnblocks import SEBlock
from attnblocks.surgery import (
    insert_attention,
    insert_se,
    plan_se,
    remove_attention,
    remove_se,
)


@dataclass
class Case:
    id: str
    build: Callable[[], nn.Module]
    layers: list[Any]
    input_shape: tuple[int, ...]
    sites: list[str]
    example: bool = False
    kwargs: dict[str, Any] = field(default_factory=dict)


def _seq(*layers: nn.Module) -> nn.Sequential:
    return nn.Sequential(*layers)


CASES = [
    Case("bn-names", small_cnn, ["1", "4"], (2, 3, 8, 8), ["1", "4"]),
    Case("conv-class", small_cnn, [nn.Conv2d], (2, 3, 8, 8), ["0", "3"], kwargs={"reduction": 4}),
    Case("relu-probe", small_cnn, ["2", "5"], (2, 3, 8, 8), ["2", "5"], example=True),
    Case(
        "predicate",
        small_cnn,
        [lambda n, m: isinstance(m, nn.BatchNorm2d) and m.num_features == 16],
        (2, 3, 8, 8),
        ["4"],
    ),
    Case(
        "conv1d",
        lambda: _seq(nn.Conv1d(4, 8, 3, padding=1), nn.BatchNorm1d(8), nn.ReLU()),
        [nn.BatchNorm1d],
        (2, 4, 16),
        ["1"],
    ),
    Case(
        "conv3d-groupnorm",
        lambda: _seq(nn.Conv3d(2, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.SiLU()),
        ["1"],
        (2, 2, 4, 6, 6),
        ["1"],
        kwargs={"hidden_channels": 3, "activation": "silu"},
    ),
    Case(
        "instance-norm",
        lambda: _seq(nn.Conv2d(3, 6, 3), nn.InstanceNorm2d(6, affine=True)),
        ["1"],
        (2, 3, 9, 9),
        ["1"],
    ),
    Case(
        "conv-transpose",
        lambda: _seq(nn.ConvTranspose2d(3, 6, 2, stride=2), nn.BatchNorm2d(6)),
        ["0"],
        (2, 3, 5, 5),
        ["0"],
    ),
    Case(
        "nested-sequential",
        lambda: _seq(
            _seq(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()),
            _seq(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2)),
        ),
        ["0", "1"],
        (2, 3, 8, 8),
        ["0", "1"],
    ),
    Case(
        "root-model",
        lambda: _seq(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)),
        [""],
        (2, 3, 8, 8),
        [""],
    ),
    Case(
        "residual-blocks-probe",
        TinyResNet,
        [r"re:blocks\.\d"],
        (2, 3, 16, 16),
        ["blocks.0", "blocks.1"],
        example=True,
    ),
    Case(
        "se-resnet-style",
        TinyResNet,
        ["blocks.*.bn2", "stem"],
        (2, 3, 16, 16),
        ["stem", "blocks.0.bn2", "blocks.1.bn2"],
    ),
    Case(
        "layernorm2d",
        lambda: _seq(nn.Conv2d(3, 8, 3, padding=1), LayerNorm2d(8)),
        ["1"],
        (2, 3, 8, 8),
        ["1"],
    ),
    Case("tutorial-bn", TutorialCNN, ["bn*"], (2, 3, 32, 32), ["bn1", "bn2", "bn3"]),
    Case(
        "tutorial-conv-probe",
        TutorialCNN,
        ["conv*"],
        (2, 3, 32, 32),
        ["conv1", "conv2", "conv3"],
        example=True,
    ),
]


def _build(case: Case, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    model = trained_like_(case.build(), seed)
    x = torch.randn(case.input_shape, generator=torch.Generator().manual_seed(seed + 1))
    return model, x


def _insert(case: Case, model: nn.Module, x: torch.Tensor, **extra: Any) -> nn.Module:
    example = x if case.example else None
    return insert_se(model, case.layers, example_input=example, **case.kwargs, **extra)


def _site_names(model: nn.Module) -> list[str]:
    return ["" if name == "se" else name.removesuffix(".se") for name in se_blocks(model)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_insert_then_remove_gives_the_original_back(case: Case) -> None:
    model, x = _build(case)
    with torch.no_grad():
        reference = model(x)
    before = snapshot(model)

    assert _insert(case, model, x) is model
    assert _site_names(model) == case.sites
    with torch.no_grad():
        changed = model(x)
    assert changed.shape == reference.shape
    assert not torch.equal(changed, reference)  # the blocks really run

    assert remove_se(model) is model
    assert_unchanged(model, before)
    with torch.no_grad():
        assert torch.equal(model(x), reference)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_identity_insertion_keeps_outputs(case: Case) -> None:
    model, x = _build(case)
    with torch.no_grad():
        reference = model(x)
        _insert(case, model, x, init="identity")
        assert len(se_blocks(model)) == len(case.sites)
        assert (model(x) - reference).abs().max().item() <= 1e-5


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_checkpoint_laws(case: Case) -> None:
    model, x = _build(case)
    original_state = model.state_dict()
    _insert(case, model, x)
    se_keys = [k for k in model.state_dict() if k not in original_state]
    assert se_keys and all(f".{k}".count(".se.") == 1 for k in se_keys)
    assert [k for k in model.state_dict() if k in original_state] == list(original_state)

    # 1. An original checkpoint loads into the rewritten model: only SE keys missing.
    result = model.load_state_dict(original_state, strict=False)
    assert result.unexpected_keys == []
    assert sorted(result.missing_keys) == sorted(se_keys)

    # 2. A rewritten checkpoint loads strictly into a freshly rewritten model.
    fresh, _ = _build(case, seed=7)
    _insert(case, fresh, x)
    fresh.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))

    # 3. ... and into the original architecture with only the SE keys unexpected.
    plain, _ = _build(case, seed=3)
    result = plain.load_state_dict(model.state_dict(), strict=False)
    assert result.missing_keys == [] and sorted(result.unexpected_keys) == sorted(se_keys)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_plan_predicts_the_insertion(case: Case) -> None:
    model, x = _build(case)
    before = snapshot(model)
    plan = plan_se(model, case.layers, example_input=x if case.example else None, **case.kwargs)
    assert_unchanged(model, before)
    params = sum(p.numel() for p in model.parameters())
    _insert(case, model, x)
    assert [site.name for site in plan.sites] == case.sites
    assert plan.params_added == sum(p.numel() for p in model.parameters()) - params
    for site in plan.sites:
        block = model.get_submodule(f"{site.name}.se" if site.name else "se")
        assert isinstance(block, SEBlock)
        assert (block.channels, block.hidden_channels) == (site.channels, site.hidden_channels)


def test_sequential_site_runs_the_block_as_its_last_stage() -> None:
    model, x = _build(CASES[8])  # nested-sequential
    insert_se(model, ["0"])
    assert list(model[0]._modules) == ["0", "1", "2", "se"]
    assert not model[0]._forward_hooks  # the Sequential itself runs it, exactly once
    calls = []
    model[0].se.register_forward_hook(lambda *args: calls.append(1))
    model(x)
    assert calls == [1]


def test_hook_site_runs_the_block_once_on_the_module_output() -> None:
    model, x = _build(CASES[0])
    insert_se(model, ["1"])
    seen: list[torch.Tensor] = []
    model[1].se.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    with torch.no_grad():
        expected = model[1].se(
            torch.nn.functional.batch_norm(
                model[0](x),
                model[1].running_mean,
                model[1].running_var,
                model[1].weight,
                model[1].bias,
                False,
                0.0,
                model[1].eps,
            )
        )
        seen.clear()
        model(x)
    assert len(seen) == 1
    with torch.no_grad():
        assert torch.allclose(model[2](model[1](model[0](x))), expected.relu())


def test_tutorial_cnn_with_se_after_each_conv_stage() -> None:
    """The tutorial's CNNWithSE, written as one call on the unmodified CNN."""
    model = TutorialCNN().eval()
    insert_se(model, ["bn1", "bn2", "bn3"], reduction=16)
    assert [
        (n, m.channels, m.hidden_channels)
        for n, m in model.named_modules()
        if isinstance(m, SEBlock)
    ] == [("bn1.se", 32, 2), ("bn2.se", 64, 4), ("bn3.se", 128, 8)]
    assert model(torch.randn(4, 3, 32, 32)).shape == (4, 10)


def test_other_block_kinds_at_the_same_site_and_selective_removal() -> None:
    class ChannelScale(nn.Module):
        def __init__(self, channels: int, *, start: float = 1.0) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.full((channels,), start))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.scale.view(1, -1, 1, 1)

    model, x = _build(CASES[0])
    before = snapshot(model)
    insert_se(model, ["1"], init="identity")
    insert_attention(model, ["1"], block=ChannelScale, start=2.0)
    assert list(model[1]._modules) == ["se", "channelscale"]
    bn_out = model[1](model[0](x))  # BN -> SE (identity) -> scale by 2
    with torch.no_grad():
        assert torch.allclose(
            bn_out,
            2
            * torch.nn.functional.batch_norm(
                model[0](x),
                model[1].running_mean,
                model[1].running_var,
                model[1].weight,
                model[1].bias,
                False,
                0.0,
                model[1].eps,
            ),
            atol=1e-5,
        )
    remove_se(model)
    assert list(model[1]._modules) == ["channelscale"]
    remove_attention(model)
    assert_unchanged(model, before)


def test_custom_name_and_remove_by_class() -> None:
    model, x = _build(CASES[0])
    before = snapshot(model)
    insert_attention(model, ["1", "4"], name="attention", reduction=2)
    assert [n for n, m in model.named_modules() if isinstance(m, SEBlock)] == [
        "1.attention",
        "4.attention",
    ]
    assert model(x).shape == (2, 4)
    remove_attention(model, block=SEBlock)
    assert_unchanged(model, before)


def test_remove_on_an_untouched_model_changes_nothing() -> None:
    model, _ = _build(CASES[0])
    before = snapshot(model)
    remove_se(model)
    remove_attention(model)
    assert_unchanged(model, before)


def test_user_hooks_survive_insert_and_remove() -> None:
    model, x = _build(CASES[0])
    calls: list[str] = []
    model[1].register_forward_hook(lambda *a: calls.append("user"))
    before = snapshot(model)
    insert_se(model, ["1"])
    remove_se(model)
    assert_unchanged(model, before)
    model(x)
    assert calls == ["user"]


def test_blocks_follow_the_site_device_and_dtype() -> None:
    model = small_cnn().double()
    insert_se(model, ["1"])
    assert model[1].se.fc1.weight.dtype == torch.float64
    assert model(torch.randn(2, 3, 8, 8, dtype=torch.float64)).dtype == torch.float64


def test_probe_keeps_training_flags_and_running_statistics() -> None:
    model = small_cnn().train()
    model[4].eval()  # mixed modes must come back exactly
    before = snapshot(model)
    plan_se(model, ["2"], example_input=torch.randn(2, 3, 8, 8))
    assert_unchanged(model, before)
    insert_se(model, ["2"], example_input=torch.randn(2, 3, 8, 8))
    remove_se(model)
    assert_unchanged(model, before)  # BN running stats untouched, flags identical


def test_plan_leaves_the_global_random_state_alone() -> None:
    model = small_cnn()
    state = torch.get_rng_state()
    plan_se(model, ["1", "4"])
    assert torch.equal(torch.get_rng_state(), state)
