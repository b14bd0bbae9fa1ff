"""TempFlow-GRPO (``sampling.plan: branch_at``, ``train.timestep_weighting: noise_aware``) and BranchGRPO
(``sampling.plan: tree``) in the GRPO trainer: on-policy first step, advantages, weights, pruning, config checks."""

import pytest
import torch

from diffalign.config import ConfigError
from diffalign.losses.policy_gradient import noise_aware_weights
from diffalign.samplers.rollout import step_stds
from diffalign.trainers.grpo import GRPOTrainer
from tests.trainers.test_grpo import make_config


def branch_config(folder, tmp_path, family="sd3", **overrides):
    flow = family not in ("sd15", "sd2v", "sdxl")
    return make_config(
        folder,
        tmp_path,
        family,
        **{
            "sampling.plan": "branch_at",
            "sampling.branch_steps": [0, 2],
            "sampling.branch_children": 3,
            "sampling.images_per_prompt": 1,
            "train.timestep_weighting": "noise_aware",
            "train.beta": 0.05,
            "sampling.noise_level": 0.7 if flow else 1.0,
            **overrides,
        },
    )


def tree_config(folder, tmp_path, family="sd3", **overrides):
    return make_config(
        folder,
        tmp_path,
        family,
        **{
            "sampling.plan": "tree",
            "sampling.tree_splits": [0, 1],
            "sampling.images_per_prompt": 4,
            "sampling.tree_split_noise_scale": 2.0,
            "train.beta": 0.05,
            **overrides,
        },
    )


@pytest.mark.slow  # about 3 s on the CI machine: the fast suite must stay under 4 minutes on 2 cores
@pytest.mark.parametrize("family", ["sd3", "sd15"])
def test_first_inner_step_of_branching_plans_is_on_policy(family, tiny_pipeline_dir, tmp_path):
    folder = tiny_pipeline_dir(family)
    for config in (branch_config(folder, tmp_path, family), tree_config(folder, tmp_path, family)):
        trainer = GRPOTrainer(config)
        trajectory, advantages, stats, candidates = trainer.sample_branched_epoch(0)
        assert stats["rollout_denoiser_calls"] > 0
        positions = trainer.train_positions(trajectory, 0)
        samples = torch.arange(trajectory.log_probs.shape[0])
        _, metrics = trainer._step_loss(trajectory, samples, positions[samples], advantages)
        assert abs(metrics["ratio_mean"].item() - 1) <= 1e-5, config.sampling.plan
        assert metrics["clipfrac"].item() == 0 and metrics["kl"].item() == 0


def test_branch_at_advantages_and_noise_aware_loss(tiny_pipeline_dir, tmp_path):
    trainer = GRPOTrainer(branch_config(tiny_pipeline_dir("sd3"), tmp_path, **{"train.beta": 0.0}))
    trajectory, advantages, _, _ = trainer.sample_branched_epoch(0)
    # 2 prompts x 1 path x 3 children, 2 branch steps; each step's children normalised within their path.
    assert advantages.shape == (6, 2)
    path_sums = advantages.view(2, 3, 2).sum(dim=1)
    assert path_sums.abs().max().item() < 1e-5
    # The loss weights each step by its std over the mean std: a weighted mean of the per-step losses (advantages 1
    # and 2 at the two steps, so that each step's loss is -A at ratio 1).
    advantages = torch.tensor([[1.0, 2.0]] * 6)
    plan = trajectory.plan
    weights = noise_aware_weights(step_stds(trainer.adapter, plan, trajectory.schedule, plan.trained))
    assert weights[0] > weights[1]  # the early branch has more noise
    samples = torch.arange(6)
    weighted, _ = trainer._step_loss(trajectory, samples, torch.tensor([[0, 1]] * 6), advantages)
    trainer.config.train.timestep_weighting = "none"
    per_step = [trainer._step_loss(trajectory, samples, torch.full((6, 1), j), advantages)[0] for j in (0, 1)]
    expected = (weights[0] * per_step[0] + weights[1] * per_step[1]) / 2
    assert weighted.item() == pytest.approx(expected.item(), rel=1e-5)
    assert weighted.item() == pytest.approx(-(weights[0] + 2 * weights[1]).item() / 2, rel=1e-4)


@pytest.mark.slow  # two tree trainers and an epoch (~5 s); the pruning math is in tests/losses
def test_tree_epoch_trains_the_unpruned_edges_and_changes_the_lora(tiny_pipeline_dir, tmp_path):
    config = tree_config(
        tiny_pipeline_dir("sd3"), tmp_path, **{"train.width_pruning": "extremes", "sampling.sde_steps": [0, 1, 2]}
    )
    trainer = GRPOTrainer(config)
    trajectory, advantages, _, candidates = trainer.sample_branched_epoch(0)
    steps = trajectory.row_steps[:, 0]
    # Per tree: 2 + 4 + 4 edges at steps 0, 1, 2 (splits at 0 and 1); the 8 edges after the last split (step 2) are
    # width-pruned to the best 2 and the worst 2 of them.
    assert steps.tolist() == [0] * 4 + [1] * 8 + [2] * 8
    late = torch.arange(12, 20)
    order = late[torch.sort(advantages[late], descending=True, stable=True).indices]
    assert sorted(candidates.tolist()) == list(range(12)) + sorted(order[[0, 1, -2, -1]].tolist())
    # Depth pruning drops the edges into depth 2 (made at step 1) instead.
    trainer = GRPOTrainer(tree_config(tiny_pipeline_dir("sd3"), tmp_path, **{"train.depth_pruning": [2]}))
    _, advantages, _, kept = trainer.sample_branched_epoch(0)
    assert kept.tolist() == [0, 1, 2, 3] + list(range(12, 20))  # the step-1 edges (4..11) are pruned
    # An epoch trains those of them with a non-zero advantage and moves the LoRA.
    expected = int((advantages[kept] != 0).sum())
    assert expected > 0
    before = [p.detach().clone() for p in trainer.run.params]
    metrics = trainer.train_step(0)
    assert metrics["num_train_samples"] == expected
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.run.params))


def test_branching_config_errors(tiny_pipeline_dir, tmp_path):
    folder = tiny_pipeline_dir("sd3")
    with pytest.raises(ConfigError, match="images_per_prompt"):
        tree_config(folder, tmp_path, **{"sampling.images_per_prompt": 8})
    with pytest.raises(ConfigError, match="stored transition means"):
        tree_config(folder, tmp_path, **{"train.ratio_guard": "grpo_guard", "train.clip_range": 1e-6})
    with pytest.raises(ConfigError, match="plan: tree"):
        make_config(folder, tmp_path, **{"train.width_pruning": "extremes"})
    with pytest.raises(ConfigError, match="branch_children"):
        branch_config(folder, tmp_path, **{"sampling.branch_children": 1})
    with pytest.raises(ConfigError, match=r"not the last step"):
        branch_config(folder, tmp_path, **{"sampling.branch_steps": [3]})
    with pytest.raises(ConfigError, match="advantage: group"):
        branch_config(folder, tmp_path, **{"train.advantage": "running"})
