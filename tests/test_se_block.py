"""Behaviour of SEBlock: the laws of the paper's definition, options, formats, errors."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from attnblocks import (
    AttnBlocksError,
    ChannelMismatchError,
    InvalidArgumentError,
    InvalidInputError,
    SEBlock,
)
from attnblocks.blocks import se_hidden_channels

FLOAT_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def _tolerance(dtype: torch.dtype) -> dict[str, float]:
    return {
        torch.float64: {"atol": 1e-12, "rtol": 1e-10},
        torch.float32: {"atol": 1e-6, "rtol": 1e-5},
        torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2},
        torch.float16: {"atol": 2e-3, "rtol": 2e-3},
    }[dtype]


def _memory_format(ndim: int, channels_last: bool) -> torch.memory_format:
    if not channels_last:
        return torch.contiguous_format
    return {4: torch.channels_last, 5: torch.channels_last_3d}[ndim]


@st.composite
def feature_maps(draw: st.DrawFn) -> tuple[torch.Tensor, bool]:
    """A random (N, C, *spatial) tensor, with 1 to 3 spatial dims, maybe channels_last."""
    n = draw(st.integers(1, 4))
    c = draw(st.integers(1, 40))
    spatial = draw(st.lists(st.integers(1, 7), min_size=1, max_size=3))
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    channels_last = len(spatial) in (2, 3) and draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, *spatial, generator=gen).to(dtype)
    x = x.contiguous(memory_format=_memory_format(x.dim(), channels_last))
    return x, channels_last


def _reference_gate(block: SEBlock, x: torch.Tensor) -> torch.Tensor:
    """The paper's eq. 2-3 written out independently, in float64."""
    dims = tuple(range(2, x.dim()))
    z = x.double().mean(dim=dims)
    w1, w2 = block.fc1.weight.double(), block.fc2.weight.double()
    b1 = block.fc1.bias.double() if block.fc1.bias is not None else 0.0
    b2 = block.fc2.bias.double() if block.fc2.bias is not None else 0.0
    hidden = torch.relu(z @ w1.T + b1)
    return torch.sigmoid(hidden @ w2.T + b2) * block.gate_scale


# --- the law of the block: out = x * gate, gate per (sample, channel) ------------------------


@given(feature_maps(), st.sampled_from(["sigmoid", "hard_sigmoid"]))
def test_shape_dtype_and_memory_format_are_preserved(
    case: tuple[torch.Tensor, bool], gate: str
) -> None:
    x, channels_last = case
    block = SEBlock(x.shape[1], gate=gate).to(x.dtype)
    out = block(x)
    assert out.shape == x.shape
    assert out.dtype == x.dtype
    if channels_last:
        assert out.is_contiguous(memory_format=_memory_format(x.dim(), True))
    else:
        assert out.is_contiguous()


@given(feature_maps(), st.sampled_from(["sigmoid", "hard_sigmoid"]))
def test_output_is_input_times_a_spatially_constant_gate_in_range(
    case: tuple[torch.Tensor, bool], gate: str
) -> None:
    x, _ = case
    x = x.double()
    block = SEBlock(x.shape[1], gate=gate, reduction=4).double()
    with torch.no_grad():
        # a strong first layer so hard_sigmoid really saturates sometimes
        block.fc2.weight.mul_(8.0)
        out = block(x)
        g = block.excitation(x)
    assert g.shape == x.shape[:2]
    if gate == "sigmoid":
        assert bool(((g > 0) & (g < 1)).all())
    else:
        assert bool(((g >= 0) & (g <= 1)).all())
    expected = x * g.view(*g.shape, *([1] * (x.dim() - 2)))
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    # where x is non-zero, the ratio out / x is the same everywhere in space
    mask = x.abs() > 1e-3
    ratio = torch.where(mask, out / x, torch.nan)
    flat = ratio.flatten(2)
    lo = torch.where(mask.flatten(2), flat, torch.inf).amin(dim=2)
    hi = torch.where(mask.flatten(2), flat, -torch.inf).amax(dim=2)
    present = mask.flatten(2).any(dim=2)
    torch.testing.assert_close(lo[present], hi[present], rtol=1e-9, atol=1e-12)


@given(feature_maps())
def test_gate_matches_the_papers_equations(case: tuple[torch.Tensor, bool]) -> None:
    x, _ = case
    block = SEBlock(x.shape[1], reduction=2).to(x.dtype)
    got = block.excitation(x).double()
    expected = _reference_gate(block, x)
    torch.testing.assert_close(got, expected, **_tolerance(x.dtype))


@given(feature_maps(), st.integers(0, 3))
def test_batch_independence_in_eval_mode(case: tuple[torch.Tensor, bool], index: int) -> None:
    x, _ = case
    x = x.float()
    index = index % x.shape[0]
    block = SEBlock(x.shape[1]).eval()
    whole = block(x)
    alone = block(x[index : index + 1])
    torch.testing.assert_close(whole[index : index + 1], alone, rtol=1e-5, atol=1e-6)
    # and changing another sample does not change this one
    other = x.clone()
    other[(index + 1) % x.shape[0]] += 5.0
    if x.shape[0] > 1:
        torch.testing.assert_close(block(other)[index], whole[index], rtol=1e-5, atol=1e-6)


def test_default_gate_is_sigmoid_and_hidden_is_c_over_r() -> None:
    block = SEBlock(64)
    assert block.hidden_channels == 4
    assert isinstance(block.gate, nn.Sigmoid)
    assert isinstance(block.act, nn.ReLU)
    assert block.fc1.weight.shape == (4, 64)
    assert block.fc2.weight.shape == (64, 4)


@pytest.mark.parametrize(
    ("channels", "reduction", "hidden"),
    [(8, 16, 1), (1, 16, 1), (64, 16, 4), (65, 16, 4), (100, 8, 12), (32, 0.5, 64), (48, 3, 16)],
)
def test_hidden_width_is_floor_c_over_r_never_zero(
    channels: int, reduction: float, hidden: int
) -> None:
    assert se_hidden_channels(channels, reduction) == hidden
    assert SEBlock(channels, reduction=reduction).hidden_channels == hidden


def test_narrow_block_is_a_real_se_not_a_constant_gate() -> None:
    torch.manual_seed(0)
    block = SEBlock(8, reduction=16)
    x = torch.randn(16, 8, 5, 5) * 3
    g = block.excitation(x)
    assert block.hidden_channels == 1
    assert float(g.detach().std(dim=0).max()) > 1e-3, "the gate must depend on the input"
    assert not torch.allclose(g, torch.full_like(g, 0.5))


def test_explicit_options() -> None:
    block = SEBlock(32, hidden_channels=5, activation="silu", gate="hard_sigmoid", bias=False)
    assert block.hidden_channels == 5
    assert isinstance(block.act, nn.SiLU)
    assert isinstance(block.gate, nn.Hardsigmoid)
    assert block.fc1.bias is None and block.fc2.bias is None
    assert sum(p.numel() for p in block.parameters()) == 2 * 32 * 5


def test_activation_and_gate_accept_classes_instances_and_functions() -> None:
    x = torch.randn(2, 16, 4, 4)
    by_class = SEBlock(16, activation=nn.GELU, gate=nn.Sigmoid)
    assert isinstance(by_class.act, nn.GELU)
    by_instance = SEBlock(16, activation=nn.LeakyReLU(0.2), gate=nn.Hardsigmoid())
    assert isinstance(by_instance.act, nn.LeakyReLU)
    by_function = SEBlock(16, gate=torch.sigmoid)
    by_function.load_state_dict(by_class.state_dict())
    # torch.sigmoid as a function equals the Sigmoid module, through the GELU-free path
    plain = SEBlock(16, activation="relu")
    plain.load_state_dict(by_class.state_dict())
    torch.testing.assert_close(by_function(x), plain(x))
    assert by_function(x).shape == x.shape
    assert by_instance(x).shape == x.shape


def test_parameter_count_with_bias() -> None:
    block = SEBlock(256, reduction=16)
    assert sum(p.numel() for p in block.parameters()) == 2 * 256 * 16 + 16 + 256


# --- identity init ---------------------------------------------------------------------------


@given(
    feature_maps(),
    st.sampled_from(["sigmoid", "hard_sigmoid"]),
    st.sampled_from(["relu", "silu", "gelu"]),
)
def test_identity_init_is_exact_identity(
    case: tuple[torch.Tensor, bool], gate: str, activation: str
) -> None:
    x, _ = case
    block = SEBlock(x.shape[1], init="identity", gate=gate, activation=activation).to(x.dtype)
    if block.hidden_channels == 1:  # the bias cancels h/8: exact in the dtype of the init
        block.reset_parameters()
    assert torch.equal(block(x), x)


def test_identity_init_every_parameter_gets_gradient() -> None:
    torch.manual_seed(1)
    block = SEBlock(32, init="identity")
    x = torch.randn(4, 32, 6, 6, requires_grad=True)
    target = torch.randn(4, 32, 6, 6)
    loss = ((block(x) - target) ** 2).mean()
    loss.backward()
    for name, p in block.named_parameters():
        assert p.grad is not None, name
        assert float(p.grad.abs().max()) > 0, f"{name} got a zero gradient"
    # and one optimiser step moves the block away from the identity
    opt = torch.optim.SGD(block.parameters(), lr=1.0)
    opt.step()
    assert not torch.equal(block(x), x)


def test_default_init_is_standard_linear_init() -> None:
    torch.manual_seed(3)
    block = SEBlock(64)
    torch.manual_seed(3)
    fc1 = nn.Linear(64, 4)
    fc2 = nn.Linear(4, 64)
    torch.testing.assert_close(block.fc1.weight, fc1.weight)
    torch.testing.assert_close(block.fc2.weight, fc2.weight)
    assert block.gate_scale == 1.0


def test_identity_init_survives_state_dict_and_reset() -> None:
    block = SEBlock(16, init="identity")
    x = torch.randn(2, 16, 3, 3)
    block.reset_parameters()
    assert torch.equal(block(x), x)


# --- half precision --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_pooling_does_not_overflow(dtype: torch.dtype) -> None:
    x = torch.full((2, 4, 64, 64), 3000.0, dtype=dtype)
    block = SEBlock(4).to(dtype)
    out = block(x)
    assert out.dtype == dtype
    assert bool(torch.isfinite(out).all())
    pooled_gate = block.excitation(x).double()
    torch.testing.assert_close(
        pooled_gate, _reference_gate(block, x.double()), atol=3e-2, rtol=3e-2
    )


def test_bfloat16_autocast_with_float32_weights() -> None:
    block = SEBlock(32)
    x = torch.randn(2, 32, 8, 8).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = block(x.bfloat16())
    assert out.dtype == torch.bfloat16
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out.float(), block(x), atol=5e-2, rtol=5e-2)


# --- gradients -------------------------------------------------------------------------------


@pytest.mark.parametrize("gate", ["sigmoid", "hard_sigmoid"])
@pytest.mark.parametrize("shape", [(2, 6, 5), (2, 6, 3, 4), (1, 4, 2, 3, 2)])
def test_gradcheck_float64(gate: str, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    block = SEBlock(shape[1], reduction=2, gate=gate).double()
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(block, (x,))
    params = tuple(block.parameters())

    def as_function(x: torch.Tensor, *weights: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(
            block, dict(zip([n for n, _ in block.named_parameters()], weights, strict=True)), (x,)
        )

    weights = tuple(p.detach().clone().requires_grad_(True) for p in params)
    assert torch.autograd.gradcheck(as_function, (x, *weights))


# --- compatibility ---------------------------------------------------------------------------


def _same_function(a: nn.Module, b: nn.Module, x: torch.Tensor) -> None:
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


def test_deepcopy_pickle_and_state_dict_round_trip() -> None:
    block = SEBlock(24, reduction=4, init="identity")
    with torch.no_grad():
        block.fc1.weight.normal_()
    x = torch.randn(3, 24, 5, 5)
    _same_function(block, copy.deepcopy(block), x)
    _same_function(block, pickle.loads(pickle.dumps(block)), x)
    buffer = io.BytesIO()
    torch.save(block.state_dict(), buffer)
    buffer.seek(0)
    fresh = SEBlock(24, reduction=4, init="identity")
    fresh.load_state_dict(torch.load(buffer))
    _same_function(block, fresh, x)


def test_to_dtype() -> None:
    block = SEBlock(16).to(torch.float64)
    assert all(p.dtype == torch.float64 for p in block.parameters())
    x = torch.randn(2, 16, 4, 4, dtype=torch.float64)
    assert block(x).dtype == torch.float64


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::torch.jit.TracerWarning")
def test_jit_trace() -> None:
    block = SEBlock(16).eval()
    x = torch.randn(2, 16, 6, 6)
    traced = torch.jit.trace(block, (x,))
    y = torch.randn(3, 16, 6, 6)
    torch.testing.assert_close(traced(y), block(y))


def test_torch_export() -> None:
    block = SEBlock(16).eval()
    x = torch.randn(2, 16, 6, 6)
    exported = torch.export.export(block, (x,))
    torch.testing.assert_close(exported.module()(x), block(x))


def test_torch_compile_fullgraph_aot_eager() -> None:
    block = SEBlock(16)
    x = torch.randn(2, 16, 6, 6, requires_grad=True)
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    out = compiled(x)
    torch.testing.assert_close(out, block(x))
    out.sum().backward()
    assert x.grad is not None


def test_torch_compile_inductor() -> None:
    block = SEBlock(16)
    x = torch.randn(2, 16, 6, 6)
    compiled = torch.compile(block, fullgraph=True)
    torch.testing.assert_close(compiled(x), block(x), rtol=1e-5, atol=1e-6)


# --- bad input -------------------------------------------------------------------------------


def test_channel_mismatch_names_both_numbers() -> None:
    block = SEBlock(32)
    with pytest.raises(ChannelMismatchError, match=r"32 channels.*16 channels"):
        block(torch.randn(2, 16, 4, 4))
    with pytest.raises(ChannelMismatchError):
        block.excitation(torch.randn(2, 16, 4, 4))


@pytest.mark.parametrize("shape", [(32,), (2, 32), (1, 32, 2, 2, 2, 2)])
def test_wrong_rank_is_rejected(shape: tuple[int, ...]) -> None:
    with pytest.raises(InvalidInputError, match=rf"got a {len(shape)}D tensor"):
        SEBlock(32)(torch.randn(*shape))


@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8, torch.bool])
def test_non_floating_input_is_rejected(dtype: torch.dtype) -> None:
    with pytest.raises(InvalidInputError, match=rf"floating-point.*{dtype}"):
        SEBlock(3)(torch.zeros(1, 3, 4, 4, dtype=dtype))


def test_non_tensor_input_is_rejected() -> None:
    with pytest.raises(InvalidInputError, match="list"):
        SEBlock(3)([1.0, 2.0])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"channels": 0}, r"channels must be a positive int \(>= 1\), got 0"),
        ({"channels": -4}, r"got -4"),
        ({"channels": 3.5}, r"channels must be a positive int, got 3.5"),
        ({"channels": True}, r"channels must be a positive int"),
        ({"channels": 8, "reduction": 0}, r"reduction must be a finite number > 0, got 0"),
        ({"channels": 8, "reduction": -2}, r"got -2"),
        ({"channels": 8, "reduction": "16"}, r"reduction must be a positive number, got '16'"),
        ({"channels": 8, "hidden_channels": 0}, r"hidden_channels must be a positive int"),
        ({"channels": 8, "gate": "softmax"}, r"unknown gate 'softmax'.*hard_sigmoid.*sigmoid"),
        ({"channels": 8, "activation": "nope"}, r"unknown activation 'nope'.*relu"),
        ({"channels": 8, "gate": 3}, r"gate must be a name"),
        ({"channels": 8, "init": "zeros"}, r"unknown init 'zeros'.*default.*identity"),
        ({"channels": 8, "init": "identity", "bias": False}, r"needs bias=True"),
        ({"channels": 8, "bias": 1}, r"bias must be True or False"),
        ({"channels": 8, "gate": torch.tanh, "init": "identity"}, r"finite, positive value"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs: dict[str, object], pattern: str) -> None:
    channels = kwargs.pop("channels")
    with pytest.raises(InvalidArgumentError, match=pattern) as info:
        SEBlock(channels, **kwargs)  # type: ignore[arg-type]
    assert isinstance(info.value, AttnBlocksError)
    assert isinstance(info.value, ValueError)


def test_errors_are_one_value_error_family() -> None:
    for cls in (ChannelMismatchError, InvalidArgumentError, InvalidInputError):
        assert issubclass(cls, AttnBlocksError)
    assert issubclass(AttnBlocksError, ValueError)
