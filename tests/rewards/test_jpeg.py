"""JPEG (in)compressibility: DDPO's definition, units and sign (docs/rewards.md#jpeg-compressibility)."""

import io

import torch
from rewards_testing import smooth_images, to_pil

import rewards


def ddpo_incompressibility(images):
    """ddpo-pytorch's ``jpeg_incompressibility``: uint8 -> PIL -> JPEG quality 95 -> size in kB."""
    sizes = []
    for image in to_pil(images):
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=95)
        sizes.append(buffer.tell() / 1000)
    return torch.tensor(sizes)


def test_incompressibility_is_the_jpeg_size_in_kb():
    images = torch.cat([smooth_images(2, 64, 48), torch.rand(1, 3, 64, 48)])
    scores = rewards.load("jpeg_incompressibility").score(images)
    torch.testing.assert_close(scores, ddpo_incompressibility(images))
    assert scores.dtype == torch.float32


def test_compressibility_is_the_negative_and_flat_images_win():
    flat = torch.full((1, 3, 64, 64), 0.5)
    noise = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    images = torch.cat([flat, noise])
    incompressible = rewards.load("jpeg_incompressibility").score(images, ["x", "y"])
    compressible = rewards.load("jpeg_compressibility").score(images, ["x", "y"])
    torch.testing.assert_close(compressible, -incompressible)
    assert compressible[0] > compressible[1]
    assert incompressible[1] > 5 * incompressible[0]


def test_jpeg_rewards_are_not_differentiable():
    reward = rewards.load("jpeg_compressibility")
    images = smooth_images(1, 16, 16).requires_grad_(True)
    assert not reward.differentiable
    assert reward.score(images).grad_fn is None


def test_quality_option_changes_the_size():
    images = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    low = rewards.load("jpeg_incompressibility", quality=30).score(images)
    assert low < rewards.load("jpeg_incompressibility").score(images)
