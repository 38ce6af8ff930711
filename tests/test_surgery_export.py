"""A rewritten model still works with deepcopy, pickle, compile, export, memory formats, dtypes."""

from __future__ import annotations

import copy
import io
import pickle
import warnings

import pytest
import torch
from _models import TinyResNet, trained_like_
from _surgery_helpers import assert_unchanged, snapshot
from torch import nn

from attnblocks import SEBlock
from attnblocks.surgery import insert_se, remove_se

X = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
# a Sequential site (block appended), hook sites with static channels and a probed site
LAYERS = ["stem", "blocks.*.bn2", "blocks.1.relu"]


def _rewritten() -> nn.Module:
    torch.manual_seed(0)
    model = trained_like_(TinyResNet())
    insert_se(model, LAYERS, example_input=X, reduction=4)
    with torch.no_grad():  # non-trivial SE weights, so a dropped block would show
        for block in model.modules():
            if isinstance(block, SEBlock):
                block.fc2.bias.normal_()
    return model.eval()


@pytest.fixture
def model() -> nn.Module:
    return _rewritten()


def _blocks(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, SEBlock)]


def test_all_sites_are_live(model: nn.Module) -> None:
    assert _blocks(model) == ["stem.se", "blocks.0.bn2.se", "blocks.1.bn2.se", "blocks.1.relu.se"]
    with torch.no_grad():
        out = model(X)
        for name in _blocks(model):
            host = model.get_submodule(name.removesuffix(".se"))
            saved = host._modules.pop("se")  # knock the block out: the output must change
            host.se = nn.Identity()
            assert not torch.equal(model(X), out), name
            host._modules["se"] = saved


def test_deepcopy_is_independent_and_removable(model: nn.Module) -> None:
    twin = copy.deepcopy(model)
    with torch.no_grad():
        assert torch.equal(twin(X), model(X))
        twin.blocks[0].bn2.se.fc2.bias.add_(1.0)  # the copy's hook uses the copy's block
        assert not torch.equal(twin(X), model(X))
    before = snapshot(TinyResNet())
    remove_se(twin)
    assert snapshot(twin).text == before.text
    assert _blocks(model)  # the original keeps its blocks


@pytest.mark.parametrize("how", ["pickle", "torch.save"])
def test_pickle_round_trip(model: nn.Module, how: str) -> None:
    if how == "pickle":
        clone = pickle.loads(pickle.dumps(model))
    else:
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        clone = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        assert torch.equal(clone(X), model(X))
    remove_se(clone)
    assert _blocks(clone) == []
    assert all(not m._forward_hooks for m in clone.modules())


def test_torch_compile_fullgraph(model: nn.Module) -> None:
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    out = compiled(X)
    assert torch.allclose(out, model(X), atol=1e-6)
    out.sum().backward()  # gradients flow through the compiled graph into the SE blocks
    assert model.blocks[1].relu.se.fc1.weight.grad is not None


def test_torch_export(model: nn.Module) -> None:
    program = torch.export.export(model, (X,))
    with torch.no_grad():
        assert torch.allclose(program.module()(X), model(X), atol=1e-6)
    assert "blocks.1.relu.se.fc1.weight" in program.state_dict


def test_jit_trace(model: nn.Module) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, X)
    with torch.no_grad():
        assert torch.allclose(traced(X), model(X), atol=1e-6)


class _LeafSE(torch.fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualified_name: str) -> bool:
        return isinstance(m, SEBlock) or super().is_leaf_module(m, qualified_name)


def test_fx_trace_keeps_the_blocks(model: nn.Module) -> None:
    """torch.fx keeps hook-applied blocks (SEBlock itself is traced as a leaf: its input
    check does not accept fx proxies)."""
    graph_module = torch.fx.GraphModule(model, _LeafSE().trace(model))
    with torch.no_grad():
        assert torch.allclose(graph_module(X), model(X), atol=1e-6)


def test_channels_last(model: nn.Module) -> None:
    with torch.no_grad():
        expected = model(X)
        model.to(memory_format=torch.channels_last)
        assert torch.allclose(model(X.to(memory_format=torch.channels_last)), expected, atol=1e-5)


@pytest.mark.parametrize(("dtype", "atol"), [(torch.float64, 1e-5), (torch.bfloat16, 0.2)])
def test_to_dtype(model: nn.Module, dtype: torch.dtype, atol: float) -> None:
    with torch.no_grad():
        expected = model(X)
        model.to(dtype)
        assert all(p.dtype == dtype for p in model.parameters())
        out = model(X.to(dtype))
    assert out.dtype == dtype
    assert torch.allclose(out.float(), expected, atol=atol)


def test_insert_into_a_converted_model_then_remove() -> None:
    model = trained_like_(TinyResNet()).to(torch.float64).to(memory_format=torch.channels_last)
    x = X.double().to(memory_format=torch.channels_last)
    before = snapshot(model)
    with torch.no_grad():
        reference = model(x)
    insert_se(model, LAYERS, example_input=x, init="identity")
    assert model.blocks[1].relu.se.fc1.weight.dtype == torch.float64
    with torch.no_grad():
        assert (model(x) - reference).abs().max().item() <= 1e-12
    remove_se(model)
    assert_unchanged(model, before)
