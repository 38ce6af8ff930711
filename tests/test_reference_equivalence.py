"""Attention inserted into a plain backbone is exactly a reference architecture.

Law: ``insert_attention(backbone, sites, block, **options)`` has the same parameters,
in the same places, as timm's model with that attention built in (after
reshaping timm's 1x1 convolutions to linear layers), and with the reference's weights
copied in gives the same outputs, to float32 rounding (a 1x1 convolution and a linear
layer sum in different orders). timm's SE modules round their width to a multiple of
8 (``rd_divisor=8``): ``divisor=8`` reproduces it, the default flooring does not.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from _models import trained_like_
from torch import nn

from attnblocks import insert_attention
from attnblocks.surgery._record import inserted_sites

timm = pytest.importorskip("timm")

#: timm's CBAM submodule names -> CBAMBlock's
CBAM_NAMES = {
    "channel.fc1.": "fc1.",
    "channel.fc2.": "fc2.",
    "spatial.conv.conv.": "spatial_conv.",
    "spatial.conv.bn.": "spatial_norm.",
}

# (reference, plain backbone, sites, block, options); a reference given as "name+attn"
# is timm's backbone built with that attention layer in every block
CASES: list[tuple[str, str, list[str], str, dict[str, Any]]] = [
    ("seresnet18", "resnet18", ["layer*.*.bn2"], "se", {"divisor": 8}),
    ("seresnet50", "resnet50", ["layer*.*.bn3"], "se", {}),
    ("ecaresnet50d", "resnet50d", ["layer*.*.bn3"], "eca", {}),
    # the authors' CBAM (BatchNorm after the spatial convolution), as timm builds it
    ("resnet18+cbam", "resnet18", ["layer*.*.bn2"], "cbam", {"spatial_norm": True, "bias": False}),
]


def _reference(name: str) -> nn.Module:
    if "+" in name:
        backbone, attn = name.split("+")
        return timm.create_model(backbone, block_args={"attn_layer": attn})
    return timm.create_model(name)


def _copy_reference_weights(reference: nn.Module, ours: nn.Module, attr: str) -> None:
    """Load ``reference``'s state dict into ``ours``: backbone keys as they are, each
    attention module ``<block>.se.*`` into the block inserted in that residual block."""
    blocks = {site.host_name.rsplit(".", 1)[0]: site for site in inserted_sites(ours)}
    state = ours.state_dict()
    assert len(blocks) == sum(1 for n, _ in reference.named_modules() if n.endswith(".se"))
    mapped: dict[str, torch.Tensor] = {}
    for key, value in reference.state_dict().items():
        if ".se." not in key:
            mapped[key] = value
            continue
        owner, rest = key.split(".se.", 1)
        for theirs, mine in CBAM_NAMES.items():
            rest = rest.replace(theirs, mine) if rest.startswith(theirs) else rest
        target = blocks[owner].prefix + rest
        assert state[target].numel() == value.numel(), (key, target)
        mapped[target] = value.reshape(state[target].shape)
    assert set(mapped) == set(state), set(mapped) ^ set(state)
    ours.load_state_dict(mapped, strict=True)


@pytest.mark.parametrize(("reference", "backbone", "sites", "block", "options"), CASES)
def test_inserted_attention_is_the_reference_architecture(
    reference: str, backbone: str, sites: list[str], block: str, options: dict[str, Any]
) -> None:
    torch.manual_seed(0)
    ref = trained_like_(_reference(reference), seed=1).eval()
    ours = insert_attention(timm.create_model(backbone), sites, block=block, **options).eval()
    _copy_reference_weights(ref, ours, block)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    for train in (False, True):  # running statistics, then batch statistics
        ref.train(train)
        ours.train(train)
        with torch.no_grad():
            expected, got = ref(x), ours(x)
        # float32 rounding of a 16-block-deep network, relative to its largest output
        scale = expected.abs().max().item()
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * scale)
    for key, value in ref.state_dict().items():  # the training pass moved the same stats
        if "running_" in key and ".se." not in key:
            torch.testing.assert_close(ours.state_dict()[key], value, rtol=1e-4, atol=1e-5)
    ours.eval()
    # and the attention matters here: with it knocked out the outputs move
    with torch.no_grad():
        for site in inserted_sites(ours):
            for p in site.block.parameters():
                p.zero_()
        assert not torch.allclose(ours(x), expected, rtol=1e-3, atol=1e-3)


def test_without_divisor_the_se_widths_are_not_timms() -> None:
    ours = insert_attention(timm.create_model("resnet18"), ["layer1.0.bn2"], block="se")
    ref: Callable[[], nn.Module] = lambda: timm.create_model("seresnet18")  # noqa: E731
    width = ref().layer1[0].se.fc1.out_channels
    (site,) = inserted_sites(ours)
    assert (site.block.hidden_channels, width) == (4, 8)  # 64 / 16 floored, and timm's 8
