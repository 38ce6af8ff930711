"""Model surgery: add channel attention to any model, safely and reversibly."""

from attnblocks.surgery._selectors import Selector, resolve_selectors

__all__ = ["Selector", "resolve_selectors"]
