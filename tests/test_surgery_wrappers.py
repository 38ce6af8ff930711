"""Wrapped models: torch.compile's OptimizedModule and DataParallel hold the model under a prefix.

Laws: attention saved from a wrapped model is named after the model it wraps, so it
loads onto that model wrapped or not, with the same outputs; a name selector that
matches nothing in a wrapper says that the names carry the wrapper's prefix.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from _models import small_cnn, trained_like_
from torch import nn

from attnblocks import (
    SelectorError,
    attention_parameters,
    insert_se,
    load_attention,
    plan_attention,
    save_attention,
)
from attnblocks.surgery._persist import CONFIG_NAME
from attnblocks.surgery._wrappers import unwrap_model

Wrap = Callable[[nn.Module], nn.Module]


def _compiled(model: nn.Module) -> nn.Module:
    return torch.compile(model, backend="eager")  # type: ignore[return-value]


WRAPPERS: dict[str, tuple[Wrap, str]] = {
    "compile": (_compiled, "_orig_mod."),
    "data_parallel": (nn.DataParallel, "module."),
    "compile(data_parallel)": (lambda m: _compiled(nn.DataParallel(m)), "_orig_mod.module."),
}


def _base() -> nn.Module:
    torch.manual_seed(0)
    return trained_like_(small_cnn(width=8)).eval()


def _x() -> torch.Tensor:
    return torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("wrapper", list(WRAPPERS))
def test_unwrap_model_finds_the_model_and_the_prefix(wrapper: str) -> None:
    wrap, prefix = WRAPPERS[wrapper]
    base = _base()
    wrapped = wrap(base)
    inner, found = unwrap_model(wrapped)
    assert inner is base and found == prefix
    assert any(name.startswith(prefix) for name, _ in wrapped.named_modules())
    assert unwrap_model(base) == (base, "")


@pytest.mark.parametrize("wrapper", list(WRAPPERS))
def test_attention_saved_from_a_wrapper_loads_onto_the_bare_model_and_back(
    tmp_path: Path, wrapper: str
) -> None:
    wrap, _ = WRAPPERS[wrapper]
    saved = insert_se(_base(), ["1", "4"], reduction=2)
    with torch.no_grad():
        for p in attention_parameters(saved):
            p.add_(0.01)  # not the freshly built weights
    save_attention(wrap(saved), tmp_path)
    sites = [s["site"] for s in json.loads((tmp_path / CONFIG_NAME).read_text())["sites"]]
    assert sites == ["1", "4"]
    x = _x()
    with torch.no_grad():
        expected = saved(x)
        bare = load_attention(_base(), tmp_path)
        assert torch.equal(bare(x), expected)
        target = wrap(_base())
        assert load_attention(target, tmp_path) is target  # the wrapper is returned
        assert torch.equal(target(x), expected)
        assert {n for n, _ in target.named_modules() if n.endswith(".se")} == {
            WRAPPERS[wrapper][1] + "1.se",
            WRAPPERS[wrapper][1] + "4.se",
        }


@pytest.mark.parametrize("wrapper", list(WRAPPERS))
@pytest.mark.parametrize("selector", ["1", "re:[14]", "*.bn*"])
def test_a_name_selector_that_misses_in_a_wrapper_says_why(wrapper: str, selector: str) -> None:
    wrap, prefix = WRAPPERS[wrapper]
    with pytest.raises(SelectorError) as info:
        plan_attention(wrap(_base()), [selector], block="se")
    message = str(info.value)
    assert f"start with {prefix!r}" in message and f"model.{prefix[:-1]}" in message, message
    # a bare model that misses gets no wrapper sentence
    with pytest.raises(SelectorError) as bare:
        plan_attention(_base(), ["nope"], block="se")
    assert "wrapper" not in str(bare.value)
    # with the prefix the same site is found
    plan = plan_attention(wrap(_base()), [prefix + "1"], block="se")
    assert [site.name for site in plan.sites] == [prefix + "1"]
