"""Dry run: report what an insertion would do, without changing the model."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from attnblocks.surgery._cost import estimate_block_cost
from attnblocks.surgery._prepare import Preparation, PreparedSite, prepare
from attnblocks.surgery._probe import ExampleInput
from attnblocks.surgery._report import AttentionPlan, SitePlan
from attnblocks.surgery._request import SurgeryRequest
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
    request = SurgeryRequest(
        model, layers, block, init, example_input, strict, name, block_kwargs, "plan_attention"
    )
    return _plan(request)


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
    request = SurgeryRequest(
        model, layers, "se", init, example_input, strict, None, se_kwargs, "plan_se"
    )
    return _plan(request)


def _plan(request: SurgeryRequest) -> AttentionPlan:
    """Prepare the request with blocks on the CPU (random state kept) and tabulate the sites."""
    with torch.random.fork_rng(devices=[]):
        prep = prepare(request, count_macs=request.example_input is not None, place=False)
    sites = tuple(_site_plan(site, prep) for site in prep.sites)
    batches = [site.output_shape[0] for site in prep.sites if site.output_shape is not None]
    return AttentionPlan(
        block=prep.block_class.__name__,
        block_name=prep.block_name,
        attr=prep.attr,
        init=prep.init,
        sites=sites,
        model_params=count_parameters(request.model),
        model_macs=prep.model_macs,
        batch_size=next((n for n in batches if n), batches[0] if batches else None),
    )


def _site_plan(site: PreparedSite, prep: Preparation) -> SitePlan:
    """One row of the plan: the site, its block's size and (with a shape) its cost."""
    cost = None
    if site.output_shape is not None:
        try:
            cost = estimate_block_cost(
                prep.block_class, site.channels, prep.block_kwargs, site.output_shape
            )
        except (RuntimeError, TypeError, ValueError):
            # The block cannot run on the meta device (a data-dependent op such as
            # .item(), an operator without a meta kernel): no estimate for this site.
            cost = None
    hidden = getattr(site.block, "hidden_channels", None)
    return SitePlan(
        name=site.name,
        module_type=type(site.module).__name__,
        channels=site.channels,
        channel_source=site.channel_source,
        hidden_channels=hidden if isinstance(hidden, int) else None,
        params=count_parameters(site.block),
        output_shape=site.output_shape,
        macs=None if cost is None else cost.macs,
        elementwise_ops=None if cost is None else cost.elementwise,
    )
