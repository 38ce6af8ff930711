"""Every registered block exports to ONNX inside ResNet-18, and ONNX Runtime agrees with PyTorch.

Users of SE blocks elsewhere meet ``adaptive_avg_pool2d`` export failures (pytorch/pytorch
#109370) and TorchScript crashes. Here each block, inserted with ``insert_attention``
into torchvision's ResNet-18, goes through ``torch.onnx.export`` (the installed torch's
default exporter: TorchScript before torch 2.9, dynamo from 2.9) in both memory
formats, and ONNX Runtime must reproduce PyTorch's outputs. Needs the ``onnx`` extra
(onnx, onnxscript, onnxruntime); skipped, with that reason, without it.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from attnblocks import available_blocks, insert_attention

ort = pytest.importorskip(
    "onnxruntime", reason="onnxruntime is not installed (pip install 'attnblocks[onnx]')"
)
pytest.importorskip("onnx", reason="onnx is not installed (pip install 'attnblocks[onnx]')")
torchvision = pytest.importorskip("torchvision")

FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


def export_and_run(model: nn.Module, x: torch.Tensor, path: Path) -> np.ndarray:
    """Export ``model`` at ``x`` to ``path`` with torch.onnx.export, run it in ONNX Runtime."""
    with warnings.catch_warnings():  # exporter progress and deprecation notes, version-dependent
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (x,), str(path), input_names=["x"], output_names=["y"], verbose=False
        )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {"x": x.numpy()})
    return y


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("block", available_blocks())
def test_every_block_in_resnet18_exports_and_onnx_runtime_matches(
    block: str, fmt: str, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    # After the second batch norm of all 8 basic blocks (before the residual addition).
    insert_attention(model, ["layer*.*.bn2"], block=block, example_input=torch.zeros(1, 3, 64, 64))
    model.eval().to(memory_format=FORMATS[fmt])
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=FORMATS[fmt])
    with torch.no_grad():
        expected = model(x)
    got = torch.from_numpy(export_and_run(model, x, tmp_path / f"{block}.onnx"))
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
