"""Torch preprocessing vs the references' PIL/processor pipelines, pixel by pixel (docs/rewards.md#preprocessing)."""

import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from rewards_testing import smooth_images, to_pil

from rewards.preprocess import CLIP_MEAN, CLIP_STD, center_crop, clip_preprocess, hps_preprocess, normalize


# PIL resizes uint8 images and rounds its output; the torch path resizes floats. On smooth images (no bicubic
# overshoot to clip) that rounding, at most 0.5 grey level plus float error in PIL's fixed-point kernel, is the
# whole difference: measured <= 1.1/255 max and ~0.3/255 mean. In normalised units divide by the smallest std.
MAX_PIXEL_DIFF = 1.5 / 255 / min(CLIP_STD)
MEAN_PIXEL_DIFF = 0.5 / 255 / min(CLIP_STD)
# (64, 90): upsampling, 224 x 315 after resize, an odd crop margin (91) where the HF floor rule and torchvision's
# round-half-even rule pick different offsets; (240, 320): downsampling with antialiasing; (224, 224): identity.
SIZES = [(64, 90), (240, 320), (224, 224)]


def hf_clip_reference(images):
    """The HF CLIP processor path (PIL backend, the v4 "slow" processor) with the LAION/OpenAI settings."""
    import transformers

    processor_cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    processor = processor_cls(
        size={"shortest_edge": 224},
        crop_size={"height": 224, "width": 224},
        resample=3,
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )
    return processor(to_pil(images), return_tensors="pt")["pixel_values"]


def torchvision_reference(images):
    """ImageReward's ``_transform``: PIL Resize(224, bicubic), CenterCrop(224), ToTensor, Normalize."""
    transform = T.Compose(
        [
            T.Resize(224, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(224),
            T.ToTensor(),
            T.Normalize(CLIP_MEAN, CLIP_STD),
        ]
    )
    return torch.stack([transform(image) for image in to_pil(images)])


def hps_reference(images, size=224):
    """HPSv2's evaluation transform: ToTensor, then ``ResizeMaxSize`` on the unbatched CHW tensor, then Normalize."""
    out = []
    for image in to_pil(images):
        x = TF.to_tensor(image)
        height, width = x.shape[1:]
        scale = size / float(max(height, width))
        if scale != 1.0:
            new_size = [round(height * scale), round(width * scale)]
            x = TF.resize(x, new_size, T.InterpolationMode.BICUBIC)
            pad_h, pad_w = size - new_size[0], size - new_size[1]
            x = TF.pad(x, [pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2], fill=0)
        out.append(TF.normalize(x, CLIP_MEAN, CLIP_STD))
    return torch.stack(out)


def assert_close_pixels(ours, ref):
    assert ours.shape == ref.shape
    diff = (ours - ref).abs()
    assert diff.max() <= MAX_PIXEL_DIFF, diff.max()
    assert diff.mean() <= MEAN_PIXEL_DIFF, diff.mean()


@pytest.mark.parametrize("size", SIZES)
def test_clip_preprocess_matches_hf_processor(size):
    images = smooth_images(2, *size)
    assert_close_pixels(clip_preprocess(images), hf_clip_reference(images))


@pytest.mark.parametrize("size", SIZES)
def test_clip_preprocess_round_crop_matches_torchvision(size):
    images = smooth_images(2, *size)
    assert_close_pixels(clip_preprocess(images, crop_rounding="round"), torchvision_reference(images))


def test_crop_rule_matters_where_the_margin_is_odd():
    """The parity tolerance is far below the effect of a one-pixel crop offset: a wrong rule would fail above."""
    images = smooth_images(2, 64, 90)
    wrong = clip_preprocess(images, crop_rounding="round")
    assert (wrong - hf_clip_reference(images)).abs().max() > 5 * MAX_PIXEL_DIFF


@pytest.mark.parametrize("size", [(64, 90), (300, 200), (224, 224), (101, 230)])
def test_hps_preprocess_matches_resize_max_size(size):
    """HPS resizes float tensors in the reference too, so the torch path is exact up to float error."""
    images = smooth_images(2, *size)
    ours = hps_preprocess(images)
    torch.testing.assert_close(ours, hps_reference(images), atol=1e-5, rtol=0)
    assert ours.shape == (2, 3, 224, 224)


def test_hps_pads_with_black_before_normalising():
    images = smooth_images(1, 112, 224)  # -> 112 x 224 content centred in 224 x 224, 56 black rows above and below
    ours = hps_preprocess(images)
    black = normalize(torch.zeros(1, 3, 1, 1))
    torch.testing.assert_close(ours[:, :, :56], black.expand(1, 3, 56, 224))
    torch.testing.assert_close(ours[:, :, -56:], black.expand(1, 3, 56, 224))


def test_hps_pads_non_square_images_whose_longest_edge_is_already_224():
    """Documented deviation: the reference skips padding when no resize is needed, leaving a non-square image the
    ViT cannot take; here it is padded like every other size."""
    images = smooth_images(1, 100, 224)
    ours = hps_preprocess(images)
    assert ours.shape == (1, 3, 224, 224)
    torch.testing.assert_close(ours[:, :, 62:162], normalize(images))


def test_center_crop_refuses_small_images():
    with pytest.raises(ValueError, match="cannot centre-crop"):
        center_crop(torch.zeros(1, 3, 10, 300), 224)


def test_preprocess_keeps_gradients_and_casts_to_model_dtype():
    images = smooth_images(2, 300, 260).requires_grad_(True)
    pixels = clip_preprocess(images, dtype=torch.bfloat16)
    assert pixels.dtype == torch.bfloat16
    pixels.float().square().sum().backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
