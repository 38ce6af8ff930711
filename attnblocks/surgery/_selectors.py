"""Module selectors: say which submodules of a model a tool should act on.

A selector is one of

* an exact qualified name from ``model.named_modules()``, e.g. ``"layer1.0.bn2"``
  (the empty string ``""`` names the model itself);
* a shell-style glob as in :mod:`fnmatch` (case-sensitive), e.g. ``"layer*.*.bn3"``;
  note that ``*`` also matches dots, so ``"*.bn3"`` matches at any depth;
* a regular expression prefixed with ``"re:"``, matched against the whole name
  (:func:`re.fullmatch`), e.g. ``"re:layer[12]\\.\\d+\\.bn3"``;
* an ``nn.Module`` subclass: every instance of it (:func:`isinstance`);
* an ``nn.Module`` object, e.g. ``model.layer1[0].bn2``: that very module
  (matched by identity, under whatever name it has);
* a predicate ``(name, module) -> bool``.

Patterns, classes and predicates never select the model itself (the root module,
whose name is ``""``); only the exact selector ``""`` or the model object does.

Resolution is linear in the number of modules plus selectors: exact names and
module objects are dictionary look-ups, globs and regexes are compiled once,
class selectors are tested once per module type, and each glob, regex and
predicate is tried once per module name.

Every selector must match at least one module. When one does not,
:func:`resolve_selectors` raises a :class:`~attnblocks.SelectorError` that repeats
the selector and suggests the closest real names; with ``strict=False`` it warns
instead.
"""

from __future__ import annotations

import difflib
import fnmatch
import inspect
import re
import warnings
from collections.abc import Callable, Sequence

from torch import nn

from attnblocks._errors import SelectorError
from attnblocks._validation import check_bool
from attnblocks.surgery._wrappers import wrapper_hint

__all__ = ["Selector", "describe_selector", "resolve_selectors"]

#: What a selector may be: a name, a glob, an ``"re:"`` regex, an ``nn.Module``
#: subclass, an ``nn.Module`` object (matched by identity), or a predicate called
#: as ``predicate(name, module)``.
Selector = str | type[nn.Module] | nn.Module | Callable[[str, nn.Module], bool]

_GLOB_CHARS = frozenset("*?[")
_REGEX_PREFIX = "re:"
_MAX_SUGGESTIONS = 5
# With strict=False, at most this many unmatched selectors get a warning with
# suggestions of their own (each suggestion scans every module name); the rest
# are listed together in one warning.
_MAX_DETAILED_WARNINGS = 5
_MAX_REPR = 60
_MAX_QUOTE = 120  # longest repr of a user's value quoted in a message


def _quote(value: object) -> str:
    """``repr(value)`` for a message, cut to one short line."""
    text = " ".join(repr(value).split())
    return text if len(text) <= _MAX_QUOTE else text[: _MAX_QUOTE - 5] + " ...>"


def describe_module(module: nn.Module) -> str:
    """A one-line description of a module object, e.g. ``BatchNorm2d(8, eps=1e-05, ...)``.

    >>> from torch import nn
    >>> describe_module(nn.Conv2d(3, 8, 1))
    'Conv2d(3, 8, kernel_size=(1, 1), stride=(1, 1))'
    """
    try:
        extra = module.extra_repr().replace("\n", " ")
    except Exception:  # a broken extra_repr must not hide the real message
        extra = ""
    if len(extra) > _MAX_REPR:  # cut after a whole argument
        extra = extra[:_MAX_REPR].rsplit(", ", 1)[0] + ", ..."
    return f"{type(module).__name__}({extra})"


def describe_selector(selector: object) -> str:
    """A short human-readable description of ``selector`` for messages.

    >>> from torch import nn
    >>> describe_selector("layer*.bn3"), describe_selector(nn.Conv2d)
    ("'layer*.bn3'", 'class torch.nn.modules.conv.Conv2d')
    """
    if isinstance(selector, str):
        return _quote(selector)
    if isinstance(selector, type):
        return f"class {selector.__module__}.{selector.__qualname__}"
    if isinstance(selector, nn.Module):
        return f"module object {describe_module(selector)}"
    name = getattr(selector, "__qualname__", None) or type(selector).__qualname__
    return f"predicate {name}"


def _check_predicate_arity(predicate: Callable[..., object], *, owner: str) -> None:
    """Refuse a predicate that cannot be called as ``predicate(name, module)``."""
    try:
        signature = inspect.signature(predicate)
    except (TypeError, ValueError):  # builtins without a signature: checked when called
        return
    try:
        signature.bind("name", None)
    except TypeError:
        raise SelectorError(
            f"{owner}: the {describe_selector(predicate)} cannot be called as "
            f"predicate(name, module): its signature is {signature}. A predicate "
            "selector takes two positional arguments, the qualified module name and "
            "the module, and returns True or False, e.g. "
            "lambda name, module: name.endswith('bn2')."
        ) from None


class _Matcher:
    """One validated selector, ready to test ``(name, module)`` pairs."""

    def __init__(self, selector: object, *, owner: str) -> None:
        self.selector = selector
        self.owner = owner
        self.text: str = ""  # the string selector (for names, globs and regexes)
        self.pattern: re.Pattern[str] | None = None
        self.cls: type[nn.Module] | None = None
        self.module: nn.Module | None = None
        self.predicate: Callable[[str, nn.Module], object] | None = None
        if isinstance(selector, str):
            self.text = selector
            if selector.startswith(_REGEX_PREFIX):
                self.kind = "regex"
                try:
                    self.pattern = re.compile(selector[len(_REGEX_PREFIX) :])
                except re.error as err:
                    raise SelectorError(
                        f"{owner}: the selector {selector!r} is not a valid regular "
                        f"expression ({err}). Regex selectors are written 're:<pattern>' "
                        "and must match the whole qualified module name."
                    ) from None
            elif _GLOB_CHARS & set(selector):
                self.kind = "glob"
                self.pattern = re.compile(fnmatch.translate(selector))
            else:
                self.kind = "name"
        elif isinstance(selector, type):
            if not issubclass(selector, nn.Module):
                raise SelectorError(
                    f"{owner}: the class selector {selector.__qualname__} is not an "
                    "nn.Module subclass. Class selectors select every instance of an "
                    "nn.Module subclass, e.g. nn.Conv2d."
                )
            self.kind = "class"
            self.cls = selector
        elif isinstance(selector, nn.Module):  # before callable(): modules are callable
            self.kind = "module"
            self.module = selector
        elif callable(selector):
            _check_predicate_arity(selector, owner=owner)
            self.kind = "predicate"
            self.predicate = selector
        else:
            raise SelectorError(
                f"{owner}: a selector must be a module name, a glob, an 're:' regex, an "
                "nn.Module subclass, an nn.Module object of the model or a predicate "
                f"(name, module) -> bool; got {_quote(selector)} (type {type(selector).__name__})."
            )

    def matches(self, name: str, module: nn.Module) -> bool:
        """Whether a glob, regex or predicate selects ``(name, module)``.

        :func:`resolve_selectors` calls it once per non-root module name, and only
        for these kinds: exact names, module objects and classes are looked up.
        """
        if self.pattern is not None:  # globs (translated) and regexes
            return self.pattern.fullmatch(name) is not None
        if self.predicate is None:  # pragma: no cover - only the kinds above get here
            return False
        try:
            result = self.predicate(name, module)
        except Exception as err:
            raise SelectorError(
                f"{self.owner}: the {describe_selector(self.selector)} raised "
                f"{type(err).__name__}: {err} for module {name!r} "
                f"({type(module).__name__}). A predicate selector is called as "
                "predicate(name, module) for every submodule and must return True or "
                "False for each."
            ) from err
        if not isinstance(result, bool):
            raise SelectorError(
                f"{self.owner}: the {describe_selector(self.selector)} must return True "
                f"or False, but returned {_quote(result)} (type {type(result).__name__}) for "
                f"module {name!r}."
            )
        return result

    def no_match_message(self, names: Sequence[str], type_names: Sequence[str]) -> str:
        head = (
            f"{self.owner}: the selector {describe_selector(self.selector)} matches no "
            "module of the model."
        )
        if self.kind == "class":
            shown = ", ".join(type_names[:12]) + (" ..." if len(type_names) > 12 else "")
            return f"{head} The model contains modules of type: {shown}."
        if self.kind == "predicate":
            return f"{head} It returned False for all {len(names) - 1} submodules."
        if self.kind == "module":
            return (
                f"{head} The object is neither the model nor one of its submodules (a "
                "module of another model, or of a copy: copy.deepcopy, pickling and "
                "loading make new objects). Pass a module of this very model object, or "
                "select it by its qualified name."
            )
        probe = self.text[len(_REGEX_PREFIX) :] if self.kind == "regex" else self.text
        candidates = [n for n in names if n]
        close = difflib.get_close_matches(probe, candidates, n=_MAX_SUGGESTIONS, cutoff=0.4)
        hint = {
            "name": "Exact names are qualified names as in model.named_modules()",
            "glob": "Globs follow fnmatch rules ('*' also matches dots)",
            "regex": "Regexes must match the whole qualified name",
        }[self.kind]
        if close:
            return f"{head} Closest module names: {close}. {hint}."
        return f"{head} No module name is close; the first ones are {candidates[:5]}. {hint}."


def resolve_selectors(
    model: nn.Module,
    layers: Sequence[Selector],
    *,
    strict: bool = True,
    owner: str = "insert_se",
) -> list[tuple[str, nn.Module]]:
    """Return the submodules of ``model`` selected by ``layers``.

    Args:
        model: the model to search.
        layers: a list of selectors (names, globs, ``"re:"`` regexes, module classes,
            module objects, predicates), mixed freely. See the module docstring for
            each kind.
        strict: if True, a selector that matches nothing raises a
            :class:`~attnblocks.SelectorError`; if False, it issues a warning and is
            skipped (past five such selectors, one warning lists the rest).
        owner: the public function on whose behalf the selectors are resolved, used
            in messages.

    Returns:
        ``(qualified_name, module)`` pairs in ``model.named_modules()`` order, each
        module once (a module registered under several names is reported under the
        first one, as ``named_modules()`` does).

    Raises:
        SelectorError: if ``layers`` is not a list of selectors, a selector is
            malformed (a predicate that cannot take ``(name, module)``, raises or
            returns a non-bool included), or (with ``strict=True``) a selector
            matches nothing.
        InvalidArgumentError: if ``strict`` is not a bool.

    Example:
        >>> from torch import nn
        >>> from attnblocks.surgery import resolve_selectors
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
        ...                     nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8))
        >>> [name for name, _ in resolve_selectors(net, [nn.BatchNorm2d, "re:[03]"])]
        ['0', '1', '3', '4']
        >>> resolve_selectors(net, ["5"])
        Traceback (most recent call last):
        ...
        attnblocks._errors.SelectorError: insert_se: the selector '5' matches no module ...
    """
    if not isinstance(model, nn.Module):
        raise SelectorError(f"{owner}: model must be an nn.Module, got {type(model).__name__}.")
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence):
        single = isinstance(layers, (str, type, nn.Module)) or (
            callable(layers) and not isinstance(layers, type)
        )
        hint = (
            f" Wrap a single selector in a list, e.g. layers=[{_quote(layers)}]."
            if single
            else " Pass a list, e.g. layers=['layer1.0.bn2', nn.BatchNorm2d]."
        )
        raise SelectorError(
            f"{owner}: layers must be a list of selectors, got {_quote(layers)} "
            f"(type {type(layers).__name__}).{hint}"
        )
    check_bool(strict, "strict", owner=owner)
    if len(layers) == 0:
        raise SelectorError(
            f"{owner}: layers is empty; pass at least one selector (a module name, a "
            "glob, an 're:' regex, an nn.Module subclass or a predicate)."
        )
    matchers = [_Matcher(selector, owner=owner) for selector in layers]
    exact: dict[str, list[int]] = {}  # name -> matchers of that exact name
    objects: dict[int, list[int]] = {}  # id(module object) -> its matchers
    classes: list[int] = []
    scanned: list[int] = []  # globs, regexes and predicates: tried once per name
    for index, matcher in enumerate(matchers):
        if matcher.kind == "name":
            exact.setdefault(matcher.text, []).append(index)
        elif matcher.kind == "module":
            objects.setdefault(id(matcher.module), []).append(index)
        elif matcher.kind == "class":
            classes.append(index)
        else:
            scanned.append(index)
    by_type: dict[type, list[int]] = {}  # module type -> the class matchers it satisfies
    hits = [0] * len(matchers)
    chosen: set[int] = set()
    all_names: list[str] = []
    # Aliases (a module registered under several names) are matched under every name.
    for name, module in model.named_modules(remove_duplicate=False):
        all_names.append(name)
        found = [*exact.get(name, ()), *objects.get(id(module), ())]
        if name:  # patterns, classes and predicates never select the root
            kind = type(module)
            if kind not in by_type:
                by_type[kind] = [i for i in classes if issubclass(kind, matchers[i].cls or ())]
            found += by_type[kind]
            found += [i for i in scanned if matchers[i].matches(name, module)]
        for index in found:
            hits[index] += 1
        if found:
            chosen.add(id(module))
    unmatched = [matcher for matcher, count in zip(matchers, hits, strict=True) if not count]
    if unmatched:
        type_names = sorted({type(m).__name__ for m in model.modules()})
        wrapped = wrapper_hint(model)

        def message_of(matcher: _Matcher) -> str:
            message = matcher.no_match_message(all_names, type_names)
            return message + wrapped if matcher.kind in ("name", "glob", "regex") else message

        if strict:
            raise SelectorError(message_of(unmatched[0]))
        for matcher in unmatched[:_MAX_DETAILED_WARNINGS]:
            message = message_of(matcher)
            warnings.warn(f"{message} (strict=False: skipped)", UserWarning, stacklevel=3)
        rest = unmatched[_MAX_DETAILED_WARNINGS:]
        if rest:
            shown = ", ".join(describe_selector(m.selector) for m in rest[:10])
            more = f" and {len(rest) - 10} more" if len(rest) > 10 else ""
            warnings.warn(
                f"{owner}: {len(rest)} more selectors match no module of the model: "
                f"{shown}{more} (strict=False: skipped)",
                UserWarning,
                stacklevel=3,
            )
    return [(name, module) for name, module in model.named_modules() if id(module) in chosen]
