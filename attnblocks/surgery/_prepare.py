"""Check a surgery request completely and work out every site, before anything changes.

:func:`prepare` is shared by :func:`~attnblocks.surgery.plan_attention` (which only
reports) and :func:`~attnblocks.surgery.insert_attention` (which then attaches the
blocks). Every refusal happens here, so a failed call leaves the model as it was.
"""

from __future__ import annotations

import keyword
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from attnblocks._errors import AttnBlocksError, InvalidArgumentError, SurgeryError
from attnblocks.blocks import available_blocks, create_block, get_block_class
from attnblocks.surgery._attach import AttachMode, attached_blocks
from attnblocks.surgery._channels import infer_channels, is_channels_last_norm
from attnblocks.surgery._probe import ExampleInput, OutputRecord, run_probe
from attnblocks.surgery._record import remember_insertion
from attnblocks.surgery._selectors import Selector, resolve_selectors

__all__ = ["Preparation", "PreparedSite", "block_identity", "prepare"]

_INIT_MODES = ("default", "identity")
_MIN_DIMS, _MAX_DIMS = 3, 5  # (N, C) plus 1 to 3 spatial dimensions


@dataclass
class PreparedSite:
    """One selected module, ready to take a block."""

    name: str
    module: nn.Module
    channels: int
    channel_source: str
    mode: AttachMode
    block: nn.Module
    output_shape: tuple[int, ...] | None = None


@dataclass
class Preparation:
    """Everything an insertion needs, computed without touching the model."""

    block_class: type[nn.Module]
    block_name: str
    attr: str
    init: str
    block_kwargs: dict[str, Any]
    sites: list[PreparedSite] = field(default_factory=list)
    model_macs: int | None = None


def block_identity(block: str | type[nn.Module], *, owner: str) -> tuple[type[nn.Module], str]:
    """Return the block class and its registry name (or lower-cased class name).

    >>> from attnblocks import SEBlock
    >>> block_identity("se", owner="demo") == (SEBlock, "se")
    True
    """
    try:
        cls = get_block_class(block)
    except InvalidArgumentError as err:
        raise InvalidArgumentError(f"{owner}: {err}") from None
    if isinstance(block, str):
        return cls, block.lower()
    for registered in available_blocks():
        if get_block_class(registered) is cls:
            return cls, registered
    return cls, cls.__name__.lower()


def _inserted_module_ids(model: nn.Module) -> set[int]:
    """Ids of every module that is, or is inside, a block attached by attnblocks."""
    found: set[int] = set()
    for host in model.modules():
        for attr in attached_blocks(host):
            child = host._modules.get(attr)
            if child is not None:
                found.update(id(m) for m in child.modules())
    return found


def _check_model(model: object, *, owner: str) -> nn.Module:
    if isinstance(model, torch.jit.ScriptModule):
        raise SurgeryError(
            f"{owner}: got a torch.jit.ScriptModule ({type(model).__name__}); a scripted "
            "model's code is compiled and cannot take new blocks. Insert into the eager "
            "nn.Module first, then script or export the result."
        )
    if not isinstance(model, nn.Module):
        raise InvalidArgumentError(
            f"{owner}: model must be an nn.Module, got {type(model).__name__}."
        )
    return model


def _check_attr(attr: object, *, owner: str) -> str:
    if not isinstance(attr, str) or not attr.isidentifier() or keyword.iskeyword(attr):
        raise InvalidArgumentError(
            f"{owner}: name must be a valid Python identifier (the attribute the block "
            f"is stored under), got {attr!r}."
        )
    return attr


def _placement(
    module: nn.Module, record: OutputRecord | None, model: nn.Module
) -> tuple[torch.device | None, torch.dtype | None]:
    """The device and floating dtype a block at ``module`` should live on."""
    for source in (module, model):
        for tensor in [*source.parameters(), *source.buffers()]:
            if tensor.is_floating_point():
                return tensor.device, tensor.dtype
        if source is module and record is not None and record.dtype is not None:
            return record.device, record.dtype
    return None, None


def _place(
    block: nn.Module, device: torch.device, dtype: torch.dtype | None, *, reinit: bool
) -> nn.Module:
    """Move ``block`` to ``device``/``dtype``; an identity block is re-initialised there.

    An identity start may cancel values computed at construction (in the default
    dtype, on the CPU); recomputing them where the block will run keeps it exact.
    """

    def where() -> tuple[torch.dtype, torch.device] | None:
        first = next(iter(block.parameters()), None)
        return None if first is None else (first.dtype, first.device)

    before = where()
    block = block.to(device=device, dtype=dtype)
    moved = before is not None and where() != before
    reset = getattr(block, "reset_parameters", None)
    if reinit and moved and callable(reset):
        reset()
    return block


def _site_problem(
    name: str,
    module: nn.Module,
    *,
    attr: str,
    block_class: type[nn.Module],
    aliases: Sequence[str],
) -> str | None:
    """Why ``module`` cannot take the block, or None if it can (static checks)."""
    kind = type(module).__name__
    label = f"module {name!r} ({kind})" if name else f"the model itself ({kind})"
    if isinstance(module, torch.jit.ScriptModule):
        return f"{label} is a torch.jit.ScriptModule, whose code cannot call a new block."
    if isinstance(module, (nn.ModuleList, nn.ModuleDict, nn.ParameterList, nn.ParameterDict)):
        return (
            f"{label} is a container (ModuleList/ModuleDict family): it either has no "
            "forward of its own or its forward iterates over its children, so an added "
            "child block would be called on the wrong input. Select the layer whose "
            "output you want gated instead."
        )
    if isinstance(module, nn.Sequential) and type(module).forward is not nn.Sequential.forward:
        last = next(reversed(list(module._modules)), None)
        hint = f", e.g. {name + '.' + last if name else last!r}" if last is not None else ""
        return (
            f"{label} is an nn.Sequential subclass with its own forward, which may "
            "iterate over its children and would then also run an added block. Select "
            f"one of its layers instead{hint}."
        )
    if len(aliases) > 1:
        return (
            f"{label} is registered under several names {list(aliases)}: one module "
            "object used at several places cannot take a block for just one of them."
        )
    existing = attached_blocks(module)
    for other in existing:
        child = module._modules.get(other)
        if isinstance(child, block_class):
            return (
                f"{label} already has a {block_class.__name__} inserted as {other!r}; "
                "inserting twice at the same site would stack two blocks. Call "
                "remove_attention(model) (or remove_se) first to start again."
            )
    if hasattr(module, attr):
        current = getattr(module, attr)
        return (
            f"{label} already has an attribute {attr!r} ({type(current).__name__}); the "
            "block would overwrite it. Pass name='<another identifier>'."
        )
    return None


def _record_problem(
    name: str, module: nn.Module, record: OutputRecord, expected: int | None
) -> str | None:
    """Why the probed output of ``module`` cannot be gated, or None if it can."""
    label = f"module {name!r} ({type(module).__name__})" if name else "the model itself"
    if record.calls == 0:
        return (
            f"{label} was not called in the forward pass with example_input, so a block "
            "attached to it would never run."
        )
    if record.calls > 1:
        return (
            f"{label} is called {record.calls} times in one forward pass (one module object "
            "reused at several places, like a shared nn.ReLU), so a block after it would "
            "gate every one of those tensors. Give each use its own module, or select a "
            "module that is called once."
        )
    shape = record.shape
    if shape is None:
        return (
            f"{label} returns a {record.type_name}, not a tensor; attention blocks gate an "
            "(N, C, *spatial) tensor."
        )
    if record.dtype is not None and not record.dtype.is_floating_point:
        return f"{label} returns a tensor of dtype {record.dtype}; a floating one is needed."
    if not _MIN_DIMS <= len(shape) <= _MAX_DIMS:
        return (
            f"{label} returns a tensor of shape {shape}; attention blocks gate an "
            "(N, C, *spatial) feature map with 1 to 3 spatial dimensions (3D to 5D)."
        )
    if expected is not None and shape[1] != expected:
        return (
            f"{label} should return {expected} channels by its configuration but returned "
            f"shape {shape}, whose dim 1 is {shape[1]}; its output is not laid out "
            "(N, C, *spatial)."
        )
    return None


def prepare(
    model: object,
    layers: Sequence[Selector],
    *,
    block: str | type[nn.Module],
    init: str,
    example_input: ExampleInput | None,
    strict: bool,
    name: str | None,
    block_kwargs: Mapping[str, Any],
    owner: str,
    count_macs: bool = False,
    place: bool = True,
) -> Preparation:
    """Check the request and return the sites with their blocks built (not attached).

    With ``place=True`` each block is moved to the device and floating dtype of the
    module it follows; a dry run passes ``place=False`` and keeps them on the CPU.

    Raises:
        InvalidArgumentError: bad ``block``, ``init``, ``name`` or block options.
        SelectorError: a selector is malformed or (``strict=True``) matches nothing.
        SurgeryError: a selected module cannot take a block.
    """
    model = _check_model(model, owner=owner)
    block_class, block_name = block_identity(block, owner=owner)
    attr = _check_attr(block_name if name is None else name, owner=owner)
    if init not in _INIT_MODES:
        raise InvalidArgumentError(
            f"{owner}: unknown init {init!r}; valid values are {list(_INIT_MODES)}."
        )
    if init == "identity" and not getattr(block_class, "supports_identity_init", False):
        reason = getattr(block_class, "identity_init_unavailable", "")
        supported = [
            n
            for n in available_blocks()
            if getattr(get_block_class(n), "supports_identity_init", False)
        ]
        raise InvalidArgumentError(
            f"{owner}: init='identity' is not available for {block_class.__name__} (its "
            "class does not set supports_identity_init = True)"
            + (f": {reason}" if isinstance(reason, str) and reason else ".")
            + f" Use init='default', or a block that supports it: {supported}."
        )
    options = dict(block_kwargs)
    for reserved in ("channels", "init"):
        if reserved in options:
            raise InvalidArgumentError(
                f"{owner}: {reserved}= cannot be passed as a block option; channels are "
                f"inferred per site and init is {owner}'s own init= argument."
            )
    if init == "identity":
        options["init"] = "identity"

    selected = resolve_selectors(model, layers, strict=strict, owner=owner)
    names_of: dict[int, list[str]] = {}
    for qualified, module in model.named_modules(remove_duplicate=False):
        names_of.setdefault(id(module), []).append(qualified)
    inserted = _inserted_module_ids(model)
    for site_name, module in selected:
        if id(module) in inserted:
            raise SurgeryError(
                f"{owner}: module {site_name!r} ({type(module).__name__}) belongs to an "
                "attention block that attnblocks inserted earlier; blocks are never put "
                "inside inserted blocks. Narrow the selector to the original model's "
                "modules (a class selector such as nn.Conv2d also matches layers inside "
                "inserted blocks; use a glob, a regex or a predicate instead)."
            )
        problem = _site_problem(
            site_name,
            module,
            attr=attr,
            block_class=block_class,
            aliases=names_of.get(id(module), [site_name]),
        )
        if problem is not None:
            raise SurgeryError(f"{owner}: {problem}")
        if is_channels_last_norm(module):
            raise SurgeryError(
                f"{owner}: module {site_name!r} ({type(module).__name__}) normalises the "
                "last dimension only, so its output is channels-last (N, ..., C); "
                "attention blocks gate channels-first (N, C, *spatial) tensors. Select a "
                "module after the permute back to (N, C, H, W)."
            )

    static = [infer_channels(module) for _, module in selected]
    records: list[OutputRecord | None] = [None] * len(selected)
    model_macs: int | None = None
    if example_input is not None:
        probe = run_probe(
            model, example_input, [m for _, m in selected], owner=owner, count_macs=count_macs
        )
        records = list(probe.records)
        model_macs = probe.model_macs
        for (site_name, module), info, probed in zip(selected, static, probe.records, strict=True):
            expected = info.channels if info is not None else None
            problem = _record_problem(site_name, module, probed, expected)
            if problem is not None:
                raise SurgeryError(f"{owner}: {problem}")
    else:
        unknown = [
            f"{site_name!r} ({type(module).__name__})"
            for (site_name, module), info in zip(selected, static, strict=True)
            if info is None
        ]
        if unknown:
            raise SurgeryError(
                f"{owner}: cannot tell the output channels of {', '.join(unknown)} from "
                "the module alone. Pass example_input=<a batch the model accepts, e.g. "
                f"torch.randn(1, 3, 224, 224)> so that {owner} runs the model once and "
                "reads each output's shape."
            )

    sites: list[PreparedSite] = []
    for (site_name, module), info, record in zip(selected, static, records, strict=True):
        if info is not None:
            channels, source = info.channels, info.source
        elif record is not None and record.shape is not None:
            channels, source = record.shape[1], "example_input"
        else:  # pragma: no cover - excluded by the checks above
            raise SurgeryError(f"{owner}: no channel count for module {site_name!r}.")
        try:
            built = create_block(block_class, channels, **options)
        except AttnBlocksError as err:
            raise type(err)(
                f"{owner}: cannot build {block_class.__name__}({channels}, **{options}) for "
                f"module {site_name!r}: {err}"
            ) from None
        device, dtype = _placement(module, record, model) if place else (None, None)
        if device is not None:
            built = _place(built, device, dtype, reinit=init == "identity")
        built.train(module.training)  # the block runs in its host's mode
        remember_insertion(built, block_name, init, options, channels)
        mode: AttachMode = "sequential" if isinstance(module, nn.Sequential) else "hook"
        shape = record.shape if record is not None else None
        sites.append(PreparedSite(site_name, module, channels, source, mode, built, shape))
    return Preparation(block_class, block_name, attr, init, options, sites, model_macs)
