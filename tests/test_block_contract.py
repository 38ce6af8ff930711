"""The contract every registered attention block honours.

The tests are parametrised over :func:`attnblocks.available_blocks`, so a block is
tested here as soon as it is registered. ``EXTRA_OPTIONS`` adds non-default
configurations of known blocks; a new block needs no entry.

What a block promises (see :class:`attnblocks.AttentionBlock`):

* ``Block(channels, *, options)``; any ``(N, C, *spatial)`` floating input whose
  spatial rank is in ``block.spatial_dims`` (1 to 3 when the attribute is absent)
  maps to a tensor of the same shape, dtype and memory format;
* samples are independent in eval mode;
* a block with ``has_channel_gate`` passes one ``(N, C)`` gate per forward to its
  gate hooks; a block without never calls them;
* a block with ``has_spatial_map`` passes one ``(N, 1 or C, *spatial)`` map per
  forward to its map hooks, the one its ``spatial_map(x)`` returns; a block without
  never calls them;
* :func:`attnblocks.inspect.record_gates` and :func:`~attnblocks.inspect.record_maps`
  record exactly what ``excitation(x)`` and ``spatial_map(x)`` return;
* every parameter receives gradient;
* deepcopy, pickle and ``state_dict`` round trips give the same function;
* an input with a spatial size of 0 gives an empty output of the same shape, in
  training and eval mode, without touching the block's parameters or statistics;
* misuse raises the library's errors;
* ``init="identity"`` is an exact, trainable identity where
  ``supports_identity_init``, and an error naming the reason elsewhere.
"""

from __future__ import annotations

import copy
import inspect
import pickle
import re
from typing import Any

import pytest
import torch
from hypothesis import given, reject, settings
from hypothesis import strategies as st

import attnblocks
from attnblocks import (
    AttentionBlock,
    ChannelMismatchError,
    InvalidArgumentError,
    InvalidInputError,
    available_blocks,
    create_block,
    register_block,
)
from attnblocks._torch_compat import has_cpu_float16_layer_norm
from attnblocks.blocks import get_block_class
from attnblocks.inspect import record_gates, record_maps

#: Non-default configurations run through the same contract.
EXTRA_OPTIONS: dict[str, list[dict[str, Any]]] = {
    "cbam": [{"spatial_kernel_size": 3, "activation": "silu"}],
    "eca": [{"kernel_size": 5, "bias": True}],
    "gc": [{"fusion": "mul"}],
    "ge": [
        {"extent": 2},
        {"variant": "theta", "extent": 4},
        {"variant": "theta_plus", "extent": 2, "reduction": 4},
    ],
    "scse": [{"combine": "max"}],
    "se": [
        {"activation": "gelu", "gate": "hard_sigmoid"},
        {"reduction": 4, "divisor": 8, "round_limit": 0.9},
    ],
}

#: Configurations whose output is exactly ``x * gate`` with the hooked ``(N, C)`` gate.
PURE_CHANNEL_GATES: set[tuple[str, str]] = {
    ("se", ""),
    ("se", "activation=gelu,gate=hard_sigmoid"),
    ("eca", ""),
    ("eca", "kernel_size=5,bias=True"),
    ("ge", ""),
    ("gc", "fusion=mul"),
}

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
MAX_EXAMPLES = 12


def _options_id(options: dict[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in options.items())


def _cases() -> list[Any]:
    cases = []
    for name in available_blocks():
        for options in [{}, *EXTRA_OPTIONS.get(name, [])]:
            label = name + (f"[{_options_id(options)}]" if options else "")
            cases.append(pytest.param(name, options, id=label))
    return cases


CASES = _cases()


def build(name: str, channels: int, options: dict[str, Any], **extra: Any) -> Any:
    return create_block(name, channels, **options, **extra)


def draw_block(data: st.DataObject, name: str, options: dict[str, Any], **extra: Any) -> Any:
    """Build the block with a drawn channel count (1 to 12), after seeding torch from ``data``."""
    channels = data.draw(st.integers(1, 12), label="channels")
    torch.manual_seed(data.draw(st.integers(0, 2**16), label="seed"))
    return build(name, channels, options, **extra)


def spatial_ranks(block: torch.nn.Module) -> tuple[int, ...]:
    return tuple(getattr(block, "spatial_dims", (1, 2, 3)))


def memory_formats(rank: int) -> list[torch.memory_format]:
    extra = {2: [torch.channels_last], 3: [torch.channels_last_3d]}.get(rank, [])
    return [torch.contiguous_format, *extra]


def gate_upper_bound(block: torch.nn.Module) -> float:
    return float(getattr(block, "gate_scale", 1.0))


@st.composite
def inputs(
    draw: st.DrawFn,
    block: torch.nn.Module,
    *,
    min_batch: int = 1,
    dtypes: tuple[torch.dtype, ...] = (torch.float32,),
) -> torch.Tensor:
    """A random input the block accepts: rank, sizes, batch, dtype and memory format."""
    rank = draw(st.sampled_from(spatial_ranks(block)))
    batch = draw(st.integers(min_batch, 3))
    sizes = draw(st.lists(st.integers(1, 6), min_size=rank, max_size=rank))
    dtype = draw(st.sampled_from(dtypes))
    fmt = draw(st.sampled_from(memory_formats(rank)))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    x = torch.randn(batch, block.channels, *sizes, generator=generator)
    return x.to(dtype).contiguous(memory_format=fmt)


def input_format(x: torch.Tensor) -> torch.memory_format:
    for fmt in (torch.contiguous_format, torch.channels_last, torch.channels_last_3d):
        if fmt is torch.channels_last and x.dim() != 4:
            continue
        if fmt is torch.channels_last_3d and x.dim() != 5:
            continue
        if x.is_contiguous(memory_format=fmt):
            return fmt
    raise AssertionError("inputs() only makes dense tensors")


# -- shape, dtype, memory format -------------------------------------------------


@pytest.mark.parametrize(("name", "options"), CASES)
@settings(max_examples=MAX_EXAMPLES, deadline=None)
@given(data=st.data())
def test_output_keeps_shape_dtype_and_memory_format(
    name: str, options: dict[str, Any], data: st.DataObject
) -> None:
    block = draw_block(data, name, options)
    training = data.draw(st.booleans(), label="training")
    block.train(training)
    x = data.draw(inputs(block, min_batch=2 if training else 1, dtypes=DTYPES), label="x")
    if data.draw(st.booleans(), label="block in the input's dtype"):
        if x.dtype == torch.float16 and name == "gc" and not has_cpu_float16_layer_norm():
            reject()  # torch 2.2: see test_global_context_in_float16_on_the_cpu
        block.to(x.dtype)
    fmt = input_format(x)
    with torch.no_grad():
        y = block(x)
    assert y.shape == x.shape
    assert y.dtype == x.dtype
    assert y.is_contiguous(memory_format=fmt), f"input was {fmt}, output strides {y.stride()}"
    assert torch.isfinite(y).all()


def _zero_size_shapes(block: torch.nn.Module) -> list[tuple[int, ...]]:
    shapes = []
    for rank in spatial_ranks(block):
        for where in range(rank):
            sizes = [3] * rank
            sizes[where] = 0
            shapes.append((2, block.channels, *sizes))
        shapes.append((0, block.channels, *([3] * rank)))
    return shapes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize(("name", "options"), CASES)
def test_zero_size_inputs_give_empty_outputs_and_leave_the_block_alone(
    name: str, options: dict[str, Any], training: bool, dtype: torch.dtype
) -> None:
    torch.manual_seed(0)
    block = build(name, 4, options).to(dtype).train(training)
    before = {k: v.clone() for k, v in block.state_dict().items()}
    gates: list[torch.Tensor] = []
    maps: list[torch.Tensor] = []
    block.register_gate_hook(lambda module, gate: gates.append(gate))
    block.register_map_hook(lambda module, attention_map: maps.append(attention_map))
    for shape in _zero_size_shapes(block):
        gates.clear(), maps.clear()
        x = torch.randn(shape, dtype=dtype, requires_grad=True)
        y = block(x)
        assert y.shape == x.shape and y.dtype == dtype
        y.sum().backward()
        assert x.grad is not None and x.grad.shape == x.shape
        assert len(gates) == int(block.has_channel_gate)
        assert all(gate.shape == shape[:2] for gate in gates)
        assert len(maps) == int(block.has_spatial_map)
        if block.has_spatial_map:
            assert maps[0].shape[0] == shape[0] and maps[0].shape[2:] == shape[2:]
            assert block.spatial_map(x).shape == maps[0].shape
    for key, value in block.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} changed"


@pytest.mark.skipif(
    not has_cpu_float16_layer_norm(),
    reason=f"torch {torch.__version__} has no float16 LayerNorm on the CPU (GC's transform)",
)
@pytest.mark.parametrize("fusion", ["add", "mul"])
def test_global_context_in_float16_on_the_cpu(fusion: str) -> None:
    block = create_block("gc", 16, fusion=fusion).half()
    x = torch.randn(2, 16, 5, 5).half()
    with torch.no_grad():
        y = block(x)
    assert y.shape == x.shape and y.dtype == torch.float16
    assert torch.isfinite(y).all()


# -- batch independence --------------------------------------------------------


@pytest.mark.parametrize(("name", "options"), CASES)
@settings(max_examples=MAX_EXAMPLES, deadline=None)
@given(data=st.data())
def test_samples_are_independent_in_eval_mode(
    name: str, options: dict[str, Any], data: st.DataObject
) -> None:
    block = draw_block(data, name, options).double().eval()
    x = data.draw(inputs(block, min_batch=2, dtypes=(torch.float64,)), label="x")
    with torch.no_grad():
        together = block(x)
        for i in range(x.shape[0]):
            alone = block(x[i : i + 1])
            torch.testing.assert_close(alone[0], together[i], rtol=1e-9, atol=1e-12)


# -- channel gate ---------------------------------------------------------------


@pytest.mark.parametrize(("name", "options"), CASES)
@settings(max_examples=MAX_EXAMPLES, deadline=None)
@given(data=st.data())
def test_channel_gate_reaches_hooks_in_range(
    name: str, options: dict[str, Any], data: st.DataObject
) -> None:
    block = draw_block(data, name, options).double().eval()
    x = data.draw(inputs(block, dtypes=(torch.float64,)), label="x")
    x.requires_grad_(True)
    seen: list[torch.Tensor] = []
    handle = block.register_gate_hook(lambda module, gate: seen.append(gate))
    y = block(x)
    if not block.has_channel_gate:
        assert seen == []
        return
    assert len(seen) == 1
    (gate,) = seen
    assert gate.shape == (x.shape[0], block.channels)
    assert not gate.requires_grad
    assert bool(((gate >= 0) & (gate <= gate_upper_bound(block))).all())
    if hasattr(block, "excitation"):
        torch.testing.assert_close(block.excitation(x).detach(), gate)
    if (name, _options_id(options)) in PURE_CHANNEL_GATES:
        expected = x * gate.view(gate.shape + (1,) * (x.dim() - 2))
        torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    handle.remove()
    block(x)
    assert len(seen) == 1


# -- spatial map ------------------------------------------------------------------


@pytest.mark.parametrize(("name", "options"), CASES)
@settings(max_examples=MAX_EXAMPLES, deadline=None)
@given(data=st.data())
def test_spatial_map_reaches_map_hooks(
    name: str, options: dict[str, Any], data: st.DataObject
) -> None:
    block = draw_block(data, name, options).double().eval()
    x = data.draw(inputs(block, dtypes=(torch.float64,)), label="x")
    x.requires_grad_(True)
    seen: list[torch.Tensor] = []
    handle = block.register_map_hook(lambda module, attention_map: seen.append(attention_map))
    block(x)
    if not block.has_spatial_map:
        assert seen == []
        return
    assert len(seen) == 1
    (attention_map,) = seen
    assert attention_map.shape[0] == x.shape[0]
    assert attention_map.shape[1] in (1, block.channels)
    assert attention_map.shape[2:] == x.shape[2:]
    assert not attention_map.requires_grad
    assert bool(torch.isfinite(attention_map).all() & (attention_map >= 0).all())
    torch.testing.assert_close(block.spatial_map(x).detach(), attention_map, rtol=0, atol=0)
    handle.remove()
    block(x)
    assert len(seen) == 1


# -- recording through attnblocks.inspect ---------------------------------------------


@pytest.mark.parametrize(("name", "options"), CASES)
@settings(max_examples=MAX_EXAMPLES, deadline=None)
@given(data=st.data())
def test_inspect_records_what_the_block_applies(
    name: str, options: dict[str, Any], data: st.DataObject
) -> None:
    block = draw_block(data, name, options).double().eval()
    net = torch.nn.Sequential(block)
    first = data.draw(inputs(block, dtypes=(torch.float64,)), label="first batch")
    second = torch.randn_like(first)[: data.draw(st.integers(1, first.shape[0]))]
    with torch.no_grad():
        if block.has_channel_gate:
            with record_gates(net) as gates:
                net(first)
                net(second)
            expected = torch.cat([block.excitation(first), block.excitation(second)])
            torch.testing.assert_close(gates.gates["0"], expected, rtol=0, atol=0)
        else:
            with pytest.raises(InvalidArgumentError, match="no channel attention block"):
                record_gates(net).__enter__()
        if block.has_spatial_map:
            with record_maps(net) as maps:
                net(first)
                net(second)
            expected = torch.cat([block.spatial_map(first), block.spatial_map(second)])
            torch.testing.assert_close(maps.maps["0"], expected, rtol=0, atol=0)
        else:
            with pytest.raises(InvalidArgumentError, match="no attention block with a spatial"):
                record_maps(net).__enter__()
    assert not block._gate_hooks and not block._map_hooks


# -- gradients --------------------------------------------------------------------


def _assert_every_parameter_learns(block: torch.nn.Module, x: torch.Tensor) -> None:
    x = x.clone().requires_grad_(True)
    weights = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    (block(x) * weights).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for pname, param in block.named_parameters():
        assert param.grad is not None, f"{pname} got no gradient"
        assert torch.isfinite(param.grad).all(), f"{pname} has a non-finite gradient"
        assert param.grad.abs().sum() > 0, f"{pname} got an all-zero gradient"


def _rank_cases() -> list[Any]:
    cases = []
    for case in CASES:
        name, options = case.values
        ranks = spatial_ranks(build(name, 8, options))
        for rank in ranks:
            cases.append(pytest.param(name, options, rank, id=f"{case.id}-{rank}d"))
    return cases


RANK_CASES = _rank_cases()


@pytest.mark.parametrize(("name", "options", "rank"), RANK_CASES)
def test_every_parameter_receives_gradient(name: str, options: dict[str, Any], rank: int) -> None:
    torch.manual_seed(0)
    block = build(name, 64, options).train()
    x = torch.randn(4, 64, *([6] * rank), generator=torch.Generator().manual_seed(2))
    _assert_every_parameter_learns(block, x)


# -- serialisation ------------------------------------------------------------------


@pytest.mark.parametrize(("name", "options"), CASES)
def test_deepcopy_pickle_and_state_dict_round_trip(name: str, options: dict[str, Any]) -> None:
    torch.manual_seed(0)
    block = build(name, 16, options)
    ranks = spatial_ranks(block)
    x = torch.randn(3, 16, *([5] * ranks[-1]), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        block.train()(x)  # moves BatchNorm statistics, if any, away from their defaults
        block.eval()
        expected = block(x)
        torch.manual_seed(1)
        fresh = build(name, 16, options).eval()
        fresh.load_state_dict(block.state_dict())
        restored = pickle.loads(pickle.dumps(block))
        for clone in (copy.deepcopy(block), restored, fresh):
            assert type(clone) is type(block)
            torch.testing.assert_close(clone(x), expected, rtol=0, atol=0)
    hooks: list[torch.Tensor] = []
    restored.register_gate_hook(lambda module, gate: hooks.append(gate))
    maps: list[torch.Tensor] = []
    restored.register_map_hook(lambda module, attention_map: maps.append(attention_map))
    restored(x)
    assert len(hooks) == int(restored.has_channel_gate)
    assert len(maps) == int(restored.has_spatial_map)


@pytest.mark.parametrize("name", available_blocks())
def test_blocks_pickled_without_hook_tables_still_load(name: str) -> None:
    """A block pickled before map hooks existed (no ``_map_hooks``) loads with empty tables."""
    block = build(name, 8, {})
    state = dict(block.__dict__)
    del state["_map_hooks"], state["_gate_hooks"]
    old = get_block_class(name).__new__(get_block_class(name))
    old.__setstate__(state)
    assert old._gate_hooks == {} and old._map_hooks == {}
    x = torch.randn(2, 8, *([4] * spatial_ranks(block)[-1]))
    old.register_map_hook(lambda module, attention_map: None).remove()
    torch.testing.assert_close(old.eval()(x), block.eval()(x), rtol=0, atol=0)


# -- errors -------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "options"), CASES)
def test_misuse_raises_library_errors(name: str, options: dict[str, Any]) -> None:
    block = build(name, 6, options)
    ranks = spatial_ranks(block)
    good = torch.randn(2, 6, *([4] * ranks[0]))

    wrong_channels = torch.randn(2, 7, *([4] * ranks[0]))
    with pytest.raises(ChannelMismatchError, match=r"6 channels.*7 channels"):
        block(wrong_channels)

    for rank in [0, 1, 2, 3, 4]:
        if rank in ranks:
            continue
        bad = torch.randn(2, 6, *([4] * rank))
        with pytest.raises(InvalidInputError, match=re.escape(str(tuple(bad.shape)))):
            block(bad)

    with pytest.raises(InvalidInputError, match="floating"):
        block(good.to(torch.int64))
    with pytest.raises(InvalidInputError, match="list"):
        block(good.tolist())

    for channels in (0, -3, 2.5, True, "6", None):  # None: the base class default
        with pytest.raises(InvalidArgumentError, match="channels"):
            build(name, channels, options)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="no_such_option"):
        build(name, 6, options, no_such_option=1)
    with pytest.raises(InvalidArgumentError, match="bogus"):
        build(name, 6, options, init="bogus")

    accepted = inspect.signature(get_block_class(name).__init__).parameters
    if "reduction" in accepted:  # a width that would overflow, or exhaust any memory
        with pytest.raises(InvalidArgumentError, match=r"reduction=1e-19.*at least 1/64"):
            build(name, 6, {**options, "reduction": 1e-19})
        assert build(name, 6, {**options, "reduction": 1 / 64}) is not None
    # hidden_channels and divisor exclude each other: start from the options without rounding
    options = {k: v for k, v in options.items() if k not in ("divisor", "round_limit")}
    if "hidden_channels" in accepted:  # the same bound for an explicit width
        with pytest.raises(InvalidArgumentError, match=r"hidden_channels=1000000000 .*at most"):
            build(name, 6, {**options, "hidden_channels": 10**9})
        assert build(name, 6, {**options, "hidden_channels": 64 * 6}) is not None
    if "divisor" in accepted:  # rounding the width: same bound, and only with reduction
        for bad in (0, -8, 2.5, True, "8"):
            with pytest.raises(InvalidArgumentError, match="divisor"):
                build(name, 6, {**options, "divisor": bad})
        with pytest.raises(InvalidArgumentError, match=r"rounded width .*at most"):
            build(name, 6, {**options, "divisor": 10**9})
        with pytest.raises(InvalidArgumentError, match="pass one or the other"):
            build(name, 6, {**options, "divisor": 8, "hidden_channels": 4})
        for bad in (1.0, -0.1, float("nan"), "0.9"):
            with pytest.raises(InvalidArgumentError, match="round_limit"):
                build(name, 6, {**options, "divisor": 8, "round_limit": bad})
        with pytest.raises(InvalidArgumentError, match="pass divisor too"):
            build(name, 6, {**options, "round_limit": 0.9})
    if "activation" in accepted:  # checked even where the configuration does not use it
        for bad in ("nope", None, 42):
            with pytest.raises(InvalidArgumentError, match="activation"):
                build(name, 6, {**options, "activation": bad})
    if "gate" in accepted:
        for bad in ("nope", None, 42):
            with pytest.raises(InvalidArgumentError, match="gate"):
                build(name, 6, {**options, "gate": bad})


@pytest.mark.parametrize(("name", "options"), CASES)
def test_an_input_on_another_device_than_the_parameters_is_refused(
    name: str, options: dict[str, Any]
) -> None:
    block = build(name, 6, options)
    x = torch.randn(2, 6, *([4] * spatial_ranks(block)[0]))
    meta_x = x.to("meta")
    if not list(block.parameters()):  # nothing to disagree with: it runs where x is
        assert block(meta_x).device.type == "meta"
        return
    with pytest.raises(InvalidInputError, match=r"parameters on cpu, but the input is on meta"):
        block(meta_x)
    if block.has_channel_gate:
        with pytest.raises(InvalidInputError, match="input is on meta"):
            block.excitation(meta_x)
    meta_block = copy.deepcopy(block).to("meta")
    with pytest.raises(InvalidInputError, match=r"parameters on meta, but the input is on cpu"):
        meta_block(x)
    assert meta_block(meta_x).shape == x.shape  # same device: fine


def test_unknown_block_name_lists_every_valid_name() -> None:
    with pytest.raises(InvalidArgumentError) as info:
        create_block("squeeze-excite-v9", 64)
    message = str(info.value)
    assert "squeeze-excite-v9" in message
    for name in available_blocks():
        assert repr(name) in message


@pytest.mark.parametrize(
    ("name", "pattern"),
    [
        ("", "valid Python identifier"),
        ("my block!", "valid Python identifier"),
        ("2se", "valid Python identifier"),
        ("class", "not a keyword"),
        ("CLASS", "not a keyword"),  # names are case-insensitive: stored as "class"
        (None, "must be a string, got None"),
        (42, "must be a string, got 42"),
        (b"se", "must be a string"),
    ],
)
def test_register_block_refuses_bad_names_and_leaves_the_registry_alone(
    name: object, pattern: str
) -> None:
    before = available_blocks()
    with pytest.raises(InvalidArgumentError, match=pattern):
        register_block(name)(get_block_class("se"))  # type: ignore[arg-type]
    assert available_blocks() == before


@pytest.mark.parametrize(
    "factory", [lambda channels: torch.nn.Identity(), torch.nn.Identity(), None, int, "se"]
)
def test_register_block_refuses_what_is_not_a_module_class(factory: object) -> None:
    before = available_blocks()
    with pytest.raises(InvalidArgumentError, match=r"nn\.Module subclasses"):
        register_block("contract_probe")(factory)  # type: ignore[type-var]
    assert available_blocks() == before
    # the registry still serves every block, by name and by class
    for name in before:
        assert isinstance(create_block(get_block_class(name), 8), get_block_class(name))


def test_register_block_refuses_a_taken_name_for_another_class() -> None:
    class Other(torch.nn.Module):
        pass

    with pytest.raises(InvalidArgumentError, match="already taken by SEBlock"):
        register_block("SE")(Other)
    assert get_block_class("se") is attnblocks.SEBlock


# -- identity init ------------------------------------------------------------------


@pytest.mark.parametrize(("name", "options"), CASES)
@settings(max_examples=MAX_EXAMPLES, deadline=None)
@given(data=st.data())
def test_identity_init_is_exact_where_supported(
    name: str, options: dict[str, Any], data: st.DataObject
) -> None:
    cls = get_block_class(name)
    if not cls.supports_identity_init:
        with pytest.raises(InvalidArgumentError, match="identity"):
            build(name, 8, options, init="identity")
        return
    block = draw_block(data, name, options, init="identity")
    block.train(data.draw(st.booleans(), label="training"))
    x = data.draw(inputs(block, dtypes=(torch.float32, torch.float64)), label="x")
    with torch.no_grad():
        y = block(x)
    assert torch.equal(y, x)


IDENTITY_CASES = [case for case in CASES if get_block_class(case.values[0]).supports_identity_init]


@pytest.mark.parametrize(("name", "options"), IDENTITY_CASES)
def test_identity_init_is_trainable(name: str, options: dict[str, Any]) -> None:
    torch.manual_seed(0)
    block = build(name, 32, options, init="identity")
    rank = spatial_ranks(block)[-1]
    x = torch.randn(4, 32, *([5] * rank), generator=torch.Generator().manual_seed(4))
    _assert_every_parameter_learns(block, x)
    with torch.no_grad():
        for param in block.parameters():
            param -= 0.5 * param.grad
        assert not torch.allclose(block(x), x, atol=1e-4), "one step should move the block"


# -- construction contract -------------------------------------------------------


@pytest.mark.parametrize("name", available_blocks())
def test_constructor_contract_and_paper_citation(name: str) -> None:
    cls = get_block_class(name)
    assert issubclass(cls, AttentionBlock)
    assert isinstance(create_block(name, 8), cls)
    assert create_block(cls, 8).channels == 8
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    assert params[0].name == "channels"
    assert params[0].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
    for param in params[1:]:
        assert param.kind is inspect.Parameter.KEYWORD_ONLY, param.name
        assert param.default is not inspect.Parameter.empty, param.name
    assert "init" in {p.name for p in params}
    # the init= values the block accepts are its init_modes, "identity" among them
    # exactly when it supports identity init
    assert cls.init_modes[0] == "default"
    assert cls.supports_identity_init == ("identity" in cls.init_modes)
    for mode in cls.init_modes:
        assert create_block(name, 8, init=mode).init == mode
    module_doc = inspect.getmodule(cls).__doc__ or ""
    assert "https://" in module_doc, "the module header should link the paper"
    assert re.search(r"et al\.,[^)]*\b(19|20)\d\d\b", cls.__doc__ or ""), "cite the paper"
    assert "identity" in (cls.__doc__ or "").lower()
    assert f"channels={8}" in repr(create_block(name, 8))


def test_every_block_is_exported() -> None:
    for name in available_blocks():
        cls = get_block_class(name)
        assert getattr(attnblocks, cls.__name__) is cls
        assert cls.__name__ in attnblocks.__all__
