"""Resolve activation and gate arguments (a name, a module class or a callable) to modules."""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import torch
from torch import nn

from attnblocks._errors import InvalidArgumentError

__all__ = ["ACTIVATIONS", "GATES", "LambdaLayer", "LayerSpec", "make_layer"]

#: What an ``activation=`` or ``gate=`` argument may be: a registered name, an
#: ``nn.Module`` subclass (or any factory returning a module), an ``nn.Module``
#: instance, or a plain tensor function such as ``torch.sigmoid``.
LayerSpec = str | type[nn.Module] | nn.Module | Callable[..., object]

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": lambda: nn.ReLU(inplace=True),
    "relu6": lambda: nn.ReLU6(inplace=True),
    "silu": lambda: nn.SiLU(inplace=True),
    "swish": lambda: nn.SiLU(inplace=True),
    "gelu": nn.GELU,
    "leaky_relu": lambda: nn.LeakyReLU(inplace=True),
    "hard_swish": lambda: nn.Hardswish(inplace=True),
    "mish": lambda: nn.Mish(inplace=True),
    "tanh": nn.Tanh,
    "identity": nn.Identity,
}

GATES: dict[str, Callable[[], nn.Module]] = {
    "sigmoid": nn.Sigmoid,
    "hard_sigmoid": nn.Hardsigmoid,
}


class LambdaLayer(nn.Module):
    """Wrap a plain tensor function (``torch.sigmoid``, ``torch.tanh`` ...) as a module."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)

    def extra_repr(self) -> str:
        return getattr(self.fn, "__qualname__", repr(self.fn))


def make_layer(
    spec: LayerSpec, table: dict[str, Callable[[], nn.Module]], *, arg: str, owner: str
) -> nn.Module:
    """Build a fresh module from ``spec``.

    Args:
        spec: a name from ``table``, an ``nn.Module`` subclass or factory, a module
            instance (used as is), or a tensor function.
        table: the valid names and their factories.
        arg: the argument's name, used in error messages.
        owner: the class the argument belongs to, used in error messages.
    """
    if isinstance(spec, str):
        key = spec.lower().replace("-", "_")
        if key not in table:
            raise InvalidArgumentError(
                f"{owner}: unknown {arg} {spec!r}; valid names are {sorted(table)}, "
                "or pass an nn.Module class, a module instance or a tensor function."
            )
        return table[key]()
    if isinstance(spec, nn.Module):
        return spec
    if isinstance(spec, type) and issubclass(spec, nn.Module):
        return spec()
    if callable(spec):
        if isinstance(spec, type):
            raise InvalidArgumentError(
                f"{owner}: {arg} class {spec.__name__} is not an nn.Module subclass."
            )
        try:
            built = spec()
        except TypeError:
            built = None
        if isinstance(built, nn.Module):
            return built
        return LambdaLayer(cast(Callable[[torch.Tensor], torch.Tensor], spec))
    raise InvalidArgumentError(
        f"{owner}: {arg} must be a name {sorted(table)}, an nn.Module class or instance, "
        f"or a callable, got {spec!r} (type {type(spec).__name__})."
    )
