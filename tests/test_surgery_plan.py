"""plan_se / plan_attention: the report's numbers, its table and the paper's SE-ResNet-50."""

from __future__ import annotations

import pytest
import torch
from _models import TutorialCNN, small_cnn
from _surgery_helpers import assert_unchanged, snapshot
from torch import nn

from attnblocks.surgery import AttentionPlan, SitePlan, insert_se, plan_attention, plan_se


def test_plan_rows_and_totals() -> None:
    model = TutorialCNN()
    plan = plan_se(model, ["bn*"], reduction=16)
    assert isinstance(plan, AttentionPlan) and len(plan) == 3
    assert [(s.name, s.module_type, s.channels, s.hidden_channels) for s in plan.sites] == [
        ("bn1", "BatchNorm2d", 32, 2),
        ("bn2", "BatchNorm2d", 64, 4),
        ("bn3", "BatchNorm2d", 128, 8),
    ]
    # SE adds C*h + h (fc1) + h*C + C (fc2) parameters per site.
    expected = [2 * c * h + h + c for c, h in [(32, 2), (64, 4), (128, 8)]]
    assert [s.params for s in plan.sites] == expected
    assert plan.params_added == sum(expected)
    total = sum(p.numel() for p in model.parameters())
    assert plan.model_params == total
    assert plan.params_percent == pytest.approx(100 * sum(expected) / total)
    assert plan.sites[0].channel_source == "BatchNorm2d.num_features"
    assert plan.macs_added is None and plan.model_macs is None


def test_plan_table_text() -> None:
    plan = plan_se(TutorialCNN(), ["bn1", "bn3"])
    text = str(plan)
    lines = text.splitlines()
    assert lines[0] == "SEBlock ('se', init='default') at 2 sites, stored as <site>.se"
    assert lines[1].split() == ["site", "type", "channels", "hidden", "params"]
    assert lines[3].split() == ["bn1", "BatchNorm2d", "32", "2", "162"]
    assert lines[4].split() == ["bn3", "BatchNorm2d", "128", "8", "2,184"]
    assert lines[6].split() == ["total", "2,346"]
    assert lines[7].startswith("parameters: 1,147,914 -> 1,150,260 (+0.20%)")


def test_plan_with_example_input_counts_compute() -> None:
    model = small_cnn(width=8)
    plan = plan_se(model, ["2", "4"], example_input=torch.randn(3, 3, 10, 10), reduction=4)
    relu, bn = plan.sites
    assert (relu.channel_source, bn.channel_source) == (
        "example_input",
        "BatchNorm2d.num_features",
    )
    assert relu.output_shape == (3, 8, 10, 10) and bn.output_shape == (3, 16, 10, 10)
    # MACs per sample of the two fully connected layers: C*h + h*C.
    assert relu.macs == 2 * 8 * 2 and bn.macs == 2 * 16 * 4
    # Elementwise: at least the squeeze (C*H*W) and the scale (C*H*W).
    assert relu.elementwise_ops is not None and relu.elementwise_ops >= 2 * 8 * 100
    assert bn.elementwise_ops is not None and bn.elementwise_ops < 2 * 16 * 100 + 200
    assert plan.macs_added == relu.macs + bn.macs
    # The model's own MACs per batch: two convs and the linear layer.
    conv = 100 * (3 * 8 * 9 + 8 * 16 * 9)
    assert plan.model_macs == 3 * (conv + 16 * 4)
    assert plan.batch_size == 3
    text = str(plan)
    assert "output shape" in text and "(3, 8, 10, 10)" in text
    assert "MACs per sample:" in text and "torch.utils.flop_counter" in text


def test_plan_does_not_touch_the_model() -> None:
    model = TutorialCNN().train()
    before = snapshot(model)
    plan_se(model, ["bn*", "conv*"], example_input=torch.randn(2, 3, 32, 32))
    assert_unchanged(model, before)


def test_plan_attention_with_a_block_class_and_name() -> None:
    class Scale(nn.Module):
        def __init__(self, channels: int) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(channels))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.weight.view(1, -1, 1, 1)

    plan = plan_attention(small_cnn(), [nn.BatchNorm2d], block=Scale, name="scale")
    assert [(s.params, s.hidden_channels) for s in plan.sites] == [(8, None), (16, None)]
    assert plan.attr == "scale" and plan.block == "Scale" and plan.block_name == "scale"
    assert "-" in str(plan).splitlines()[3].split()  # no hidden width


def test_empty_plan_with_strict_false() -> None:
    with pytest.warns(UserWarning):
        plan = plan_se(small_cnn(), ["nothing"], strict=False)
    assert len(plan) == 0 and plan.params_added == 0
    assert "at 0 sites" in str(plan)


def test_site_plan_is_a_frozen_record() -> None:
    site = SitePlan("a", "Conv2d", 8, "Conv2d.out_channels", 1, 25)
    with pytest.raises(AttributeError):
        site.params = 0  # type: ignore[misc]


def test_se_resnet50_matches_the_paper() -> None:
    """Hu et al. 2018, Table 10: SE-ResNet-50 has 28.09 M parameters (ResNet-50: 25.56 M)."""
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet50(weights=None)
    plan = plan_se(model, ["layer*.*.bn3"])
    assert len(plan) == 16
    insert_se(model, ["layer*.*.bn3"])
    total = sum(p.numel() for p in model.parameters())
    assert total == plan.model_params + plan.params_added
    assert abs(total - 28.09e6) / 28.09e6 < 0.01
    assert len([n for n, _ in model.named_modules() if n.endswith("bn3.se")]) == 16


def test_cost_of_a_batchnorm_block_on_a_map_that_gathers_to_one_cell() -> None:
    """The cost is estimated in eval mode: GE-theta's BatchNorm accepts one sample there."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8))
    plan = plan_attention(
        model, ["1"], block="ge", variant="theta", extent=8, example_input=torch.zeros(1, 3, 7, 7)
    )
    # three depthwise 3x3 convolutions of stride 2: 7x7 -> 4x4 -> 2x2 -> 1x1
    assert plan.macs_added == 8 * 9 * (16 + 4 + 1)
    assert model.training  # the model's own mode is untouched


def test_a_block_that_cannot_run_on_meta_gets_no_cost_estimate() -> None:
    """The cost is counted on the meta device; a data-dependent block gets '-', not an error."""

    class DataDependent(nn.Module):
        def __init__(self, channels: int) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(channels))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            scale = float(x.abs().max().item()) or 1.0  # .item() fails on meta tensors
            return x * self.weight.view(1, -1, 1, 1) / scale

    model = small_cnn()
    plan = plan_attention(
        model, [nn.BatchNorm2d], block=DataDependent, example_input=torch.ones(2, 3, 16, 16)
    )
    assert [(s.macs, s.elementwise_ops) for s in plan.sites] == [(None, None), (None, None)]
    assert [s.params for s in plan.sites] == [8, 16]
    assert [s.output_shape is not None for s in plan.sites] == [True, True]
    assert plan.macs_added is None and plan.model_macs is not None
