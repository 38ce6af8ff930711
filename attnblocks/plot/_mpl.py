"""Lazy access to matplotlib, so that ``import attnblocks`` never needs it.

Figures are built as :class:`matplotlib.figure.Figure` objects directly, never
through ``pyplot``: no global figure registry that grows until memory runs out, no
backend to select, and ``fig.savefig("x.png")`` works on a headless machine.
"""

from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING

from attnblocks._errors import InvalidArgumentError

if TYPE_CHECKING:
    from matplotlib.cm import ScalarMappable
    from matplotlib.figure import Figure

__all__ = ["INSTALL_HINT", "check_cmap", "new_figure", "require_matplotlib", "scalar_mappable"]

INSTALL_HINT = (
    "attnblocks.plot needs matplotlib, which is not installed. Install it with "
    "`pip install attnblocks[examples]` (or `pip install matplotlib`)."
)


def require_matplotlib() -> ModuleType:
    """Import and return :mod:`matplotlib`, or raise an ``ImportError`` saying how to get it."""
    try:
        import matplotlib
        import matplotlib.colors
        import matplotlib.figure
    except ImportError:
        raise ImportError(INSTALL_HINT, name="matplotlib") from None
    return matplotlib


def check_cmap(cmap: object, *, owner: str) -> None:
    """Check that ``cmap`` is a registered matplotlib colour map name or a ``Colormap``.

    >>> check_cmap("viridis", owner="demo")
    >>> check_cmap("viridi", owner="demo")
    Traceback (most recent call last):
    ...
    attnblocks._errors.InvalidArgumentError: demo: cmap must be a matplotlib colour map name ...
    """
    require_matplotlib()
    import difflib

    import matplotlib as mpl
    from matplotlib.colors import Colormap

    if isinstance(cmap, Colormap) or (isinstance(cmap, str) and cmap in mpl.colormaps):
        return
    names = sorted(mpl.colormaps)
    close = difflib.get_close_matches(cmap, names, n=3) if isinstance(cmap, str) else []
    hint = f" Did you mean {close}?" if close else ""
    raise InvalidArgumentError(
        f"{owner}: cmap must be a matplotlib colour map name (e.g. 'viridis', 'turbo', "
        f"'Blues'; all {len(names)} are in matplotlib.colormaps) or a Colormap, got "
        f"{cmap!r}.{hint}"
    )


def new_figure(figsize: tuple[float, float], *, dpi: float = 100) -> Figure:
    """A new constrained-layout figure, independent of pyplot."""
    require_matplotlib()
    from matplotlib.figure import Figure

    return Figure(figsize=figsize, dpi=dpi, layout="constrained")


def scalar_mappable(cmap: str, vmin: float, vmax: float) -> ScalarMappable:
    """An opaque colour-bar source for ``cmap`` on ``[vmin, vmax]``.

    Heat maps drawn with ``alpha`` < 1 would give a washed-out colour bar; this one
    shows the colours at full strength.
    """
    require_matplotlib()
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    return ScalarMappable(norm=Normalize(vmin=vmin, vmax=vmax), cmap=cmap)
