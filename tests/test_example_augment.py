"""The CIFAR-10 example's batched augmentation: per-image randomness with the right laws."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from se_cifar.augment import (
    Augment,
    adjust_hue,
    color_jitter,
    hsv_to_rgb,
    random_crop,
    random_flip,
    random_rotation,
    rgb_to_hsv,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@given(st.integers(0, 1000))
def test_crop_is_a_shifted_window_of_the_zero_padded_image(seed: int) -> None:
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8) + 1
    out = random_crop(x, 8, 2, _gen(seed))
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for n in range(2):
        found = [
            (dy, dx)
            for dy in range(5)
            for dx in range(5)
            if torch.equal(padded[n, :, dy : dy + 8, dx : dx + 8], out[n])
        ]
        assert len(found) == 1


def test_crop_offsets_differ_between_images() -> None:
    x = torch.rand(64, 3, 8, 8)
    out = random_crop(x, 8, 4, _gen())
    same = [torch.equal(out[i], x[i]) for i in range(64)]
    assert 0 < sum(same) < 64  # some images are unshifted, most are not


def test_flip_flips_about_half_of_the_images_exactly() -> None:
    x = torch.rand(200, 3, 4, 4)
    out = random_flip(x, _gen(1))
    flipped = [torch.equal(out[i], x[i].flip(-1)) for i in range(200)]
    kept = [torch.equal(out[i], x[i]) for i in range(200)]
    assert all(f or k for f, k in zip(flipped, kept, strict=True))
    assert 60 < sum(flipped) < 140


def test_hsv_round_trip_and_hue_matches_torchvision() -> None:
    tvf = pytest.importorskip("torchvision.transforms.v2.functional")
    x = torch.rand(6, 3, 9, 9)
    torch.testing.assert_close(hsv_to_rgb(rgb_to_hsv(x)), x, atol=1e-5, rtol=0)
    for shift in (-0.1, 0.05, 0.3):
        expected = tvf.adjust_hue(x, shift)
        got = adjust_hue(x, torch.full((6,), shift))
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_jitter_keeps_range_and_varies_per_image() -> None:
    x = torch.rand(32, 3, 8, 8)
    out = color_jitter(x, _gen(2), brightness=0.2, contrast=0.2, saturation=0.2, hue=0.1)
    assert out.shape == x.shape
    assert float(out.min()) >= 0 and float(out.max()) <= 1
    ratios = (out.mean(dim=(1, 2, 3)) / x.mean(dim=(1, 2, 3))).unique()
    assert ratios.numel() > 16


def test_brightness_alone_scales_each_image_by_a_factor_in_range() -> None:
    x = torch.rand(50, 3, 4, 4) * 0.5  # no clamping at 1.2 x 0.5
    out = color_jitter(x, _gen(3), brightness=0.2)
    factor = out / x
    per_image = factor.flatten(1)
    torch.testing.assert_close(per_image.min(1).values, per_image.max(1).values)
    assert float(per_image.min()) >= 0.8 - 1e-6 and float(per_image.max()) <= 1.2 + 1e-6


def test_rotation_by_zero_degrees_is_identity_and_angles_fill_corners_with_zero() -> None:
    x = torch.rand(4, 3, 16, 16) + 0.1
    torch.testing.assert_close(random_rotation(x, 0.0, _gen()), x)
    out = random_rotation(x, 45.0, _gen(5))
    # a rotation by a noticeable angle leaves zero-filled corners in most images
    corners = out[:, :, 0, 0] == 0
    assert bool(corners.any())


def test_pipeline_is_deterministic_for_a_seed_and_normalises() -> None:
    aug = Augment(
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
        crop_padding=4,
        flip=True,
        jitter=(0.2, 0.2, 0.2, 0.1),
        rotation=15.0,
    )
    images = (torch.rand(16, 3, 32, 32) * 255).to(torch.uint8)
    a = aug(images, _gen(9), train=True)
    b = aug(images, _gen(9), train=True)
    c = aug(images, _gen(10), train=True)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    plain = aug(images, None, train=False)
    torch.testing.assert_close(plain, (images.float() / 255 - 0.5) / 0.25)
