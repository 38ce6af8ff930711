"""Check a surgery request completely and work out every site, before anything changes.

:func:`prepare` is shared by :func:`~attnblocks.surgery.plan_attention` (which only
reports) and :func:`~attnblocks.surgery.insert_attention` (which then attaches the
blocks). Every refusal happens here, so a failed call leaves the model as it was.
"""

from __future__ import annotations

import keyword
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from attnblocks._errors import AttnBlocksError, InvalidArgumentError, SurgeryError
from attnblocks._validation import check_choice
from attnblocks.blocks import available_blocks, create_block, get_block_class
from attnblocks.surgery._attach import AttachMode, attached_modules
from attnblocks.surgery._channels import ChannelInfo, infer_channels, is_channels_last_norm
from attnblocks.surgery._probe import ExampleInput, OutputRecord, ProbeResult, run_probe
from attnblocks.surgery._record import remember_insertion
from attnblocks.surgery._request import SurgeryRequest
from attnblocks.surgery._selectors import resolve_selectors
from attnblocks.surgery._site_problems import (
    not_called_hint,
    rank_problem,
    record_problem,
    site_problem,
)

__all__ = ["Preparation", "PreparedSite", "block_identity", "prepare"]

_INIT_MODES = ("default", "identity")


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


@dataclass(frozen=True)
class Preparation:
    """Everything an insertion needs, computed without touching the model.

    The checked arguments first; :func:`prepare` adds the sites last.
    """

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
        for child in attached_modules(host):
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


def _lazy_module_names(model: nn.Module) -> list[str]:
    """Qualified names of the modules holding uninitialised (lazy) parameters or buffers."""
    return [
        repr(name) if name else "the model itself"
        for name, module in model.named_modules()
        if any(
            torch.nn.parameter.is_lazy(tensor)
            for tensor in [*module._parameters.values(), *module._buffers.values()]
            if tensor is not None
        )
    ]


def prepare(
    request: SurgeryRequest, *, count_macs: bool = False, place: bool = True
) -> Preparation:
    """Check the request and return the sites with their blocks built (not attached).

    The steps, in the order their refusals are raised: the arguments, the selected
    modules, then (with ``example_input``) one probing forward pass or (without) the
    channels each module declares (or, for one that declares none, the request's
    ``saved_channels`` when it has them), and last each site's block.

    With ``place=True`` each block is moved to the device and floating dtype of the
    module it follows; a dry run passes ``place=False`` and keeps them on the CPU.

    Raises:
        InvalidArgumentError: bad ``block``, ``init``, ``name`` or block options.
        SelectorError: a selector is malformed or (``strict=True``) matches nothing.
        SurgeryError: a selected module cannot take a block.
    """
    model = _check_model(request.model, owner=request.owner)
    checked = _check_arguments(request)
    selected = _select_sites(model, request, checked)
    static = [infer_channels(module) for _, module in selected]
    if request.example_input is None and request.saved_channels is not None:
        saved = ChannelInfo(request.saved_channels, "the saved attention's config")
        static = [saved if info is None else info for info in static]
    records: Sequence[OutputRecord | None] = [None] * len(selected)
    model_macs: int | None = None
    if request.example_input is not None:
        probe = _probe_sites(
            model, request, request.example_input, selected, static, count_macs=count_macs
        )
        records, model_macs = probe.records, probe.model_macs
    else:
        _require_declared_channels(selected, static, owner=request.owner)
    sites = [
        _build_site(model, checked, selected_site, info, record, place=place, owner=request.owner)
        for selected_site, info, record in zip(selected, static, records, strict=True)
    ]
    return replace(checked, sites=sites, model_macs=model_macs)


def _check_arguments(request: SurgeryRequest) -> Preparation:
    """Check ``block``, ``name``, ``init`` and the block options; no sites yet."""
    owner = request.owner
    block_class, block_name = block_identity(request.block, owner=owner)
    attr = _check_attr(block_name if request.name is None else request.name, owner=owner)
    init = check_choice(request.init, "init", _INIT_MODES, owner=owner)
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
    options = dict(request.block_kwargs)
    for reserved in ("channels", "init"):
        if reserved in options:
            raise InvalidArgumentError(
                f"{owner}: {reserved}= cannot be passed as a block option; channels are "
                f"inferred per site and init is {owner}'s own init= argument."
            )
    if init == "identity":
        options["init"] = "identity"
    return Preparation(block_class, block_name, attr, init, options)


def _select_sites(
    model: nn.Module, request: SurgeryRequest, checked: Preparation
) -> list[tuple[str, nn.Module]]:
    """Resolve the selectors; refuse a selected module that cannot take the block."""
    owner = request.owner
    selected = resolve_selectors(model, request.layers, strict=request.strict, owner=owner)
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
        problem = site_problem(
            site_name,
            module,
            attr=checked.attr,
            block_class=checked.block_class,
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
    return selected


def _probe_sites(
    model: nn.Module,
    request: SurgeryRequest,
    example_input: ExampleInput,
    selected: Sequence[tuple[str, nn.Module]],
    static: Sequence[ChannelInfo | None],
    *,
    count_macs: bool,
) -> ProbeResult:
    """Run the model once on ``example_input``; refuse a site whose output cannot be gated."""
    owner = request.owner
    lazy = _lazy_module_names(model)
    if lazy:
        shown = ", ".join(lazy[:5]) + (f" and {len(lazy) - 5} more" if len(lazy) > 5 else "")
        raise SurgeryError(
            f"{owner}: the model has lazy modules whose parameters are not "
            f"initialised yet ({shown}); the forward pass with example_input would "
            "initialise them and fix their input sizes, which a refused call or a dry "
            "run must not do. Run one forward pass first (model(example_input)), then "
            f"call {owner} again; or leave example_input out if every site's channels "
            "can be read from the module itself (e.g. LazyConv2d.out_channels)."
        )
    probe = run_probe(
        model, example_input, [m for _, m in selected], owner=owner, count_macs=count_macs
    )
    for (site_name, module), info, probed in zip(selected, static, probe.records, strict=True):
        expected = info.channels if info is not None else None
        problem = record_problem(site_name, module, probed, expected)
        if problem is not None:
            if probed.calls == 0:
                problem += not_called_hint(selected, probe.records, request.layers)
            raise SurgeryError(f"{owner}: {problem}")
    return probe


def _require_declared_channels(
    selected: Sequence[tuple[str, nn.Module]],
    static: Sequence[ChannelInfo | None],
    *,
    owner: str,
) -> None:
    """Without ``example_input``, every selected module must declare its output channels."""
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


def _build_site(
    model: nn.Module,
    checked: Preparation,
    selected: tuple[str, nn.Module],
    info: ChannelInfo | None,
    record: OutputRecord | None,
    *,
    place: bool,
    owner: str,
) -> PreparedSite:
    """Build the block for one site, check its rank and place it on the site's device."""
    site_name, module = selected
    block_class, options = checked.block_class, checked.block_kwargs
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
    except Exception as err:  # a third-party block's own failure (or memory)
        raise InvalidArgumentError(
            f"{owner}: cannot build {block_class.__name__}({channels}, **{options}) for "
            f"module {site_name!r}: its constructor raised {type(err).__name__}: {err}"
        ) from err
    problem = rank_problem(site_name, module, built, record)
    if problem is not None:
        raise SurgeryError(f"{owner}: {problem}")
    device, dtype = _placement(module, record, model) if place else (None, None)
    if device is not None:
        built = _place(built, device, dtype, reinit=checked.init == "identity")
    built.train(module.training)  # the block runs in its host's mode
    remember_insertion(built, checked.block_name, checked.init, options, channels)
    mode: AttachMode = "sequential" if isinstance(module, nn.Sequential) else "hook"
    shape = record.shape if record is not None else None
    return PreparedSite(site_name, module, channels, source, mode, built, shape)
