"""Progress bars for the example's command-line scripts: tqdm when it is there."""

from __future__ import annotations

from typing import Any

__all__ = ["progress_factory"]


def progress_factory(enabled: bool) -> Any:
    """tqdm's ``tqdm.auto.tqdm`` if ``enabled`` and tqdm is installed, else None (plain logs).

    >>> progress_factory(False) is None
    True
    """
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm
