"""Dry run: report what an insertion would do, without changing the model."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from attnblocks.surgery._cost import estimate_block_cost
from attnblocks.surgery._prepare import prepare
from attnblocks.surgery._probe import ExampleInput
from attnblocks.surgery._report import AttentionPlan, SitePlan
from attnblocks.surgery._selectors import Selector

__all__ = ["count_parameters", "plan_attention", "plan_se"]


def count_parameters(module: nn.Module) -> int:
    """Number of (initialised) parameters of ``module``, each shared tensor once.

    >>> from torch import nn
    >>> count_parameters(nn.Linear(4, 2))
    10
    """
    return sum(
        p.numel()
        for p in module.parameters()
        if not isinstance(p, nn.parameter.UninitializedParameter)
    )


def plan_attention(
    model: nn.Module,
    layers: Sequence[Selector],
    *,
    block: str | type[nn.Module] = "se",
    init: str = "default",
    example_input: ExampleInput | None = None,
    strict: bool = True,
    name: str | None = None,
    **block_kwargs: Any,
) -> AttentionPlan:
    """Report what :func:`insert_attention` would do with the same arguments; change nothing.

    Every check that :func:`insert_attention` makes is made here too, so a plan
    that succeeds means the insertion will. The blocks are built on the CPU to count
    their parameters (the global random state is restored afterwards). With an
    ``example_input``, the model is run once (eval mode, no gradients, training
    flags restored) to read each site's output shape and to estimate the compute
    each block adds; see :class:`AttentionPlan` for what is counted.

    Args:
        model: the model to inspect; it is not modified.
        layers: selectors for the modules to put a block after (see
            :func:`insert_attention`).
        block: a registered block name (see :func:`attnblocks.available_blocks`) or a
            block class.
        init: ``"default"`` or ``"identity"`` (only for blocks that support it).
        example_input: optional input for one forward pass: a tensor, a tuple/list
            of positional arguments or a dict of keyword arguments.
        strict: if False, selectors that match nothing only warn.
        name: the attribute each block would be stored under (default: the
            block's registry name, e.g. ``"se"``).
        **block_kwargs: options for the block, e.g. ``reduction=8``.

    Returns:
        An :class:`AttentionPlan`; ``print(plan)`` shows a table.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from attnblocks.surgery import plan_attention
        >>> net = nn.Sequential(nn.Conv2d(3, 64, 3), nn.BatchNorm2d(64), nn.ReLU())
        >>> plan = plan_attention(net, ["1"], reduction=16)
        >>> print(plan)
        SEBlock ('se', init='default') at 1 site, stored as <site>.se
        site   type         channels  hidden  params
        -----  -----------  --------  ------  ------
        1      BatchNorm2d        64       4     580
        -----  -----------  --------  ------  ------
        total                                    580
        parameters: 1,920 -> 2,500 (+30.21%)
    """
    return _plan(
        model,
        layers,
        block=block,
        init=init,
        example_input=example_input,
        strict=strict,
        name=name,
        block_kwargs=block_kwargs,
        owner="plan_attention",
    )


def plan_se(
    model: nn.Module,
    layers: Sequence[Selector],
    *,
    init: str = "default",
    example_input: ExampleInput | None = None,
    strict: bool = True,
    **se_kwargs: Any,
) -> AttentionPlan:
    """Report what :func:`insert_se` would do; change nothing.

    The same as :func:`plan_attention` with ``block="se"``; ``se_kwargs`` go to
    :class:`~attnblocks.SEBlock` (``reduction``, ``hidden_channels``, ``activation``,
    ``gate``, ``bias``).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from attnblocks.surgery import plan_se
        >>> net = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU())
        >>> plan = plan_se(net, ["1"], example_input=torch.zeros(1, 3, 16, 16))
        >>> plan.sites[0].channels, plan.sites[0].output_shape, plan.params_added
        (32, (1, 32, 16, 16), 162)
        >>> plan.sites[0].macs  # the two fully connected layers: 32*2 + 2*32 per sample
        128
    """
    return _plan(
        model,
        layers,
        block="se",
        init=init,
        example_input=example_input,
        strict=strict,
        name=None,
        block_kwargs=se_kwargs,
        owner="plan_se",
    )


def _plan(
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
) -> AttentionPlan:
    with torch.random.fork_rng(devices=[]):
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
            count_macs=example_input is not None,
            place=False,
        )
    sites = []
    batch_size = None
    for site in prep.sites:
        macs = elementwise = None
        if site.output_shape is not None:
            batch_size = batch_size or site.output_shape[0]
            try:
                cost = estimate_block_cost(
                    prep.block_class, site.channels, prep.block_kwargs, site.output_shape
                )
                macs, elementwise = cost.macs, cost.elementwise
            except Exception:
                macs = elementwise = None
        hidden = getattr(site.block, "hidden_channels", None)
        sites.append(
            SitePlan(
                name=site.name,
                module_type=type(site.module).__name__,
                channels=site.channels,
                channel_source=site.channel_source,
                hidden_channels=hidden if isinstance(hidden, int) else None,
                params=count_parameters(site.block),
                output_shape=site.output_shape,
                macs=macs,
                elementwise_ops=elementwise,
            )
        )
    return AttentionPlan(
        block=prep.block_class.__name__,
        block_name=prep.block_name,
        attr=prep.attr,
        init=prep.init,
        sites=tuple(sites),
        model_params=count_parameters(model),
        model_macs=prep.model_macs,
        batch_size=batch_size,
    )
