"""What is specific to each block of the family: the papers' formulas and options.

The shared behaviour (shapes, dtypes, gates, gradients, errors...) is in
``test_block_contract.py``; here each block is checked against its paper: parameter
counts, ECA's kernel-size rule, SimAM's energy against plain numpy, the
gather/excite mapping of GE, and so on.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from attnblocks import (
    CBAMBlock,
    CoordAttentionBlock,
    ECABlock,
    GatherExciteBlock,
    GlobalContextBlock,
    InvalidArgumentError,
    InvalidInputError,
    SCSEBlock,
    SEBlock,
    SimAMBlock,
    create_block,
)
from attnblocks.blocks import eca_kernel_size
from attnblocks.blocks._ops import global_avg_pool

DOCS = Path(__file__).resolve().parent.parent / "docs" / "blocks.rst"


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def rng(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -- ECA ---------------------------------------------------------------------------


def nearest_odd(t: float) -> int:
    """The odd integer nearest to t; the larger one on a tie (independent of the library)."""
    below = math.floor(t)
    candidates = [k for k in range(below - 2, below + 4) if k % 2 == 1 and k > 0]
    return min(candidates, key=lambda k: (abs(k - t), -k))


@pytest.mark.parametrize(("gamma", "beta"), [(2, 1), (2, 2), (3, 1), (1.5, 0.5)])
def test_eca_kernel_size_is_the_nearest_odd_number(gamma: float, beta: float) -> None:
    for channels in range(1, 4097):
        t = abs(math.log2(channels) / gamma + beta / gamma)
        assert eca_kernel_size(channels, gamma, beta) == nearest_odd(t), channels


def test_eca_kernel_sizes_of_common_widths() -> None:
    # k = |log2(C)/2 + 1/2|_odd, eq. 12 with gamma = 2, b = 1
    expected = {16: 3, 32: 3, 64: 3, 128: 5, 256: 5, 512: 5, 1024: 5, 2048: 7}
    assert {c: ECABlock(c).kernel_size for c in expected} == expected


def test_eca_has_exactly_k_parameters() -> None:
    for channels in (1, 3, 64, 256, 2048):
        block = ECABlock(channels)
        assert n_params(block) == block.kernel_size
        assert n_params(ECABlock(channels, bias=True)) == block.kernel_size + 1
    assert n_params(ECABlock(64, kernel_size=9)) == 9


def test_eca_options_are_validated() -> None:
    with pytest.raises(InvalidArgumentError, match=r"odd.*got 4"):
        ECABlock(64, kernel_size=4)
    with pytest.raises(InvalidArgumentError, match="gamma"):
        ECABlock(64, gamma=0)
    with pytest.raises(InvalidArgumentError, match="beta"):
        ECABlock(64, beta=float("nan"))


def test_eca_gate_matches_a_loop_over_channel_neighbours() -> None:
    block = ECABlock(10, kernel_size=5, bias=True).double()
    x = torch.randn(3, 10, 4, 7, generator=rng(), dtype=torch.float64)
    z = x.mean(dim=(2, 3)).numpy()
    w = block.conv.weight.detach().numpy().ravel()
    b = float(block.conv.bias.detach())
    expected = np.zeros_like(z)
    for n in range(3):
        for c in range(10):
            acc = b
            for j in range(5):
                src = c + j - 2
                if 0 <= src < 10:
                    acc += w[j] * z[n, src]
            expected[n, c] = 1 / (1 + np.exp(-acc))
    np.testing.assert_allclose(block.excitation(x).detach().numpy(), expected, rtol=1e-12)
    np.testing.assert_allclose(
        block(x).detach().numpy(), x.numpy() * expected[:, :, None, None], rtol=1e-12
    )


# -- SimAM -------------------------------------------------------------------------


def simam_reference(x: np.ndarray, lam: float) -> np.ndarray:
    """Eq. 16-17 of the paper, written out per channel in numpy."""
    out = np.empty_like(x)
    for n in range(x.shape[0]):
        for c in range(x.shape[1]):
            t = x[n, c]
            m = t.size
            mu = t.mean()
            var = ((t - mu) ** 2).sum() / (m - 1) if m > 1 else 0.0
            energy = 4 * (var + lam) / ((t - mu) ** 2 + 2 * var + 2 * lam)
            out[n, c] = t / (1 + np.exp(-1 / energy))
    return out


@settings(max_examples=15, deadline=None)
@given(
    shape=st.lists(st.integers(1, 5), min_size=1, max_size=3),
    lam=st.sampled_from([1e-4, 1e-2, 1.0]),
    seed=st.integers(0, 2**16),
)
def test_simam_matches_numpy_energy(shape: list[int], lam: float, seed: int) -> None:
    x = torch.randn(2, 3, *shape, generator=rng(seed), dtype=torch.float64)
    out = SimAMBlock(3, lambda_=lam)(x)
    np.testing.assert_allclose(out.numpy(), simam_reference(x.numpy(), lam), rtol=1e-10)


def test_simam_is_parameter_free_and_single_positions_give_sigmoid_half() -> None:
    block = SimAMBlock(64)
    assert n_params(block) == 0
    assert not block.has_channel_gate
    x = torch.randn(2, 64, 1, 1, generator=rng())
    torch.testing.assert_close(block(x), x * torch.sigmoid(torch.tensor(0.5)))
    with pytest.raises(InvalidArgumentError, match="lambda_"):
        SimAMBlock(64, lambda_=0)


def test_simam_half_input_matches_float32_computation() -> None:
    x = torch.randn(2, 4, 64, 64, generator=rng()).half()
    expected = SimAMBlock(4)(x.float()).half()
    torch.testing.assert_close(SimAMBlock(4)(x), expected, rtol=0, atol=0)


# -- CBAM --------------------------------------------------------------------------


@pytest.mark.parametrize(("channels", "reduction"), [(256, 16), (64, 16), (48, 8), (8, 16)])
def test_cbam_parameter_count(channels: int, reduction: int) -> None:
    hidden = max(1, channels // reduction)
    mlp = 2 * channels * hidden  # the shared MLP's weights, 2 C^2 / r
    spatial = 2 * 7 * 7 + 1
    block = CBAMBlock(channels, reduction=reduction)
    assert n_params(block) == mlp + hidden + channels + spatial
    assert n_params(CBAMBlock(channels, reduction=reduction, bias=False)) == mlp + spatial


def test_cbam_spatial_convolution_is_7x7_from_two_maps() -> None:
    conv = CBAMBlock(32).spatial_conv
    assert (conv.in_channels, conv.out_channels) == (2, 1)
    assert conv.kernel_size == (7, 7) and conv.padding == (3, 3)
    assert CBAMBlock(32, spatial_kernel_size=3).spatial_conv.kernel_size == (3, 3)
    with pytest.raises(InvalidArgumentError, match="odd"):
        CBAMBlock(32, spatial_kernel_size=6)


def test_cbam_matches_its_equations() -> None:
    torch.manual_seed(0)
    block = CBAMBlock(16, reduction=4).double()
    x = torch.randn(2, 16, 9, 11, generator=rng(), dtype=torch.float64)

    def mlp(z: torch.Tensor) -> torch.Tensor:
        return block.fc2(torch.relu(block.fc1(z)))

    m_c = torch.sigmoid(mlp(x.mean(dim=(2, 3))) + mlp(x.amax(dim=(2, 3))))  # eq. 2
    refined = x * m_c[:, :, None, None]
    maps = torch.cat([refined.mean(1, keepdim=True), refined.amax(1, keepdim=True)], 1)
    conv = block.spatial_conv
    m_s = torch.sigmoid(F.conv2d(maps, conv.weight, conv.bias, padding=3))  # eq. 3
    torch.testing.assert_close(block(x), refined * m_s)
    torch.testing.assert_close(block.spatial_map(x), m_s)


@pytest.mark.parametrize("rank", [1, 3])
def test_cbam_refuses_other_ranks_saying_why(rank: int) -> None:
    with pytest.raises(InvalidInputError, match=r"2D feature maps \(N, C, H, W\) only"):
        CBAMBlock(8)(torch.randn(2, 8, *([4] * rank)))


# -- scSE --------------------------------------------------------------------------


def test_scse_parameter_count() -> None:
    for channels, reduction in [(256, 16), (64, 2), (8, 16)]:
        hidden = max(1, channels // reduction)
        cse = 2 * channels * hidden + hidden + channels
        sse = channels + 1
        assert n_params(SCSEBlock(channels, reduction=reduction)) == cse + sse


@pytest.mark.parametrize("combine", ["add", "max"])
def test_scse_combines_its_branches(combine: str) -> None:
    block = SCSEBlock(12, reduction=3, combine=combine).double()
    x = torch.randn(2, 12, 5, 3, 4, generator=rng(), dtype=torch.float64)
    c = torch.sigmoid(block.fc2(torch.relu(block.fc1(x.mean(dim=(2, 3, 4))))))
    w = block.spatial_proj.weight[0]
    s = torch.sigmoid(torch.einsum("ncdhw,c->ndhw", x, w) + block.spatial_proj.bias)[:, None]
    x_cse, x_sse = x * c[:, :, None, None, None], x * s
    expected = x_cse + x_sse if combine == "add" else torch.maximum(x_cse, x_sse)
    torch.testing.assert_close(block(x), expected)


def test_scse_identity_scales_differ_by_combination() -> None:
    assert SCSEBlock(8, init="identity").gate_scale == 1.0  # 1/2 + 1/2
    assert SCSEBlock(8, combine="max", init="identity").gate_scale == 2.0
    with pytest.raises(InvalidArgumentError, match="bias=True"):
        SCSEBlock(8, bias=False, init="identity")
    with pytest.raises(InvalidArgumentError, match=r"combine.*\['add', 'max'\]"):
        SCSEBlock(8, combine="mean")  # type: ignore[arg-type]


# -- Coordinate Attention ------------------------------------------------------------


@pytest.mark.parametrize("channels", [16, 256, 512, 1024])
def test_coord_parameter_count(channels: int) -> None:
    m = max(8, channels // 32)
    expected = channels * m + m + 2 * m + 2 * (m * channels + channels)
    block = CoordAttentionBlock(channels)
    assert block.hidden_channels == m
    assert n_params(block) == expected
    assert CoordAttentionBlock(channels, hidden_channels=4).hidden_channels == 4


def test_coord_gates_factorise_over_rows_and_columns() -> None:
    block = CoordAttentionBlock(8).double().eval()
    x = torch.randn(1, 8, 6, 5, generator=rng(), dtype=torch.float64)
    g_h, g_w = block.coordinate_maps(x)
    torch.testing.assert_close(block(x), x * g_h * g_w)
    bumped = x.clone()
    bumped[0, :, 2, 3] += 5.0
    b_h, b_w = block.coordinate_maps(bumped)
    rows = (b_h - g_h).abs().amax(dim=(0, 1, 3))
    cols = (b_w - g_w).abs().amax(dim=(0, 1, 2))
    assert rows[2] > 0 and cols[3] > 0
    assert torch.equal(rows.nonzero().flatten(), torch.tensor([2]))
    assert torch.equal(cols.nonzero().flatten(), torch.tensor([3]))


def test_coord_is_2d_only_and_has_no_identity_init() -> None:
    with pytest.raises(InvalidInputError, match="height and width"):
        CoordAttentionBlock(8)(torch.randn(2, 8, 4, 4, 4))
    with pytest.raises(InvalidArgumentError, match="BatchNorm"):
        CoordAttentionBlock(8, init="identity")  # type: ignore[arg-type]


# -- Gather-Excite -------------------------------------------------------------------


def ge_local_reference(x: np.ndarray, extent: int) -> np.ndarray:
    """GE-theta-minus with extent e: every position gated by the mean of its e-window."""
    out = np.empty_like(x)
    for index in np.ndindex(*x.shape[2:]):
        window = tuple(slice((i // extent) * extent, (i // extent + 1) * extent) for i in index)
        context = x[(slice(None), slice(None), *window)]
        mean = context.reshape(*x.shape[:2], -1).mean(axis=2)
        out[(slice(None), slice(None), *index)] = x[(slice(None), slice(None), *index)] / (
            1 + np.exp(-mean)
        )
    return out


@settings(max_examples=15, deadline=None)
@given(
    shape=st.lists(st.integers(1, 7), min_size=1, max_size=3),
    extent=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_ge_theta_minus_local_extent_matches_window_means(
    shape: list[int], extent: int, seed: int
) -> None:
    x = torch.randn(2, 3, *shape, generator=rng(seed), dtype=torch.float64)
    block = GatherExciteBlock(3, extent=extent)
    assert n_params(block) == 0 and not block.has_channel_gate
    np.testing.assert_allclose(block(x).numpy(), ge_local_reference(x.numpy(), extent), rtol=1e-12)


def test_ge_theta_minus_global_is_a_parameter_free_channel_gate() -> None:
    block = GatherExciteBlock(6)
    x = torch.randn(2, 6, 3, 4, 5, generator=rng())
    assert n_params(block) == 0 and block.has_channel_gate
    gate = torch.sigmoid(x.mean(dim=(2, 3, 4)))
    torch.testing.assert_close(block(x), x * gate[..., None, None, None])


@pytest.mark.parametrize("extent", [2, 4, 8])
def test_ge_theta_parameter_count_and_gather_layout(extent: int) -> None:
    c = 32
    steps = int(math.log2(extent))
    block = GatherExciteBlock(c, variant="theta", extent=extent)
    assert n_params(block) == steps * (9 * c + 2 * c)
    convs = [m for m in block.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == steps
    assert all(m.groups == c and m.stride == (2, 2) and m.kernel_size == (3, 3) for m in convs)
    x = torch.randn(2, c, 11, 9, generator=rng())
    gate = block.eval().excitation(x)
    assert gate.shape == x.shape
    # each gathered cell covers an extent x extent tile of positions
    tile = gate[:, :, :extent, :extent]
    assert torch.equal(tile, tile[:, :, :1, :1].expand_as(tile))


def test_ge_theta_global_extent_uses_a_full_size_depthwise_kernel() -> None:
    c, h, w = 16, 7, 5
    block = GatherExciteBlock(c, variant="theta", spatial_size=(h, w))
    assert n_params(block) == c * h * w + 2 * c
    assert block.has_channel_gate
    assert block(torch.randn(2, c, h, w)).shape == (2, c, h, w)
    with pytest.raises(InvalidInputError, match="7x5"):
        block(torch.randn(2, c, 5, 7))


def test_ge_theta_plus_adds_an_se_mlp() -> None:
    c, r = 64, 16
    hidden = c // r
    mlp = 2 * c * hidden + hidden + c
    assert n_params(GatherExciteBlock(c, variant="theta_plus", extent=2)) == 11 * c + mlp
    assert n_params(GatherExciteBlock(c, variant="theta_plus", spatial_size=4)) == 18 * c + mlp


def test_ge_options_are_validated() -> None:
    with pytest.raises(InvalidArgumentError, match="power of two"):
        GatherExciteBlock(8, variant="theta", extent=3)
    with pytest.raises(InvalidArgumentError, match="spatial_size"):
        GatherExciteBlock(8, variant="theta")
    with pytest.raises(InvalidArgumentError, match="only used"):
        GatherExciteBlock(8, spatial_size=4)
    with pytest.raises(InvalidArgumentError, match="variant"):
        GatherExciteBlock(8, variant="theta-")  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="2D feature maps"):
        GatherExciteBlock(8, variant="theta", extent=2)(torch.randn(2, 8, 4, 4, 4))
    with pytest.raises(InvalidInputError, match="more than one value per channel"):
        GatherExciteBlock(8, variant="theta", extent=4).train()(torch.randn(1, 8, 3, 3))


# -- Global Context --------------------------------------------------------------------


@pytest.mark.parametrize(("channels", "reduction"), [(256, 16), (64, 4), (8, 16)])
def test_gc_parameter_count(channels: int, reduction: int) -> None:
    h = max(2, channels // reduction)
    context = channels  # W_k, no bias
    transform = channels * h + h + 2 * h + h * channels + channels
    block = GlobalContextBlock(channels, reduction=reduction)
    assert block.hidden_channels == h
    assert n_params(block) == context + transform
    with pytest.raises(InvalidArgumentError, match="at least 2"):
        GlobalContextBlock(channels, hidden_channels=1)


@pytest.mark.parametrize("fusion", ["add", "mul"])
def test_gc_matches_its_equations(fusion: str) -> None:
    torch.manual_seed(0)
    block = GlobalContextBlock(12, reduction=4, fusion=fusion).double()
    x = torch.randn(2, 12, 5, 6, generator=rng(), dtype=torch.float64)
    logits = torch.einsum("nchw,c->nhw", x, block.context_mask.weight[0]).flatten(1)
    alpha = logits.softmax(dim=1)
    context = torch.einsum("ncj,nj->nc", x.flatten(2), alpha)
    hidden = torch.relu(F.layer_norm(block.fc1(context), (3,), block.norm.weight, block.norm.bias))
    t = block.fc2(hidden)
    expected = x + t[..., None, None] if fusion == "add" else x * torch.sigmoid(t)[..., None, None]
    torch.testing.assert_close(block(x), expected)
    torch.testing.assert_close(block.context_weights(x).flatten(1), alpha)
    assert block.has_channel_gate is (fusion == "mul")


def test_gc_zero_last_init_is_the_authors_start() -> None:
    x = torch.randn(2, 16, 4, 4, generator=rng())
    assert torch.equal(GlobalContextBlock(16, init="zero_last")(x), x)
    half = GlobalContextBlock(16, fusion="mul", init="zero_last")(x)
    torch.testing.assert_close(half, x * 0.5)
    with pytest.raises(InvalidArgumentError, match="zero_last"):
        GlobalContextBlock(16, init="identity")  # type: ignore[arg-type]


# -- shared helpers and docs ------------------------------------------------------------


def test_half_pooling_accumulates_in_float32() -> None:
    x = torch.ones(1, 2, 300, 300, dtype=torch.float16)
    pooled = global_avg_pool(x)
    assert pooled.dtype == torch.float32
    assert torch.equal(pooled, torch.ones(1, 2))


def expected_table_counts() -> dict[str, tuple[int, int]]:
    """(parameters at C=256 and r=16, parameters at C=256 with defaults) per block."""
    counts = {}
    for name in ("se", "eca", "cbam", "scse", "simam", "coord", "ge", "gc"):
        options = {} if name in ("eca", "simam", "ge") else {"reduction": 16}
        counts[name] = (
            n_params(create_block(name, 256, **options)),
            n_params(create_block(name, 256)),
        )
    return counts


def test_docs_table_matches_the_code() -> None:
    text = DOCS.read_text(encoding="utf-8")
    glance = text[text.index("The blocks at a glance") :]
    glance = glance[: glance.index("\n----", glance.index("\n----") + 5)]  # one section
    rows = re.split(r"\n   \* - ", glance)  # the rows of its list-table
    for name, (at_r16, default) in expected_table_counts().items():
        matching = [row for row in rows if row.startswith(f"``{name}``")]
        assert len(matching) == 1, f"expected one table row for {name}"
        row = matching[0]
        assert f"{at_r16:,}" in row, f"{name}: expected {at_r16:,} parameters in {row!r}"
        assert f"{default:,}" in row, f"{name}: expected {default:,} parameters in {row!r}"
    all_docs = "".join(p.read_text() for p in Path(__file__).parents[1].glob("docs/*.rst"))
    for cls in (
        SEBlock,
        ECABlock,
        CBAMBlock,
        SCSEBlock,
        SimAMBlock,
        CoordAttentionBlock,
        GatherExciteBlock,
        GlobalContextBlock,
    ):
        assert f".. autoclass:: attnblocks.{cls.__name__}" in all_docs, cls.__name__
