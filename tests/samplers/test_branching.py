"""Branching rollouts: TempFlow-GRPO's branch plan and rollout, BranchGRPO's tree plan and rollout."""

import pytest
import torch
from families import FAMILIES_FIRST_FIVE_FAST

from diffalign.adapters import load_adapter
from diffalign.samplers.branching import (
    branch_plan,
    branch_rollout,
    count_branch_calls,
    count_tree_calls,
    count_tree_edges,
    tree_plan,
    tree_rollout,
)
from diffalign.samplers.plan import ode_plan
from diffalign.samplers.rollout import rollout, transition_log_probs


SIZE = 32


def _adapter(tiny_pipeline_dir, family):
    kwargs = {"max_sequence_length": 77} if family in ("sd3", "flux", "flux_kontext") else {}
    return load_adapter(tiny_pipeline_dir(family), height=SIZE, width=SIZE, **kwargs)


def _kernel(adapter):
    return "sde" if adapter.prediction_type == "flow" else "ddim"


# --- plans (pure) ----------------------------------------------------------------------------------------------------


def test_branch_plan_puts_noise_only_at_the_branch_steps():
    plan = branch_plan(6, 0.7, [3, 1])
    assert plan.noise_levels == (0.0, 0.7, 0.0, 0.7, 0.0, 0.0)
    assert plan.stored == plan.trained == (1, 3)
    assert branch_plan(4, 0.9).stored == (0, 1, 2)  # default: every step but the last, as TempFlow-GRPO's code
    with pytest.raises(ValueError, match="at least one branch step"):
        branch_plan(4, 0.7, [])


def test_tree_plan_scales_the_split_steps_noise_and_trains_every_stochastic_step():
    tree = tree_plan(6, 0.3, [0, 2], sde_steps=[0, 1, 2, 3], split_noise_scale=4.0, kernel="const")
    assert tree.plan.noise_levels == pytest.approx((0.3, 0.3, 0.3, 0.3, 0.0, 0.0))
    assert tree.plan.std_scales == (4.0, 1.0, 4.0, 1.0, 1.0, 1.0)  # wider splits around the kernel's own mean
    assert tree.plan.stored == tree.plan.trained == (0, 1, 2, 3)
    assert tree.num_leaves == 4
    with pytest.raises(ValueError, match="not stochastic"):
        tree_plan(6, 0.3, [6])  # past the last step


def test_denoiser_call_counts_match_the_papers_settings():
    # TempFlow-GRPO SD3.5: 10 steps, 6 children at steps 0..8 -> 9 main-path calls + 6 * 45 completions.
    assert count_branch_calls(10, range(9), 6) == 279
    # BranchGRPO: 20 steps, binary splits at 0, 3, 6, 9 -> 1 + 2*3 + 4*3 + 8*3 + 16*10 = 203 (vs 16 * 20 = 320).
    tree = tree_plan(20, 0.3, [0, 3, 6, 9], kernel="const")
    assert count_tree_calls(tree) == 203
    # Edges: 2 + 2 + 2 + 4 + 4 + 4 + 8 + 8 + 8 + 16 x 10 stochastic steps (the last, ODE, is not an edge) = 202.
    assert count_tree_edges(tree) == 202


# --- TempFlow-GRPO rollout -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd3(tiny_pipeline_dir):
    return _adapter(tiny_pipeline_dir, "sd3")


def test_branch_children_share_the_main_path_and_differ_only_from_their_branch(sd3):
    plan = branch_plan(5, 0.7, [1, 3])
    out = branch_rollout(sd3, ["a red circle", "a blue square"], plan, 3, guidance_scale=2.0, seeds=[5, 6])
    traj = out.trajectory
    assert traj.latents.shape[:2] == (6, 2) and out.images.shape == (6, 2, 3, SIZE, SIZE)
    assert out.path_ids.tolist() == [0, 0, 0, 1, 1, 1]
    # The main path's state at a branch is the same for a path's children, and its ODE reproduces a plain rollout.
    assert torch.equal(traj.latents[0, 0], traj.latents[2, 0]) and not torch.equal(
        traj.latents[0, 0], traj.latents[3, 0]
    )
    plain = rollout(sd3, ["a red circle"], ode_plan(5), guidance_scale=2.0, seeds=[5], decode=False, stop_after=1)
    assert torch.allclose(traj.latents[0, 0], plain.final_latents[0], atol=1e-6)
    # Siblings are different draws; each is completed by the ODE from the step after its branch.
    assert not torch.equal(traj.next_latents[0, 1], traj.next_latents[1, 1])
    completed = rollout(
        sd3,
        ["a red circle"],
        ode_plan(5),
        guidance_scale=2.0,
        decode=False,
        start_step=4,
        start_latents=traj.next_latents[1, 1:2],
    )
    assert torch.allclose(out.final_latents[1, 1], completed.final_latents[0], atol=1e-5)
    again = branch_rollout(sd3, ["a red circle", "a blue square"], plan, 3, guidance_scale=2.0, seeds=[5, 6])
    assert torch.equal(again.trajectory.next_latents, traj.next_latents)


@pytest.mark.parametrize("family", FAMILIES_FIRST_FIVE_FAST)
def test_branching_rollouts_are_on_policy(family, tiny_pipeline_dir):
    adapter = _adapter(tiny_pipeline_dir, family)
    kernel = _kernel(adapter)
    branched = branch_rollout(adapter, ["a red circle"], branch_plan(4, 0.7, [0, 2], kernel=kernel), 2, seeds=[3])
    widened = tree_plan(4, 0.7, [0, 1], split_noise_scale=3.0, kernel=kernel)
    tree = tree_rollout(adapter, ["a red circle"], widened, seeds=[4], decode=False)
    for traj in (branched.trajectory, tree.trajectory):
        positions = torch.arange(traj.log_probs.shape[1]).expand(traj.log_probs.shape[0], -1)
        with torch.no_grad():
            log_probs, _, _ = transition_log_probs(adapter, traj, positions)
        assert torch.allclose(log_probs, traj.log_probs, atol=1e-4), family


# --- BranchGRPO rollout ----------------------------------------------------------------------------------------------


def test_tree_rollout_shares_prefixes_and_records_every_stochastic_edge(sd3):
    tree = tree_plan(5, 0.7, [0, 2], sde_steps=[0, 1, 2])  # steps 3, 4: ODE
    out = tree_rollout(sd3, ["a red circle", "a blue square"], tree, guidance_scale=2.0, seeds=[1, 2])
    # Per tree: root; step 0 -> 2 nodes; step 1 -> 2; step 2 -> 4; steps 3, 4 -> 4 each: 17 nodes, 8 edges stochastic.
    assert out.parents.shape == (34,) and out.leaves.shape == (8,) and out.images.shape == (8, 3, SIZE, SIZE)
    assert out.trajectory.latents.shape[:2] == (16, 1)
    assert out.trajectory.row_steps.flatten().tolist() == [0] * 4 + [1] * 4 + [2] * 8
    assert out.depths[out.leaves].tolist() == [5] * 8
    assert out.trees[out.leaves].tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert out.leaf_prompts[:4] == ["a red circle"] * 4
    # An edge starts from its parent's state: a split's two children have the same parent and different draws.
    children = out.edge_children[:2]
    assert out.parents[children[0]] == out.parents[children[1]] == 0
    assert torch.equal(out.trajectory.latents[0], out.trajectory.latents[1])
    assert not torch.equal(out.trajectory.next_latents[0], out.trajectory.next_latents[1])
    # The edge at step 1 from the first child continues from that child's state.
    step1 = out.trajectory.row_steps[:, 0] == 1
    first = torch.nonzero(step1)[0, 0]
    assert out.parents[out.edge_children[first]] == children[0]
    assert torch.equal(out.trajectory.latents[first, 0], out.trajectory.next_latents[0, 0])
    assert torch.isnan(out.edge_log_probs[0]) and not torch.isnan(out.edge_log_probs[children]).any()


def test_a_widened_split_keeps_the_kernels_mean_and_scales_its_std(sd3):
    """BranchGRPO's split noise: the transition is N(kernel mean, (scale * kernel std)^2), drawn and scored alike."""
    from diffalign.samplers.rollout import step_transition
    from diffalign.samplers.steps import gaussian_log_prob

    plain, wide = tree_plan(4, 0.7, [0]).plan, tree_plan(4, 0.7, [0], split_noise_scale=3.0).plan
    schedule = sd3.set_timesteps(4)
    x, v = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)).unbind(0)
    x, v = x[None], v[None]
    base = step_transition(sd3, plain, schedule, 0, v, x, generator=[torch.Generator().manual_seed(1)])
    step = step_transition(sd3, wide, schedule, 0, v, x, generator=[torch.Generator().manual_seed(1)])
    assert torch.equal(step.mean, base.mean)
    assert torch.allclose(torch.as_tensor(step.std), 3 * torch.as_tensor(base.std))
    assert torch.allclose(step.prev_sample - step.mean, 3 * (base.prev_sample - base.mean), atol=1e-6)
    scored = step_transition(sd3, wide, schedule, 0, v, x, prev_sample=step.prev_sample)
    assert torch.allclose(scored.log_prob, gaussian_log_prob(step.prev_sample, base.mean, 3 * base.std))
