"""The self-play trainers, ``raft`` and ``spin`` (diffalign/trainers/self_play.py, docs/methods/self-play.md)."""

import math

import pytest
import torch
from config_probes import with_keys
from families import FAMILIES_SD3_FAST
from safetensors.torch import load_file
from test_image_refl import write_pairs

from diffalign.config import ConfigError, load_config
from diffalign.testing import redness
from diffalign.trainers import get_trainer
from diffalign.trainers.self_play import SelfPlayConfig, SelfPlayTrainer, raft_keep


PROMPTS = ["a red circle", "a blue square", "a green star"]


def make_config(folder, output_dir, method="raft", **overrides):
    """A small LoRA self-play config on a tiny pipeline; ``overrides`` are dotted keys."""
    raw = {
        "method": method,
        "model": {"path": str(folder), "lora": {"rank": 4}},
        "reward": "diffalign.testing:redness",
        "output_dir": str(output_dir),
        "seed": 0,
        "max_steps": 2,
        "optim": {"lr": 1e-2},
        "logging": {"log_with": "none", "log_every": 1},
        "checkpoint": {"every": 0},
        "sampling": {"num_steps": 2, "guidance_scale": 2.0, "batch_size": 4, "resolution": 16},
        "self_play": {"steps_per_round": 2, "samples_per_prompt": 3, "batch_size": 2},
    }
    if method == "raft":
        raw["sampling"]["prompts"] = PROMPTS
    return load_config(SelfPlayConfig, with_keys(raw, overrides))


def test_raft_keeps_the_best_of_each_prompt_then_the_top_share_over_prompts():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.3], [0.2, 0.4, 0.8, 0.6], [0.05, 0.02, 0.07, 0.01]])
    local = raft_keep(scores, keep_per_prompt=2, keep_share=1.0)
    assert local.tolist() == [[False, True, True, False], [False, False, True, True], [True, False, True, False]]
    # of the 6 locally kept (0.9, 0.5, 0.8, 0.6, 0.07, 0.05) the top half: 0.9, 0.8, 0.6
    kept = raft_keep(scores, keep_per_prompt=2, keep_share=0.5)
    assert kept.tolist() == [[False, True, False, False], [False, False, True, True], [False, False, False, False]]
    # with other processes' kept scores the cut moves: ceil(0.25 * 8) = 2 of them, threshold 0.95
    pool = torch.tensor([0.9, 0.5, 0.8, 0.6, 0.07, 0.05, 0.99, 0.95])
    assert raft_keep(scores, 2, 0.25, pool).sum() == 0


def test_both_methods_are_registered_and_their_configs_are_checked(tiny_pipeline_dir, tmp_path):
    assert get_trainer("raft") == get_trainer("spin") == (SelfPlayConfig, SelfPlayTrainer)
    folder = tiny_pipeline_dir("sd3")
    with pytest.raises(ConfigError, match="sampling.prompts"):
        make_config(folder, tmp_path, **{"sampling.prompts": None})
    with pytest.raises(ConfigError, match="sampling.real_images"):
        make_config(folder, tmp_path, method="spin")
    with pytest.raises(ConfigError, match="keep_per_prompt must be <= samples_per_prompt"):
        make_config(folder, tmp_path, **{"self_play.keep_per_prompt": 4})
    with pytest.raises(ConfigError, match="keep_share"):
        make_config(folder, tmp_path, **{"self_play.keep_share": 0.0})


def test_a_raft_round_keeps_each_prompts_best_sample_and_trains_on_it(tiny_pipeline_dir, tmp_path):
    trainer = SelfPlayTrainer(make_config(tiny_pipeline_dir("sd3"), tmp_path))
    before = {name: p.detach().clone() for name, p in trainer.run.named_trainables()}
    metrics = trainer.train_step(0)
    data = trainer.data
    assert data.captions == PROMPTS and data.latents.shape[0] == 3  # best-of-3 of each prompt, no global cut
    with torch.no_grad():
        kept_rewards = redness(trainer.adapter.decode(data.latents))
    torch.testing.assert_close(kept_rewards.mean().item(), metrics["round/reward_kept"], rtol=0, atol=1e-5)
    assert metrics["round/reward_kept"] >= metrics["round/reward_sampled"]
    assert metrics["round/num_kept"] == 3 and metrics["round"] == 0
    assert any(not torch.equal(p, before[name]) for name, p in trainer.run.named_trainables())
    trainer.train_step(1)
    assert trainer.round_index == 0  # two steps per round
    trainer.train_step(2)
    assert trainer.round_index == 1 and (tmp_path / "self_play" / "round-1.safetensors").is_file()


@pytest.mark.parametrize("family", FAMILIES_SD3_FAST)
def test_spin_starts_every_round_at_log_2_because_the_reference_is_the_rounds_own_model(
    tiny_pipeline_dir, tmp_path, family
):
    real = str(write_pairs(tmp_path / "real"))
    trainer = SelfPlayTrainer(
        make_config(tiny_pipeline_dir(family), tmp_path, "spin", **{"sampling.real_images": real})
    )
    first = trainer.train_step(0)
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6) and first["implicit_acc"] == 0.5
    assert trainer.data.real.shape == trainer.data.latents.shape
    moved = trainer.train_step(1)
    assert abs(moved["loss"] - math.log(2)) > 1e-7  # within a round the policy leaves its reference
    second_round = trainer.train_step(2)
    assert second_round["round"] == 1
    assert second_round["loss"] == pytest.approx(math.log(2), abs=1e-6)  # the reference is theta_1 now, not the base


@pytest.mark.slow  # about 3 s on the CI machine: the fast suite must stay under 4 minutes on 2 cores
def test_seppo_draws_a_previous_rounds_model_as_its_reference_and_keeps_every_round(tiny_pipeline_dir, tmp_path):
    real = str(write_pairs(tmp_path / "real"))
    options = {"sampling.real_images": real, "self_play.steps_per_round": 1, "max_steps": 4}
    trainer = SelfPlayTrainer(make_config(tiny_pipeline_dir("sd3"), tmp_path, "seppo", **options))
    drawn = [trainer.reference_round(r) for r in range(40)]
    assert drawn[0] == 0 and all(0 <= j <= r for r, j in enumerate(drawn))  # the checkpoints kept so far
    assert any(j == r for r, j in enumerate(drawn[1:], 1)) and any(j < r for r, j in enumerate(drawn))
    first = trainer.train_step(0)  # round 0: the reference is the initial model, equal to the policy
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6) and first["flipped"] == 1.0  # s = 0 on exact ties
    for step in range(1, 4):
        trainer.train_step(step)
        chosen = trainer.reference_round(step)
        saved = load_file(str(trainer.round_file(chosen)))
        assert all(torch.equal(trainer.reference[name].cpu(), saved[name]) for name in saved)
    assert sorted(p.name for p in (tmp_path / "self_play").iterdir()) == [f"round-{r}.safetensors" for r in range(4)]


@pytest.mark.slow  # over 3 s: three runs of four and two steps, with checkpoints
@pytest.mark.parametrize("method", ["raft", "spin", "seppo"])
def test_a_run_resumed_inside_a_round_trains_what_an_uninterrupted_one_does(tiny_pipeline_dir, tmp_path, method):
    folder = tiny_pipeline_dir("sd3")
    options = {"max_steps": 4, "self_play.steps_per_round": 3, "checkpoint.every": 1, "checkpoint.keep_last": 5}
    options["method"] = method
    if method != "raft":  # the reference comes back from the round files on the resume
        options["sampling.real_images"] = str(write_pairs(tmp_path / "real"))
    whole = SelfPlayTrainer(make_config(folder, tmp_path / "whole", **options))
    whole.train()
    cut = SelfPlayTrainer(make_config(folder, tmp_path / "cut", **{**options, "max_steps": 2}))
    cut.train()
    resumed = SelfPlayTrainer(make_config(folder, tmp_path / "cut", **{**options, "checkpoint.resume_from": "latest"}))
    resumed.train()
    for (name, a), (_, b) in zip(whole.run.named_trainables(), resumed.run.named_trainables()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
