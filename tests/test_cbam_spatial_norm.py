"""CBAMBlock(spatial_norm=True): the authors' spatial step (convolution, BatchNorm, gate).

Laws: the default block is unchanged (no BatchNorm, same state dict keys); with the
norm, training uses batch statistics and moves the running ones exactly as a
hand-written conv + BatchNorm2d(1) + sigmoid does; the spatial step never takes the
fused node (it holds buffers); what BatchNorm cannot do is refused by name. Its exact
equivalence with timm's CbamModule is in test_reference_equivalence.py.
"""

from __future__ import annotations

import tempfile

import pytest
import torch
from _fused_helpers import has_node
from torch import nn

from attnblocks import (
    CBAMBlock,
    InvalidArgumentError,
    InvalidInputError,
    insert_attention,
    load_attention,
    save_attention,
)


def _by_hand(block: CBAMBlock, x: torch.Tensor, norm: nn.BatchNorm2d) -> torch.Tensor:
    """CBAM written out: channel gate, then sigmoid(norm(conv([mean; max]))) (eq. 1-3)."""
    avg, mx = x.mean(dim=(2, 3)), torch.amax(x, dim=(2, 3))
    mlp = lambda z: block.fc2(block.act(block.fc1(z)))  # noqa: E731
    refined = x * torch.sigmoid(mlp(avg) + mlp(mx))[:, :, None, None]
    maps = torch.cat([refined.mean(1, keepdim=True), refined.amax(1, keepdim=True)], dim=1)
    return refined * torch.sigmoid(norm(block.spatial_conv(maps)))


def test_the_default_block_has_no_norm_and_its_old_state_dict_keys() -> None:
    keys = set(CBAMBlock(16).state_dict())
    assert keys == {
        "fc1.weight",
        "fc1.bias",
        "fc2.weight",
        "fc2.bias",
        "spatial_conv.weight",
        "spatial_conv.bias",
    }
    normed = CBAMBlock(16, spatial_norm=True)
    assert normed.spatial_conv.bias is None and isinstance(normed.spatial_norm, nn.BatchNorm2d)
    assert "spatial_norm.running_mean" in normed.state_dict()
    assert "spatial_norm=True" in repr(normed)


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_training_matches_conv_batchnorm_sigmoid_written_by_hand(
    fmt: torch.memory_format,
) -> None:
    torch.manual_seed(0)
    block = CBAMBlock(16, reduction=4, spatial_norm=True)
    norm = nn.BatchNorm2d(1)
    norm.load_state_dict(block.spatial_norm.state_dict())  # type: ignore[union-attr]
    x = torch.randn(4, 16, 9, 9).to(memory_format=fmt)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out = block(xa)
    assert not has_node(out, "SpatialGateFunction")  # a stateful step stays with autograd
    expected = _by_hand(block, xb, norm)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    weights = torch.randn(x.shape)
    (out * weights).sum().backward()
    (expected * weights).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-6)
    state = block.spatial_norm.state_dict()  # type: ignore[union-attr]
    for key, value in norm.state_dict().items():  # the same running statistics
        torch.testing.assert_close(state[key], value)
    assert int(state["num_batches_tracked"]) == 1
    assert block.spatial_norm.weight.grad is not None  # type: ignore[union-attr]
    assert block.spatial_norm.weight.grad.abs().sum() > 0  # type: ignore[union-attr]


def test_eval_uses_the_running_statistics_and_changes_nothing() -> None:
    torch.manual_seed(0)
    block = CBAMBlock(8, reduction=2, spatial_norm=True)
    with torch.no_grad():
        block.spatial_norm.running_mean.fill_(0.3)  # type: ignore[union-attr]
        block.spatial_norm.running_var.fill_(2.0)  # type: ignore[union-attr]
    block.eval()
    before = {k: v.clone() for k, v in block.state_dict().items()}
    x = torch.randn(1, 8, 1, 1)  # one position: fine with running statistics
    norm = nn.BatchNorm2d(1).eval()
    norm.load_state_dict(block.spatial_norm.state_dict())  # type: ignore[union-attr]
    torch.testing.assert_close(block(x), _by_hand(block, x, norm))
    for key, value in block.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_what_batchnorm_cannot_do_is_refused_by_name() -> None:
    block = CBAMBlock(8, spatial_norm=True)
    with pytest.raises(InvalidInputError, match="more than one position"):
        block(torch.randn(1, 8, 1, 1))
    assert block(torch.randn(2, 8, 1, 1)).shape == (2, 8, 1, 1)  # two positions: fine
    assert block(torch.randn(0, 8, 4, 4)).shape == (0, 8, 4, 4)  # nothing to normalise
    assert int(block.spatial_norm.num_batches_tracked) == 1  # type: ignore[union-attr]
    with pytest.raises(InvalidArgumentError, match="not available with spatial_norm=True"):
        CBAMBlock(8, spatial_norm=True, init="identity")
    for bad in ("yes", 1, None):
        with pytest.raises(InvalidArgumentError, match="spatial_norm must be True or False"):
            CBAMBlock(8, spatial_norm=bad)  # type: ignore[arg-type]


def test_saved_and_loaded_with_its_statistics() -> None:
    def backbone() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8))

    net = insert_attention(backbone(), ["1"], block="cbam", reduction=2, spatial_norm=True)
    net.eval()
    net[1].cbam.train()  # only the block: the backbone's statistics stay the saved base's
    net(torch.randn(4, 3, 6, 6))  # the spatial norm's statistics move
    assert net[1].cbam.spatial_norm.running_mean.abs().sum() > 0
    net.eval()
    folder = save_attention(net, tempfile.mkdtemp())
    loaded = load_attention(backbone().eval(), folder)
    x = torch.randn(2, 3, 6, 6)
    assert torch.equal(loaded(x), net(x))
    assert torch.equal(
        loaded[1].cbam.spatial_norm.running_mean, net[1].cbam.spatial_norm.running_mean
    )
