"""Grad-CAM against a hand computation, plus the traps it must avoid."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _inspect_toys import hook_counts, modes, toy_se_net
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from attnblocks import InvalidArgumentError, InvalidInputError
from attnblocks.inspect import grad_cam, normalize_maps, upsample_maps


def _cam_net(channels: int, classes: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, channels, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(channels, classes),
    )


@settings(deadline=None, max_examples=15)
@given(
    n=st.integers(1, 4),
    channels=st.integers(1, 6),
    classes=st.integers(2, 5),
    hw=st.integers(2, 6),
    seed=st.integers(0, 1000),
)
def test_grad_cam_equals_hand_computation(n: int, channels: int, classes: int, hw: int, seed: int):
    torch.manual_seed(seed)
    net = _cam_net(channels, classes)
    x = torch.randn(n, 3, hw, hw)
    targets = torch.randint(0, classes, (n,))
    cams = grad_cam(net, x, targets, "0")
    # y_t = sum_k W[t, k] * mean_ij relu(A_kij) + b_t, so dy_t / dA_kij = W[t, k] [A_kij > 0] / HW
    with torch.no_grad():
        a = net[0](x)
        w = net[4].weight[targets]  # (n, C)
        grad = w[:, :, None, None] * (a > 0).float() / (hw * hw)
        alpha = grad.mean(dim=(2, 3))
        want = (alpha[:, :, None, None] * a).sum(1).clamp(min=0)
    torch.testing.assert_close(cams, want, rtol=1e-5, atol=1e-6)
    # the in-place ReLU module itself is a valid layer too: A = relu(conv(x))
    on_relu = grad_cam(net, x, targets, "1", relu=False)
    with torch.no_grad():
        r = a.clamp(min=0)
        alpha_r = (w[:, :, None, None] / (hw * hw)).expand_as(r).mean(dim=(2, 3))
        want_r = (alpha_r[:, :, None, None] * r).sum(1)
    torch.testing.assert_close(on_relu, want_r, rtol=1e-5, atol=1e-6)


def test_each_image_uses_its_own_target() -> None:
    torch.manual_seed(0)
    net = _cam_net(4, 3)
    x = torch.randn(3, 3, 5, 5)
    batched = grad_cam(net, x, [2, 0, 1], "0")
    for i, t in enumerate([2, 0, 1]):
        torch.testing.assert_close(batched[i], grad_cam(net, x[i : i + 1], [t], "0")[0])


def test_state_grads_and_hooks_untouched() -> None:
    net = toy_se_net()
    net.stage.bn.eval()
    net(torch.randn(2, 3, 8, 8)).sum().backward()
    grads = {n: p.grad.clone() for n, p in net.named_parameters()}
    before_modes, before_hooks = modes(net), hook_counts(net)
    bn_stats = net.stem.bn.running_mean.clone()
    x = torch.randn(4, 3, 8, 8)
    cams = grad_cam(net, x, [0, 1, 2, 3], "stage.se", size=(8, 8))
    assert cams.shape == (4, 8, 8) and not cams.requires_grad
    assert modes(net) == before_modes and hook_counts(net) == before_hooks
    for n, p in net.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], rtol=0, atol=0)
    torch.testing.assert_close(net.stem.bn.running_mean, bn_stats, rtol=0, atol=0)  # eval mode
    assert not x.requires_grad
    # frozen models work too
    for p in net.parameters():
        p.requires_grad_(False)
    torch.testing.assert_close(grad_cam(net, x, [0, 1, 2, 3], "stage.se", size=(8, 8)), cams)


def test_normalization_modes() -> None:
    torch.manual_seed(1)
    net = _cam_net(6, 3)
    x = torch.randn(3, 3, 6, 6)
    raw = grad_cam(net, x, [0, 1, 2], "0")
    image = grad_cam(net, x, [0, 1, 2], "0", normalize="image")
    shared = grad_cam(net, x, [0, 1, 2], "0", normalize="shared")
    torch.testing.assert_close(image, normalize_maps(raw, "image"))
    flat = image.flatten(1)
    for row, raw_row in zip(flat, raw.flatten(1), strict=True):
        if raw_row.max() > raw_row.min():
            assert row.min() == 0 and row.max() == 1
    assert shared.min() == 0 and shared.max() == 1
    torch.testing.assert_close(shared, (raw - raw.min()) / (raw.max() - raw.min()))
    pair = normalize_maps({"a": raw, "b": 2 * raw}, "shared")
    torch.testing.assert_close(pair["b"].max(), torch.tensor(1.0))
    assert pair["a"].max() < 0.51  # the weaker model stays visibly weaker


def test_upsample_maps() -> None:
    maps = torch.arange(4.0).view(1, 2, 2)
    near = upsample_maps(maps, (4, 4), mode="nearest")
    torch.testing.assert_close(near[0, :2, :2], torch.zeros(2, 2))
    cubic = upsample_maps(maps, (7, 5), mode="bicubic")
    assert cubic.shape == (1, 7, 5) and cubic.min() >= 0 and cubic.max() <= 3
    with pytest.raises(InvalidArgumentError, match="unknown upsample mode 'linear'; valid values"):
        upsample_maps(maps, (4, 4), mode="linear")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="size"):
        upsample_maps(maps, (4, 0))
    with pytest.raises(InvalidInputError, match=r"\(N, H, W\)"):
        upsample_maps(torch.rand(4, 4), (8, 8))
    with pytest.raises(InvalidInputError, match="no positions to resize"):
        upsample_maps(torch.rand(1, 0, 2), (4, 4))
    with pytest.raises(InvalidArgumentError, match="more than 2,147,483,648"):
        upsample_maps(maps, (10**6, 10**6))
    with pytest.raises(InvalidArgumentError, match="size must be"):
        upsample_maps(maps, None)  # type: ignore[arg-type]
    assert upsample_maps(torch.rand(0, 2, 2), (4, 4)).shape == (0, 4, 4)
    empty = {"a": torch.rand(0, 2, 2)}
    assert normalize_maps(empty, "shared")["a"].shape == (0, 2, 2)


def test_errors() -> None:
    net = _cam_net(4, 3)
    x = torch.randn(2, 3, 5, 5)
    with pytest.raises(InvalidArgumentError, match="got 3 targets for a batch of 2"):
        grad_cam(net, x, [0, 1, 2], "0")
    with pytest.raises(InvalidArgumentError, match="got 1 targets for a batch of 2"):
        grad_cam(net, x, torch.tensor([1]), "0")
    with pytest.raises(InvalidArgumentError, match=r"lie in \[0, 2\]"):
        grad_cam(net, x, [0, 3], "0")
    with pytest.raises(
        InvalidArgumentError, match=r"grad_cam: .*'00'.*Closest module names: \['0'"
    ):
        grad_cam(net, x, [0, 1], "00")
    with pytest.raises(InvalidArgumentError, match=r"layer 're:\[01\]' matches 2 modules"):
        grad_cam(net, x, [0, 1], "re:[01]")  # selectors, but exactly one module
    with pytest.raises(InvalidArgumentError, match="is neither the model nor one of its"):
        grad_cam(net, x, [0, 1], nn.Conv2d(3, 4, 1))
    with pytest.raises(InvalidArgumentError, match=r"layer must be a module name .* got int"):
        grad_cam(net, x, [0, 1], 0)  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match=r"\(N, C, \*spatial\)"):
        grad_cam(net, x, [0, 1], "3")
    with pytest.raises(InvalidArgumentError, match="normalize"):
        grad_cam(net, x, [0, 1], "0", normalize="minmax")  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="floating"):
        grad_cam(net, x.long(), [0, 1], "0")
    shared = nn.Conv2d(4, 4, 1)
    twice = nn.Sequential(nn.Conv2d(3, 4, 1), shared, shared, *list(net)[2:])
    with pytest.raises(InvalidArgumentError, match="ran 2 times"):
        grad_cam(twice, x, [0, 1], "1")
    assert hook_counts(twice)["1"] == (0, 0, 0, 0, 0)
    assert grad_cam(net, x, [0, 1], net[0]).shape == (2, 5, 5)


class _CountingNet(nn.Sequential):
    calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        type(self).calls += 1
        return super().forward(x)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"size": (0, 16)}, InvalidArgumentError, r"size must be \(height, width\)"),
        ({"size": 16}, InvalidArgumentError, "size must be"),
        ({"upsample": "cubic"}, InvalidArgumentError, "unknown upsample mode 'cubic'"),
        ({"upsample": "cubic", "size": (8, 8)}, InvalidArgumentError, "unknown upsample"),
        ({"relu": "no"}, InvalidArgumentError, "relu must be True or False"),
        ({"eval_mode": 1}, InvalidArgumentError, "eval_mode must be True or False"),
        ({"normalize": "per_image"}, InvalidArgumentError, "unknown normalize"),
    ],
)
def test_arguments_are_checked_before_the_forward_pass(
    kwargs: dict, error: type[Exception], match: str
) -> None:
    net = _CountingNet(*_cam_net(4, 3))
    _CountingNet.calls = 0
    with pytest.raises(error, match=match):
        grad_cam(net, torch.randn(2, 3, 5, 5), [0, 1], "0", **kwargs)
    assert _CountingNet.calls == 0, "no forward pass before the arguments are checked"


def test_inference_mode_is_refused_clearly_and_inference_tensors_work() -> None:
    net = _cam_net(4, 3)
    x = torch.randn(2, 3, 5, 5)
    with torch.inference_mode():
        made_inside = torch.randn(2, 3, 5, 5)
        with pytest.raises(InvalidArgumentError, match=r"torch.inference_mode\(\)"):
            grad_cam(net, x, [0, 1], "0")
    # inputs made under inference_mode, used outside it: an ordinary Grad-CAM
    torch.testing.assert_close(
        grad_cam(net, made_inside, [0, 1], "0"), grad_cam(net, made_inside.clone(), [0, 1], "0")
    )
    with torch.inference_mode():
        frozen = _cam_net(4, 3)
    with pytest.raises(InvalidArgumentError, match="parameters were created under"):
        grad_cam(frozen, x, [0, 1], "0")
    with pytest.raises(InvalidInputError, match="meta device"):
        grad_cam(net, x.to("meta"), [0, 1], "0")
    assert grad_cam(net, x, np.array([0, 1]), "0").shape == (2, 5, 5)
