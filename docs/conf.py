"""Sphinx configuration for the attnblocks documentation."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.abspath(".."))
sys.path.insert(0, os.path.abspath("_ext"))

import attnblocks

project = "attnblocks"
author = "The attnblocks developers"
copyright = "2026, The attnblocks developers"
release = attnblocks.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.doctest",
    "sphinx.ext.viewcode",
    "mathml",  # docs/_ext/mathml.py: math as MathML at build time, no MathJax, no network
]
html_math_renderer = "mathml"

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": True}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
autosummary_generate = False

doctest_global_setup = """
import torch
torch.manual_seed(0)
try:
    import onnxruntime  # docs/onnx.rst's example runs where the onnx extra is installed
except ImportError:
    onnxruntime = None
"""

exclude_patterns = ["_build"]
html_theme = "furo"
html_title = f"attnblocks {release}"
html_static_path = ["_static"]
html_css_files = ["custom.css"]  # a wider text column, see the file
nitpicky = False
