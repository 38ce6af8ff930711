"""Compute the "cost in a ResNet-50" table of docs/blocks.rst with the insertion planner.

Every block is planned, with its default options, after ``layer*.*.bn3`` of a
torchvision ResNet-50 with random weights (the 16 bottlenecks, where SE-ResNet puts
SE: before the residual addition), for one 224x224 image:
``attnblocks.plan_attention(model, ["layer*.*.bn3"], block=..., example_input=...)``.
Nothing is inserted and nothing is trained.

By default the model and the example input live on PyTorch's ``meta`` device: the
planner only needs shapes, so nothing is allocated or computed, and the counts are
the same as on the CPU (``--device cpu`` checks it, ~20x slower).

Run from the repository root::

    python docs/make_block_table.py        # prints the rows of the list-table

``tests/test_block_table.py`` recomputes every row and compares it with the page, so
the table cannot go stale.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

import torch

from attnblocks import plan_attention

#: Where the blocks go: after the last batch norm of every bottleneck.
SITES = ["layer*.*.bn3"]

#: One table row per entry: (label in the table, block name, options).
ROWS: list[tuple[str, str, dict[str, Any]]] = [
    ("``se``", "se", {}),
    ("``eca``", "eca", {}),
    ("``cbam``", "cbam", {}),
    ("``scse``", "scse", {}),
    ("``simam``", "simam", {}),
    ("``coord``", "coord", {}),
    ("``ge`` (GE-θ⁻, global)", "ge", {}),
    ("``ge`` (GE-θ, ``extent=8``)", "ge", {"variant": "theta", "extent": 8}),
    ("``ge`` (GE-θ⁺, ``extent=8``)", "ge", {"variant": "theta_plus", "extent": 8}),
    ("``gc``", "gc", {}),
]


@dataclass(frozen=True)
class Row:
    """The cost one block adds to ResNet-50, per 224x224 image."""

    label: str
    params: int
    params_percent: float
    macs: int
    macs_percent: float
    elementwise: int

    def cells(self) -> list[str]:
        """The row's cells as they appear in docs/blocks.rst."""
        return [
            self.label,
            f"{self.params:,}",
            f"{self.params_percent:.2f}%",
            f"{self.macs / 1e6:,.2f} M",
            f"{self.macs_percent:.2f}%",
            f"{self.elementwise / 1e6:,.1f} M",
        ]


def resnet50(device: str = "meta") -> torch.nn.Module:
    """torchvision's ResNet-50 with random weights (no download), on ``device``."""
    from torchvision.models import resnet50 as build

    torch.manual_seed(0)
    with torch.device(device):
        return build(weights=None)


def example_input(model: torch.nn.Module) -> torch.Tensor:
    """One 224x224 image of zeros on the model's device."""
    return torch.zeros(1, 3, 224, 224, device=next(model.parameters()).device)


def compute_row(model: torch.nn.Module, label: str, block: str, options: dict[str, Any]) -> Row:
    """Plan ``block`` after :data:`SITES` of ``model`` and return its table row."""
    example = example_input(model)
    plan = plan_attention(model, SITES, block=block, example_input=example, **options)
    macs, elementwise = plan.macs_added, plan.elementwise_ops_added
    if macs is None or elementwise is None or not plan.model_macs:
        raise RuntimeError(f"the planner could not count the compute of {label}")
    return Row(
        label=label,
        params=plan.params_added,
        params_percent=plan.params_percent,
        macs=macs,
        macs_percent=100.0 * macs / plan.model_macs,
        elementwise=elementwise,
    )


def compute_rows(model: torch.nn.Module | None = None) -> list[Row]:
    """Every row of the table, in :data:`ROWS` order."""
    model = resnet50() if model is None else model
    return [compute_row(model, label, block, options) for label, block, options in ROWS]


def as_list_table(rows: list[Row]) -> str:
    """The rows in reStructuredText list-table syntax, ready to paste."""
    lines = []
    for row in rows:
        first, *rest = row.cells()
        lines.append(f"   * - {first}")
        lines.extend(f"     - {cell}" for cell in rest)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="meta", help="meta (default) or cpu")
    args = parser.parse_args(argv)
    model = resnet50(args.device)
    plan = plan_attention(model, SITES, example_input=example_input(model))
    print(
        f"ResNet-50: {plan.model_params:,} parameters, {plan.model_macs:,} MACs per "
        f"224x224 image, {len(plan)} sites"
    )
    print(as_list_table(compute_rows(model)))


if __name__ == "__main__":
    main()
