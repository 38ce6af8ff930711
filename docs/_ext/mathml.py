"""Render the docs' LaTeX math as MathML when the site is built.

Sphinx's default (MathJax) typesets math in the browser with a script from a CDN, so
every page read offline shows raw ``\\(C = 256\\)``. This renderer converts each
formula with docutils' own LaTeX-to-MathML converter at build time instead; browsers
draw MathML natively (Chromium since version 109, Firefox, Safari), with no script and
no network. A formula the converter cannot read is a build warning (an error with -W).
"""

from __future__ import annotations

import html
import re
from typing import Any

from docutils import nodes
from docutils.utils.math import MathError
from docutils.utils.math.latex2mathml import tex2mathml
from sphinx.application import Sphinx
from sphinx.util import logging
from sphinx.util.math import get_node_equation_number
from sphinx.writers.html5 import HTML5Translator

logger = logging.getLogger(__name__)

# docutils (0.22) turns an accented symbol with a subscript, ``\tilde{x}_c``, into an
# under-over construct (the ``c`` under the ``x``); an empty group between them,
# ``\tilde{x}{}_c``, keeps the subscript a subscript.
_ACCENT_THEN_SUBSCRIPT = re.compile(
    r"(\\(?:tilde|widetilde|hat|widehat|bar|overline|dot|ddot|vec|check|breve|acute|grave)"
    r"\s*(?:\{[^{}]*\}|\\[A-Za-z]+|\w))(?=\s*_)"
)


def _mathml(node: nodes.Element, latex: str, *, block: bool) -> str:
    latex = _ACCENT_THEN_SUBSCRIPT.sub(r"\1{}", latex)
    try:
        return tex2mathml(latex, as_block=block)
    except MathError as exc:
        logger.warning("cannot render %r as MathML: %s", latex, exc, location=node)
        return f"<code>{html.escape(latex)}</code>"


def visit_math(self: HTML5Translator, node: nodes.math) -> None:
    self.body.append(self.starttag(node, "span", "", CLASS="math notranslate"))
    self.body.append(_mathml(node, node.astext(), block=False))
    self.body.append("</span>")
    raise nodes.SkipNode


def visit_displaymath(self: HTML5Translator, node: nodes.math_block) -> None:
    self.body.append(self.starttag(node, "div", CLASS="math notranslate"))
    if node["number"]:
        number = get_node_equation_number(self, node)
        self.body.append(f'<span class="eqno">({number})</span>')
    # Sphinx separates the equations of one block by blank lines.
    for equation in (part for part in node.astext().split("\n\n") if part.strip()):
        self.body.append(_mathml(node, equation, block=True))
    self.body.append("</div>\n")
    raise nodes.SkipNode


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_html_math_renderer("mathml", (visit_math, None), (visit_displaymath, None))
    return {"parallel_read_safe": True, "parallel_write_safe": True}
