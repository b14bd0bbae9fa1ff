"""The shipped shapes assets (base model, CLIP) and their training scripts."""

from __future__ import annotations

import importlib.util
import json
import random
import sys
from pathlib import Path

import pytest
import torch

import rewards
from diffalign.shapes import CLIP_DIR
from diffalign.shapes import model as shapes_model
from diffalign.shapes.scenes import (
    PROMPT_KINDS,
    heldout_prompts,
    is_heldout,
    parse_caption,
    render,
    sample_scene,
)


BASE_DIR = shapes_model.BASE_MODEL_DIR
SCRIPTS = Path(__file__).resolve().parents[2] / "scripts" / "shapes"


def _load_script(name: str):
    """The training script ``scripts/shapes/<name>.py`` as a module (the scripts are not part of the package)."""
    spec = importlib.util.spec_from_file_location(f"shapes_scripts_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


train_base = _load_script("train_base")
train_clip = _load_script("train_clip")


@pytest.fixture(scope="module")
def base_adapter():
    from diffalign.adapters import load_adapter

    return load_adapter(BASE_DIR)


# --------------------------------------------------------------------------------------------------- base model


def test_base_model_folder_is_an_sd3_pipeline_within_budget():
    index = json.loads((BASE_DIR / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline"
    size = sum(path.stat().st_size for path in BASE_DIR.rglob("*") if path.is_file())
    assert size <= 25 * 2**20


def test_base_model_samples_finite_images(base_adapter):
    from diffalign.samplers.plan import ode_plan
    from diffalign.samplers.rollout import rollout

    traj = rollout(base_adapter, ["a red circle", "two blue squares"], ode_plan(2), guidance_scale=4.5, seeds=0)
    assert traj.images.shape == (2, 3, 32, 32)
    assert torch.isfinite(traj.images).all()
    assert traj.images.min() >= 0 and traj.images.max() <= 1


def test_base_model_loads_with_diffusers_and_generates():
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(BASE_DIR)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    images = pipe("a green square", num_inference_steps=2, generator=generator, output_type="pt").images
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()


def test_t5_slot_is_exactly_zero(base_adapter):
    pipe = base_adapter.pipe
    assert shapes_model.null_t5(pipe)
    embeds = pipe._get_t5_prompt_embeds(["a red circle to the left of a blue square"], max_sequence_length=8)
    assert embeds.shape == (1, 8, pipe.transformer.config.joint_attention_dim)
    assert not embeds.any()


def test_repeated_context_sampling_gives_the_same_images(base_adapter):
    from diffalign.samplers.plan import ode_plan
    from diffalign.samplers.rollout import rollout

    prompts = ["a yellow triangle above a red square"]
    plain = rollout(base_adapter, prompts, ode_plan(3), guidance_scale=4.5, seeds=1).images
    with shapes_model.repeated_context_sampling(base_adapter):
        fast = rollout(base_adapter, prompts, ode_plan(3), guidance_scale=4.5, seeds=1).images
    assert base_adapter.max_sequence_length == shapes_model.T5_TOKENS
    torch.testing.assert_close(fast, plain, atol=1e-4, rtol=0)


def test_eval_json_records_protocol_and_accuracies():
    results = json.loads((BASE_DIR / shapes_model.EVAL_FILE).read_text())
    for key in ("single_strict", "heldout_strict"):
        assert 0.0 <= results[key] <= 1.0
    assert results["single_strict"] >= 0.8  # the base model follows simple prompts
    assert results["heldout_strict"] < results["single_strict"]  # and fails more compositions, leaving room
    protocol = results["protocol"]
    per_prompt = protocol["heldout_images_per_prompt"]
    assert results["num_single"] >= 200 and results["num_heldout"] == len(heldout_prompts()) * per_prompt
    assert protocol["num_steps"] > 0 and protocol["guidance_scale"] > 1
    assert {"seed", "heldout_seed", "single_images_per_prompt"} <= set(protocol)


# --------------------------------------------------------------------------------------------------------- CLIP


def _scenes_and_corruptions(count: int, seed: int):
    rng = random.Random(seed)
    images, captions = train_clip.sample_batch(count, rng, split="all")
    return images, captions, [train_clip.corrupt_caption(c, rng) for c in captions]


def test_corrupt_caption_changes_one_colour_shape_count_or_binding():
    rng = random.Random(0)
    for caption in ["a red circle", "three blue squares", "a red circle to the left of a blue triangle"]:
        corrupted = train_clip.corrupt_caption(caption, rng)
        assert corrupted != caption
        assert len(corrupted.split()) == len(caption.split())
        assert sum(a != b for a, b in zip(corrupted.split(), caption.split())) in (1, 2)  # "square" vs "squares"
    seen = {train_clip.corrupt_caption("a blue circle and a green square", rng) for _ in range(200)}
    assert "a green circle and a blue square" in seen  # the colours swapped: the same words, bound the other way
    assert "two blue circles and a green square" in seen
    recounted = [train_clip.corrupt_caption("four red circles", rng) for _ in range(50)]
    assert all(parse_caption(c).num_objects <= 4 for c in recounted)  # a count never goes past MAX_OBJECTS


def test_fast_preprocess_matches_the_rewards_preprocess():
    from rewards.preprocess import clip_preprocess

    images = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(train_clip.fast_clip_preprocess(images), clip_preprocess(images), atol=1e-5, rtol=0)


def test_shipped_clip_ranks_true_captions_and_is_differentiable():
    reward = rewards.load("clip_score", path=CLIP_DIR)
    images, captions, corrupted = _scenes_and_corruptions(50, seed=12345)
    images.requires_grad_(True)
    true = reward(images, captions)
    wrong = reward(images, corrupted)
    assert (true > wrong).float().mean() >= 0.85
    true.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


def test_shipped_clip_sees_relations_and_bindings():
    reward = rewards.load("clip_score", path=CLIP_DIR)
    rng = random.Random(2024)
    scenes = [sample_scene("relation", rng, "train") for _ in range(64)]
    images = torch.stack([render(scene) for scene, _ in scenes])
    captions = [caption for _, caption in scenes]
    flipped = [train_clip.flip_relation(c) for c in captions]
    with torch.no_grad():
        relation = (reward(images, captions) > reward(images, flipped)).float().mean()
    assert relation >= 0.8  # the CLIP shipped before this one, blind to relations, scored ~0.5
    # Colour binding, on a held-out composition (the demo's "a blue circle and a green square"): the same words
    # bound the other way must score lower (the CLIP shipped before preferred them on 0.4 of held-out scenes).
    caption = "a blue circle and a green square"
    images = torch.stack([render(sample_scene(caption, rng)[0]) for _ in range(32)])
    with torch.no_grad():
        binding = (reward(images, [caption] * 32) > reward(images, ["a green circle and a blue square"] * 32)).float()
    assert binding.mean() >= 0.75


def test_shipped_clip_loads_as_pickscore():
    reward = rewards.load("pickscore", path=CLIP_DIR)
    images, captions, corrupted = _scenes_and_corruptions(8, seed=7)
    scores = reward(images, captions)
    assert scores.shape == (8,) and torch.isfinite(scores).all()
    assert (scores > reward(images, corrupted)).float().mean() >= 0.5


# ------------------------------------------------------------------------------------------- training scripts

_TINY_BASE = [
    "--images", "48", "--vae-steps", "2", "--vae-batch", "8", "--vae-channels", "16,16", "--layers", "1",
    "--heads", "2", "--head-dim", "8", "--batch", "4", "--ckpt-every", "2", "--log-every", "1", "--vae-check", "8",
]  # fmt: skip


def _transformer_weights(folder):
    from safetensors.torch import load_file

    return load_file(folder / "transformer" / "diffusion_pytorch_model.safetensors")


@pytest.mark.slow  # two training runs of the base model (fast-suite time)
def test_train_base_smoke_resume_matches_uninterrupted(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train_base.main(["--out", str(straight), "--steps", "3", *_TINY_BASE])
    train_base.main(["--out", str(resumed), "--steps", "2", *_TINY_BASE])
    state = torch.load(tmp_path / "resumed.ckpt" / "state.pt", weights_only=True)
    assert state["step"] == 2
    with pytest.raises(SystemExit, match="--resume"):
        train_base.main(["--out", str(resumed), "--steps", "3", *_TINY_BASE])
    train_base.main(["--out", str(resumed), "--steps", "3", "--resume", *_TINY_BASE])
    a, b = _transformer_weights(straight), _transformer_weights(resumed)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=0, rtol=0)


@pytest.mark.slow  # two training stages of the base model (fast-suite time)
def test_train_base_later_stage_starts_from_the_earlier_one(tmp_path):
    from safetensors.torch import load_file

    first, second = tmp_path / "first", tmp_path / "second"
    train_base.main(["--out", str(first), "--steps", "2", "--split", "pretrain", *_TINY_BASE])
    with pytest.raises(SystemExit, match="recipe.json"):
        train_base.main(["--out", str(second), "--init-from", str(tmp_path), "--steps", "3", *_TINY_BASE])
    stage = [
        "--out",
        str(second),
        "--ckpt",
        str(tmp_path / "second.ckpt"),
        "--init-from",
        str(tmp_path / "first.ckpt"),
    ]
    train_base.main([*stage, "--steps", "4", "--stop-at", "1", "--kinds", "relation:1", "--seed", "5", *_TINY_BASE])
    # The frozen text encoders follow --seed unless --text-seed names the earlier stage's.
    third = tmp_path / "third"
    init = ["--init-from", str(tmp_path / "first.ckpt"), "--seed", "5", "--text-seed", "0"]
    train_base.main(["--out", str(third), *init, "--steps", "1", *_TINY_BASE])
    for name in ("text_encoder", "text_encoder_2"):
        weights = [load_file(folder / name / "model.safetensors") for folder in (first, second, third)]
        assert not all(torch.equal(weights[0][key], weights[1][key]) for key in weights[0]), name
        assert all(torch.equal(weights[0][key], weights[2][key]) for key in weights[0]), name
    # The VAE (and its latent scaling) is the first stage's; the transformer moved on from the first stage's.
    vae_first = torch.load(tmp_path / "first.ckpt" / "vae.pt", weights_only=True)
    vae_second = torch.load(tmp_path / "second.ckpt" / "vae.pt", weights_only=True)
    for key in vae_first:
        torch.testing.assert_close(vae_first[key], vae_second[key], atol=0, rtol=0)
    configs = [json.loads((folder / "vae" / "config.json").read_text()) for folder in (first, second)]
    assert configs[0]["scaling_factor"] == configs[1]["scaling_factor"]
    ema_first = torch.load(tmp_path / "first.ckpt" / "state.pt", weights_only=True)["ema"]
    ema_second = torch.load(tmp_path / "second.ckpt" / "state.pt", weights_only=True)["ema"]
    gaps = [(ema_second[k] - ema_first[k]).abs().max().item() for k in ema_first]
    assert 0 < max(gaps) < 0.1  # one step away from the first stage, not from a fresh initialisation
    recipe = json.loads((second / "diffalign_train.json").read_text())
    assert recipe["step"] == 1 and recipe["args"]["stop_at"] == 1
    assert [(s["args"]["split"], s["step"]) for s in recipe["earlier_stages"]] == [("pretrain", 2)]


_TINY_CLIP = [
    "--text-hidden", "8", "--text-layers", "1", "--vision-hidden", "8", "--vision-layers", "1",
    "--projection-dim", "8", "--batch", "4", "--ckpt-every", "2", "--log-every", "1", "--eval-scenes", "4",
]  # fmt: skip


def test_train_clip_smoke_resume_matches_uninterrupted(tmp_path):
    from safetensors.torch import load_file

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train_clip.main(["--out", str(straight), "--steps", "3", *_TINY_CLIP])
    train_clip.main(["--out", str(resumed), "--steps", "2", *_TINY_CLIP])
    train_clip.main(["--out", str(resumed), "--steps", "3", "--resume", *_TINY_CLIP])
    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=0, rtol=0)
    reward = rewards.load("clip_score", path=resumed)
    assert torch.isfinite(reward(torch.rand(2, 3, 32, 32), ["a red circle", "a blue square"])).all()


def test_flip_relation_reverses_the_relation_only():
    assert train_clip.flip_relation("a red circle to the left of a blue square") == (
        "a red circle to the right of a blue square"
    )
    assert train_clip.flip_relation("a green triangle below a red circle") == "a green triangle above a red circle"
    assert train_clip.flip_relation("a red circle and a blue square") is None


def test_train_clip_later_stage_starts_from_an_export_and_records_the_chain(tmp_path):
    from safetensors.torch import load_file

    first, second = tmp_path / "first", tmp_path / "second"
    train_clip.main(["--out", str(first), "--steps", "2", *_TINY_CLIP])
    later = ["--init-from", str(first), "--split", "all", "--relation-fraction", "0.5", "--flip-negatives"]
    train_clip.main(["--out", str(second), "--steps", "2", *later, *_TINY_CLIP])
    info = json.loads((second / "diffalign_clip.json").read_text())
    assert [stage["step"] for stage in info["earlier_stages"]] == [2]
    assert info["earlier_stages"][0]["args"]["split"] == "train" and info["args"]["split"] == "all"
    a, b = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    assert a.keys() == b.keys() and any(not torch.equal(a[key], b[key]) for key in a)
    with pytest.raises(SystemExit, match="diffalign_clip.json"):
        train_clip.main(["--out", str(tmp_path / "third"), "--init-from", str(tmp_path), *_TINY_CLIP])


def test_sample_batch_pairs_scenes_with_scenes_of_their_contrast_caption():
    from diffalign.shapes.verifier import ShapesVerifier

    images, captions = train_clip.sample_batch(12, random.Random(3), "all", relation_fraction=0.5, pair_fraction=1)
    assert len(images) == len(captions) == 24  # in the "all" split every contrast can be drawn
    for caption, contrast in zip(captions[::2], captions[1::2]):
        if parse_caption(caption).relations:  # the same objects the other way round
            assert contrast == train_clip.flip_relation(caption)
        else:  # one colour, shape or count changed, or two colours swapped
            assert contrast != caption and len(contrast.split()) == len(caption.split())
            assert sum(a != b for a, b in zip(contrast.split(), caption.split())) in (1, 2)
    _, strict = ShapesVerifier().evaluate(images, captions)
    assert strict.all()  # every scene, contrasts included, shows its caption
    _, train = train_clip.sample_batch(64, random.Random(3), "train", relation_fraction=0.5, pair_fraction=1)
    assert 64 < len(train) < 128 and not any(is_heldout(parse_caption(c)) for c in train)


def test_train_clip_patch_embedding_learns_at_its_lr_scale(tmp_path):
    train_clip.main(["--out", str(tmp_path / "clip"), "--steps", "2", "--lr", "1e-3", "--warmup", "1", *_TINY_CLIP])
    state = torch.load(tmp_path / "clip.ckpt" / "state.pt", weights_only=True)
    rest, patch = state["optimizer"]["param_groups"]
    assert rest["lr"] == pytest.approx(1e-3) and patch["lr"] == pytest.approx(0.02 * 1e-3)
    assert len(patch["params"]) == 1
    model = train_clip.build_clip(train_clip.parse_args(["--out", "x", "--position-init-std", "0.5"]))
    assert model.vision_model.embeddings.position_embedding.weight.std().item() == pytest.approx(0.5, rel=0.1)


def test_sample_batch_relation_fraction():
    _, captions = train_clip.sample_batch(64, random.Random(0), relation_fraction=1.0)
    assert {parse_caption(c).kind for c in captions} == {"relation"}
    _, mixed = train_clip.sample_batch(64, random.Random(0))
    assert len({parse_caption(c).kind for c in mixed}) == len(PROMPT_KINDS)
