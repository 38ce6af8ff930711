"""The ResNet-50 cost table of docs/blocks.rst is what docs/make_block_table.py computes now."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest

from attnblocks import available_blocks, plan_attention

pytest.importorskip("torchvision")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "docs" / "make_block_table.py"
PAGE = ROOT / "docs" / "blocks.rst"


@pytest.fixture(scope="module")
def table() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_block_table", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def documented_rows() -> dict[str, list[str]]:
    """``{label: cells}`` of the list-table in the "Cost in a ResNet-50" section."""
    text = PAGE.read_text(encoding="utf-8")
    section = text[text.index("Cost in a ResNet-50\n") :]
    section = section[: section.index("\n----", section.index("\n----") + 5)]
    rows = {}
    for chunk in re.split(r"\n   \* - ", section)[2:]:  # skip the text and the header row
        lines = [line.strip() for line in chunk.split("\n\n")[0].splitlines()]
        cells = [lines[0]] + [line.removeprefix("- ") for line in lines[1:]]
        rows[cells[0]] = cells
    return rows


def test_every_documented_row_matches_the_planner(table: ModuleType) -> None:
    documented = documented_rows()
    computed = table.compute_rows()
    assert list(documented) == [row.label for row in computed]
    for row in computed:
        assert documented[row.label] == row.cells(), row.label
    # the totals quoted above the table
    model = table.resnet50()
    plan = plan_attention(model, table.SITES, example_input=table.example_input(model))
    text = PAGE.read_text(encoding="utf-8")
    assert f"ResNet-50 ({plan.model_params:,} parameters, {plan.model_macs:,}\nMACs" in text
    assert len(plan) == 16 and "each of the 16 bottlenecks" in text
    # every registered block has a row with its default options

    labels = [label for label, _, options in table.ROWS if not options]
    assert sorted(label.split()[0].strip("`") for label in labels) == available_blocks()


def test_meta_device_counts_equal_cpu_counts(table: ModuleType) -> None:
    """The table is computed on the meta device; one row checked against a real forward."""
    label, block, options = table.ROWS[1]  # eca: the cheapest block
    on_meta = table.compute_row(table.resnet50("meta"), label, block, options)
    on_cpu = table.compute_row(table.resnet50("cpu"), label, block, options)
    assert on_meta == on_cpu
