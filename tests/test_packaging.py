"""The installed distribution is what it says: its version, licence, modules and data.

CI runs these against the built wheel installed in a fresh environment (``.ci/run``),
where a file left out of the wheel would fail here, as well as against the source tree.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.resources
import pkgutil
import re

import pytest

import attnblocks

#: The public subpackages; everything else in the package is private (``_name``).
PUBLIC_SUBPACKAGES = [
    "attnblocks.blocks",
    "attnblocks.surgery",
    "attnblocks.inspect",
    "attnblocks.plot",
]


def all_modules() -> list[str]:
    """Every module of the installed package, private ones included."""
    found = pkgutil.walk_packages(attnblocks.__path__, prefix="attnblocks.")
    return sorted(["attnblocks", *(info.name for info in found)])


def test_installed_version_is_the_package_version() -> None:
    assert importlib.metadata.version("attnblocks") == attnblocks.__version__


def test_version_is_semantic() -> None:
    assert re.fullmatch(r"\d+\.\d+\.\d+(?:(?:a|b|rc)\d+)?(?:\.dev\d+)?", attnblocks.__version__)


def test_licence_is_apache_2_and_shipped() -> None:
    meta = importlib.metadata.metadata("attnblocks")
    assert meta["License-Expression"] == "Apache-2.0"
    assert "LICENSE" in meta.get_all("License-File", [])
    files = importlib.metadata.files("attnblocks") or []
    licence = [f for f in files if f.name == "LICENSE"]
    assert licence, "no LICENSE among the installed distribution's files"
    assert "Apache License" in licence[0].read_text()
    assert "Version 2.0, January 2004" in licence[0].read_text()


def test_runtime_requirements_are_torch_einops_and_safetensors_only() -> None:
    requires = importlib.metadata.requires("attnblocks") or []
    runtime = sorted(
        re.split(r"[ <>=!~;\[]", r, maxsplit=1)[0] for r in requires if "extra" not in r
    )
    assert runtime == ["einops", "safetensors", "torch"]


def test_py_typed_marker_is_shipped() -> None:
    assert importlib.resources.files("attnblocks").joinpath("py.typed").is_file()


@pytest.mark.parametrize("name", all_modules())
def test_every_module_imports(name: str) -> None:
    importlib.import_module(name)


def test_the_public_subpackages_are_all_there() -> None:
    subpackages = {
        m for m in all_modules() if m.count(".") == 1 and not m.split(".")[1].startswith("_")
    }
    assert subpackages == set(PUBLIC_SUBPACKAGES)


@pytest.mark.parametrize("name", ["attnblocks", *PUBLIC_SUBPACKAGES])
def test_every_public_name_exists(name: str) -> None:
    module = importlib.import_module(name)
    missing = [n for n in module.__all__ if not hasattr(module, n)]
    assert not missing, f"{name}.__all__ names what it lacks: {missing}"
