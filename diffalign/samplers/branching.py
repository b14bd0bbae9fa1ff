"""Branching rollouts: TempFlow-GRPO's trajectory branching and BranchGRPO's tree rollouts.

Both sample on the one step layer (:func:`~diffalign.samplers.rollout.step_transition`) and return their transitions
as a :class:`~diffalign.samplers.rollout.Trajectory`, so that :func:`~diffalign.samplers.rollout.transition_log_probs`
re-scores them under new parameters exactly as a flat rollout's (ratio 1 before the first update).

- :func:`branch_rollout` (TempFlow-GRPO, docs/methods/grpo.md#tempflow-grpo): each main path follows the ODE; at each
  branch step ``j`` of the plan, ``K`` children are drawn with the stochastic kernel from the main path's state and
  each is completed to the end with the ODE. A child's image differs from its siblings' only through step ``j``, so
  its reward credits that step alone. The trajectory's rows are (path, child) and its stored positions the branch
  steps; the images are ``[rows, positions, 3, H, W]``.
- :func:`tree_rollout` (BranchGRPO, docs/methods/grpo.md#branchgrpo): one tree per prompt; every live node gets one
  denoiser call per step, a split step gives each node ``branching`` children, other steps one. Prefixes are shared,
  so a tree of ``L`` leaves costs fewer denoiser calls than ``L`` independent rollouts. Every stochastic edge is a
  training transition: the trajectory's rows are edges, with one stored position whose step differs per row
  (``Trajectory.row_steps``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from diffalign.adapters.base import Conditioning, DiffusionAdapter
from diffalign.samplers.plan import StepPlan, ode_plan
from diffalign.samplers.rollout import (
    Trajectory,
    _check_plan,
    _resolve_seeds,
    make_generators,
    prompt_conditioning,
    step_transition,
)


__all__ = [
    "BranchedRollout",
    "TreePlan",
    "TreeRollout",
    "branch_plan",
    "branch_rollout",
    "count_branch_calls",
    "count_tree_calls",
    "count_tree_edges",
    "tree_plan",
    "tree_rollout",
]


# --- plans -----------------------------------------------------------------------------------------------------------


def branch_plan(num_steps: int, noise_level: float, branch_steps: Sequence[int] | None = None, kernel: str = "sde"):
    """TempFlow-GRPO's plan: the kernel's noise only at the branch steps, which are stored and trained.

    Args:
        num_steps: sampling steps ``T``.
        noise_level: the kernel's noise scale at a branch (TempFlow-GRPO: 0.7 SD3.5, 0.9 FLUX).
        branch_steps: the steps branched at; default every step but the last (TempFlow-GRPO's SD3.5 code).
        kernel: the stochastic kernel (``sde``, ``const``, ``cps``; ``ddim`` for epsilon / v models).
    """
    if not noise_level > 0:
        raise ValueError(f"noise_level must be > 0 at a branch, got {noise_level}")
    steps = tuple(sorted(set(branch_steps))) if branch_steps is not None else tuple(range(num_steps - 1))
    if not steps:
        raise ValueError("branch_steps is empty: a branching rollout needs at least one branch step")
    levels = tuple(float(noise_level) if i in steps else 0.0 for i in range(num_steps))
    return StepPlan(num_steps, kernel, levels, steps, steps)


@dataclass(frozen=True)
class TreePlan:
    """A BranchGRPO tree: the step plan (which steps are stochastic, their noise), where the tree splits, how wide.

    Attributes:
        plan: the step plan; its stochastic steps are the tree's training edges (stored and trained).
        split_steps: increasing steps at which every live node gets ``branching`` children (each stochastic).
        branching: children per node at a split step (BranchGRPO: 2).
    """

    plan: StepPlan
    split_steps: tuple[int, ...]
    branching: int = 2

    def __post_init__(self) -> None:
        if self.branching < 2:
            raise ValueError(f"branching must be >= 2 (one child is no split), got {self.branching}")
        if not self.split_steps:
            raise ValueError("a tree needs at least one split step")
        not_stochastic = [i for i in self.split_steps if i >= self.plan.num_steps or self.plan.noise_levels[i] == 0]
        if not_stochastic:
            raise ValueError(
                f"split steps {not_stochastic} are not stochastic steps of the plan: children would be equal"
            )

    @property
    def num_leaves(self) -> int:
        """Leaves of one tree: ``branching ** len(split_steps)``."""
        return self.branching ** len(self.split_steps)


def tree_plan(
    num_steps: int,
    noise_level: float,
    split_steps: Sequence[int],
    branching: int = 2,
    sde_steps: Sequence[int] | None = None,
    split_noise_scale: float = 1.0,
    kernel: str = "sde",
) -> TreePlan:
    """BranchGRPO's tree: stochastic ``sde_steps`` (default every step but the last), split at ``split_steps``.

    Args:
        num_steps: sampling steps ``T`` (BranchGRPO: 20).
        noise_level: the kernel's noise scale (BranchGRPO: DanceGRPO's ``const`` kernel with eta 0.3).
        split_steps: steps at which each node branches (BranchGRPO: 0, 3, 6, 9); always stochastic.
        branching: children per split (BranchGRPO: 2).
        sde_steps: the other stochastic steps (ODE elsewhere: the "Mix" variant); default all but the last.
        split_noise_scale: std multiplier at split steps around the kernel's own mean, so that siblings spread
            further apart (BranchGRPO's ``tree_split_noise_scale``; :attr:`StepPlan.std_scales`). Deviation:
            BranchGRPO draws split children with the scaled std but scores them with the unscaled one; here they
            are drawn from and scored with the widened density.
        kernel: the stochastic kernel.
    """
    if not noise_level > 0 or not split_noise_scale > 0:
        raise ValueError(f"noise_level and split_noise_scale must be > 0, got {noise_level}, {split_noise_scale}")
    splits = tuple(sorted(set(split_steps)))
    sde = set(range(num_steps - 1)) if sde_steps is None else set(sde_steps)
    levels = tuple(float(noise_level) if i in sde or i in splits else 0.0 for i in range(num_steps))
    scales = tuple(float(split_noise_scale) if i in splits else 1.0 for i in range(num_steps))
    stochastic = tuple(i for i, level in enumerate(levels) if level > 0)
    plan = StepPlan(num_steps, kernel, levels, stochastic, stochastic, std_scales=scales)
    return TreePlan(plan, splits, branching)


def count_branch_calls(num_steps: int, branch_steps: Sequence[int], num_children: int) -> int:
    """Denoiser calls of one TempFlow-GRPO main path (CFG doubles them): the path runs to its last branch step, then
    each child runs the steps after its branch, ``K * sum_j (T - 1 - j)`` (TempFlow-GRPO's SD3.5 setting, 10 steps,
    K = 6, branches at 0..8: 279)."""
    return max(branch_steps) + 1 + num_children * sum(num_steps - 1 - j for j in branch_steps)


def count_tree_calls(tree: TreePlan) -> int:
    """Denoiser calls of one tree: each step runs once per live node (BranchGRPO's 16-leaf, 20-step tree: 203 where
    16 independent rollouts take 320)."""
    calls, live = 0, 1
    for i in range(tree.plan.num_steps):
        calls += live
        live *= tree.branching if i in tree.split_steps else 1
    return calls


def count_tree_edges(tree: TreePlan) -> int:
    """Stochastic edges of one tree, its training transitions: 202 for BranchGRPO's 20-step tree split at 0, 3, 6, 9
    (its own stochastic last step adds 16 more)."""
    edges, live = 0, 1
    for i in range(tree.plan.num_steps):
        live *= tree.branching if i in tree.split_steps else 1
        edges += live if tree.plan.noise_levels[i] > 0 else 0
    return edges


# --- shared pieces ---------------------------------------------------------------------------------------------------


@torch.no_grad()
def _predict(adapter, latents: Tensor, t: Tensor, cond: Conditioning, guidance: float, chunk: int | None) -> Tensor:
    """The denoiser's output on ``latents`` ``[n, ...]``, at most ``chunk`` rows per call."""
    size = chunk or latents.shape[0]
    outputs = [
        adapter.predict(latents[i : i + size], t, cond[i : i + size], guidance)
        for i in range(0, latents.shape[0], size)
    ]
    return torch.cat(outputs)


@torch.no_grad()
def _ode_to_end(adapter, schedule, start: int, latents, cond, guidance, chunk) -> Tensor:
    """Run the ODE (the plan family's deterministic step) from step ``start`` to the end; ``[n, ...]`` latents."""
    plan = ode_plan(len(schedule.timesteps))
    for i in range(start, len(schedule.timesteps)):
        output = _predict(adapter, latents, schedule.timesteps[i], cond, guidance, chunk)
        latents = step_transition(adapter, plan, schedule, i, output, latents).prev_sample
    return latents


@torch.no_grad()
def _decode(adapter: DiffusionAdapter, latents: Tensor, chunk: int | None) -> Tensor:
    size = chunk or latents.shape[0]
    return torch.cat([adapter.decode(latents[i : i + size]) for i in range(0, latents.shape[0], size)])


# --- TempFlow-GRPO ---------------------------------------------------------------------------------------------------


@dataclass
class BranchedRollout:
    """What :func:`branch_rollout` returns: ``P`` main paths, ``K`` children per branch step, ``S`` branch steps.

    Attributes:
        trajectory: rows ``B = P * K`` (path-major: path 0's children first), stored positions = the branch steps;
            ``latents[b, s]`` is the main path's state entering branch step ``s`` (equal over a path's children) and
            ``next_latents[b, s]`` child ``b``'s draw there.
        images: ``[B, S, 3, H, W]`` the completed image of each child, or ``None`` when not decoded.
        path_ids: ``[B]`` the main path of each row (TempFlow-GRPO's seed group).
        final_latents: ``[B, S, ...]`` each child's completed latents.
    """

    trajectory: Trajectory
    images: Tensor | None
    path_ids: Tensor
    final_latents: Tensor


def branch_rollout(
    adapter: DiffusionAdapter,
    prompts: Sequence[str],
    plan: StepPlan,
    num_children: int,
    *,
    guidance_scale: float = 1.0,
    negative_prompt: str | None = None,
    seeds: int | Sequence[int] | None = None,
    conditioning: Conditioning | None = None,
    chunk_size: int | None = None,
    decode: bool = True,
) -> BranchedRollout:
    """TempFlow-GRPO's trajectory branching (see the module docstring).

    Args:
        adapter: the model family's adapter.
        prompts: ``P`` prompts, one per main path (repeat a prompt for several paths).
        plan: :func:`branch_plan`: its stored steps are the branch steps, its noise levels their kernel's.
        num_children: ``K`` children per branch step (TempFlow-GRPO: 6).
        guidance_scale: CFG scale (FLUX: the guidance embedding).
        negative_prompt: CFG's unconditional text.
        seeds: one per main path (an int ``s`` gives ``s + p``): its initial noise, then its children's noise in
            order (branch step by branch step, child by child).
        conditioning: precomputed ``[P]`` conditioning of ``prompts``.
        chunk_size: rows per denoiser call (memory bound); default all.
        decode: decode the children's completed latents.
    """
    prompts = list(prompts)
    _check_plan(adapter, plan)
    if num_children < 1:
        raise ValueError(f"num_children must be >= 1, got {num_children}")
    if not plan.stored:
        raise ValueError("the plan has no branch steps (stored steps): build it with branch_plan")
    paths, k = len(prompts), num_children
    seeds = _resolve_seeds(seeds, paths)
    generators = make_generators(seeds, adapter.device)
    cond = prompt_conditioning(adapter, prompts, guidance_scale, negative_prompt, conditioning)
    child_cond = cond.repeat_interleave(k)
    # Each path's generator draws its children's noise in turn: rows are path-major.
    child_generators = [g for g in generators for _ in range(k)]
    schedule = adapter.set_timesteps(plan.num_steps)
    main_plan = ode_plan(plan.num_steps, plan.kernel)

    latents = adapter.prepare_latents(paths, generators).float()
    entering, produced, log_probs, finals = [], [], [], []
    with torch.no_grad():
        for i in range(plan.stored[-1] + 1):  # the main path's own image is not used: it stops at the last branch
            output = _predict(adapter, latents, schedule.timesteps[i], cond, guidance_scale, chunk_size)
            if i in plan.stored:
                x, out = latents.repeat_interleave(k, 0), output.float().repeat_interleave(k, 0)
                child = step_transition(adapter, plan, schedule, i, out, x, generator=child_generators)
                entering.append(x)
                produced.append(child.prev_sample)
                log_probs.append(child.log_prob)
                finals.append(
                    _ode_to_end(adapter, schedule, i + 1, child.prev_sample, child_cond, guidance_scale, chunk_size)
                )
            latents = step_transition(adapter, main_plan, schedule, i, output, latents).prev_sample
    final_latents = torch.stack(finals, dim=1)  # [B, S, ...]
    images = _decode(adapter, final_latents.flatten(0, 1), chunk_size) if decode else None
    unique = list(dict.fromkeys(prompts))
    rows_prompts = [p for p in prompts for _ in range(k)]
    trajectory = Trajectory(
        prompts=rows_prompts,
        prompt_ids=torch.tensor([unique.index(p) for p in rows_prompts]),
        conditioning=child_cond,
        seeds=[s for s in seeds for _ in range(k)],
        step_indices=plan.stored,
        timesteps=schedule.timesteps[list(plan.stored)],
        latents=torch.stack(entering, dim=1),
        next_latents=torch.stack(produced, dim=1),
        log_probs=torch.stack(log_probs, dim=1),
        final_latents=final_latents[:, -1],
        images=None,
        guidance_scale=guidance_scale,
        plan=plan,
        schedule=schedule,
    )
    return BranchedRollout(
        trajectory=trajectory,
        images=None if images is None else images.view(paths * k, len(plan.stored), *images.shape[1:]),
        path_ids=torch.arange(paths).repeat_interleave(k),
        final_latents=final_latents,
    )


# --- BranchGRPO ------------------------------------------------------------------------------------------------------


@dataclass
class TreeRollout:
    """What :func:`tree_rollout` returns. ``N`` nodes over all trees (roots included), ``E`` stochastic edges,
    ``L`` leaves (``P * tree.num_leaves``).

    Nodes are numbered in creation order, so a parent's id is below its children's.

    Attributes:
        trajectory: rows = the ``E`` stochastic edges, one stored position each; ``latents[e, 0]`` the parent's
            state, ``next_latents[e, 0]`` the child's, ``row_steps[e, 0]`` the step that made it.
        images: ``[L, 3, H, W]`` the leaves' images (leaf order = :attr:`leaves`), or ``None``.
        parents: ``[N]`` each node's parent id (``-1`` for a root).
        depths: ``[N]`` each node's depth (root 0; a node made at step ``i`` has depth ``i + 1``).
        trees: ``[N]`` the tree (prompt index) of each node.
        leaves: ``[L]`` node ids of the leaves, tree by tree.
        edge_children: ``[E]`` node id of each edge's child (its advantage is the child's).
        edge_log_probs: ``[N]`` log-prob of the edge into each node (NaN for roots and ODE edges): the
            probability-weighted reward fusion reads it.
        leaf_prompts: ``[L]`` the prompt of each leaf.
        final_latents: ``[L, ...]`` the leaves' latents.
    """

    trajectory: Trajectory
    images: Tensor | None
    parents: Tensor
    depths: Tensor
    trees: Tensor
    leaves: Tensor
    edge_children: Tensor
    edge_log_probs: Tensor
    leaf_prompts: list[str]
    final_latents: Tensor

    def ancestors_at(self, depth: int) -> Tensor:
        """``[N]`` each node's ancestor at ``depth`` (itself at that depth; -1 for shallower nodes): e.g. the branch
        made by the last split that a late edge's child descends from (BranchGRPO's width pruning)."""
        ancestors = torch.full_like(self.parents, -1)
        for node, (parent, node_depth) in enumerate(zip(self.parents.tolist(), self.depths.tolist())):
            if node_depth == depth:
                ancestors[node] = node
            elif node_depth > depth:
                ancestors[node] = ancestors[parent]
        return ancestors


def tree_rollout(
    adapter: DiffusionAdapter,
    prompts: Sequence[str],
    tree: TreePlan,
    *,
    guidance_scale: float = 1.0,
    negative_prompt: str | None = None,
    seeds: int | Sequence[int] | None = None,
    conditioning: Conditioning | None = None,
    chunk_size: int | None = None,
    decode: bool = True,
) -> TreeRollout:
    """BranchGRPO's tree rollout (see the module docstring): one tree per prompt.

    Args:
        adapter: the model family's adapter.
        prompts: ``P`` prompts, one tree each.
        tree: :func:`tree_plan`.
        guidance_scale: CFG scale (FLUX: the guidance embedding).
        negative_prompt: CFG's unconditional text.
        seeds: one per tree: its root noise, then all of its nodes' noise in creation order.
        conditioning: precomputed ``[P]`` conditioning of ``prompts``.
        chunk_size: rows per denoiser call (memory bound); default all live nodes at once.
        decode: decode the leaves.
    """
    prompts = list(prompts)
    plan = tree.plan
    _check_plan(adapter, plan)
    seeds = _resolve_seeds(seeds, len(prompts))
    generators = make_generators(seeds, adapter.device)
    cond = prompt_conditioning(adapter, prompts, guidance_scale, negative_prompt, conditioning)
    schedule = adapter.set_timesteps(plan.num_steps)

    latents = adapter.prepare_latents(len(prompts), generators).float()
    node_ids = torch.arange(len(prompts))  # the live nodes
    node_trees = torch.arange(len(prompts))
    parents, depths, trees = [-1] * len(prompts), [0] * len(prompts), list(range(len(prompts)))
    edge_log_probs: list[float] = [float("nan")] * len(prompts)
    edges: dict[str, list] = {"parent_latents": [], "child_latents": [], "steps": [], "log_probs": [], "children": []}
    with torch.no_grad():
        for i in range(plan.num_steps):
            output = _predict(adapter, latents, schedule.timesteps[i], cond[node_trees], guidance_scale, chunk_size)
            width = tree.branching if i in tree.split_steps else 1
            x, out = latents.repeat_interleave(width, 0), output.float().repeat_interleave(width, 0)
            rows_trees = node_trees.repeat_interleave(width)
            step = step_transition(adapter, plan, schedule, i, out, x, generator=[generators[t] for t in rows_trees])
            child_ids = torch.arange(len(parents), len(parents) + x.shape[0])
            parents += node_ids.repeat_interleave(width).tolist()
            depths += [i + 1] * x.shape[0]
            trees += rows_trees.tolist()
            if step.log_prob is None:
                edge_log_probs += [float("nan")] * x.shape[0]
            else:
                edge_log_probs += step.log_prob.tolist()
                edges["parent_latents"].append(x)
                edges["child_latents"].append(step.prev_sample)
                edges["steps"].append(torch.full((x.shape[0],), i, dtype=torch.long))
                edges["log_probs"].append(step.log_prob)
                edges["children"].append(child_ids)
            latents, node_ids, node_trees = step.prev_sample, child_ids, rows_trees
    if not edges["steps"]:
        raise ValueError("the tree has no stochastic step: nothing to train")
    # The live nodes are the leaves, tree-major already (children follow their parent's order).
    images = _decode(adapter, latents, chunk_size) if decode else None
    edge_steps = torch.cat(edges["steps"])
    edge_trees = torch.tensor(trees)[torch.cat(edges["children"])]
    unique = list(dict.fromkeys(prompts))
    edge_prompts = [prompts[t] for t in edge_trees.tolist()]
    trajectory = Trajectory(
        prompts=edge_prompts,
        prompt_ids=torch.tensor([unique.index(p) for p in edge_prompts]),
        conditioning=cond[edge_trees],
        seeds=[seeds[t] for t in edge_trees.tolist()],
        step_indices=(int(edge_steps[0]),),
        timesteps=schedule.timesteps[edge_steps[:1]],
        latents=torch.cat(edges["parent_latents"]).unsqueeze(1),
        next_latents=torch.cat(edges["child_latents"]).unsqueeze(1),
        log_probs=torch.cat(edges["log_probs"]).unsqueeze(1),
        final_latents=latents,
        images=None,
        guidance_scale=guidance_scale,
        plan=plan,
        schedule=schedule,
        row_steps=edge_steps.unsqueeze(1),
    )
    return TreeRollout(
        trajectory=trajectory,
        images=images,
        parents=torch.tensor(parents),
        depths=torch.tensor(depths),
        trees=torch.tensor(trees),
        leaves=node_ids,
        edge_children=torch.cat(edges["children"]),
        edge_log_probs=torch.tensor(edge_log_probs),
        leaf_prompts=[prompts[t] for t in node_trees.tolist()],
        final_latents=latents,
    )
