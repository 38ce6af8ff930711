"""``init="identity"`` is exact: bit-for-bit equal outputs, not merely close ones.

The law: for every block class with ``supports_identity_init``, every activation and
gate it accepts, float32 / float64 / bfloat16 / float16 models, NCHW or channels_last,
with or without CPU autocast (of a float32 model), inserting the blocks with
``init="identity"`` into a trained-like model leaves its eval-mode outputs
``torch.equal`` to what they were.
Combinations PyTorch cannot run on this CPU (float16 convolutions or float16 autocast
on an old torch) are skipped, saying why.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from _models import TinyResNet, small_cnn, trained_like_
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from attnblocks import SEBlock, available_blocks, insert_attention
from attnblocks.blocks import create_block, get_block_class
from attnblocks.blocks._identity import zero_output_mlp_
from attnblocks.blocks._layers import ACTIVATIONS, GATES

SUPPORTED = [n for n in available_blocks() if get_block_class(n).supports_identity_init]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
#: Sites of each test model: lists of selectors.
MODELS: dict[str, tuple[Callable[[], nn.Module], list[list[str]]]] = {
    "cnn": (lambda: small_cnn(width=16), [["1"], ["2", "4"], ["0", "5"]]),
    "resnet": (lambda: TinyResNet(width=16), [["stem"], ["blocks.*.bn2"], ["stem.1", "blocks.1"]]),
}


def _options_of(name: str) -> set[str]:
    return set(inspect.signature(get_block_class(name).__init__).parameters)


def _unsupported_on_cpu(dtype: torch.dtype, autocast: torch.dtype | None) -> str | None:
    """Why this torch cannot run a small CNN in ``dtype`` (or under this autocast), or None."""
    try:
        conv = nn.Conv2d(3, 4, 3).to(dtype)
        with _autocast(autocast):
            conv(torch.ones(1, 3, 5, 5, dtype=dtype))
    except (RuntimeError, NotImplementedError) as err:
        return f"this torch cannot run {dtype} (autocast {autocast}) on the CPU: {err}"
    return None


@contextlib.contextmanager
def _autocast(dtype: torch.dtype | None) -> Iterator[None]:
    if dtype is None:
        yield
    else:
        with torch.autocast("cpu", dtype=dtype):
            yield


@st.composite
def block_options(draw: st.DrawFn, name: str) -> dict[str, Any]:
    """Options for block ``name``: any activation and gate it accepts, small hidden widths."""
    accepted = _options_of(name)
    options: dict[str, Any] = {}
    if "activation" in accepted:
        options["activation"] = draw(st.sampled_from(sorted(ACTIVATIONS)), label="activation")
    if "gate" in accepted:
        options["gate"] = draw(st.sampled_from(sorted(GATES)), label="gate")
    if "hidden_channels" in accepted:
        hidden = draw(st.sampled_from([None, 1, 2, 3, 5, 16]), label="hidden")
        if hidden is not None:
            options["hidden_channels"] = hidden
    if "combine" in accepted:
        options["combine"] = draw(st.sampled_from(["add", "max"]), label="combine")
    if "kernel_size" in accepted:
        options["kernel_size"] = draw(st.sampled_from([None, 1, 3, 5]), label="kernel_size")
        options["bias"] = draw(st.booleans(), label="bias")
    if "spatial_kernel_size" in accepted:
        options["spatial_kernel_size"] = draw(st.sampled_from([3, 7]), label="spatial_kernel")
    return options


@settings(max_examples=80)
@given(data=st.data())
def test_identity_insertion_leaves_eval_outputs_bitwise_equal(data: st.DataObject) -> None:
    name = data.draw(st.sampled_from(SUPPORTED), label="block")
    options = data.draw(block_options(name), label="options")
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    channels_last = data.draw(st.booleans(), label="channels_last")
    # autocast is for float32 models (a half model under the other half's autocast mixes dtypes)
    autocasts = [None, torch.bfloat16, torch.float16] if dtype == torch.float32 else [None]
    autocast = data.draw(st.sampled_from(autocasts), label="autocast")
    model_name = data.draw(st.sampled_from(sorted(MODELS)), label="model")
    build, site_lists = MODELS[model_name]
    layers = data.draw(st.sampled_from(site_lists), label="layers")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    reason = _unsupported_on_cpu(dtype, autocast)
    if reason is not None:
        pytest.skip(reason)

    torch.manual_seed(seed)
    model = trained_like_(build(), seed=seed).to(dtype)
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(seed)).to(dtype)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), _autocast(autocast):
        before = model(x)
    insert_attention(model, layers, block=name, init="identity", example_input=x[:1], **options)
    with torch.no_grad(), _autocast(autocast):
        after = model(x)
    assert after.dtype == before.dtype
    assert torch.equal(after, before), (after.double() - before.double()).abs().max()


@settings(max_examples=40)
@given(data=st.data())
def test_identity_block_is_exact_after_a_cast_and_in_training(data: st.DataObject) -> None:
    """A block built in float32 stays exact after ``.to(dtype)`` (two hidden units or more),
    in train mode too, with gradients (SE's fused path) or without."""
    name = data.draw(st.sampled_from(SUPPORTED), label="block")
    options = data.draw(block_options(name), label="options")
    if options.get("hidden_channels") == 1:
        options["hidden_channels"] = 2  # one hidden unit cancels through the bias: see below
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    training = data.draw(st.booleans(), label="training")
    if _unsupported_on_cpu(dtype, None) is not None:
        pytest.skip(f"{dtype} does not run on this CPU")
    # 64 channels: the default reduction (16) gives 4 hidden units
    block = create_block(name, 64, init="identity", **options).to(dtype).train(training)
    x = torch.randn(2, 64, 5, 5, dtype=dtype, requires_grad=training)
    assert torch.equal(block(x), x)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", [n for n in SUPPORTED if "hidden_channels" in _options_of(n)])
def test_one_hidden_unit_is_exact_after_reset_parameters_in_the_new_dtype(
    name: str, dtype: torch.dtype
) -> None:
    block = create_block(name, 16, hidden_channels=1, activation="gelu", init="identity")
    block = block.to(dtype)
    block.reset_parameters()  # what insert_attention does after placing the block
    x = torch.randn(4, 16, 5, 5).to(dtype)
    assert torch.equal(block(x), x)


@pytest.mark.parametrize("activation", ["silu", "gelu", "tanh", "mish", "hard_swish"])
def test_a_wide_se_block_is_an_exact_identity(activation: str) -> None:
    # The example: 64 hidden units with random +-1/8 in fc2 were 2.4e-7 off.
    se = SEBlock(1024, reduction=16, activation=activation, init="identity")
    x = torch.randn(2, 1024, 4, 4)
    assert torch.equal(se(x), x)
    assert torch.equal(se.to(torch.bfloat16)(x.bfloat16()), x.bfloat16())


def test_zero_output_mlp_pairs_opposite_weights_and_needs_no_bias() -> None:
    fc1, fc2 = nn.Linear(10, 4), nn.Linear(4, 10)
    zero_output_mlp_(fc1, nn.SiLU(), fc2, owner="X")
    assert torch.equal(fc1.weight, torch.zeros(4, 10))
    assert torch.equal(fc1.bias, torch.ones(4))
    assert torch.equal(fc2.bias, torch.zeros(10))
    for row in fc2.weight:
        assert sorted(row.tolist()) == [-0.125, 0.0, 0.0, 0.125]
    # every hidden unit is read by some output, so every row of fc1 learns
    assert bool((fc2.weight != 0).any(dim=0).all())


def test_identity_init_is_deterministic() -> None:
    # no random signs: two blocks built from different RNG states are identical
    torch.manual_seed(0)
    a = SEBlock(32, reduction=4, init="identity")
    torch.manual_seed(1)
    b = SEBlock(32, reduction=4, init="identity")
    for (key, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), key
