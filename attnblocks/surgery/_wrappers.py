"""Model wrappers that hold the user's model under a prefix: ``torch.compile`` and (D)DP.

``torch.compile(model)`` returns an ``OptimizedModule`` whose only child is the model,
as ``_orig_mod``; ``DistributedDataParallel`` and ``DataParallel`` hold it as
``module``. Their qualified names and state-dict keys carry that prefix
(``_orig_mod.layer1.0.bn2``), which the unwrapped model does not have. Saved
attention is named after the unwrapped model, so it loads onto the model however it
is wrapped, and a selector that matches nothing in a wrapper gets a hint that says so.
"""

from __future__ import annotations

from torch import nn

__all__ = ["unwrap_model", "wrapper_hint"]


def _inner(model: nn.Module) -> tuple[nn.Module, str] | None:
    """The wrapped model and its attribute, if ``model`` is a known wrapper."""
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        return model.module, "module"
    original = model._modules.get("_orig_mod")
    if type(model).__name__ == "OptimizedModule" and isinstance(original, nn.Module):
        return original, "_orig_mod"
    return None


def unwrap_model(model: nn.Module) -> tuple[nn.Module, str]:
    """The model inside any ``torch.compile`` / DDP / DataParallel wrappers, and their prefix.

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3))
        >>> unwrap_model(nn.DataParallel(net)) == (net, "module.")
        True
        >>> unwrap_model(net) == (net, "")
        True
    """
    prefix = ""
    while (found := _inner(model)) is not None:
        model, attr = found
        prefix += attr + "."
    return model, prefix


def wrapper_hint(model: nn.Module) -> str:
    """A sentence for a selector that matched nothing in a wrapped model (else ``""``)."""
    inner, prefix = unwrap_model(model)
    if not prefix:
        return ""
    return (
        f" The model is a wrapper ({type(model).__name__}) around a {type(inner).__name__}: "
        f"its modules' names start with {prefix!r}. Select them with that prefix, or pass the "
        f"wrapped model itself (e.g. model.{prefix[:-1]}; insert attention before "
        "torch.compile or DistributedDataParallel wraps the model)."
    )
