"""CBAM's fused spatial node (``_spatial_gate``) against its plain path.

The plain path (``fast_path = False``) is the block's modules under plain autograd; the
fused node must give the same outputs and the same gradients of the input and of every
parameter, to the standard of the other fused nodes (test_fused_gate.py,
test_fused_coord.py). Every test checks which path ran, so a silent fallback cannot
make it pass.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable

import pytest
import torch
from _fused_helpers import (
    assert_close_bf16,
    assert_close_f32,
    compare_with_plain_twin,
    has_format,
    has_node,
    module_gradients,
    plain_twin,
    to_format,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.checkpoint import checkpoint

from attnblocks import CBAMBlock
from attnblocks.blocks._ops import count_true
from attnblocks.blocks._spatial_gate import channel_pools, try_spatial_fused

FORMATS = ["contiguous", "channels_last"]


def make(channels: int = 8, dtype: torch.dtype = torch.float32, **kwargs: object) -> CBAMBlock:
    torch.manual_seed(11)
    kwargs.setdefault("reduction", 2)
    return CBAMBlock(channels, **kwargs).to(dtype)  # type: ignore[arg-type]


def took_fused_path(out: torch.Tensor) -> bool:
    """Whether the spatial-gate node is in the graph of ``out``."""
    return has_node(out, "SpatialGateFunction")


gradients = module_gradients


def compare(
    block: nn.Module,
    x: torch.Tensor,
    grad_out: torch.Tensor,
    check: Callable[[torch.Tensor | None, torch.Tensor | None], None] = assert_close_f32,
) -> None:
    """Fused block against its plain twin: output, every gradient, every buffer."""
    compare_with_plain_twin(block, x, grad_out, "SpatialGateFunction", check)


@settings(deadline=None, max_examples=40)
@given(
    n=st.integers(1, 4),
    c=st.integers(1, 24),
    h=st.integers(1, 9),
    w=st.integers(1, 9),
    fmt=st.sampled_from(FORMATS),
    kernel=st.sampled_from([1, 3, 7]),
    relu=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_fused_matches_the_plain_path_outputs_and_gradients(
    n: int, c: int, h: int, w: int, fmt: str, kernel: int, relu: bool, seed: int
) -> None:
    torch.manual_seed(seed)
    block = CBAMBlock(c, hidden_channels=2, spatial_kernel_size=kernel)
    x = torch.randn(n, c, h, w)
    if relu:  # a ReLU map: where every channel is <= 0, all of them tie at the maximum 0
        x = x.clamp_min(0)
    x = to_format(x, fmt)
    grad_out = to_format(torch.randn(n, c, h, w), fmt)
    plain = plain_twin(block)
    out, grads = gradients(block, x, grad_out)
    ref, ref_grads = gradients(plain, x, grad_out)
    assert took_fused_path(out)
    assert has_format(out, fmt) and grads[0] is not None and has_format(grads[0], fmt)
    # The forward makes the plain path's operations in its order: bitwise equal.
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    for got, expected in zip(grads, ref_grads, strict=True):
        assert_close_f32(got, expected)


def test_tied_maxima_share_the_gradient_as_amax_does() -> None:
    block = make(channels=6)
    plain = plain_twin(block)
    # Small integers: many channels hold the same maximum at a position.
    x = torch.randint(-2, 3, (2, 6, 5, 5)).float()
    hits = x == x.amax(dim=1, keepdim=True)
    assert (hits.sum(dim=1) > 1).any()
    grad_out = torch.randn(2, 6, 5, 5)
    compare(block, x, grad_out)
    # The gate of the maximum map alone (the centre tap): all of the pools' gradient
    # goes through the maximum, split among the tied channels.
    for module in (block, plain):
        with torch.no_grad():
            k = module.spatial_kernel_size // 2
            module.spatial_conv.weight.zero_()
            module.spatial_conv.weight[0, 1, k, k] = 1.0
    compare(block, x, grad_out)


@pytest.mark.parametrize("fmt", FORMATS)
def test_gradcheck_float64(fmt: str) -> None:
    block = make(4, torch.float64, spatial_kernel_size=3)
    names = [n for n, _ in block.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for p in block.parameters())
    x = to_format(torch.randn(2, 4, 3, 4, dtype=torch.float64), fmt).requires_grad_(True)

    def fn(x: torch.Tensor, *ps: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(block, dict(zip(names, ps, strict=True)), (x,))

    assert took_fused_path(fn(x, *params))
    assert torch.autograd.gradcheck(fn, (x, *params))
    # Random projections (fast_mode): the full second-order check takes minutes.
    assert torch.autograd.gradgradcheck(fn, (x, *params), fast_mode=True)


def test_double_backward_matches_plain_autograd() -> None:
    block = make(8, torch.float64)
    plain = plain_twin(block)
    x = torch.randn(2, 8, 5, 4, dtype=torch.float64)

    def penalty(module: nn.Module) -> list[torch.Tensor | None]:
        xg = x.clone().requires_grad_(True)
        out = module(xg)
        assert took_fused_path(out) == (module is block)
        (gx,) = torch.autograd.grad(out.square().sum(), xg, create_graph=True)
        return list(
            torch.autograd.grad(gx.square().sum(), [xg, *module.parameters()], allow_unused=True)
        )

    for got, expected in zip(penalty(block), penalty(plain), strict=True):
        assert (got is None) == (expected is None)
        if got is not None:
            torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("fmt", FORMATS)
def test_bfloat16_input_and_autocast_agree_with_the_plain_path(fmt: str) -> None:
    block = make(16)
    x = to_format(torch.randn(3, 16, 9, 7), fmt)
    grad_out = to_format(torch.randn(3, 16, 9, 7), fmt)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        compare(block, x, grad_out, check=assert_close_bf16)
        compare(block, x.to(torch.bfloat16), grad_out.to(torch.bfloat16), check=assert_close_bf16)
    compare(
        block.to(torch.bfloat16),
        x.to(torch.bfloat16),
        grad_out.to(torch.bfloat16),
        check=assert_close_bf16,
    )


def test_float16_channel_sums_of_magnitude_3000_stay_finite() -> None:
    # dL/ds sums grad * x over the channels: 64 x 3000 overflows float16, so the node
    # sums in float32 (and differentiates the maximum in float32).
    block = make(64, reduction=16)  # float32 parameters, float16 input
    x = (3000 + 10 * torch.randn(2, 64, 8, 8)).half().requires_grad_(True)
    fused = try_spatial_fused(block, x)
    assert fused is not None
    out, _ = fused
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    out.float().sum().backward()
    # The spatial step alone in float64, for reference.
    x64 = x.detach().double().requires_grad_(True)
    block64 = copy.deepcopy(block).double()
    (x64 * block64._spatial_gate(x64)).sum().backward()
    assert x.grad is not None and x64.grad is not None and torch.isfinite(x.grad).all()
    scale = float(x64.grad.abs().max())
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-2, atol=1e-2 * scale)
    pairs = zip(block.spatial_conv.parameters(), block64.spatial_conv.parameters(), strict=True)
    for p, q in pairs:
        assert p.grad is not None and q.grad is not None and torch.isfinite(p.grad).all()
        torch.testing.assert_close(p.grad.double(), q.grad, rtol=1e-2, atol=1e-2)


def test_channel_pools_accumulate_the_mean_in_float32_and_keep_the_maximum_exact() -> None:
    x = torch.randn(2, 300, 3, 3).to(torch.bfloat16)
    avg, maximum = channel_pools(x)
    assert avg.dtype == torch.float32 and maximum.dtype == torch.bfloat16
    torch.testing.assert_close(avg, x.float().mean(dim=1, keepdim=True))
    assert torch.equal(maximum, x.amax(dim=1, keepdim=True))


def test_partial_requires_grad_and_broadcast_grad_output() -> None:
    block, x = make(), torch.randn(3, 8, 4, 5)
    plain = plain_twin(block)
    # out.sum().backward() hands the block an expanded (stride-0) gradient.
    xgrads = []
    for module in (block, plain):
        xg = x.clone().requires_grad_(True)
        out = module(xg)
        assert took_fused_path(out) == (module is block)
        out.sum().backward()
        xgrads.append(xg.grad)
    assert_close_f32(*xgrads)
    for p, q in zip(block.parameters(), plain.parameters(), strict=True):
        assert_close_f32(p.grad, q.grad)
    # Input without grad (first layer): only the parameters' gradients.
    out = block(x)
    assert took_fused_path(out)
    got = torch.autograd.grad(out.square().sum(), list(block.parameters()))
    expected = torch.autograd.grad(plain(x).square().sum(), list(plain.parameters()))
    for g, e in zip(got, expected, strict=True):
        assert_close_f32(g, e)
    # Only the spatial convolution trains: the node still runs, for its parameters.
    block.requires_grad_(False)
    plain.requires_grad_(False)
    block.spatial_conv.requires_grad_(True)
    plain.spatial_conv.requires_grad_(True)
    out = block(x)
    assert took_fused_path(out)
    got = torch.autograd.grad(out.square().sum(), list(block.spatial_conv.parameters()))
    expected = torch.autograd.grad(plain(x).square().sum(), list(plain.spatial_conv.parameters()))
    for g, e in zip(got, expected, strict=True):
        assert_close_f32(g, e)
    # Frozen parameters (fine-tuning the rest): only the input's gradient.
    block.requires_grad_(False)
    plain.requires_grad_(False)
    xg, xp = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out = block(xg)
    assert took_fused_path(out)
    out.square().sum().backward()
    plain(xp).square().sum().backward()
    assert_close_f32(xg.grad, xp.grad)


def test_map_hooks_see_the_map_of_the_plain_path() -> None:
    block = make()
    plain = plain_twin(block)
    seen: list[torch.Tensor] = []
    for module in (block, plain):
        module.register_map_hook(lambda m, attention_map: seen.append(attention_map))
    x = torch.randn(2, 8, 5, 6, requires_grad=True)
    assert took_fused_path(block(x)) and not took_fused_path(plain(x))
    assert len(seen) == 2 and not seen[0].requires_grad and seen[0].shape == (2, 1, 5, 6)
    torch.testing.assert_close(seen[0], seen[1], rtol=0, atol=0)
    torch.testing.assert_close(seen[0], block.spatial_map(x).detach(), rtol=0, atol=0)


def test_identity_init_is_exact_on_the_fused_path() -> None:
    block = make(init="identity")
    x = torch.randn(2, 8, 5, 5, requires_grad=True)
    out = block(x)
    assert took_fused_path(out) and torch.equal(out, x)
    out.square().sum().backward()
    assert all(p.grad is not None for p in block.parameters())
    assert block.spatial_conv.weight.grad is not None
    assert block.spatial_conv.weight.grad.abs().sum() > 0


def test_without_gradients_the_plain_path_runs() -> None:
    block = make()
    x = torch.randn(2, 8, 5, 5)
    with torch.no_grad():
        no_grad = block(x)
    with torch.inference_mode():
        inference = block(x)
    frozen = copy.deepcopy(block).requires_grad_(False)
    for out in (no_grad, inference, frozen(x)):
        assert out.grad_fn is None
    torch.testing.assert_close(no_grad, plain_twin(block)(x).detach(), rtol=0, atol=0)


def test_fallbacks_take_the_plain_path_and_stay_correct() -> None:
    x = torch.randn(2, 8, 4, 4, requires_grad=True)
    block = make()
    expected = plain_twin(block)(x)
    block.fast_path = False
    assert not took_fused_path(block(x))
    # A forward hook on any submodule must still be called.
    for name in ("spatial_conv", "gate", "fc1"):
        hooked = make()
        calls: list[str] = []
        getattr(hooked, name).register_forward_hook(lambda *args, c=calls: c.append("hook"))
        out = hooked(x)
        assert not took_fused_path(out) and calls
        assert_close_f32(out, expected)
    # A global module hook, likewise.
    handle = nn.modules.module.register_module_forward_hook(lambda *args: None)
    try:
        assert not took_fused_path(make()(x))
    finally:
        handle.remove()
    # A gate with state of its own, or a convolution of another type than the block built.
    stateful = make(gate=nn.PReLU)
    out = stateful(x)
    assert not took_fused_path(out)
    assert_close_f32(out, plain_twin(stateful)(x))

    class Conv(nn.Conv2d):
        pass

    replaced = make()
    replaced.spatial_conv = Conv(2, 1, 7, padding=3)
    out = replaced(x)
    assert not took_fused_path(out)
    assert_close_f32(out, plain_twin(replaced)(x))


def test_meta_tensors_give_shapes() -> None:
    block = make().to("meta")
    x = torch.empty(2, 8, 8, 6, device="meta", requires_grad=True)
    out = block(x)
    assert took_fused_path(out) and out.shape == x.shape and out.device.type == "meta"
    out.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape


@pytest.mark.parametrize("shape", [(0, 8, 5, 5), (2, 8, 0, 5), (2, 8, 5, 0)])
def test_empty_input_is_handled_like_the_plain_path(shape: tuple[int, ...]) -> None:
    block = make()
    for module in (block, plain_twin(block)):
        x = torch.randn(shape, requires_grad=True)
        out = module(x)
        assert not took_fused_path(out)
        out.sum().backward()
        assert out.shape == x.shape and x.grad is not None and x.grad.shape == x.shape


def test_retain_graph_and_a_second_backward() -> None:
    block = make()
    x = torch.randn(2, 8, 5, 5, requires_grad=True)
    out = block(x)
    assert took_fused_path(out)
    grad_out = torch.randn_like(out)
    first = torch.autograd.grad(out, x, grad_out, retain_graph=True)[0]
    second = torch.autograd.grad(out, x, grad_out)[0]
    torch.testing.assert_close(first, second, rtol=0, atol=0)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_activation_checkpointing(use_reentrant: bool) -> None:
    block = make()
    plain = plain_twin(block)
    x = torch.randn(2, 8, 8, 8)
    xc, xp = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out = checkpoint(block, xc, use_reentrant=use_reentrant)
    ref = plain(xp)
    out.square().sum().backward()
    ref.square().sum().backward()
    assert_close_f32(out, ref)
    assert_close_f32(xc.grad, xp.grad)
    for p, q in zip(block.parameters(), plain.parameters(), strict=True):
        assert_close_f32(p.grad, q.grad)


def test_torch_func_transforms_fall_back_to_plain_autograd() -> None:
    block = make()
    plain = plain_twin(block)
    x = torch.randn(4, 8, 3, 3)
    params = {n: p.detach() for n, p in block.named_parameters()}

    def per_sample(module: nn.Module) -> dict[str, torch.Tensor]:
        def loss(p: dict, xs: torch.Tensor) -> torch.Tensor:
            return torch.func.functional_call(module, p, (xs[None],)).square().sum()

        return torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, x)

    got, expected = per_sample(block), per_sample(plain)
    for n in params:
        assert_close_f32(got[n], expected[n])
    tangent = torch.randn_like(x)
    _, jvp = torch.func.jvp(block, (x,), (tangent,))
    _, jvp_plain = torch.func.jvp(plain, (x,), (tangent,))
    assert_close_f32(jvp, jvp_plain)


def test_torch_export_records_the_plain_modules() -> None:
    block = make()
    x = torch.randn(2, 8, 5, 5)
    exported = torch.export.export(block, (x,))
    assert "autograd_function" not in exported.graph_module.code
    torch.testing.assert_close(exported.module()(x), plain_twin(block)(x), rtol=0, atol=0)


def test_jit_trace_records_the_plain_modules_and_trains() -> None:
    block = make()
    plain = plain_twin(block)
    x = torch.randn(2, 8, 5, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(block, (x,))
    grad_out = torch.randn_like(x)
    out, grads = gradients(traced, x, grad_out)
    ref, ref_grads = gradients(plain, x, grad_out)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    for got, expected in zip(grads, ref_grads, strict=True):
        assert_close_f32(got, expected)


def test_torch_compile_falls_back_and_stays_correct() -> None:
    block = make()
    plain = plain_twin(block)
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    x = to_format(torch.randn(2, 8, 6, 6), "channels_last")
    grad_out = torch.randn_like(x)
    out, grads = gradients(compiled, x, grad_out)
    ref, ref_grads = gradients(plain, x, grad_out)
    assert_close_f32(out, ref)
    for got, expected in zip(grads, ref_grads, strict=True):
        assert_close_f32(got, expected)


@settings(deadline=None, max_examples=40)
@given(
    shape=st.lists(st.integers(1, 300), min_size=2, max_size=4).filter(
        lambda s: torch.Size(s).numel() <= 200_000
    ),
    density=st.sampled_from([0.0, 0.01, 0.5, 1.0]),
    channels_last=st.booleans(),
    data=st.data(),
)
def test_count_true_is_the_exact_count_of_true_values(
    shape: list[int], density: float, channels_last: bool, data: st.DataObject
) -> None:
    # The uint8 partial sums must not overflow: sizes up to 300 and all-True masks.
    dims = data.draw(st.lists(st.integers(0, len(shape) - 1), min_size=1, unique=True).map(tuple))
    mask = torch.rand(shape) < density
    if channels_last and len(shape) == 4:
        mask = mask.contiguous(memory_format=torch.channels_last)
    got = count_true(mask, dims)
    expected = mask.sum(dim=dims, keepdim=True)
    assert got.dtype == torch.int32 and got.shape == expected.shape
    assert torch.equal(got.long(), expected)
