"""Add attention blocks after chosen modules of an existing model, in place."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from attnblocks._errors import SurgeryError
from attnblocks.surgery._attach import attach_block, detach_block
from attnblocks.surgery._prepare import PreparedSite, prepare
from attnblocks.surgery._probe import ExampleInput, OutputRecord, describe_example_input, run_probe
from attnblocks.surgery._request import SurgeryRequest
from attnblocks.surgery._selectors import Selector

__all__ = ["insert_attention", "insert_request", "insert_se"]


def insert_attention(
    model: nn.Module,
    layers: Sequence[Selector],
    *,
    block: str | type[nn.Module] = "se",
    init: str = "default",
    example_input: ExampleInput | None = None,
    strict: bool = True,
    name: str | None = None,
    **block_kwargs: Any,
) -> nn.Module:
    """Add an attention block after the output of each selected module, in place.

    Each selected module keeps its place in the model. The block becomes its child
    (attribute ``name``, by default the block's registry name such as ``se``) and
    is applied to the module's output: by a forward hook, or, for a plain
    ``nn.Sequential``, as its last stage. So every original state-dict key keeps
    its name and order, :func:`remove_attention` gives the original model back,
    and the model still works with ``copy.deepcopy``, pickle, ``torch.compile``,
    ``torch.export``, channels_last and ``.to(dtype)``. Each block is placed on its
    site's device and dtype and starts in its site's train/eval mode (an eval-mode
    model gets eval-mode blocks).

    Everything is checked before anything changes, so a call that raises leaves
    the model exactly as it was. With ``example_input``, the model is also run once
    more after the insertion to check that each block runs exactly once and
    returns a tensor of its input's shape; if not, or if a block fails, the
    insertion is undone and an error naming the block and its site is raised.

    Args:
        model: the model to modify (an eager ``nn.Module``; a
            ``torch.jit.ScriptModule`` is refused).
        layers: a list of selectors, mixed freely: exact qualified names as in
            ``model.named_modules()`` (``"layer1.0.bn2"``), ``fnmatch`` globs
            (``"layer*.*.bn3"``; ``*`` also matches dots), regexes prefixed with
            ``"re:"`` matched against the whole name, ``nn.Module`` classes (every
            instance), ``nn.Module`` objects of the model (``model.layer1[0].bn2``,
            by identity) and predicates ``(name, module) -> bool``. Every selector
            must match at least one module.
        block: a registered block name (see :func:`attnblocks.available_blocks`) or
            a block class taking ``(channels, **options)``.
        init: ``"default"``, or ``"identity"`` to start every block as an exact
            identity map so a trained model's outputs are unchanged (only for
            blocks whose class sets ``supports_identity_init = True``).
        example_input: input for one forward pass (a tensor, a tuple/list of
            positional arguments or a dict of keyword arguments). Needed when a
            site's channels cannot be read from the module itself (activations,
            residual blocks, custom modules); when given, it is also used to check
            every site: called exactly once, returning a floating
            ``(N, C, *spatial)`` tensor with the expected channels.
        strict: if False, a selector that matches nothing only warns.
        name: the attribute each block is stored under.
        **block_kwargs: options for every block, e.g. ``reduction=8``.

    Returns:
        ``model`` itself, modified.

    Raises:
        SelectorError: a selector is malformed or matches nothing (``strict=True``).
        SurgeryError: a selected module cannot take a block (called several times,
            not a feature map, channels unknown without ``example_input``, already
            has such a block, a container, ...).
        InvalidArgumentError: invalid ``block``, ``init``, ``name`` or block options.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from attnblocks.surgery import insert_attention, remove_attention
        >>> net = nn.Sequential(nn.Conv2d(3, 32, 3), nn.BatchNorm2d(32), nn.ReLU())
        >>> x = torch.randn(2, 3, 16, 16)
        >>> before = net(x)
        >>> _ = insert_attention(net, ["1"], block="se", init="identity", reduction=8)
        >>> net[1].se
        SEBlock(
          channels=32, hidden_channels=4, gate_scale=2.0
          ...
        )
        >>> torch.equal(net(x), before)  # bit for bit
        True
        >>> torch.equal(remove_attention(net)(x), before)
        True
    """
    request = SurgeryRequest(
        model, layers, block, init, example_input, strict, name, block_kwargs, "insert_attention"
    )
    return insert_request(request)


def insert_se(
    model: nn.Module,
    layers: Sequence[Selector],
    *,
    init: str = "default",
    example_input: ExampleInput | None = None,
    strict: bool = True,
    **se_kwargs: Any,
) -> nn.Module:
    """Add a Squeeze-and-Excitation block after each selected module, in place.

    :func:`insert_attention` with ``block="se"``: ``se_kwargs`` go to
    :class:`~attnblocks.SEBlock` (``reduction``, ``hidden_channels``,
    ``activation``, ``gate``, ``bias``). Each block is stored as ``<site>.se``.
    Selecting the last batch norm of every ResNet bottleneck gives SE-ResNet as in
    Hu et al., "Squeeze-and-Excitation Networks" (Fig. 3, Table 10): SE on the
    residual branch, before the addition.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from attnblocks.surgery import insert_se, remove_se
        >>> net = nn.Sequential(
        ...     nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        ...     nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        ... )
        >>> _ = insert_se(net, [nn.BatchNorm2d], reduction=4)
        >>> [name for name, m in net.named_modules() if name.endswith(".se")]
        ['1.se', '4.se']
        >>> net(torch.randn(1, 3, 8, 8)).shape
        torch.Size([1, 32, 8, 8])
        >>> _ = remove_se(net)
        >>> [name for name, m in net.named_modules() if name.endswith(".se")]
        []
    """
    request = SurgeryRequest(
        model, layers, "se", init, example_input, strict, None, se_kwargs, "insert_se"
    )
    return insert_request(request)


def insert_request(request: SurgeryRequest) -> nn.Module:
    """Attach the blocks :func:`prepare` built; with an example input, check them; undo on error."""
    prep = prepare(request)
    attached: list[tuple[nn.Module, str]] = []
    try:
        for site in prep.sites:
            attach_block(site.module, prep.attr, site.block, site.mode)
            attached.append((site.module, prep.attr))
        if request.example_input is not None and prep.sites:
            _check_inserted(request, request.example_input, prep.sites)
    except BaseException:
        for module, attr in reversed(attached):
            detach_block(module, attr)
        raise
    return request.model


def _check_inserted(
    request: SurgeryRequest, example_input: ExampleInput, sites: list[PreparedSite]
) -> None:
    """Run the model once more: each block must run once and keep its input's shape."""
    owner = request.owner

    def blame(index: int | None, records: Sequence[OutputRecord], err: Exception) -> str:
        return _check_failure(sites, index, records, err, example_input, owner)

    blocks = [site.block for site in sites]
    probe = run_probe(request.model, example_input, blocks, owner=owner, describe_failure=blame)
    for site, record in zip(sites, probe.records, strict=True):
        if record.calls != 1:
            raise SurgeryError(
                f"{owner}: after insertion, the block at {site.name!r} "
                f"({type(site.module).__name__}) ran {record.calls} times in one "
                "forward pass instead of once; the module's forward probably "
                "iterates over its own children. The insertion was undone; select "
                "another module."
            )
        problem = _output_problem(site, record)
        if problem is not None:
            raise SurgeryError(f"{owner}: after insertion, {problem} The insertion was undone.")


def _output_problem(site: PreparedSite, record: OutputRecord) -> str | None:
    """Why a block's output in the check forward pass is wrong, or None if it is fine."""
    if record.shape is not None and record.shape == record.input_shape:
        return None
    got = f"shape {record.shape}" if record.shape is not None else f"a {record.type_name}"
    return (
        f"the {type(site.block).__name__} at {site.name!r} ({type(site.module).__name__}) "
        f"returned {got} for its input of shape {record.input_shape}; an attention block "
        "must return a tensor of its input's shape."
    )


def _check_failure(
    sites: list[PreparedSite],
    index: int | None,
    records: Sequence[OutputRecord],
    err: Exception,
    example_input: object,
    owner: str,
) -> str:
    """The message for a forward pass that ran before the insertion and fails after it."""
    text = str(err).strip()
    failure = f"{type(err).__name__}: {text.rstrip('.')}"
    if index is None:
        for site, record in zip(sites, records, strict=True):
            problem = _output_problem(site, record) if record.calls else None
            if problem is not None:
                return (
                    f"{owner}: after insertion, {problem} The model then failed with "
                    f"{failure}. The insertion was undone."
                )
        return (
            f"{owner}: after insertion, the forward pass with example_input "
            f"{describe_example_input(example_input)} failed with {failure}. It ran "
            "before the insertion, so an inserted block changed something the rest of "
            "the model relies on. The insertion was undone."
        )
    site = sites[index]
    shape = records[index].input_shape
    on = f" on the output of shape {shape}" if shape is not None else ""
    return (
        f"{owner}: after insertion, the {type(site.block).__name__} at {site.name!r} "
        f"({type(site.module).__name__}) failed{on} with {failure}. The insertion was "
        "undone; this block cannot gate that site's output: select another module or "
        "use another block or block options."
    )
