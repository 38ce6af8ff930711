"""Add attention blocks after chosen modules of an existing model, in place."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from attnblocks._errors import SurgeryError
from attnblocks.surgery._attach import attach_block, detach_block
from attnblocks.surgery._prepare import prepare
from attnblocks.surgery._probe import ExampleInput, run_probe
from attnblocks.surgery._selectors import Selector

__all__ = ["insert_attention", "insert_se"]


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
    more after the insertion to check that each block runs exactly once; if not,
    the insertion is undone and an error is raised.

    Args:
        model: the model to modify (an eager ``nn.Module``; a
            ``torch.jit.ScriptModule`` is refused).
        layers: a list of selectors, mixed freely: exact qualified names as in
            ``model.named_modules()`` (``"layer1.0.bn2"``), ``fnmatch`` globs
            (``"layer*.*.bn3"``; ``*`` also matches dots), regexes prefixed with
            ``"re:"`` matched against the whole name, ``nn.Module`` classes (every
            instance) and predicates ``(name, module) -> bool``. Every selector
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
    return _insert(
        model,
        layers,
        block=block,
        init=init,
        example_input=example_input,
        strict=strict,
        name=name,
        block_kwargs=block_kwargs,
        owner="insert_attention",
    )


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
    return _insert(
        model,
        layers,
        block="se",
        init=init,
        example_input=example_input,
        strict=strict,
        name=None,
        block_kwargs=se_kwargs,
        owner="insert_se",
    )


def _insert(
    model: nn.Module,
    layers: Sequence[Selector],
    *,
    block: str | type[nn.Module],
    init: str,
    example_input: ExampleInput | None,
    strict: bool,
    name: str | None,
    block_kwargs: dict[str, Any],
    owner: str,
) -> nn.Module:
    prep = prepare(
        model,
        layers,
        block=block,
        init=init,
        example_input=example_input,
        strict=strict,
        name=name,
        block_kwargs=block_kwargs,
        owner=owner,
    )
    attached: list[tuple[nn.Module, str]] = []
    try:
        for site in prep.sites:
            attach_block(site.module, prep.attr, site.block, site.mode)
            attached.append((site.module, prep.attr))
        if example_input is not None and prep.sites:
            blocks = [site.block for site in prep.sites]
            probe = run_probe(model, example_input, blocks, owner=owner)
            for site, record in zip(prep.sites, probe.records, strict=True):
                if record.calls != 1:
                    raise SurgeryError(
                        f"{owner}: after insertion, the block at {site.name!r} "
                        f"({type(site.module).__name__}) ran {record.calls} times in one "
                        "forward pass instead of once; the module's forward probably "
                        "iterates over its own children. The insertion was undone; select "
                        "another module."
                    )
    except BaseException:
        for module, attr in reversed(attached):
            detach_block(module, attr)
        raise
    return model
