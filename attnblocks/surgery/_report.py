"""The report a dry run returns: one row per site, totals, and a readable table."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["AttentionPlan", "SitePlan"]


@dataclass(frozen=True)
class SitePlan:
    """What an insertion would do at one selected module.

    Attributes:
        name: the module's qualified name (``""`` for the model itself).
        module_type: the module's class name.
        channels: the channel count the block would gate.
        channel_source: where the channel count was read from (e.g.
            ``"BatchNorm2d.num_features"`` or ``"example_input"``).
        hidden_channels: the block's bottleneck width, if it has one.
        params: parameters the block adds.
        output_shape: the module's output shape in the example forward pass, if one
            was run.
        macs: multiply-accumulates the block adds per sample (matrix multiplications
            and convolutions), if an example input was given.
        elementwise_ops: elementwise operations the block adds per sample (one per
            element of the largest tensor each other operator touches), if an
            example input was given.
    """

    name: str
    module_type: str
    channels: int
    channel_source: str
    hidden_channels: int | None
    params: int
    output_shape: tuple[int, ...] | None = None
    macs: int | None = None
    elementwise_ops: int | None = None


def _fmt(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


@dataclass(frozen=True)
class AttentionPlan:
    """The result of :func:`~attnblocks.surgery.plan_attention`; ``str()`` is a table.

    Attributes:
        block: the block's class name.
        block_name: the registry name (or lower-cased class name) of the block.
        attr: the attribute name each block would be stored under.
        init: ``"default"`` or ``"identity"``.
        sites: one :class:`SitePlan` per selected module, in ``named_modules()`` order.
        model_params: the model's parameter count before insertion.
        model_macs: the model's multiply-accumulates per example input (matrix
            multiplications and convolutions), if an example input was given.
        batch_size: the batch size of the example input (dim 0 of the first
            recorded output), if one was given.
    """

    block: str
    block_name: str
    attr: str
    init: str
    sites: tuple[SitePlan, ...]
    model_params: int
    model_macs: int | None = None
    batch_size: int | None = None

    @property
    def params_added(self) -> int:
        """Parameters added by all blocks together."""
        return sum(site.params for site in self.sites)

    @property
    def params_percent(self) -> float:
        """``params_added`` as a percentage of the model's parameters."""
        return 100.0 * self.params_added / self.model_params if self.model_params else 0.0

    @property
    def macs_added(self) -> int | None:
        """Per-sample MACs added by all blocks, if an example input was given."""
        if not self.sites or any(site.macs is None for site in self.sites):
            return None
        return sum(site.macs or 0 for site in self.sites)

    @property
    def elementwise_ops_added(self) -> int | None:
        """Per-sample elementwise operations added by all blocks, if known."""
        if not self.sites or any(site.elementwise_ops is None for site in self.sites):
            return None
        return sum(site.elementwise_ops or 0 for site in self.sites)

    def __len__(self) -> int:
        return len(self.sites)

    def __str__(self) -> str:
        with_cost = any(site.output_shape is not None for site in self.sites)
        header = ["site", "type", "channels", "hidden", "params"]
        if with_cost:
            header += ["output shape", "MACs", "elementwise"]
        rows = []
        for site in self.sites:
            row = [
                site.name or "(model)",
                site.module_type,
                str(site.channels),
                "-" if site.hidden_channels is None else str(site.hidden_channels),
                _fmt(site.params),
            ]
            if with_cost:
                shape = "-" if site.output_shape is None else str(tuple(site.output_shape))
                row += [shape, _fmt(site.macs), _fmt(site.elementwise_ops)]
            rows.append(row)
        total = ["total", "", "", "", _fmt(self.params_added)]
        if with_cost:
            total += ["", _fmt(self.macs_added), _fmt(self.elementwise_ops_added)]
        widths = [max(len(r[i]) for r in [header, *rows, total]) for i in range(len(header))]
        numeric = {2, 3, 4, 6, 7}

        def line(cells: list[str]) -> str:
            parts = [
                cell.rjust(width) if i in numeric else cell.ljust(width)
                for i, (cell, width) in enumerate(zip(cells, widths, strict=True))
            ]
            return "  ".join(parts).rstrip()

        rule = "  ".join("-" * w for w in widths)
        plural = "" if len(self.sites) == 1 else "s"
        lines = [
            f"{self.block} ({self.block_name!r}, init={self.init!r}) at {len(self.sites)} "
            f"site{plural}, stored as <site>.{self.attr}",
            line(header),
            rule,
            *(line(row) for row in rows),
            rule,
            line(total),
            f"parameters: {self.model_params:,} -> {self.model_params + self.params_added:,} "
            f"(+{self.params_percent:.2f}%)",
        ]
        if with_cost:
            macs = self.macs_added
            if self.model_macs and macs is not None and self.batch_size:
                per_sample = self.model_macs / self.batch_size
                lines.append(
                    f"MACs per sample: {per_sample:,.0f} -> {per_sample + macs:,.0f} "
                    f"(+{100.0 * macs / per_sample:.3f}%)"
                )
            lines += [
                "MACs: multiply-accumulates of matrix multiplications and convolutions "
                "(torch.utils.flop_counter);",
                "elementwise: one op per element of the largest tensor of every other "
                "operator (pooling, activations, gating); both per sample.",
            ]
        return "\n".join(lines)
