"""Look inside attention models: gates, spatial maps, features, knockouts and Grad-CAM.

Everything here works on plain tensors and has no plotting dependency; the figures
built from these results live in :mod:`attnblocks.plot`.

>>> import torch
>>> from torch import nn
>>> from attnblocks import SEBlock
>>> from attnblocks.inspect import GateStats, record_gates
>>> net = nn.Sequential(nn.Conv2d(3, 16, 3), SEBlock(16, reduction=4), nn.ReLU())
>>> with record_gates(net) as rec:
...     _ = net(torch.randn(8, 3, 12, 12))
>>> stats = GateStats.from_gates(rec.gates, labels=torch.arange(8) % 2)
>>> tuple(stats["1"].class_mean.shape)
(2, 16)
"""

from attnblocks.inspect._features import FeatureRecorder, record_features
from attnblocks.inspect._gates import GateRecorder, record_gates
from attnblocks.inspect._gradcam import grad_cam
from attnblocks.inspect._knockout import knockout, knockout_scan
from attnblocks.inspect._maps import normalize_maps, upsample_maps
from attnblocks.inspect._metrics import class_specificity, saturation
from attnblocks.inspect._spatial import MapRecorder, record_maps
from attnblocks.inspect._state import eval_mode
from attnblocks.inspect._stats import GateStats, SiteStats, gate_statistics

__all__ = [
    "FeatureRecorder",
    "GateRecorder",
    "GateStats",
    "MapRecorder",
    "SiteStats",
    "class_specificity",
    "eval_mode",
    "gate_statistics",
    "grad_cam",
    "knockout",
    "knockout_scan",
    "normalize_maps",
    "record_features",
    "record_gates",
    "record_maps",
    "saturation",
    "upsample_maps",
]
