"""Self-NPO, the ``self_npo`` trainer (diffalign/trainers/self_npo.py, docs/methods/self-npo.md), and its pure
functions (diffalign/losses/npo.py)."""

import math

import pytest
import torch
from config_probes import with_keys
from test_image_refl import write_pairs

from diffalign.adapters import load_adapter
from diffalign.config import ConfigError, load_config
from diffalign.losses.npo import guided_output, previous_level, pseudo_huber, renoise, truncation_grid
from diffalign.samplers.inversion import forward_coefficients, implied_noise
from diffalign.trainers import get_trainer
from diffalign.trainers.self_npo import TEACHER_STATE, SelfNPOConfig, SelfNPOTrainer


CFG_FAMILIES = [f if f == "sd3" else pytest.param(f, marks=pytest.mark.slow) for f in ("sd15", "sd2v", "sdxl", "sd3")]
"""The families with CFG (FLUX.1-dev has none): SD3 in the fast suite."""


def make_config(folder, output_dir, pairs, **overrides):
    raw = {
        "method": "self_npo",
        "model": {"path": str(folder), "lora": {"rank": 4}},
        "data": {"real_images": str(pairs), "batch_size": 2, "resolution": 16},
        "output_dir": str(output_dir),
        "seed": 0,
        "max_steps": 2,
        "optim": {"lr": 1e-2},
        "logging": {"log_with": "none", "log_every": 1},
        "checkpoint": {"every": 0},
    }
    return load_config(SelfNPOConfig, with_keys(raw, overrides))


# --- the pure functions ----------------------------------------------------------------------------------------------


def test_grid_and_steps_down_it():
    grid = truncation_grid(25)
    assert grid[0].item() == 39 and grid[-1].item() == 999 and (grid.diff() == 40).all()
    assert previous_level(torch.tensor([999, 79, 39, 0]), 25).tolist() == [959, 39, 0, 0]


def test_teacher_guidance_and_the_pseudo_huber_loss_by_hand():
    text, uncond = torch.tensor([2.0]), torch.tensor([0.5])
    assert guided_output(None, uncond, -1.0) is uncond  # SD1.5's w = -1: the unconditional output alone
    assert guided_output(text, uncond, -5.0).item() == 2.0 - 5 * 1.5  # SDXL's anti-guidance
    with pytest.raises(ValueError, match="unconditional"):
        guided_output(text, None, -5.0)
    c = 0.001
    expected = (math.sqrt(9 + c**2) - c + math.sqrt(0.25 + c**2) - c) / 2
    assert pseudo_huber(torch.tensor([3.0, 1.0]), torch.tensor([0.0, 0.5]), c).item() == pytest.approx(expected)


@pytest.mark.parametrize("family", ["sd15", "sd3"])
def test_renoising_is_the_forward_transition_to_the_higher_level(tiny_pipeline_dir, family):
    """From x_e = a_e x0 + b_e eps, re-noising to s gives a_s x0 plus noise of std b_s: the forward marginal at s."""
    adapter = load_adapter(tiny_pipeline_dir(family))
    level, higher = (
        (torch.tensor([200]), torch.tensor([700]))
        if family == "sd15"
        else (
            torch.tensor([200.0]),
            torch.tensor([700.0]),
        )
    )
    generator = torch.Generator().manual_seed(0)
    x0 = torch.full((1, 4, 200, 200), 0.7)
    eps, z = torch.randn(x0.shape, generator=generator), torch.randn(x0.shape, generator=generator)
    a_e, b_e, _, _ = forward_coefficients(adapter, level, x0)
    a_s, b_s, _, _ = forward_coefficients(adapter, higher, x0)
    out = renoise(a_e * x0 + b_e * eps, (a_e, b_e), (a_s, b_s), z)
    residual = out - a_s * x0
    assert residual.mean().abs().item() < 0.01
    assert residual.std().item() == pytest.approx(b_s.item(), rel=0.01)


# --- the trainer -----------------------------------------------------------------------------------------------------


def test_registered_and_its_config_checked(tiny_pipeline_dir, tmp_path):
    assert get_trainer("self_npo") == (SelfNPOConfig, SelfNPOTrainer)
    pairs = write_pairs(tmp_path / "real")
    folder = tiny_pipeline_dir("sd3")
    with pytest.raises(ConfigError, match="model.lora.rank"):
        make_config(folder, tmp_path, pairs, **{"model.lora.rank": 0})
    with pytest.raises(ConfigError, match="truncation_steps"):
        make_config(folder, tmp_path, pairs, **{"self_npo.truncation_steps": 0})
    with pytest.raises(ConfigError, match="teacher_decay"):
        make_config(folder, tmp_path, pairs, **{"self_npo.teacher_decay": 1.0})
    with pytest.raises(ConfigError, match="without CFG"):
        SelfNPOTrainer(make_config(tiny_pipeline_dir("flux"), tmp_path, pairs))


@pytest.mark.parametrize("family", ["sd15", "sd3"])
def test_the_teacher_walk_of_a_model_that_knows_the_image_keeps_its_noise_and_targets_the_image(
    tiny_pipeline_dir, tmp_path, family, monkeypatch
):
    """A teacher that always predicts one clean image x0 (its output: the target of the noise that puts x0 at the
    sample) walks deterministic steps that keep the starting noise, so it ends at ``add_noise(x0, eps, level)`` with
    target x0 (closed form, epsilon and flow)."""
    trainer = SelfNPOTrainer(make_config(tiny_pipeline_dir(family), tmp_path, write_pairs(tmp_path / "real")))
    adapter = trainer.adapter
    x0 = torch.randn(2, *trainer.encode([0, 1], torch.Generator().manual_seed(0)).shape[1:])
    calls = []

    def predict(sample, level, cond, guidance=1.0, uncond_grad=True):
        calls.append(level.clone())
        coefficients = forward_coefficients(adapter, level, sample)
        noise = torch.nan_to_num(implied_noise(x0, sample, coefficients))  # the clean level: any noise
        return adapter.training_target(x0, noise, level)

    monkeypatch.setattr(adapter, "predict", predict)
    cond = adapter.encode_prompt(["a", "b"])
    target, sample, level = trainer.teacher_walk(x0, cond, torch.Generator().manual_seed(2))
    replay = torch.Generator().manual_seed(2)  # the walk's own draws: the start index, then the noise
    start = trainer.grid[torch.randint(0, 25, (2,), generator=replay)]
    noise = torch.randn(x0.shape, generator=replay)
    torch.testing.assert_close(target, x0, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(level, (start - 5 * 40).clamp(min=0).to(level))
    torch.testing.assert_close(sample, adapter.add_noise(x0, noise, level).float(), atol=1e-4, rtol=1e-4)
    assert len(calls) == 6 and torch.equal(calls[0], start.to(calls[0]))  # w = -1: one call per output


@pytest.mark.parametrize("family", CFG_FAMILIES)
def test_a_step_trains_the_lora_and_moves_the_teacher_by_its_ema_rate(tiny_pipeline_dir, tmp_path, family):
    trainer = SelfNPOTrainer(make_config(tiny_pipeline_dir(family), tmp_path, write_pairs(tmp_path / "real")))
    assert trainer.adapter.negative_lora == "default"  # the evaluation samples with it on CFG's unconditional half
    before = {name: p.detach().clone() for name, p in trainer.run.named_trainables()}
    teacher = {name: t.clone() for name, t in trainer.teacher.items()}
    metrics = trainer.train_step(0)
    assert math.isfinite(metrics["loss"]) and metrics["loss"] > 0
    assert 0 <= metrics["level_reached"] < metrics["level_trained"] <= 999
    moved = False
    for name, param in trainer.run.named_trainables():
        moved |= not torch.equal(param, before[name])
        expected = 0.999 * teacher[name] + 0.001 * param.detach().float()
        torch.testing.assert_close(trainer.teacher[name], expected, rtol=1e-6, atol=1e-7)
    assert moved


def test_teacher_guidance_other_than_minus_one_calls_both_halves(tiny_pipeline_dir, tmp_path, monkeypatch):
    pairs = write_pairs(tmp_path / "real")
    trainer = SelfNPOTrainer(
        make_config(tiny_pipeline_dir("sd3"), tmp_path, pairs, **{"self_npo.teacher_guidance": -5.0})
    )
    seen, predict = [], trainer.adapter.predict

    def record(sample, level, cond, guidance=1.0, uncond_grad=True):
        seen.append(guidance)
        return predict(sample, level, cond, guidance, uncond_grad)

    monkeypatch.setattr(trainer.adapter, "predict", record)
    trainer.loss([0, 1], torch.Generator().manual_seed(0))
    assert len(seen) == 2 * 6 + 1 and set(seen) == {1.0}  # two plain calls per teacher output, then the student's


@pytest.mark.slow  # over 3 s: three short runs with checkpoints
def test_a_resumed_run_trains_what_an_uninterrupted_one_does(tiny_pipeline_dir, tmp_path):
    folder, pairs = tiny_pipeline_dir("sd3"), write_pairs(tmp_path / "real")
    options = {"max_steps": 3, "checkpoint.every": 1, "checkpoint.keep_last": 5}
    whole = SelfNPOTrainer(make_config(folder, tmp_path / "whole", pairs, **options))
    whole.train()
    SelfNPOTrainer(make_config(folder, tmp_path / "cut", pairs, **{**options, "max_steps": 1})).train()
    assert (tmp_path / "cut" / "checkpoints" / "checkpoint-1" / f"{TEACHER_STATE}.safetensors").is_file()
    resumed = SelfNPOTrainer(
        make_config(folder, tmp_path / "cut", pairs, **{**options, "checkpoint.resume_from": "latest"})
    )
    resumed.train()
    for (name, a), (_, b) in zip(whole.run.named_trainables(), resumed.run.named_trainables()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
    for name in whole.teacher:
        torch.testing.assert_close(whole.teacher[name], resumed.teacher[name], rtol=0, atol=1e-6, msg=name)
