"""Selectors: every kind, ordering, de-duplication and every error path."""

from __future__ import annotations

import difflib
import fnmatch
import re
import warnings
from typing import Any

import pytest
from _models import TinyResNet, TutorialCNN
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from attnblocks import AttnBlocksError, SelectorError
from attnblocks.surgery import _selectors, resolve_selectors


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
        (None, r"got None \(type NoneType\)\. Pass a list, e\.g\. layers=\["),
        ([3], r"got 3 \(type int\)"),
        ([None], r"got None \(type NoneType\)"),
        ([int], "int is not an nn.Module subclass"),
        (["re:(unclosed"], r"'re:\(unclosed' is not a valid regular expression"),
        ([lambda n, m: 1], r"must return True or False, but returned 1 \(type int\)"),
        ([lambda n: True], r"cannot be called as predicate\(name, module\).*\(n\)"),
        ([lambda: True], r"cannot be called as predicate\(name, module\)"),
        ([lambda n, m, x: True], r"cannot be called as predicate\(name, module\)"),
        ([lambda n, *, m: True], r"cannot be called as predicate\(name, module\)"),
        ([lambda n, m: 1 / 0], r"raised ZeroDivisionError: division by zero for module 'stem'"),
        ([nn.Conv2d(3, 16, 3)], r"module object Conv2d\(3, 16, .*matches no module"),
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


@pytest.mark.parametrize(
    "predicate",
    [
        lambda *args: args[0] == "fc",
        lambda name, module, extra=None: name == "fc",
        lambda name, /, module: name == "fc",
        max,  # a builtin without a signature: called as max(name, module), then refused
    ],
    ids=["varargs", "default", "positional-only", "builtin"],
)
def test_predicates_callable_with_two_arguments_are_accepted(
    resnet: TinyResNet, predicate: Any
) -> None:
    if predicate is max:
        with pytest.raises(SelectorError, match="raised TypeError"):
            resolve_selectors(resnet, [predicate])
    else:
        assert names(resnet, [predicate]) == ["fc"]


def test_module_objects_select_themselves_by_identity(resnet: TinyResNet) -> None:
    bn = resnet.blocks[1].bn2
    assert resolve_selectors(resnet, [bn]) == [("blocks.1.bn2", bn)]
    assert names(resnet, [resnet.fc, "stem.0", bn]) == ["stem.0", "blocks.1.bn2", "fc"]
    # an equal module of another model is another object
    with pytest.raises(SelectorError, match=r"module object BatchNorm2d\(16, .*copy"):
        resolve_selectors(resnet, [nn.BatchNorm2d(16)])


def test_a_module_object_alias_is_reported_under_its_first_name() -> None:
    shared = nn.Conv2d(3, 3, 1)
    model = nn.Module()
    model.a = shared
    model.b = shared
    assert resolve_selectors(model, [shared]) == [("a", shared)]


def test_the_model_object_selects_the_root_like_the_empty_name(resnet: TinyResNet) -> None:
    assert names(resnet, [resnet]) == [""]


def test_a_predicate_exception_is_chained(resnet: TinyResNet) -> None:
    def picky(name: str, module: nn.Module) -> bool:
        raise KeyError(name)

    with pytest.raises(SelectorError, match=r"predicate .*picky raised KeyError") as info:
        resolve_selectors(resnet, [picky])
    assert isinstance(info.value.__cause__, KeyError)


def _chain(n: int) -> nn.Sequential:
    return nn.Sequential(*[nn.Identity() for _ in range(n)])


def _count_matches(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls = [0]
    original = _selectors._Matcher.matches

    def counting(self: Any, name: str, module: nn.Module) -> bool:
        calls[0] += 1
        return original(self, name, module)

    monkeypatch.setattr(_selectors._Matcher, "matches", counting)
    return calls


@pytest.mark.parametrize("n", [50, 400, 2000])
def test_exact_names_are_looked_up_not_compared_with_every_module(
    monkeypatch: pytest.MonkeyPatch, n: int
) -> None:
    calls = _count_matches(monkeypatch)
    model = _chain(n)
    selected = resolve_selectors(model, [str(i) for i in reversed(range(n))])
    assert [name for name, _ in selected] == [str(i) for i in range(n)]
    assert calls[0] == 0  # N names x N modules used to make N * (N + 1) comparisons


@pytest.mark.parametrize("n", [50, 400, 2000])
def test_a_predicate_is_called_once_per_module_whatever_the_other_selectors(n: int) -> None:
    calls = [0]

    def predicate(name: str, module: nn.Module) -> bool:
        calls[0] += 1
        return name == "0"

    names = [str(i) for i in range(n)]
    resolve_selectors(_chain(n), [*names, predicate, *names])
    assert calls[0] == n  # every submodule once; the root is never offered


def test_globs_and_regexes_are_compiled_once_and_tried_once_per_module(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    translated: list[str] = []
    original_translate = fnmatch.translate

    def counting_translate(pattern: str) -> str:
        translated.append(pattern)
        return original_translate(pattern)

    def no_fnmatchcase(name: str, pattern: str) -> bool:
        raise AssertionError("globs must use their compiled pattern")

    monkeypatch.setattr(fnmatch, "translate", counting_translate)
    monkeypatch.setattr(fnmatch, "fnmatchcase", no_fnmatchcase)
    calls = _count_matches(monkeypatch)
    n = 1000
    selected = resolve_selectors(_chain(n), ["1?", "re:9\\d\\d", "5*"])
    assert translated == ["1?", "5*"]
    assert calls[0] == 3 * n  # three patterns, each tried once per submodule name
    assert len(selected) == 10 + 100 + 111


def test_class_selectors_are_checked_once_per_module_type() -> None:
    checks = [0]

    class CountingMeta(type(nn.Module)):  # type: ignore[misc]
        def __subclasscheck__(cls, subclass: type) -> bool:
            checks[0] += 1
            return super().__subclasscheck__(subclass)

        def __instancecheck__(cls, instance: object) -> bool:
            checks[0] += 1
            return super().__instancecheck__(instance)

    class Marked(nn.Identity, metaclass=CountingMeta):
        pass

    model = nn.Sequential(*[Marked() if i % 2 else nn.ReLU() for i in range(1000)])
    assert len(resolve_selectors(model, [Marked, nn.ReLU, Marked])) == 1000
    assert checks[0] <= 2 * 2  # two module types (Marked, ReLU), twice listed


def test_many_unmatched_selectors_with_strict_false_stay_cheap(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    suggestions = [0]
    original = difflib.get_close_matches

    def counting(*args: Any, **kwargs: Any) -> list[str]:
        suggestions[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(difflib, "get_close_matches", counting)
    missing = [f"missing{i}" for i in range(300)]
    with pytest.warns(UserWarning) as caught:
        selected = resolve_selectors(_chain(300), ["0", *missing], strict=False)
    assert [name for name, _ in selected] == ["0"]
    assert suggestions[0] == 5  # suggestions (a scan of every name) for the first five only
    assert len(caught) == 6
    assert "295 more selectors match no module" in str(caught[-1].message)
    assert "'missing5'" in str(caught[-1].message)


def _reference(model: nn.Module, layers: list[Any]) -> list[str]:
    """The selector rules applied literally: every selector against every name."""

    def hit(selector: Any, name: str, module: nn.Module) -> bool:
        if isinstance(selector, str) and selector.startswith("re:"):
            return name != "" and re.fullmatch(selector[3:], name) is not None
        if isinstance(selector, str) and set(selector) & set("*?["):
            return name != "" and fnmatch.fnmatchcase(name, selector)
        if isinstance(selector, str):
            return name == selector
        if isinstance(selector, type):
            return name != "" and isinstance(module, selector)
        if isinstance(selector, nn.Module):
            return module is selector
        return name != "" and bool(selector(name, module))

    chosen = {
        id(module)
        for name, module in model.named_modules(remove_duplicate=False)
        if any(hit(s, name, module) for s in layers)
    }
    return [name for name, module in model.named_modules() if id(module) in chosen]


_RESNET = TinyResNet()
_NAMES = [name for name, _ in _RESNET.named_modules()]
_MODULES = [module for _, module in _RESNET.named_modules()]


@st.composite
def _selector(draw: st.DrawFn) -> Any:
    kind = draw(st.sampled_from(["name", "glob", "regex", "class", "object", "predicate"]))
    name = draw(st.sampled_from(_NAMES))
    if kind == "name":
        return name if draw(st.booleans()) else name + "x"  # sometimes a miss
    if kind == "glob":
        chars = [draw(st.sampled_from([c, "*", "?"])) for c in name] or ["*"]
        return "".join(chars)
    if kind == "regex":
        return "re:" + re.escape(name).replace(r"\.", draw(st.sampled_from([r"\.", "."])))
    if kind == "class":
        return type(draw(st.sampled_from(_MODULES)))
    if kind == "object":
        return draw(st.sampled_from(_MODULES))
    suffix = name.rsplit(".", 1)[-1]
    return lambda n, m: n.endswith(suffix)


@given(layers=st.lists(_selector(), min_size=1, max_size=8))
def test_resolution_agrees_with_the_literal_rules(layers: list[Any]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = [name for name, _ in resolve_selectors(_RESNET, layers, strict=False)]
    assert got == _reference(_RESNET, layers)
