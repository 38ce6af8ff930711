"""Selectors: every kind, ordering, de-duplication and every error path."""

from __future__ import annotations

import re
import warnings

import pytest
from _models import TinyResNet, TutorialCNN
from torch import nn

from attnblocks import AttnBlocksError, SelectorError
from attnblocks.surgery import resolve_selectors


def names(model: nn.Module, layers: list, **kwargs: object) -> list[str]:
    return [name for name, _ in resolve_selectors(model, layers, **kwargs)]


@pytest.fixture
def resnet() -> TinyResNet:
    return TinyResNet()


@pytest.mark.parametrize(
    ("layers", "expected"),
    [
        (["stem.1"], ["stem.1"]),
        (["blocks.0.bn2"], ["blocks.0.bn2"]),
        (["blocks.*.bn2"], ["blocks.0.bn2", "blocks.1.bn2"]),
        (["*.bn?"], ["blocks.0.bn1", "blocks.0.bn2", "blocks.1.bn1", "blocks.1.bn2"]),
        (["blocks.[1].conv*"], ["blocks.1.conv1", "blocks.1.conv2"]),
        ([r"re:blocks\.\d\.bn2"], ["blocks.0.bn2", "blocks.1.bn2"]),
        (["re:bn2"], []),  # fullmatch, never a search: guarded below by strict=False
        (
            [nn.BatchNorm2d],
            ["stem.1", "blocks.0.bn1", "blocks.0.bn2", "blocks.1.bn1", "blocks.1.bn2"],
        ),
        ([lambda n, m: n.endswith("conv2")], ["blocks.0.conv2", "blocks.1.conv2"]),
        (["fc", "stem.0"], ["stem.0", "fc"]),  # named_modules order, not selector order
        (["blocks.0.bn2", "blocks.*.bn2", nn.Linear], ["blocks.0.bn2", "blocks.1.bn2", "fc"]),
        ([""], [""]),
    ],
)
def test_selector_kinds(resnet: TinyResNet, layers: list, expected: list[str]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert names(resnet, layers, strict=False) == expected


def test_patterns_classes_and_predicates_never_select_the_root() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Sequential(nn.ReLU()))
    assert names(model, ["*"]) == ["0", "1", "1.0"]
    assert names(model, ["re:.*"]) == ["0", "1", "1.0"]
    assert names(model, [nn.Sequential]) == ["1"]
    assert names(model, [lambda n, m: True]) == ["0", "1", "1.0"]


def test_alias_is_matched_under_every_name_and_reported_once() -> None:
    shared = nn.Conv2d(3, 3, 1)
    model = nn.Module()
    model.a = shared
    model.b = shared
    assert names(model, ["b"]) == ["a"]  # the first name, as named_modules() reports it
    assert names(model, ["a", "b"]) == ["a"]


def test_returns_module_objects(resnet: TinyResNet) -> None:
    [(name, module)] = resolve_selectors(resnet, ["blocks.1.bn1"])
    assert name == "blocks.1.bn1" and module is resnet.blocks[1].bn1


@pytest.mark.parametrize(
    ("layers", "fragments"),
    [
        (["blocks.0.bn"], ["'blocks.0.bn'", "matches no module", "blocks.0.bn1", "blocks.0.bn2"]),
        (["layer*.bn3"], ["'layer*.bn3'", "fnmatch"]),
        ([r"re:blocks\.2\.bn1"], [r"'re:blocks\\.2\\.bn1'", "whole qualified name"]),
        ([nn.Conv1d], ["Conv1d", "BatchNorm2d", "ResidualBlock"]),
        ([lambda n, m: False], ["predicate", "<lambda>", "False for all"]),
    ],
)
def test_unmatched_selector_names_it_and_suggests(
    resnet: TinyResNet, layers: list, fragments: list[str]
) -> None:
    with pytest.raises(SelectorError) as info:
        resolve_selectors(resnet, ["fc", *layers], owner="insert_se")
    message = str(info.value)
    assert message.startswith("insert_se:")
    for fragment in fragments:
        assert fragment in message


def test_each_selector_must_match_not_just_one(resnet: TinyResNet) -> None:
    with pytest.raises(SelectorError, match="'nope'"):
        resolve_selectors(resnet, ["fc", "stem.0", "nope"])


def test_strict_false_warns_and_keeps_the_rest(resnet: TinyResNet) -> None:
    with pytest.warns(UserWarning, match=r"'nope' matches no module.*strict=False"):
        assert names(resnet, ["nope", "fc"], strict=False) == ["fc"]


def test_owner_appears_in_messages(resnet: TinyResNet) -> None:
    with pytest.raises(SelectorError, match=r"^record_features: "):
        resolve_selectors(resnet, ["nope"], owner="record_features")


@pytest.mark.parametrize(
    ("layers", "pattern"),
    [
        ("fc", r"layers must be a list of selectors, got 'fc'.*layers=\['fc'\]"),
        (nn.Conv2d, "layers must be a list"),
        ([], "layers is empty"),
        ([3], r"got 3 \(type int\)"),
        ([None], r"got None \(type NoneType\)"),
        ([int], "int is not an nn.Module subclass"),
        (["re:(unclosed"], r"'re:\(unclosed' is not a valid regular expression"),
        ([lambda n, m: 1], r"must return True or False, but returned 1 \(type int\)"),
    ],
)
def test_malformed_selectors(resnet: TinyResNet, layers: object, pattern: str) -> None:
    with pytest.raises(SelectorError, match=pattern):
        resolve_selectors(resnet, layers)  # type: ignore[arg-type]


def test_model_must_be_a_module() -> None:
    with pytest.raises(SelectorError, match=r"model must be an nn\.Module, got str"):
        resolve_selectors("resnet", ["fc"])  # type: ignore[arg-type]


def test_selector_error_is_in_the_family() -> None:
    assert issubclass(SelectorError, AttnBlocksError)
    assert issubclass(SelectorError, ValueError)


def test_suggestions_come_from_the_real_model() -> None:
    with pytest.raises(SelectorError) as info:
        resolve_selectors(TutorialCNN(), ["bn4"])
    suggested = re.search(r"Closest module names: \[(.*?)\]", str(info.value))
    assert suggested is not None
    assert "'bn1'" in suggested.group(1)
