"""Figures from what :mod:`attnblocks.inspect` returns: tensors in, a matplotlib Figure out.

matplotlib is optional (``pip install attnblocks[examples]``) and imported only when a
function here is called, so ``import attnblocks`` and ``import attnblocks.plot`` never
need it. Every function returns a :class:`matplotlib.figure.Figure` built without
pyplot: save it with ``fig.savefig("name.png")``, headless or not.

>>> from attnblocks.plot import confusion_matrix
>>> fig = confusion_matrix([0, 1, 1], [0, 1, 0])
>>> type(fig).__name__
'Figure'
"""

from attnblocks.plot._confusion import confusion_matrix
from attnblocks.plot._features import channel_heatmaps, feature_map_grid
from attnblocks.plot._gates import gate_class_profile, gate_heatmap, gate_profiles
from attnblocks.plot._gradcam import gradcam_overlay
from attnblocks.plot._spatial import spatial_map_overlay
from attnblocks.plot._training import training_curves

__all__ = [
    "channel_heatmaps",
    "confusion_matrix",
    "feature_map_grid",
    "gate_class_profile",
    "gate_heatmap",
    "gate_profiles",
    "gradcam_overlay",
    "spatial_map_overlay",
    "training_curves",
]
