"""``clip_score`` with open_clip models by name, against open_clip's own transform and encoders, on tiny models.

The references are open_clip itself: ``create_model_and_transforms``/``create_model_from_pretrained`` load the same
local weights and give the PIL evaluation transform; the score is ``100 * cos`` of ``encode_image``/``encode_text``
computed here. Nothing is downloaded: weights are random, saved in tmp folders and passed as files or
``local-dir:`` folders (HF_HUB_OFFLINE=1).
"""

import json

import pytest
import torch
import torch.nn.functional as F
from rewards_testing import smooth_images, to_pil

import rewards
from rewards.clip_score import open_clip_preprocess


PROMPTS = ["a red cube left of a blue ball", "two green cats on a mat", "a photo of a dog", "an astronaut"]
TINY_TEXT = {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}
TINY_NAME = "tiny-clipscore-open-clip"
# A model folder as hf-hub repositories hold them: its own size, resize mode, interpolation and normalisation.
LOCAL_PREPROCESS = {
    "mean": [0.5, 0.4, 0.3],
    "std": [0.2, 0.25, 0.3],
    "interpolation": "bilinear",
    "resize_mode": "squash",
}
# PIL resizes uint8 and rounds (test_preprocess.py): 1.5 grey levels (measured <= 1.02 on these cases) in normalised
# units over the smallest std.
PIXEL_ATOL = 1.5 / 255 / 0.2


def tiny_cfg(image_size, patch_size):
    vision = {"image_size": image_size, "layers": 2, "width": 64, "head_width": 32, "patch_size": patch_size}
    return {"embed_dim": 32, "vision_cfg": vision, "text_cfg": TINY_TEXT}


@pytest.fixture(scope="session")
def tiny_open_clip(tmp_path_factory):
    """``(name, weights file)``: a tiny built-in-style config registered with open_clip, random weights saved."""
    import open_clip

    folder = tmp_path_factory.mktemp("open-clip")
    config = folder / f"{TINY_NAME}.json"
    config.write_text(json.dumps(tiny_cfg(224, 14)))
    open_clip.add_model_config(config)
    torch.manual_seed(20)
    weights = folder / "tiny_open_clip.pt"
    torch.save(open_clip.create_model(TINY_NAME, pretrained=None).state_dict(), weights)
    return TINY_NAME, weights


@pytest.fixture(scope="session")
def tiny_open_clip_dir(tmp_path_factory):
    """A ``local-dir:`` folder (``open_clip_config.json`` with a non-default ``preprocess_cfg`` + safetensors)."""
    import open_clip
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("open-clip-dir")
    config = {"model_cfg": tiny_cfg(64, 16), "preprocess_cfg": LOCAL_PREPROCESS}
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    (folder / "model-only.json").write_text(json.dumps(config["model_cfg"]))
    open_clip.add_model_config(folder / "model-only.json")
    torch.manual_seed(21)
    save_file(
        open_clip.create_model("model-only", pretrained=None).state_dict(), str(folder / "open_clip_model.safetensors")
    )
    return folder


def open_clip_reference(model_name, images, prompts, pretrained=None):
    """``100 * cos`` through open_clip's own loader, PIL transform and encoders; also returns the pixels."""
    import open_clip

    model, preprocess = open_clip.create_model_from_pretrained(model_name, pretrained=pretrained)
    tokenizer = open_clip.get_tokenizer(model_name)
    pixels = torch.stack([preprocess(image) for image in to_pil(images)])
    with torch.no_grad():
        image_features = F.normalize(model.eval().encode_image(pixels), dim=-1)
        text_features = F.normalize(model.encode_text(tokenizer(prompts)), dim=-1)
    return 100 * (image_features * text_features).sum(-1), pixels


def test_builtin_name_with_a_local_weights_file_scores_100_cos(tiny_open_clip):
    name, weights = tiny_open_clip
    images = smooth_images(4, 224, 224)  # at the model size: open_clip's transform is only ToTensor + Normalize
    ref, _ = open_clip_reference(name, images, PROMPTS, pretrained=str(weights))
    ours = rewards.load("clip_score", model=f"open_clip:{name}", pretrained=weights).score(images, PROMPTS)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-4)
    same_prompt, _ = open_clip_reference(name, images, PROMPTS[:1] * 4, pretrained=str(weights))
    assert same_prompt.max() - same_prompt.min() > 1.0, "scores barely depend on the image: the check is vacuous"
    # The open_clip: prefix is optional once model= is given; scale and clamp act as for transformers models.
    plain = rewards.load("clip_score", model=name, pretrained=weights, scale=1.0).score(images, PROMPTS)
    torch.testing.assert_close(plain, ref / 100, rtol=1e-5, atol=1e-6)


def test_local_dir_uses_the_models_own_preprocessing(tiny_open_clip_dir):
    import open_clip

    name = f"local-dir:{tiny_open_clip_dir}"
    images = smooth_images(3, 64, 64)
    ref, ref_pixels = open_clip_reference(name, images, PROMPTS[:3])
    reward = rewards.load("clip_score", path=name).load_weights()
    model = reward._bundle[0]
    cfg = model.visual.preprocess_cfg
    assert (cfg["resize_mode"], cfg["interpolation"], list(cfg["mean"])) == ("squash", "bilinear", [0.5, 0.4, 0.3])
    torch.testing.assert_close(open_clip_preprocess(images, cfg), ref_pixels, rtol=0, atol=1e-6)
    torch.testing.assert_close(reward.score(images, PROMPTS[:3]), ref, rtol=1e-5, atol=1e-4)
    # After a resize (squash, bilinear): within PIL's uint8 rounding of open_clip's transform.
    resized = smooth_images(2, 48, 80)
    _, transform = open_clip.create_model_from_pretrained(name)
    expected = torch.stack([transform(image) for image in to_pil(resized)])
    torch.testing.assert_close(open_clip_preprocess(resized, cfg), expected, rtol=0, atol=PIXEL_ATOL)


# Sizes with odd margins whose half rounds differently from floor (torchvision's round-half-even crop, the 9/10
# padding split): (64, 67) crops 3 columns, (210, 200) -> 67 x 64 crops 3 rows, (64, 91) -> 45 x 64 pads 19 rows.
@pytest.mark.parametrize(
    "resize_mode,interpolation,size",
    [("shortest", "bicubic", (64, 67)), ("shortest", "bicubic", (210, 200)), ("longest", "bicubic", (64, 91))]
    + [("squash", "bicubic", (90, 64)), ("shortest", "bilinear", (100, 72))],
)
def test_preprocessing_matches_open_clip_image_transform(resize_mode, interpolation, size):
    from open_clip.transform import image_transform

    cfg = {"size": 64, "mean": (0.5, 0.4, 0.3), "std": (0.2, 0.25, 0.3), "interpolation": interpolation}
    cfg.update(resize_mode=resize_mode, fill_color=128)
    options = {"mean": cfg["mean"], "std": cfg["std"], "interpolation": interpolation, "fill_color": 128}
    transform = image_transform(64, is_train=False, resize_mode=resize_mode, **options)
    images = smooth_images(2, *size)
    expected = torch.stack([transform(image) for image in to_pil(images)])
    ours = open_clip_preprocess(images, cfg)
    assert ours.shape == expected.shape == (2, 3, 64, 64)
    torch.testing.assert_close(ours, expected, rtol=0, atol=PIXEL_ATOL)
    if resize_mode == "longest":  # the grey padding (128) is there, at the same rows
        pad_value = (128 / 255 - 0.5) / 0.2
        torch.testing.assert_close(ours[:, 0, 0], torch.full_like(ours[:, 0, 0], pad_value))


def test_gradients_reach_images(tiny_open_clip):
    name, weights = tiny_open_clip
    images = smooth_images(2, 96, 80).requires_grad_(True)
    scores = rewards.load("clip_score", model=f"open_clip:{name}", pretrained=weights).score(images, PROMPTS[:2])
    assert scores.dtype == torch.float32 and scores.shape == (2,)
    scores.sum().backward()
    assert torch.isfinite(images.grad).all() and (images.grad.flatten(1).abs().sum(1) > 0).all()


def test_bad_names_and_options_fail_with_the_fix(tiny_open_clip, tmp_path):
    name, weights = tiny_open_clip
    images = smooth_images(1, 32, 32)

    def score(**options):
        return rewards.load("clip_score", **options).score(images, ["x"])

    with pytest.raises(ValueError, match=r"unknown open_clip model 'ViT-H-14-quickgel'.*'ViT-H-14-quickgelu'"):
        score(model="open_clip:ViT-H-14-quickgel", pretrained=weights)
    with pytest.raises(ValueError, match=r"needs pretrained=.*'dfn5b'"):
        score(model="open_clip:ViT-H-14-quickgelu")
    with pytest.raises(ValueError, match=r"neither an existing file nor one of its tags"):
        score(model=f"open_clip:{name}", pretrained=tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="brings its own weights"):
        score(model="open_clip:hf-hub:apple/DFN5B-CLIP-ViT-H-14-384", pretrained=weights)
    with pytest.raises(ValueError, match="transformers models only"):
        rewards.load("clip_score", path="hf-hub:apple/DFN5B-CLIP-ViT-H-14-384", revision="main")
    with pytest.raises(ValueError, match="name the open_clip model too"):
        rewards.load("clip_score", pretrained="dfn5b")
    # Offline and not cached: a clear error, no random-weight fallback.
    with pytest.raises(OSError, match="could not load open_clip model 'hf-hub:apple/DFN5B-CLIP-ViT-H-14-384'"):
        score(path="hf-hub:apple/DFN5B-CLIP-ViT-H-14-384")
