"""SurgeryRequest: the one frozen record each surgery call passes to its steps."""

from __future__ import annotations

import dataclasses

import pytest
from torch import nn

from attnblocks.surgery._request import SurgeryRequest


def test_a_request_is_frozen_and_keeps_its_own_read_only_block_options() -> None:
    options = {"reduction": 4}
    request = SurgeryRequest(nn.ReLU(), ["0"], "se", "default", None, True, None, options, "demo")
    with pytest.raises(dataclasses.FrozenInstanceError):
        request.init = "identity"  # type: ignore[misc]
    with pytest.raises(TypeError):
        request.block_kwargs["reduction"] = 8  # type: ignore[index]
    options["reduction"] = 8  # the caller's dict is copied, not shared
    assert dict(request.block_kwargs) == {"reduction": 4}
