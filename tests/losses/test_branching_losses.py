"""TempFlow-GRPO and BranchGRPO math against hand-computed values: branch advantages, noise-aware weights, tree reward
fusion, depth-wise advantages and pruning."""

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from diffalign.losses.advantages import branch_advantages, fuse_tree_rewards, prune_tree_edges, tree_advantages
from diffalign.losses.policy_gradient import noise_aware_weights
from diffalign.samplers.steps import flow_sde_step


def test_branch_advantages_normalise_each_step_within_its_main_path():
    # Two paths of two children, two branch steps: [rows, steps].
    rewards = torch.tensor([[1.0, 5.0], [3.0, 5.0], [0.0, 1.0], [4.0, 2.0]])
    advantages = branch_advantages(rewards, torch.tensor([0, 0, 1, 1]))
    expected = torch.tensor(
        [
            [-1 / (1 + 1e-4), 0.0],  # path 0, step 0: mean 2, population std 1; step 1: equal rewards
            [1 / (1 + 1e-4), 0.0],
            [-2 / (2 + 1e-4), -0.5 / (0.5 + 1e-4)],  # path 1: std 2 at step 0, 0.5 at step 1
            [2 / (2 + 1e-4), 0.5 / (0.5 + 1e-4)],
        ]
    )
    assert torch.allclose(advantages, expected, atol=1e-6)
    # With a global scale (the epoch's std, flow_grpo's global_std) the same centring is divided by it instead.
    scaled = branch_advantages(rewards, torch.tensor([0, 0, 1, 1]), scale=2.0)
    centred = torch.tensor([[-1.0, 0.0], [1.0, 0.0], [-2.0, -0.5], [2.0, 0.5]])
    assert torch.allclose(scaled, centred / (2 + 1e-4), atol=1e-6)
    with pytest.raises(ValueError, match="rows, branch steps"):
        branch_advantages(rewards.flatten(), torch.arange(8))


def test_noise_aware_weights_are_the_stds_over_their_mean_and_reproduce_tempflows_constant():
    assert torch.allclose(noise_aware_weights(torch.tensor([1.0, 2.0, 3.0])), torch.tensor([0.5, 1.0, 1.5]))
    # SD3.5 (10 steps, shift 3, noise level 0.7), the 9 trained steps: TempFlow-GRPO's code multiplies the stds by
    # 2.25, which is 1 / mean(std) of this schedule: the weights agree to the constant's rounding.
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(10)
    sigmas = scheduler.sigmas
    noise = torch.Generator().manual_seed(0)
    stds = torch.tensor(
        [
            float(
                flow_sde_step(torch.zeros(1, 1), torch.zeros(1, 1), sigmas[j], sigmas[j + 1], 0.7, generator=noise).std
            )
            for j in range(9)
        ]
    )
    assert 1 / stds.mean().item() == pytest.approx(2.25, abs=0.005)
    assert torch.allclose(noise_aware_weights(stds), 2.25 * stds, atol=2e-3)
    # The noisiest step is not the heaviest: flow_grpo's kernel uses sigma_1 for sigma_0 = 1 inside sqrt(s / (1 - s)).
    assert noise_aware_weights(stds).argmax().item() == 1
    with pytest.raises(ValueError, match="positive"):
        noise_aware_weights(torch.tensor([1.0, 0.0]))


# A hand-made tree: root 0 splits at step 0 into 1, 2; step 1 continues 1 -> 3, 2 -> 4; step 2 splits 3 -> 5, 6 and
# 4 -> 7, 8 (the leaves).
PARENTS = torch.tensor([-1, 0, 0, 1, 2, 3, 3, 4, 4])
DEPTHS = torch.tensor([0, 1, 1, 2, 2, 3, 3, 3, 3])
LEAVES = torch.tensor([5, 6, 7, 8])
LEAF_REWARDS = torch.tensor([1.0, 3.0, 2.0, 6.0])


def test_mean_fusion_averages_the_leaf_descendants():
    fused = fuse_tree_rewards(LEAF_REWARDS, PARENTS, LEAVES)
    assert fused.tolist() == [3.0, 2.0, 4.0, 2.0, 4.0, 1.0, 3.0, 2.0, 6.0]


def test_probability_weighted_fusion_softmaxes_the_child_edges_log_probs():
    log_probs = torch.tensor([float("nan"), 0.0, 0.0, -1.0, -1.0, 0.0, math.log(3.0), 0.0, 0.0])
    fused = fuse_tree_rewards(LEAF_REWARDS, PARENTS, LEAVES, "prob_weighted", log_probs)
    # node 3: weights 1/4, 3/4 of rewards 1, 3 -> 2.5; node 4: equal weights -> 4; single children pass through;
    # root: equal weights of 2.5 and 4.
    assert fused.tolist() == pytest.approx([3.25, 2.5, 4.0, 2.5, 4.0, 1.0, 3.0, 2.0, 6.0])


def test_depth_wise_advantages_use_the_unbiased_std_of_each_depth_of_each_tree():
    fused = fuse_tree_rewards(LEAF_REWARDS, PARENTS, LEAVES)
    advantages = tree_advantages(fused, DEPTHS, torch.zeros(9, dtype=torch.long))
    half = 1 / (math.sqrt(2) + 1e-8)  # depths 1 and 2: rewards 2, 4 (mean 3, unbiased std sqrt 2)
    std3 = math.sqrt(14 / 3)  # depth 3: rewards 1, 3, 2, 6 (mean 3)
    expected = [0.0, -half, half, -half, half, -2 / std3, 0.0, -1 / std3, 3 / std3]
    assert advantages.tolist() == pytest.approx(expected, abs=1e-7)
    # A second tree is normalised on its own: scaling its rewards leaves its advantages unchanged.
    parents = torch.cat([PARENTS, torch.where(PARENTS >= 0, PARENTS + 9, PARENTS)])
    leaves = torch.cat([LEAVES, LEAVES + 9])
    fused = fuse_tree_rewards(torch.cat([LEAF_REWARDS, 10 * LEAF_REWARDS]), parents, leaves)
    both = tree_advantages(fused, torch.cat([DEPTHS, DEPTHS]), torch.tensor([0] * 9 + [1] * 9))
    assert both[:9].tolist() == pytest.approx(expected, abs=1e-7) and both[9:].tolist() == pytest.approx(
        expected, abs=1e-7
    )
    # A global scale replaces each depth's std; a depth of one node (the root) still gets 0.
    scaled = tree_advantages(fused[:9], DEPTHS, torch.zeros(9, dtype=torch.long), scale=2.0)
    assert scaled.tolist() == pytest.approx([0.0, -0.5, 0.5, -0.5, 0.5, -1.0, 0.0, -0.5, 1.5], abs=1e-7)
    # Equal rewards at a depth: advantage 0, not 0 / eps.
    flat = tree_advantages(torch.ones(9, dtype=torch.float64), DEPTHS, torch.zeros(9, dtype=torch.long))
    assert flat.abs().max().item() == 0.0


def test_pruning_by_depth_and_by_width():
    # Edges into nodes 1..8 of the tree above, then two ODE-free steps (3, 4) after the last split (step 2), one edge
    # per leaf chain each; the late edges carry their chain's advantage.
    chain = torch.tensor([-1.0, 0.0, -0.5, 1.4])
    steps = torch.tensor([0, 0, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4])
    depths = steps + 1
    advantages = torch.cat([torch.tensor([-0.7, 0.7, -0.7, 0.7]), chain, chain, chain])
    branches = torch.tensor([-1] * 8 + [5, 6, 7, 8] * 2)
    keep_all = prune_tree_edges(steps, depths, advantages, branches, last_split=2)
    assert keep_all.all()
    by_depth = prune_tree_edges(steps, depths, advantages, branches, last_split=2, depths=[2, 5])
    assert torch.nonzero(~by_depth).flatten().tolist() == [2, 3, 12, 13, 14, 15]
    # per_branch: each branch has 2 late edges of equal advantage: max(1, int(2 * 0.5)) = 1 kept, the earlier one.
    per_branch = prune_tree_edges(steps, depths, advantages, branches, last_split=2, width="per_branch")
    assert torch.nonzero(per_branch).flatten().tolist() == list(range(12))
    # extremes: k = max(2, int(8 * 0.5)) = 4 of the 8 late edges: the best 2 (advantage 1.4) and the worst 2 (-1).
    extremes = prune_tree_edges(steps, depths, advantages, branches, last_split=2, width="extremes")
    assert torch.nonzero(extremes).flatten().tolist() == list(range(8)) + [8, 11, 12, 15]
