"""Half-type pooling and dot products in float32, reduced a few samples at a time on the CPU.

The chunked path exists for speed only (no full-size float32 copy of a large
bfloat16 feature map); every sample's reduction is the same computation either
way, so chunked and one-call results must be bitwise equal.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnblocks import SEBlock
from attnblocks.blocks import _ops
from attnblocks.blocks._ops import global_avg_pool, global_avg_pool_for, spatial_dot


def _one_call(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_ops, "_CHUNK_ELEMENTS", 1 << 40)


@settings(deadline=None, max_examples=25)
@given(
    n=st.integers(1, 7),
    c=st.integers(1, 9),
    hw=st.integers(1, 9),
    dtype=st.sampled_from([torch.bfloat16, torch.float16]),
    channels_last=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_chunked_equals_one_call_bitwise(
    n: int, c: int, hw: int, dtype: torch.dtype, channels_last: bool, seed: int
) -> None:
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(n, c, hw, hw + 1, generator=gen).to(dtype)
    b = torch.randn(n, c, hw, hw + 1, generator=gen).to(dtype)
    if channels_last:
        a, b = (t.contiguous(memory_format=torch.channels_last) for t in (a, b))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_ops, "_CHUNK_ELEMENTS", 1 << 40)
        pool_ref, dot_ref = global_avg_pool(a), spatial_dot(a, b)
        mp.setattr(_ops, "_CHUNK_ELEMENTS", 2 * c)  # chunks of a sample or a few
        if n > 1:
            assert _ops._batch_chunk(a) is not None
        pool, dot = global_avg_pool(a), spatial_dot(a, b)
    assert pool.dtype == dot.dtype == torch.float32 and pool.shape == (n, c)
    assert torch.equal(pool, pool_ref) and torch.equal(dot, dot_ref)
    # and both are the float32 reductions they claim to be
    torch.testing.assert_close(pool, a.float().mean((2, 3)), rtol=1e-6, atol=1e-6)
    expected = (a * b).float().sum((2, 3))
    torch.testing.assert_close(dot, expected, rtol=1e-5, atol=1e-4)


def test_only_large_cpu_half_inputs_are_chunked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_ops, "_CHUNK_ELEMENTS", 100)
    big = torch.zeros(8, 4, 5, 5)
    assert _ops._batch_chunk(big) is None  # float32: no cast, nothing to save
    assert _ops._batch_chunk(big.to(torch.bfloat16)) == 1
    assert _ops._batch_chunk(big[:1].to(torch.bfloat16)) is None  # one sample
    assert _ops._batch_chunk(big[:, :, :2, :2].to(torch.float16)) == 6  # 128 > 100: 100 // 16
    assert _ops._batch_chunk(big[:, :, :1, :1].to(torch.float16)) is None  # 32 elements
    monkeypatch.setattr(_ops, "_CHUNK_ELEMENTS", 1000)
    assert _ops._batch_chunk(big.to(torch.float16)) is None  # 800 elements: one call
    monkeypatch.setattr(_ops, "_CHUNK_ELEMENTS", 250)
    assert _ops._batch_chunk(big.to(torch.float16)) == 2  # 250 // 100 samples


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_se_block_on_half_inputs_is_unchanged_by_chunking(
    channels_last: bool, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    # float32 weights and no autocast: the MLP runs in float32 on the float32 mean, which
    # is chunked for both half types (and so is the float16 backward's dot product).
    torch.manual_seed(0)
    block = SEBlock(16, reduction=4)
    x = torch.randn(6, 16, 8, 8)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    grad_out = torch.randn_like(x).to(dtype)

    def run() -> tuple[torch.Tensor, ...]:
        xh = x.to(dtype).requires_grad_()
        block.zero_grad(set_to_none=True)
        out = block(xh)
        out.backward(grad_out)
        assert block.fast_path and "ChannelGateFunction" in type(out.grad_fn).__name__
        return (out, xh.grad, *(p.grad for p in block.parameters()))

    _one_call(monkeypatch)
    reference = run()
    calls = 0
    batch_chunk = _ops._batch_chunk

    def counting(t: torch.Tensor) -> int | None:
        nonlocal calls
        chunk = batch_chunk(t)
        calls += chunk is not None
        return chunk

    monkeypatch.setattr(_ops, "_CHUNK_ELEMENTS", 200)  # 1024 elements per sample: 1 per chunk
    monkeypatch.setattr(_ops, "_batch_chunk", counting)
    chunked = run()
    assert calls == (2 if dtype == torch.float16 else 1)  # the mean; float16 also the dot
    for got, expected in zip(chunked, reference, strict=True):
        assert torch.equal(got, expected)


@settings(deadline=None, max_examples=30)
@given(
    n=st.integers(1, 5),
    c=st.integers(1, 9),
    h=st.integers(1, 9),
    w=st.integers(1, 9),
    channels_last=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_pool_for_bfloat16_is_the_float32_accumulated_mean_rounded_once(
    n: int, c: int, h: int, w: int, channels_last: bool, seed: int
) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = (3 * torch.randn(n, c, h, w, generator=gen)).to(torch.bfloat16)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    pooled = global_avg_pool_for(x, torch.bfloat16)
    assert pooled.dtype == torch.float32 and pooled.shape == (n, c)
    exact = x.double().mean((2, 3))  # what a float32 accumulation approximates
    # the bfloat16 sum of a float32 accumulation, rounded once, then divided
    sums = exact * (h * w)
    torch.testing.assert_close(pooled.double() * (h * w), sums, rtol=2**-7, atol=1e-5)
    # after the caller's cast it is the float32 mean rounded to bfloat16, up to one rounding
    rounded = global_avg_pool(x).to(torch.bfloat16)
    torch.testing.assert_close(pooled.to(torch.bfloat16), rounded, rtol=2**-7, atol=1e-6)


def test_pool_for_bfloat16_accumulates_in_float32() -> None:
    # 4096 ones: a bfloat16 accumulator stops at 256 (256 + 1 rounds back to 256)
    ones = torch.ones(2, 3, 64, 64, dtype=torch.bfloat16)
    for x in (ones, ones.contiguous(memory_format=torch.channels_last)):
        assert torch.equal(global_avg_pool_for(x, torch.bfloat16), torch.ones(2, 3))


@pytest.mark.parametrize(
    ("x_dtype", "dtype"),
    [
        (torch.bfloat16, torch.float32),  # a float32 MLP keeps the float32 mean
        (torch.float16, torch.float16),
        (torch.float16, torch.bfloat16),
        (torch.float32, torch.bfloat16),
        (torch.float32, torch.float32),
    ],
)
def test_pool_for_other_dtypes_is_global_avg_pool(x_dtype: torch.dtype, dtype: torch.dtype) -> None:
    x = torch.randn(3, 5, 6, 7).to(x_dtype)
    assert torch.equal(global_avg_pool_for(x, dtype), global_avg_pool(x))
