"""ImageReFL in the reward_backprop trainer (``backprop.mode: image_refl``) and its combined generation
(``adapter.lora_max_timestep``, ``backprop.switch_step``) (docs/methods/reward-backprop.md#imagerefl)."""

import json

import pytest
import torch
from PIL import Image
from test_reward_backprop_trainer import DenoiserCalls, make_config

from diffalign.config import ConfigError
from diffalign.data.image_captions import load_real_image, load_real_pairs
from diffalign.losses.reward_backprop import switch_timestep
from diffalign.samplers.plan import ode_plan
from diffalign.samplers.rollout import rollout
from diffalign.testing import random_lora_adapter
from diffalign.trainers.reward_backprop import RewardBackpropTrainer


STEPS = 4


def write_pairs(folder, count=3):
    """``count`` small PNGs and a JSONL of their captions; returns the JSONL path."""
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(count):
        pixels = torch.zeros(20, 24, 3, dtype=torch.uint8)
        pixels[..., i % 3] = 200
        Image.fromarray(pixels.numpy()).save(folder / f"{i}.png")
        records.append({"prompt": ["a red square", "a green square", "a blue square"][i % 3], "image": f"{i}.png"})
    path = folder / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def image_refl_config(folder, tmp_path, **overrides):
    values = {
        "backprop.mode": "image_refl",
        "backprop.refl_step_range": [2, 3],
        "backprop.image_refl_start": 1,
        "backprop.weight": 1e-3,
        "sampling.real_images": str(write_pairs(tmp_path / "real")),
        "sampling.guidance_scale": 1.0,
        **overrides,
    }
    return make_config(folder, tmp_path / "run", **values)


def test_combined_generation_switch_matches_the_lora_at_0_and_the_base_at_num_steps(tiny_pipeline_dir, tmp_path):
    adapter = random_lora_adapter(tiny_pipeline_dir("sd3"))
    timesteps = adapter.set_timesteps(STEPS).timesteps

    def images():
        with torch.no_grad():
            return rollout(adapter, ["a red circle"], ode_plan(STEPS), guidance_scale=2.0, seeds=[7]).images

    lora = images()
    with adapter.lora_disabled():
        base = images()
    combined = {}
    for switch in (0, 2, STEPS):
        adapter.lora_max_timestep = switch_timestep(timesteps, switch)
        combined[switch] = images()
    assert torch.equal(combined[0], lora) and torch.equal(combined[STEPS], base)
    assert (combined[2] - lora).abs().max() > 1e-4 and (combined[2] - base).abs().max() > 1e-4

    adapter.lora_max_timestep = switch_timestep(timesteps, 2)  # kept in the LoRA's scope file, and read back
    folder = adapter.save_lora(tmp_path / "lora")
    assert json.loads((folder / "diffalign_lora.json").read_text()) == {"max_timestep": float(timesteps[2])}
    adapter.lora_max_timestep = None
    adapter.load_lora(folder)
    assert adapter.lora_max_timestep == float(timesteps[2])
    assert torch.equal(images(), combined[2])


def test_switch_step_applies_to_evaluation_and_the_saved_lora_not_to_training(tiny_pipeline_dir, tmp_path):
    config = make_config(tiny_pipeline_dir("sd3"), tmp_path, **{"backprop.switch_step": 2})
    trainer = RewardBackpropTrainer(config)
    limit = float(trainer.adapter.set_timesteps(STEPS).timesteps[2])
    assert trainer.adapter.lora_max_timestep == limit
    with trainer.lora_at_every_step():
        assert trainer.adapter.lora_max_timestep is None
    assert trainer.adapter.lora_max_timestep == limit
    with pytest.raises(ConfigError, match="switch_step"):
        make_config(tiny_pipeline_dir("sd3"), tmp_path, **{"backprop.switch_step": STEPS + 1})


def test_one_image_refl_step_trains_the_lora_through_the_two_grad_calls(tiny_pipeline_dir, tmp_path):
    trainer = RewardBackpropTrainer(image_refl_config(tiny_pipeline_dir("sd3"), tmp_path))
    before = [p.detach().clone() for p in trainer.run.params]
    calls = DenoiserCalls(trainer.adapter.denoiser)
    metrics = trainer.train_step(0)
    calls.handle.remove()
    mid = int(metrics["refl_step"])
    # start 1 .. mid - 1 without grad, then the reward's call at mid and the regulariser's at the start, with grad.
    assert calls.keeps_graph == [False] * (mid - 1) + [True, True]
    assert all(calls.got_grad.values()) and len(calls.got_grad) == 2
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.run.params))
    assert metrics["image_refl_mse"] > 0


def test_loss_is_weighted_reward_loss_plus_regulariser_and_every_nth_batch_is_plain_refl(
    tiny_pipeline_dir, tmp_path, monkeypatch
):
    config = image_refl_config(tiny_pipeline_dir("sd3"), tmp_path, **{"backprop.image_refl_plain_every": 2})
    trainer = RewardBackpropTrainer(config)
    images = torch.zeros(2, 3, 4, 4)
    images[:, 0] = 0.8  # redness 0.8
    monkeypatch.setattr(trainer, "image_refl_images", lambda *args: (images, torch.tensor(2.0)))
    monkeypatch.setattr(trainer, "refl_images", lambda *args: images * 0.5)
    loss, metrics = trainer.micro_batch_loss(0, 0)
    assert loss.item() == pytest.approx(1e-3 * (-0.8 + 0.01 * 2.0))
    assert metrics["image_refl_mse"] == 2.0 and metrics["reward_mean"] == pytest.approx(0.8)
    assert [trainer.is_plain_refl(step, 0) for step in range(4)] == [False, True, False, True]
    loss, metrics = trainer.micro_batch_loss(1, 0)  # plain ReFL from noise: the reward loss alone
    assert "image_refl_mse" not in metrics and loss.item() == pytest.approx(1e-3 * -0.4)


def test_real_images_missing_or_broken_files_are_named(tmp_path):
    pairs = write_pairs(tmp_path / "ok")
    assert [caption for caption, _ in load_real_pairs(pairs)] == ["a red square", "a green square", "a blue square"]
    assert load_real_image(load_real_pairs(pairs)[0][1], 16, 16).shape == (3, 16, 16)
    (tmp_path / "ok" / "1.png").unlink()
    with pytest.raises(FileNotFoundError, match="1 missing file.*1.png"):
        load_real_pairs(pairs)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(ValueError, match="broken.png"):
        load_real_image(broken, 16, 16)
    folder = tmp_path / "folder"
    write_pairs(folder, 2)
    (folder / "0.txt").write_text("a red square\n")
    with pytest.raises(FileNotFoundError, match="1.txt"):  # a folder needs a caption per image
        load_real_pairs(folder)
    (folder / "1.txt").write_text("a green square")
    assert load_real_pairs(folder) == [("a red square", folder / "0.png"), ("a green square", folder / "1.png")]


@pytest.mark.parametrize(
    "values, key",
    [
        ({"sampling.real_images": None}, "sampling.real_images"),
        ({"backprop.image_refl_start": 3}, "backprop.image_refl_start"),
        ({"backprop.image_refl_mse_weight": -1.0}, "backprop.image_refl_mse_weight"),
        ({"backprop.image_refl_plain_every": 0}, "backprop.image_refl_plain_every"),
    ],
)
def test_config_errors_name_the_key(values, key, tiny_pipeline_dir, tmp_path):
    with pytest.raises(ConfigError) as caught:
        image_refl_config(tiny_pipeline_dir("sd3"), tmp_path, **values)
    assert key in caught.value.issues[0].keys, caught.value
