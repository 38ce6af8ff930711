"""Property tests over randomly built Sequential CNNs and random selectors."""

from __future__ import annotations

import re

import torch
from _models import trained_like_
from _surgery_helpers import assert_unchanged, se_blocks, snapshot
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from attnblocks import SurgeryError
from attnblocks.surgery import insert_se, plan_se, remove_se
from attnblocks.surgery._channels import infer_channels

NORMS = {
    "none": None,
    "bn": lambda c: nn.BatchNorm2d(c),
    "gn": lambda c: nn.GroupNorm(1, c),
    "in": lambda c: nn.InstanceNorm2d(c, affine=True),
}
ACTS = {"none": None, "relu": nn.ReLU, "silu": nn.SiLU, "gelu": nn.GELU, "relu_inplace": None}


@st.composite
def random_cnn(draw: st.DrawFn) -> nn.Sequential:
    depth = draw(st.integers(1, 4))
    layers: list[nn.Module] = []
    channels, size = 3, 8
    for _ in range(depth):
        width = draw(st.integers(1, 12))
        kernel = draw(st.sampled_from([1, 3]))
        layers.append(nn.Conv2d(channels, width, kernel, padding=kernel // 2))
        norm = NORMS[draw(st.sampled_from(sorted(NORMS)))]
        if norm is not None:
            layers.append(norm(width))
        act = draw(st.sampled_from(sorted(ACTS)))
        if act == "relu_inplace":
            layers.append(nn.ReLU(inplace=True))
        elif ACTS[act] is not None:
            layers.append(ACTS[act]())
        if size >= 4 and draw(st.booleans()):
            layers.append(nn.MaxPool2d(2))
            size //= 2
        channels = width
    return nn.Sequential(*layers)


@st.composite
def cnn_and_selectors(draw: st.DrawFn) -> tuple[nn.Sequential, list[object], list[str]]:
    model = draw(random_cnn())
    names = [str(i) for i in range(len(model))]
    chosen = sorted(
        draw(st.lists(st.sampled_from(names), min_size=1, max_size=4, unique=True)), key=int
    )
    form = draw(st.sampled_from(["names", "regex", "predicate", "class"]))
    if form == "names":
        selectors: list[object] = list(chosen)
    elif form == "regex":
        selectors = ["re:" + "|".join(re.escape(n) for n in chosen)]
    elif form == "predicate":
        wanted = set(chosen)
        selectors = [lambda name, module: name in wanted]
    else:
        kind = type(model[int(chosen[0])])
        selectors = [kind]
        chosen = [n for n in names if type(model[int(n)]) is kind]
    return model, selectors, chosen


X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


@settings(deadline=None, max_examples=25)
@given(case=cnn_and_selectors(), use_example=st.booleans(), identity=st.booleans())
def test_insert_remove_round_trip_and_identity_law(
    case: tuple[nn.Sequential, list[object], list[str]], use_example: bool, identity: bool
) -> None:
    model, selectors, sites = case
    trained_like_(model)
    with torch.no_grad():
        reference = model(X)
    before = snapshot(model)
    example = X if use_example else None
    init = "identity" if identity else "default"
    inferable = all(infer_channels(model[int(s)]) is not None for s in sites)

    if not use_example and not inferable:
        try:
            insert_se(model, selectors, init=init)
        except SurgeryError as err:
            assert "example_input" in str(err)
        else:  # pragma: no cover - must not happen
            raise AssertionError("insert_se accepted a site without known channels")
        assert_unchanged(model, before)
        return

    plan = plan_se(model, selectors, init=init, example_input=example)
    params = sum(p.numel() for p in model.parameters())
    insert_se(model, selectors, init=init, example_input=example)
    assert [s.name for s in plan.sites] == sites
    assert se_blocks(model) == [f"{s}.se" for s in sites]
    assert sum(p.numel() for p in model.parameters()) == params + plan.params_added
    with torch.no_grad():
        out = model(X)
    assert out.shape == reference.shape
    if identity:
        assert (out - reference).abs().max().item() <= 1e-5

    remove_se(model)
    assert_unchanged(model, before)
    with torch.no_grad():
        assert torch.equal(model(X), reference)


@settings(deadline=None, max_examples=15)
@given(model=random_cnn())
def test_inferred_channels_agree_with_the_probe(model: nn.Sequential) -> None:
    """Whatever the module alone tells about its channels, the real output confirms."""
    layers = [str(i) for i in range(len(model))]
    plan = plan_se(model, layers, example_input=X)
    for site in plan.sites:
        static = infer_channels(model[int(site.name)])
        assert site.output_shape is not None
        assert site.channels == site.output_shape[1]
        if static is not None:
            assert static.channels == site.channels
