"""The fused channel-gating node (``_fused_gate``) in every block that uses it.

SE has its own tests against an independent reference (test_se_fast.py). Here every
other user (ECA, Gather-Excite θ⁻ with global extent, CBAM's channel gate, scSE's cSE
with ``combine="max"``, and SE with a gate that autograd differentiates) is checked
against the same block on its plain path (``fast_path = False``, plain autograd through
the submodules) and by gradcheck in float64, to the standard of the SE tests. Every
test checks that the block really took the fused node, so a silent fallback cannot
make it pass.
"""

from __future__ import annotations

import copy
import warnings
import zlib
from collections.abc import Callable

import pytest
import torch
from _fused_helpers import (
    assert_close_bf16,
    assert_close_f32,
    gradients,
    has_format,
    has_node,
    plain_twin,
    to_format,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from attnblocks import CBAMBlock, ECABlock, GatherExciteBlock, SCSEBlock, SEBlock
from attnblocks.blocks._base import AttentionBlock

# name -> (factory(channels), spatial ranks the block accepts)
USERS: dict[str, tuple[Callable[[int], AttentionBlock], tuple[int, ...]]] = {
    "eca": (lambda c: ECABlock(c, kernel_size=3), (1, 2, 3)),
    "eca_bias_hard_sigmoid": (
        lambda c: ECABlock(c, kernel_size=5, bias=True, gate="hard_sigmoid"),
        (1, 2, 3),
    ),
    "ge_theta_minus": (lambda c: GatherExciteBlock(c), (1, 2, 3)),
    "cbam": (lambda c: CBAMBlock(c, hidden_channels=3, spatial_kernel_size=3), (2,)),
    "cbam_silu_nobias": (
        lambda c: CBAMBlock(
            c, hidden_channels=2, activation="silu", bias=False, spatial_kernel_size=3
        ),
        (2,),
    ),
    "scse_max": (lambda c: SCSEBlock(c, hidden_channels=3, combine="max"), (1, 2, 3)),
    "se_elu": (lambda c: SEBlock(c, hidden_channels=3, activation=nn.ELU), (1, 2, 3)),
}
# Users whose gate has parameters (and whose plain gate can be checked twice).
IDENTITY_USERS = {
    "eca": lambda c: ECABlock(c, kernel_size=3, init="identity"),
    "cbam": lambda c: CBAMBlock(c, hidden_channels=3, spatial_kernel_size=3, init="identity"),
    "scse_max": lambda c: SCSEBlock(c, hidden_channels=3, combine="max", init="identity"),
}
NAMES = sorted(USERS)


def make(name: str, channels: int = 8, dtype: torch.dtype = torch.float32) -> AttentionBlock:
    torch.manual_seed(zlib.crc32(name.encode()) % 1000)  # str hashes vary between runs
    return USERS[name][0](channels).to(dtype)


def took_fused_path(out: torch.Tensor) -> bool:
    """Whether the pooled-gate node is in the graph of ``out``."""
    return has_node(out, "ChannelGateFunction")


def compare(
    block: AttentionBlock,
    x: torch.Tensor,
    grad_out: torch.Tensor,
    check: Callable[..., None] = assert_close_f32,
) -> None:
    """Fused block against its plain twin: output, gradient of x and of every parameter."""
    plain = plain_twin(block)
    out, grads = gradients(block, x, list(block.parameters()), grad_out)
    ref, ref_grads = gradients(plain, x, list(plain.parameters()), grad_out)
    assert took_fused_path(out) and not took_fused_path(ref)
    check(out, ref)
    for got, expected in zip(grads, ref_grads, strict=True):
        check(got, expected)


@st.composite
def cases(draw: st.DrawFn) -> dict[str, object]:
    name = draw(st.sampled_from(NAMES))
    rank = draw(st.sampled_from(USERS[name][1]))
    sizes = draw(st.lists(st.integers(1, 9), min_size=rank, max_size=rank))
    return {
        "name": name,
        "shape": (draw(st.integers(1, 4)), draw(st.integers(1, 24)), *sizes),
        "fmt": draw(st.sampled_from(["contiguous", "channels_last"])),
        "relu_input": draw(st.booleans()),  # ties in CBAM's max pool
        "seed": draw(st.integers(0, 2**16)),
    }


@settings(deadline=None, max_examples=30)
@given(case=cases())
def test_fused_matches_the_plain_path_outputs_and_all_gradients(case: dict) -> None:
    torch.manual_seed(case["seed"])
    shape = case["shape"]
    block = USERS[case["name"]][0](shape[1])
    x = to_format(torch.randn(shape), case["fmt"])
    if case["relu_input"]:
        x = x.relu()
    grad_out = to_format(torch.randn(shape), case["fmt"])
    plain = plain_twin(block)
    out, grads = gradients(block, x, list(block.parameters()), grad_out)
    ref, ref_grads = gradients(plain, x, list(plain.parameters()), grad_out)
    assert took_fused_path(out)
    assert has_format(out, case["fmt"]) and grads[0] is not None
    assert has_format(grads[0], case["fmt"])
    assert_close_f32(out, ref)
    for got, expected in zip(grads, ref_grads, strict=True):
        assert_close_f32(got, expected)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(
    ("shape", "fmt"),
    [
        ((2, 8, 8, 8), "contiguous"),  # >= 64 positions: batch-norm dot product
        ((2, 8, 4, 4), "contiguous"),  # < 64 positions: multiply and sum
        ((2, 8, 8, 8), "channels_last"),  # channels innermost: addcmul
    ],
)
def test_every_backward_kernel_matches_the_plain_path(
    name: str, shape: tuple[int, ...], fmt: str
) -> None:
    block = make(name)
    x = to_format(torch.randn(shape), fmt)
    for grad_out in (to_format(torch.randn(shape), fmt), torch.randn(shape)):
        compare(block, x, grad_out)


@pytest.mark.parametrize("name", sorted(IDENTITY_USERS))
def test_identity_init_is_exact_on_the_fused_path_and_trains(name: str) -> None:
    torch.manual_seed(3)
    block = IDENTITY_USERS[name](8)
    x = torch.randn(2, 8, 5, 5, requires_grad=True)
    out = block(x)
    assert took_fused_path(out)
    assert torch.equal(out, x)
    grad_out = torch.randn_like(x)
    compare(block, x.detach(), grad_out)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
def test_gradcheck_float64(name: str, fmt: str) -> None:
    block = make(name, channels=4, dtype=torch.float64)
    names = [n for n, _ in block.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for p in block.parameters())
    x = to_format(torch.randn(2, 4, 3, 3, dtype=torch.float64), fmt).requires_grad_(True)

    def fn(x: torch.Tensor, *ps: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(block, dict(zip(names, ps, strict=True)), (x,))

    assert took_fused_path(fn(x, *params))
    assert torch.autograd.gradcheck(fn, (x, *params))
    if "hard_sigmoid" not in name:  # PyTorch has no second derivative of hardsigmoid
        # Random projections (fast_mode): the full second-order check takes minutes.
        assert torch.autograd.gradgradcheck(fn, (x, *params), fast_mode=True)


@pytest.mark.parametrize("name", [n for n in NAMES if "hard_sigmoid" not in n])
def test_double_backward_matches_plain_autograd(name: str) -> None:
    block = make(name, channels=8, dtype=torch.float64)
    plain = plain_twin(block)
    x = torch.randn(2, 8, 5, 5, dtype=torch.float64)

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


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
def test_bfloat16_input_and_autocast_agree_with_the_plain_path(name: str, fmt: str) -> None:
    block = make(name)
    x = to_format(torch.randn(3, 8, 9, 9), fmt)
    grad_out = to_format(torch.randn(3, 8, 9, 9), fmt)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        compare(block, x, grad_out, check=assert_close_bf16)
    compare(
        block.to(torch.bfloat16),
        x.to(torch.bfloat16),
        grad_out.to(torch.bfloat16),
        check=assert_close_bf16,
    )


# Not CBAM: its spatial step (plain autograd, the same on both paths) can overflow float16
# at this magnitude on its own; the plain path gives non-finite gradients for some seeds too.
@pytest.mark.parametrize("name", [n for n in NAMES if not n.startswith("cbam")])
def test_float16_of_magnitude_3000_over_64x64_stays_finite(name: str) -> None:
    block = make(name)  # float32 parameters, float16 input
    x = (3000 + 10 * torch.randn(2, 8, 64, 64)).half().requires_grad_(True)
    out = block(x)
    assert took_fused_path(out)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    out.float().sum().backward()  # dL/dgate = 3000 * 4096 per channel: beyond float16's 65504
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in block.parameters())


def test_cbam_max_pool_gradient_is_split_between_ties_as_autograd_does() -> None:
    torch.manual_seed(4)
    block = make("cbam")
    x = torch.randn(2, 8, 6, 6).relu()
    x[0, :3] = 0.0  # whole channels at 0: every position holds the maximum
    x[1, 4, :2, :2] = 5.0  # a four-way tie at the top
    compare(block, x, torch.randn_like(x))


@pytest.mark.parametrize("name", NAMES)
def test_partial_requires_grad_and_broadcast_grad_output(name: str) -> None:
    block, x = make(name), torch.randn(3, 8, 4, 4)
    plain = plain_twin(block)
    # out.sum().backward() hands the block an expanded (stride-0) gradient.
    for module in (block, plain):
        module.zero_grad()
        xg = x.clone().requires_grad_(True)
        out = module(xg)
        assert took_fused_path(out) == (module is block)
        out.sum().backward()
        module.xgrad = xg.grad  # type: ignore[assignment]
    assert_close_f32(block.xgrad, plain.xgrad)  # type: ignore[arg-type]
    for p, q in zip(block.parameters(), plain.parameters(), strict=True):
        assert_close_f32(p.grad, q.grad)
    params = list(block.parameters())
    if params:  # input without grad (first layer): only the parameters' gradients
        out = block(x)
        assert took_fused_path(out)
        got = torch.autograd.grad(out.square().sum(), params)
        expected = torch.autograd.grad(plain(x).square().sum(), list(plain.parameters()))
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


@pytest.mark.parametrize("name", NAMES)
def test_gate_hooks_and_excitation_see_the_fused_gate(name: str) -> None:
    block = make(name)
    seen: list[torch.Tensor] = []
    handle = block.register_gate_hook(lambda module, gate: seen.append(gate))
    x = torch.randn(2, 8, 5, 5, requires_grad=True)
    out = block(x)
    handle.remove()
    assert took_fused_path(out)
    assert len(seen) == 1 and not seen[0].requires_grad
    torch.testing.assert_close(seen[0], block.excitation(x).detach(), rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_without_gradients_the_plain_path_runs(name: str) -> None:
    block = make(name)
    x = torch.randn(2, 8, 5, 5)
    with torch.no_grad():
        no_grad = block(x)
    with torch.inference_mode():
        inference = block(x)
    frozen = copy.deepcopy(block).requires_grad_(False)
    for out in (no_grad, inference, frozen(x)):
        assert out.grad_fn is None
    expected = plain_twin(block)(x).detach()
    if name.startswith("eca"):  # its gate function (shifted sums) replaces the convolution
        assert_close_f32(no_grad, expected)
    else:
        torch.testing.assert_close(no_grad, expected, rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_fallbacks_take_the_plain_path_and_stay_correct(name: str) -> None:
    x = torch.randn(2, 8, 4, 4, requires_grad=True)
    block = make(name)
    expected = plain_twin(block)(x)
    block.fast_path = False  # type: ignore[attr-defined]
    assert not took_fused_path(block(x))
    # A forward hook on any submodule must still be called.
    hooked = make(name)
    calls: list[int] = []
    child = next(iter(hooked.children()))
    child.register_forward_hook(lambda *args: calls.append(1))
    out = hooked(x)
    assert not took_fused_path(out) and calls
    assert_close_f32(out, expected)
    # A global module hook, likewise.
    handle = nn.modules.module.register_module_forward_hook(lambda *args: None)
    try:
        assert not took_fused_path(make(name)(x))
    finally:
        handle.remove()
    # A gate module with parameters: its gradient would be lost.
    stateful = make(name)
    stateful.gate = nn.Sequential(nn.PReLU(), nn.Sigmoid())
    assert not took_fused_path(stateful(x))


def test_scse_add_takes_the_plain_path() -> None:
    # x * (channel + spatial) in one product: measured faster than the fused node's
    # x * channel plus x * spatial in NCHW.
    x = torch.randn(2, 8, 4, 4, requires_grad=True)
    assert not took_fused_path(SCSEBlock(8, hidden_channels=3)(x))


def test_a_module_of_another_type_takes_the_plain_path() -> None:
    torch.manual_seed(5)
    x = torch.randn(2, 8, 4, 4, requires_grad=True)
    eca = ECABlock(8)
    eca.conv = nn.Conv1d(1, 1, 3, padding=1, padding_mode="circular", bias=False)
    assert not took_fused_path(eca(x))
    cbam = make("cbam")

    class Linear(nn.Linear):
        pass

    cbam.fc1 = Linear(8, 3)
    assert not took_fused_path(cbam(x))
    ge = GatherExciteBlock(8, extent=2)  # a local extent is not a pooled gate
    assert not took_fused_path(ge(x))


@pytest.mark.parametrize("name", NAMES)
def test_meta_tensors_give_shapes(name: str) -> None:
    block = make(name).to("meta")
    x = torch.empty(2, 8, 8, 8, device="meta", requires_grad=True)
    out = block(x)
    assert took_fused_path(out) and out.shape == x.shape and out.device.type == "meta"
    out.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape


@pytest.mark.parametrize("name", NAMES)
def test_empty_batch_is_handled_like_the_plain_path(name: str) -> None:
    block = make(name)
    for module in (block, plain_twin(block)):
        x = torch.randn(0, 8, 8, 8, requires_grad=True)
        out = module(x)
        out.sum().backward()
        assert out.shape == x.shape and x.grad is not None and x.grad.shape == x.shape


@pytest.mark.parametrize("name", NAMES)
def test_retain_graph_and_a_second_backward(name: str) -> None:
    block = make(name)
    x = torch.randn(2, 8, 5, 5, requires_grad=True)
    out = block(x)
    assert took_fused_path(out)
    grad_out = torch.randn_like(out)
    first = torch.autograd.grad(out, x, grad_out, retain_graph=True)[0]
    second = torch.autograd.grad(out, x, grad_out)[0]
    torch.testing.assert_close(first, second, rtol=0, atol=0)


@pytest.mark.parametrize("use_reentrant", [False, True])
@pytest.mark.parametrize("name", NAMES)
def test_activation_checkpointing(name: str, use_reentrant: bool) -> None:
    block = make(name)
    plain = plain_twin(block)
    x = torch.randn(2, 8, 8, 8)
    xc, xp = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out = torch.utils.checkpoint.checkpoint(block, xc, use_reentrant=use_reentrant)
    ref = plain(xp)
    out.square().sum().backward()
    ref.square().sum().backward()
    assert_close_f32(out, ref)
    assert_close_f32(xc.grad, xp.grad)
    for p, q in zip(block.parameters(), plain.parameters(), strict=True):
        assert_close_f32(p.grad, q.grad)


@pytest.mark.parametrize("name", NAMES)
def test_torch_func_transforms_fall_back_to_plain_autograd(name: str) -> None:
    block = make(name)
    plain = plain_twin(block)
    x = torch.randn(4, 8, 3, 3)
    params = {n: p.detach() for n, p in block.named_parameters()}

    def per_sample(module: nn.Module) -> dict[str, torch.Tensor]:
        def loss(p: dict, xs: torch.Tensor) -> torch.Tensor:
            return torch.func.functional_call(module, p, (xs[None],)).square().sum()

        return torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, x)

    if params:
        got, expected = per_sample(block), per_sample(plain)
        for n in params:
            assert_close_f32(got[n], expected[n])
    tangent = torch.randn_like(x)
    _, jvp = torch.func.jvp(block, (x,), (tangent,))
    _, jvp_plain = torch.func.jvp(plain, (x,), (tangent,))
    assert_close_f32(jvp, jvp_plain)


@pytest.mark.parametrize("name", NAMES)
def test_torch_export_records_the_plain_modules(name: str) -> None:
    block = make(name).eval()
    x = torch.randn(2, 8, 5, 5)
    exported = torch.export.export(block, (x,))
    assert "autograd_function" not in exported.graph_module.code
    torch.testing.assert_close(exported.module()(x), plain_twin(block)(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["eca", "ge_theta_minus", "cbam", "scse_max"])
def test_jit_trace_records_the_plain_modules_and_trains(name: str) -> None:
    block = make(name)
    plain = plain_twin(block)
    x = torch.randn(2, 8, 5, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(block, (x,))
    grad_out = torch.randn_like(x)
    out, grads = gradients(traced, x, list(traced.parameters()), grad_out)
    ref, ref_grads = gradients(plain, x, list(plain.parameters()), grad_out)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    for got, expected in zip(grads, ref_grads, strict=True):
        assert_close_f32(got, expected)


@pytest.mark.parametrize("name", ["eca", "cbam", "scse_max"])
def test_torch_compile_falls_back_or_traces_and_stays_correct(name: str) -> None:
    # Gates differentiated by autograd fall back to the plain modules under
    # torch.compile; scSE's cSE has SE's hand-written MLP derivative and is traced.
    block = make(name)
    plain = plain_twin(block)
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    x = to_format(torch.randn(2, 8, 6, 6), "channels_last")
    grad_out = torch.randn_like(x)
    out, grads = gradients(compiled, x, list(block.parameters()), grad_out)
    ref, ref_grads = gradients(plain, x, list(plain.parameters()), grad_out)
    assert_close_f32(out, ref)
    for got, expected in zip(grads, ref_grads, strict=True):
        assert_close_f32(got, expected)
