"""Direct-Align / SRPO in the reward_backprop trainer (``backprop.mode: direct_align``): the gradient path, the
known-noise recovery wired to the rollout's own noise, SRP's two prompt lists and the branch swap, config errors
(docs/methods/reward-backprop.md#direct-align-and-srpo)."""

import dataclasses

import pytest
import torch
from test_reward_backprop_trainer import STEPS, DenoiserCalls, make_config

import rewards
from diffalign.config import ConfigError
from diffalign.samplers.rollout import make_generators
from diffalign.trainers.reward_backprop import RewardBackpropTrainer


SRPO = {"backprop.mode": "direct_align", "backprop.loss": "hinge", "backprop.target": 0.7}


def lora_snapshot(trainer):
    return [p.detach().clone() for p in trainer.run.params]


@pytest.mark.parametrize("family", ["sd3", pytest.param("sd15", marks=pytest.mark.slow)])  # sd15: the epsilon analogue
def test_one_step_trains_the_lora_through_the_one_grad_call(family, tiny_pipeline_dir, tmp_path):
    trainer = RewardBackpropTrainer(make_config(tiny_pipeline_dir(family), tmp_path, **SRPO))
    before = lora_snapshot(trainer)
    calls = DenoiserCalls(trainer.adapter.denoiser)
    metrics = trainer.train_step(0)
    calls.handle.remove()

    # The ODE rollout runs without grad; one call with grad holds both branches (x2 for CFG at guidance 2).
    assert calls.keeps_graph == [False] * STEPS + [True]
    assert calls.batch_sizes[-1] == 2 * 2 * trainer.config.sampling.batch_size
    assert calls.got_grad == {STEPS: True}
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.run.params))
    assert {"srp_discount", "srp_inversion_discount", "direct_align_level", "loss"} <= set(metrics)


def test_recovery_is_exact_when_the_grad_call_returns_the_true_velocity(tiny_pipeline_dir, tmp_path, monkeypatch):
    # The trainer must inject the rollout's own starting noise: with a "denoiser" whose velocity is the true one for
    # that noise and the ODE sample x0, both branches recover x0 exactly.
    trainer = RewardBackpropTrainer(make_config(tiny_pipeline_dir("sd3"), tmp_path, **SRPO))
    prompts, seeds = trainer.micro_batch_prompts(0, 0)
    with torch.no_grad():
        x0 = trainer._rollout(prompts, seeds, decode=False).final_latents.float()
        noise = trainer.adapter.prepare_latents(len(seeds), make_generators(seeds)).float()
    sampler_predict = trainer.adapter.predict

    def true_velocity(latents, t, cond, guidance_scale=1.0, **kwargs):
        if not torch.is_grad_enabled():  # the rollout
            return sampler_predict(latents, t, cond, guidance_scale, **kwargs)
        return (noise - x0).repeat(latents.shape[0] // x0.shape[0], 1, 1, 1)

    monkeypatch.setattr(trainer.adapter, "predict", true_velocity)
    monkeypatch.setattr(trainer, "_decode", lambda latents: latents)
    recovered, levels, grid = trainer.direct_align_images(prompts, seeds, m=400)
    assert [grid[level.inject] > grid[level.recover] for level in levels] == [True, False]  # down, then up
    torch.testing.assert_close(recovered, torch.cat([x0, x0]), atol=1e-4, rtol=1e-4)


def prefix_reward():
    """A stub similarity set by the prompt's control word: ``Real.`` 0.30, ``Oil.`` 0.20, the plain prompt 0.50."""
    table = {"Real": 0.3, "Oil": 0.2}

    def score(images, prompts):
        known = torch.tensor([table.get(p.split(".")[0], 0.5) for p in prompts])
        return known + 0 * images.mean((1, 2, 3))

    return rewards.load(score, differentiable=True)


def test_srp_scores_two_prompt_lists_and_swaps_them_in_the_inversion_branch(tiny_pipeline_dir, tmp_path, monkeypatch):
    words = {"backprop.srp_positive_words": ["Real"], "backprop.srp_negative_words": ["Oil"]}
    config = make_config(tiny_pipeline_dir("sd3"), tmp_path, **SRPO, **words)
    trainer = RewardBackpropTrainer(config, reward=prefix_reward())
    images = torch.rand(4, 3, 8, 8, requires_grad=True)
    levels = [trainer.direct_align_levels_of(673, branch) for branch in ("denoise", "inversion")]
    scores, metrics = trainer.direct_align_rewards(images, ["a cat", "a dog"], [{}, {}], levels, step=0)
    k_denoise, k_inversion = 0.1 + 0.15 * 673 / 999, 0.3 - 0.29 * 573 / 999
    assert metrics["srp_discount"] == pytest.approx(k_denoise)
    assert metrics["srp_inversion_discount"] == pytest.approx(k_inversion)
    expected = [(1 + k_denoise) * 0.3 - 0.2] * 2 + [(1 + k_inversion) * 0.2 - 0.3] * 2
    assert scores.tolist() == pytest.approx(expected)

    plain = dataclasses.replace(config.backprop, srp=False, direct_align_inversion=False)
    monkeypatch.setattr(trainer.config, "backprop", plain)
    scores, _ = trainer.direct_align_rewards(images[:2], ["a cat", "a dog"], [{}, {}], levels[:1], step=0)
    assert scores.tolist() == pytest.approx([0.5, 0.5])  # plain Direct-Align: the prompt itself


@pytest.mark.slow  # one more trainer
def test_plain_direct_align_runs_the_denoise_branch_only(tiny_pipeline_dir, tmp_path):
    plain = {**SRPO, "backprop.srp": False, "backprop.direct_align_inversion": False}
    trainer = RewardBackpropTrainer(make_config(tiny_pipeline_dir("sd3"), tmp_path, **plain))
    calls = DenoiserCalls(trainer.adapter.denoiser)
    loss, _ = trainer.micro_batch_loss(0, 0)
    calls.handle.remove()
    assert calls.batch_sizes[-1] == 2 * trainer.config.sampling.batch_size and loss.requires_grad


@pytest.mark.parametrize(
    "values, keys",
    [
        ({"backprop.srp": False}, ("backprop.direct_align_inversion", "backprop.srp")),
        ({"backprop.direct_align_step_range": [25, 5]}, ("backprop.direct_align_step_range",)),
        ({"backprop.direct_align_grid_size": 8}, ("backprop.direct_align_grid_size",)),
        ({"backprop.direct_align_offset": 0}, ("backprop.direct_align_offset",)),
        ({"backprop.srp_positive_words": []}, ("backprop.srp_positive_words",)),
        ({"backprop.srp_discount": [-0.1, 0.2]}, ("backprop.srp_discount",)),
    ],
)
def test_config_errors_name_the_key(values, keys, tiny_pipeline_dir, tmp_path):
    with pytest.raises(ConfigError) as caught:
        make_config(tiny_pipeline_dir("sd3"), tmp_path, **SRPO, **values)
    assert set(keys) <= set(caught.value.issues[0].keys), caught.value
