"""The fused SE path (ChannelGateFunction with MLPRule) against an independent reference.

The reference below is written from the paper's equations with plain tensor ops
(mean -> Linear -> act -> Linear -> gate -> x * s) and differentiated by autograd;
it does not use attnblocks. Every test checks that the block really took the fused
path, so a silent fallback to plain autograd cannot make the tests pass.
"""

from __future__ import annotations

import copy
import io
import pickle
import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from _fused_helpers import assert_close_bf16, assert_close_f32, has_format, to_format
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from attnblocks import SEBlock
from attnblocks._torch_compat import EXPORT_DETECTABLE

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "relu6": F.relu6,
    "silu": F.silu,
    "gelu": F.gelu,
    "leaky_relu": F.leaky_relu,
    "hard_swish": F.hardswish,
    "mish": F.mish,
    "tanh": torch.tanh,
    "identity": lambda h: h,
}
GATES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "sigmoid": torch.sigmoid,
    "hard_sigmoid": F.hardsigmoid,
}


def reference_se(
    x: torch.Tensor,
    block: SEBlock,
    act: str | Callable[[torch.Tensor], torch.Tensor] = "relu",
    gate: str | Callable[[torch.Tensor], torch.Tensor] = "sigmoid",
) -> torch.Tensor:
    """The SE block written out: squeeze, excite, scale, with the block's parameters."""
    act_fn = ACTIVATIONS[act] if isinstance(act, str) else act
    gate_fn = GATES[gate] if isinstance(gate, str) else gate
    spatial = tuple(range(2, x.dim()))
    half = x.dtype in (torch.float16, torch.bfloat16)
    z = x.mean(dim=spatial, dtype=torch.float32 if half else x.dtype)
    z = z.to(block.fc1.weight.dtype)
    h = F.linear(z, block.fc1.weight, block.fc1.bias)
    s = gate_fn(F.linear(act_fn(h), block.fc2.weight, block.fc2.bias))
    s = s * block.gate_scale
    return x * s.to(x.dtype).reshape(*s.shape, *([1] * len(spatial)))


def took_fused_path(out: torch.Tensor) -> bool:
    return out.grad_fn is not None and "ChannelGateFunction" in type(out.grad_fn).__name__


def gradients(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    params: list[torch.Tensor],
    grad_out: torch.Tensor,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    x = x.detach().requires_grad_(True)
    out = fn(x)
    grads = torch.autograd.grad(out, [x, *params], grad_out)
    return out, list(grads)


def make_block(
    channels: int,
    hidden: int,
    act: str,
    gate: str,
    *,
    bias: bool = True,
    init: str = "default",
    dtype: torch.dtype = torch.float32,
) -> SEBlock:
    block = SEBlock(
        channels, hidden_channels=hidden, activation=act, gate=gate, bias=bias, init=init
    ).to(dtype)
    if init == "identity":  # move away from the exact identity so gradients are generic
        with torch.no_grad():
            for p in block.parameters():
                p.add_(0.1 * torch.randn_like(p))
    return block


@st.composite
def cases(draw: st.DrawFn) -> dict[str, object]:
    spatial_dims = draw(st.integers(1, 3))
    sizes = draw(st.lists(st.integers(1, 6), min_size=spatial_dims, max_size=spatial_dims))
    bias = draw(st.booleans())
    return {
        "shape": (draw(st.integers(1, 4)), draw(st.integers(1, 24)), *sizes),
        "hidden": draw(st.integers(1, 8)),
        "act": draw(st.sampled_from(sorted(ACTIVATIONS))),
        "gate": draw(st.sampled_from(sorted(GATES))),
        "bias": bias,
        "init": draw(st.sampled_from(["default", "identity"])) if bias else "default",
        "fmt": draw(st.sampled_from(["contiguous", "channels_last"])),
        "seed": draw(st.integers(0, 2**16)),
    }


@settings(deadline=None, max_examples=25)
@given(case=cases())
def test_fused_matches_reference_outputs_and_all_gradients(case: dict) -> None:
    torch.manual_seed(case["seed"])
    shape, act, gate = case["shape"], case["act"], case["gate"]
    block = make_block(shape[1], case["hidden"], act, gate, bias=case["bias"], init=case["init"])
    x = to_format(torch.randn(shape), case["fmt"])
    grad_out = to_format(torch.randn(shape), case["fmt"])
    params = list(block.parameters())

    out, grads = gradients(block, x, params, grad_out)
    ref_out, ref_grads = gradients(lambda t: reference_se(t, block, act, gate), x, params, grad_out)

    assert took_fused_path(out)
    assert has_format(out, case["fmt"]) and has_format(grads[0], case["fmt"])
    assert_close_f32(out, ref_out)
    assert len(grads) == len(ref_grads) == 1 + (4 if case["bias"] else 2)
    for got, expected in zip(grads, ref_grads, strict=True):
        assert got.shape == expected.shape and got.dtype == expected.dtype
        assert_close_f32(got, expected)


@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
def test_fused_matches_the_plain_path_of_the_same_block(fmt: str) -> None:
    torch.manual_seed(0)
    block = SEBlock(32, reduction=4)
    plain = copy.deepcopy(block)
    plain.fast_path = False
    x = to_format(torch.randn(3, 32, 7, 5), fmt)
    grad_out = to_format(torch.randn(3, 32, 7, 5), fmt)
    out, grads = gradients(block, x, list(block.parameters()), grad_out)
    ref, ref_grads = gradients(plain, x, list(plain.parameters()), grad_out)
    assert took_fused_path(out) and not took_fused_path(ref)
    assert_close_f32(out, ref)
    for got, expected in zip(grads, ref_grads, strict=True):
        assert_close_f32(got, expected)


@pytest.mark.parametrize(
    ("shape", "fmt", "dtype"),
    [
        ((2, 8, 8, 8), "contiguous", torch.float32),  # >= 64 positions: batch-norm dot
        ((2, 8, 16, 16), "contiguous", torch.float64),
        ((2, 8, 4, 4, 4), "contiguous", torch.float32),
        ((2, 8, 4, 4), "contiguous", torch.float32),  # < 64 positions: multiply and sum
        ((2, 8, 8, 8), "channels_last", torch.float32),  # channels innermost: addcmul
        ((2, 8, 4, 4, 4), "channels_last", torch.float64),
        ((2, 8, 100), "channels_last", torch.float32),
    ],
)
def test_every_backward_kernel_matches_reference(
    shape: tuple[int, ...], fmt: str, dtype: torch.dtype
) -> None:
    torch.manual_seed(17)
    block = SEBlock(8, reduction=2, activation="silu").to(dtype)
    x = to_format(torch.randn(shape, dtype=dtype), fmt)
    params = list(block.parameters())
    for grad_out in (to_format(torch.randn_like(x), fmt), torch.randn(shape, dtype=dtype)):
        out, grads = gradients(block, x, params, grad_out)
        ref, ref_grads = gradients(lambda t: reference_se(t, block, "silu"), x, params, grad_out)
        assert took_fused_path(out)
        assert_close_f32(out, ref)
        for got, expected in zip(grads, ref_grads, strict=True):
            assert_close_f32(got, expected)


def test_empty_batch_is_handled_like_the_plain_path() -> None:
    block, plain = _fused_and_plain(8)
    for module in (block, plain):
        x = torch.randn(0, 8, 8, 8, requires_grad=True)
        out = module(x)
        out.sum().backward()
        assert out.shape == x.shape and x.grad is not None and x.grad.shape == x.shape


@pytest.mark.parametrize(
    ("act", "gate", "bias", "scale"),
    [
        ("relu", "sigmoid", True, 1.0),
        ("silu", "hard_sigmoid", False, 1.0),
        ("gelu", "sigmoid", True, 2.0),
        ("tanh", "hard_sigmoid", True, 2.0),
    ],
)
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
def test_gradcheck_float64(act: str, gate: str, bias: bool, scale: float, fmt: str) -> None:
    torch.manual_seed(1)
    block = SEBlock(6, hidden_channels=3, activation=act, gate=gate, bias=bias).double()
    block.gate_scale = scale
    names = [name for name, _ in block.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for p in block.parameters())
    x = to_format(torch.randn(2, 6, 3, 4, dtype=torch.float64), fmt).requires_grad_(True)

    def fn(x: torch.Tensor, *ps: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(block, dict(zip(names, ps, strict=True)), (x,))

    assert took_fused_path(fn(x, *params))
    assert torch.autograd.gradcheck(fn, (x, *params))
    if gate == "sigmoid":  # PyTorch has no second derivative of hardsigmoid at all
        assert torch.autograd.gradgradcheck(fn, (x, *params))


def test_double_backward_matches_plain_autograd() -> None:
    torch.manual_seed(2)
    block = SEBlock(16, reduction=4, activation="silu").double()
    plain = copy.deepcopy(block)
    plain.fast_path = False
    x = torch.randn(2, 16, 5, 5, dtype=torch.float64)

    def penalty(module: SEBlock) -> list[torch.Tensor]:
        xg = x.clone().requires_grad_(True)
        out = module(xg)
        (gx,) = torch.autograd.grad(out.square().sum(), xg, create_graph=True)
        return list(torch.autograd.grad(gx.square().sum(), [xg, *module.parameters()]))

    for got, expected in zip(penalty(block), penalty(plain), strict=True):
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("block_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_float16_of_magnitude_3000_over_64x64_stays_finite(
    block_dtype: torch.dtype, seed: int
) -> None:
    torch.manual_seed(seed)
    block = SEBlock(8, reduction=2).to(block_dtype)
    x = (3000 + 10 * torch.randn(2, 8, 64, 64)).half().requires_grad_(True)
    out = block(x)
    assert took_fused_path(out)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    gate = block.excitation(x.detach())
    assert gate.dtype == block_dtype and torch.isfinite(gate).all()
    expected = x.detach() * gate.half()[..., None, None]  # what the block computes: x * s
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    out.float().sum().backward()  # dL/ds = 3000 * 4096 per channel: beyond float16's 65504
    assert x.grad is not None and torch.isfinite(x.grad).all()
    if block_dtype == torch.float32:  # float32 parameters hold their (large) gradients
        assert all(torch.isfinite(p.grad).all() for p in block.parameters())


@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
def test_cpu_bfloat16_autocast_matches_reference(fmt: str) -> None:
    torch.manual_seed(4)
    block = SEBlock(32, reduction=4)
    x = to_format(torch.randn(4, 32, 6, 6), fmt)
    grad_out = to_format(torch.randn(4, 32, 6, 6), fmt)
    params = list(block.parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, grads = gradients(block, x, params, grad_out)
        ref, ref_grads = gradients(lambda t: reference_se(t, block), x, params, grad_out)
    assert took_fused_path(out)
    assert out.dtype == ref.dtype == torch.float32
    # The reference rounds the float32 mean to bfloat16; the block rounds PyTorch's
    # float32-accumulated bfloat16 sum and divides (global_avg_pool_for): the same up to
    # one bfloat16 rounding of the mean.
    assert_close_bf16(out, ref)
    for got, expected in zip(grads, ref_grads, strict=True):
        assert got.dtype == expected.dtype
        torch.testing.assert_close(
            got, expected, rtol=2e-2, atol=2e-2 * float(expected.abs().max())
        )


def test_bfloat16_input_channels_last_matches_reference() -> None:
    torch.manual_seed(5)
    block = SEBlock(16, reduction=4).to(torch.bfloat16)
    x = to_format(torch.randn(2, 16, 9, 9), "channels_last").to(torch.bfloat16)
    grad_out = torch.randn_like(x)
    params = list(block.parameters())
    out, grads = gradients(block, x, params, grad_out)
    ref, ref_grads = gradients(lambda t: reference_se(t, block), x, params, grad_out)
    assert took_fused_path(out)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert_close_bf16(out, ref)  # the mean is rounded to bfloat16 by another route, see above
    for got, expected in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(
            got, expected, rtol=2e-2, atol=2e-2 * float(expected.abs().max())
        )


@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
def test_bfloat16_autocast_fused_and_plain_paths_agree(fmt: str) -> None:
    torch.manual_seed(21)
    block, plain = _fused_and_plain(16)
    x = to_format(torch.randn(4, 16, 12, 12), fmt).to(torch.bfloat16)  # 144 positions
    grad_out = to_format(torch.randn(4, 16, 12, 12), fmt).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, grads = gradients(block, x, list(block.parameters()), grad_out)
        ref, ref_grads = gradients(plain, x, list(plain.parameters()), grad_out)
    assert took_fused_path(out) and not took_fused_path(ref)
    assert torch.equal(out, ref)  # the same pooling and the same MLP ops
    for got, expected in zip(grads, ref_grads, strict=True):
        assert got.dtype == expected.dtype
        assert_close_bf16(got, expected)


def test_broadcast_grad_output_and_partial_requires_grad() -> None:
    torch.manual_seed(6)
    block = SEBlock(8, reduction=2)
    x = torch.randn(3, 8, 4, 4)
    # out.sum().backward() hands the block an expanded (stride-0) gradient.
    xg = x.clone().requires_grad_(True)
    out = block(xg)
    assert took_fused_path(out)
    out.sum().backward()
    xr = x.clone().requires_grad_(True)
    reference_se(xr, block).sum().backward()
    assert xg.grad is not None and xr.grad is not None
    assert_close_f32(xg.grad, xr.grad)
    # Input without grad (first layer) and frozen parameters (fine-tuning the rest).
    block.zero_grad()
    out = block(x)
    assert took_fused_path(out)
    out.square().sum().backward()
    assert all(p.grad is not None for p in block.parameters())
    block.requires_grad_(False)
    xg = x.clone().requires_grad_(True)
    out = block(xg)
    assert took_fused_path(out)
    out.square().sum().backward()
    xr = x.clone().requires_grad_(True)
    reference_se(xr, block).square().sum().backward()
    assert xg.grad is not None and xr.grad is not None
    assert_close_f32(xg.grad, xr.grad)


def test_gate_hooks_and_excitation_see_the_fused_gate() -> None:
    torch.manual_seed(7)
    block = SEBlock(16, reduction=4)
    seen: list[torch.Tensor] = []
    handle = block.register_gate_hook(lambda module, gate: seen.append(gate))
    x = torch.randn(2, 16, 5, 5, requires_grad=True)
    out = block(x)
    assert took_fused_path(out)
    handle.remove()
    assert len(seen) == 1 and not seen[0].requires_grad
    torch.testing.assert_close(seen[0], block.excitation(x).detach(), rtol=0, atol=0)
    torch.testing.assert_close(out, x * seen[0][..., None, None], rtol=0, atol=0)


def test_fallbacks_take_the_plain_path_and_stay_correct() -> None:
    torch.manual_seed(8)
    x = torch.randn(2, 16, 4, 4, requires_grad=True)
    block = SEBlock(16, reduction=4)
    block.fast_path = False
    assert not took_fused_path(block(x))
    # A forward hook on a submodule must still be called.
    hooked = SEBlock(16, reduction=4)
    calls: list[int] = []
    hooked.fc1.register_forward_hook(lambda *args: calls.append(1))
    assert not took_fused_path(hooked(x)) and calls == [1]
    # An activation with parameters: the fused node would not differentiate them.
    prelu = SEBlock(16, reduction=4, activation=nn.PReLU)
    out = prelu(x)
    assert not took_fused_path(out)
    assert_close_f32(out, reference_se(x, prelu, prelu.act))


def test_other_activations_and_gates_are_fused_by_autograd() -> None:
    # An activation or gate without a hand-written derivative: the fused node
    # differentiates it with autograd on the (N, C) tensors.
    torch.manual_seed(8)
    x = torch.randn(2, 16, 4, 4)
    grad_out = torch.randn_like(x)

    class ScaledSigmoid(nn.Sigmoid):  # a subclass may compute something else
        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return 0.5 * torch.sigmoid(t)

    for block, act, gate in (
        (SEBlock(16, reduction=4, activation=nn.ELU), F.elu, torch.sigmoid),
        (
            SEBlock(16, reduction=4, gate=ScaledSigmoid),
            F.relu,
            lambda t: 0.5 * torch.sigmoid(t),
        ),
    ):
        params = list(block.parameters())
        out, grads = gradients(block, x, params, grad_out)
        ref, ref_grads = gradients(
            lambda t, b=block, a=act, g=gate: reference_se(t, b, a, g), x, params, grad_out
        )
        assert took_fused_path(out)
        assert_close_f32(out, ref)
        for got, expected in zip(grads, ref_grads, strict=True):
            assert_close_f32(got, expected)


def test_meta_tensors_give_shapes() -> None:
    block = SEBlock(16, reduction=4).to("meta")
    x = torch.empty(2, 16, 8, 8, device="meta", requires_grad=True)
    out = block(x)
    assert took_fused_path(out) and out.shape == x.shape and out.device.type == "meta"
    out.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape


def test_inference_path_matches_reference() -> None:
    torch.manual_seed(9)
    block = SEBlock(16, reduction=4)
    x = to_format(torch.randn(2, 16, 6, 6), "channels_last")
    with torch.no_grad():
        out = block(x)
        ref = reference_se(x, block)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_without_gradients_the_submodules_run() -> None:
    # The fused function is only worth its cost when there is a backward pass to save.
    torch.manual_seed(19)
    block = SEBlock(16, reduction=4)
    frozen = copy.deepcopy(block).requires_grad_(False)
    calls: list[str] = []

    def count_fc1_calls(se: SEBlock) -> None:
        fc1_forward = se.fc1.forward

        def counted(z: torch.Tensor) -> torch.Tensor:
            calls.append("fc1")
            return fc1_forward(z)

        se.fc1.forward = counted  # type: ignore[method-assign]

    count_fc1_calls(block)
    count_fc1_calls(frozen)
    x = torch.randn(2, 16, 5, 5)
    with torch.no_grad():
        expected = reference_se(x, block)
        no_grad = block(x)
    with torch.inference_mode():
        inference = block(x)
    nothing_requires_grad = frozen(x)
    assert calls == ["fc1"] * 3
    for out in (no_grad, inference, nothing_requires_grad):
        assert out.grad_fn is None
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
    trained = block(x.requires_grad_(True))
    assert took_fused_path(trained) and calls == ["fc1"] * 3


def test_identity_init_is_exact_on_the_fused_path_and_trains() -> None:
    torch.manual_seed(10)
    for gate in ("sigmoid", "hard_sigmoid"):
        block = SEBlock(16, reduction=4, gate=gate, init="identity")
        assert block.gate_scale == 2.0
        x = torch.randn(2, 16, 5, 5, requires_grad=True)
        out = block(x)
        assert took_fused_path(out)
        assert torch.equal(out, x)
        out.square().sum().backward()
        assert x.grad is not None
        # Every parameter receives gradient (W1 = 0 still gets dL/dW1 = dh^T z).
        assert all(bool(p.grad.abs().sum() > 0) for p in block.parameters())


def test_deepcopy_pickle_state_dict_and_dtype_round_trips() -> None:
    torch.manual_seed(11)
    block = SEBlock(16, reduction=4, activation="gelu", init="identity")
    block.fast_path = True
    x = torch.randn(2, 16, 3, 3)
    grad_out = torch.randn_like(x)
    params = list(block.parameters())
    out, grads = gradients(block, x, params, grad_out)

    buffer = io.BytesIO()
    torch.save(block, buffer)
    buffer.seek(0)
    clones = [
        copy.deepcopy(block),
        pickle.loads(pickle.dumps(block)),
        torch.load(buffer, weights_only=False),
    ]
    fresh = SEBlock(16, reduction=4, activation="gelu", init="identity")
    fresh.load_state_dict(block.state_dict())
    clones.append(fresh)
    for clone in clones:
        assert clone.gate_scale == 2.0
        clone_out, clone_grads = gradients(clone, x, list(clone.parameters()), grad_out)
        assert took_fused_path(clone_out)
        torch.testing.assert_close(clone_out, out, rtol=0, atol=0)
        for got, expected in zip(clone_grads, grads, strict=True):
            torch.testing.assert_close(got, expected, rtol=0, atol=0)

    double = copy.deepcopy(block).to(torch.float64)
    out64, grads64 = gradients(double, x.double(), list(double.parameters()), grad_out.double())
    assert took_fused_path(out64) and out64.dtype == torch.float64
    assert_close_f32(out64.float(), out)
    for got, expected in zip(grads64, grads, strict=True):
        assert got.dtype == torch.float64
        assert_close_f32(got.float(), expected)


def _fused_and_plain(channels: int = 16) -> tuple[SEBlock, SEBlock]:
    block = SEBlock(channels, reduction=4)
    plain = copy.deepcopy(block)
    plain.fast_path = False
    return block, plain


@pytest.mark.skipif(
    not EXPORT_DETECTABLE,
    reason=f"torch {torch.__version__} < 2.7 cannot tell torch.compile from torch.export, "
    "so compiled SE blocks use the plain modules",
)
def test_torch_compile_fullgraph_aot_eager_uses_the_fused_function() -> None:
    torch.manual_seed(12)
    block, plain = _fused_and_plain()
    graphs: list[str] = []

    def backend(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> Callable:
        graphs.append(gm.code)  # record the graph dynamo captured, then compile as aot_eager
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    compiled = torch.compile(block, backend=backend, fullgraph=True)
    for fmt in ("contiguous", "channels_last"):
        x = to_format(torch.randn(2, 16, 6, 6), fmt)
        grad_out = to_format(torch.randn(2, 16, 6, 6), fmt)
        out, grads = gradients(compiled, x, list(block.parameters()), grad_out)
        ref, ref_grads = gradients(plain, x, list(plain.parameters()), grad_out)
        assert_close_f32(out, ref)
        for got, expected in zip(grads, ref_grads, strict=True):
            assert_close_f32(got, expected)
    assert graphs and all("autograd_function_apply" in code for code in graphs)


def test_torch_compile_inductor() -> None:
    torch.manual_seed(13)
    block, plain = _fused_and_plain()
    compiled = torch.compile(block, fullgraph=True)
    x = to_format(torch.randn(2, 16, 6, 6), "channels_last")
    grad_out = torch.randn_like(x)
    out, grads = gradients(compiled, x, list(block.parameters()), grad_out)
    ref, ref_grads = gradients(plain, x, list(plain.parameters()), grad_out)
    assert_close_f32(out, ref)
    for got, expected in zip(grads, ref_grads, strict=True):
        assert_close_f32(got, expected)


def test_torch_export_records_the_plain_modules() -> None:
    torch.manual_seed(14)
    block, plain = _fused_and_plain()
    x = torch.randn(2, 16, 5, 5)
    exported = torch.export.export(block, (x,))
    code = exported.graph_module.code
    assert "autograd_function" not in code
    assert "linear" in code or "addmm" in code  # torch 2.2 exports nn.Linear as t + addmm
    torch.testing.assert_close(exported.module()(x), plain(x), rtol=0, atol=0)


def test_jit_trace_records_the_plain_modules_and_trains() -> None:
    torch.manual_seed(15)
    block, plain = _fused_and_plain()
    x = torch.randn(2, 16, 5, 5)
    with warnings.catch_warnings():  # deprecation and tracer warnings, version-dependent
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(block, (x,))
    grad_out = torch.randn_like(x)
    out, grads = gradients(traced, x, list(traced.parameters()), grad_out)
    ref, ref_grads = gradients(plain, x, list(plain.parameters()), grad_out)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    for got, expected in zip(grads, ref_grads, strict=True):
        assert_close_f32(got, expected)


def test_torch_func_transforms_fall_back_to_plain_autograd() -> None:
    torch.manual_seed(16)
    block, plain = _fused_and_plain(8)
    params = {name: p.detach() for name, p in block.named_parameters()}
    x = torch.randn(4, 8, 3, 3)

    def loss(module: SEBlock) -> Callable:
        return lambda p, xs: torch.func.functional_call(module, p, (xs,)).square().sum()

    per_sample = torch.func.vmap(
        torch.func.grad(lambda p, xs: loss(block)(p, xs[None])), in_dims=(None, 0)
    )(params, x)
    expected = torch.func.vmap(
        torch.func.grad(lambda p, xs: loss(plain)(p, xs[None])), in_dims=(None, 0)
    )(params, x)
    for name in params:
        assert_close_f32(per_sample[name], expected[name])
    tangent = torch.randn_like(x)
    _, jvp = torch.func.jvp(block, (x,), (tangent,))
    _, jvp_plain = torch.func.jvp(plain, (x,), (tangent,))
    assert_close_f32(jvp, jvp_plain)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_activation_checkpointing(use_reentrant: bool) -> None:
    torch.manual_seed(18)
    block, plain = _fused_and_plain()
    x = torch.randn(2, 16, 8, 8)
    assert took_fused_path(block(x.clone().requires_grad_(True)))
    xc, xp = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out = torch.utils.checkpoint.checkpoint(block, xc, use_reentrant=use_reentrant)
    ref = plain(xp)
    out.square().sum().backward()  # reentrant checkpointing does not support autograd.grad
    ref.square().sum().backward()
    assert_close_f32(out, ref)
    assert xc.grad is not None and xp.grad is not None
    assert_close_f32(xc.grad, xp.grad)
    for p, q in zip(block.parameters(), plain.parameters(), strict=True):
        assert p.grad is not None and q.grad is not None
        assert_close_f32(p.grad, q.grad)
