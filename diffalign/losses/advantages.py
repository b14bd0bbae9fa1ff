"""Advantages for policy-gradient training: group-relative (Flow-GRPO) and per-prompt running (DDPO).

Both follow the references exactly (docs/methods/grpo.md#advantages,
docs/methods/grpo.md#running-per-prompt-statistics):

- Flow-GRPO (``flow_grpo/stat_tracking.py``, cleared every epoch, so a pure function here,
  :func:`group_advantages`): ``A_i = (r_i - mean_{group(i)} r) / (std + 1e-4)`` with ``std`` the std of *all*
  rewards of the (gathered) batch when ``global_std`` (default) or of the group's rewards otherwise. If every
  group has a single member the training script bypasses the tracker and normalises over the batch:
  ``(r - mean(r)) / (std(r) + 1e-4)``.
- DDPO (``ddpo_pytorch/stat_tracking.py``, a buffer that persists across epochs, :class:`PerPromptStatTracker`).

Standard deviations are **population** std (``ddof=0``, numpy's ``np.std``), computed in float64 as the references
(numpy) do, and the epsilon is *added* to the std. DanceGRPO differs (torch's unbiased std, ``eps=1e-8``); pass
``global_std=False, eps=1e-8`` for its per-group form and note the ``ddof`` difference.

Rewards and prompts must be gathered over processes first: a group is spread over GPUs
(docs/methods/grpo.md#group-sampling).
"""

from collections import deque
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor


__all__ = [
    "PerPromptStatTracker",
    "branch_advantages",
    "clip_advantages",
    "fuse_tree_rewards",
    "group_advantages",
    "group_stds",
    "nonzero_advantage_mask",
    "per_reward_advantages",
    "prune_tree_edges",
    "tree_advantages",
    "zero_std_ratio",
]

GroupIds = Tensor | Sequence[Hashable]


def _group_index(group_ids: GroupIds, num: int) -> tuple[Tensor, int]:
    """``[N]`` long index of each sample's group (0..G-1, by first appearance) and ``G``."""
    if isinstance(group_ids, Tensor):
        if group_ids.shape != (num,):
            raise ValueError(f"group_ids has shape {tuple(group_ids.shape)}, expected ({num},)")
        _, index = torch.unique(group_ids, return_inverse=True)
        return index, int(index.max()) + 1 if num else 0
    if len(group_ids) != num:
        raise ValueError(f"got {len(group_ids)} group ids for {num} rewards")
    codes: dict[Hashable, int] = {}
    index = torch.tensor([codes.setdefault(g, len(codes)) for g in group_ids], dtype=torch.long)
    return index, len(codes)


def _check_rewards(rewards: Tensor) -> None:
    if rewards.ndim != 1 or rewards.numel() == 0:
        raise ValueError(f"rewards must be a non-empty [N] tensor, got shape {tuple(rewards.shape)}")


def _group_mean_std(rewards: Tensor, index: Tensor, num_groups: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per-group ``(mean [G], population std [G], count [G])`` of float64 ``rewards [N]``."""
    count = torch.zeros(num_groups, dtype=rewards.dtype, device=rewards.device).index_add_(
        0, index, torch.ones_like(rewards)
    )
    mean = torch.zeros_like(count).index_add_(0, index, rewards) / count
    sq_dev = torch.zeros_like(count).index_add_(0, index, (rewards - mean[index]) ** 2)
    return mean, (sq_dev / count).sqrt(), count


def group_advantages(rewards: Tensor, group_ids: GroupIds, global_std: bool = True, eps: float = 1e-4) -> Tensor:
    """Group-relative advantages of Flow-GRPO (Liu et al. 2025, Eq. 4; docs/methods/grpo.md#advantages).

    Args:
        rewards: ``[N]`` rewards of the whole (gathered) batch.
        group_ids: ``[N]`` group of each sample: an integer tensor or a sequence of prompts (any hashables).
        global_std: divide by the std of all ``N`` rewards (Flow-GRPO default, ``sample.global_std=True``);
            ``False`` divides by each group's own std (flow_grpo ``pickscore_flux_fast``, Wan; DanceGRPO).
        eps: added to the std (flow_grpo 1e-4).

    Returns:
        ``[N]`` advantages in the dtype of ``rewards``. When every group has one sample, batch normalisation
        ``(r - mean(r)) / (std(r) + eps)``, as flow_grpo with ``num_image_per_prompt == 1``. A singleton group
        among larger ones gets advantage 0 (its own mean), as in the reference tracker.
    """
    _check_rewards(rewards)
    index, num_groups = _group_index(group_ids, rewards.shape[0])
    r = rewards.detach().to(torch.float64)
    index = index.to(r.device)
    if num_groups == r.shape[0]:  # all singletons: the reference disables per-prompt tracking
        return ((r - r.mean()) / (r.std(correction=0) + eps)).to(rewards.dtype)
    mean, std, _ = _group_mean_std(r, index, num_groups)
    scale = r.std(correction=0) if global_std else std[index]
    return ((r - mean[index]) / (scale + eps)).to(rewards.dtype)


def per_reward_advantages(
    parts: Mapping[str, Tensor],
    weights: Mapping[str, float],
    group_ids: GroupIds,
    global_std: bool = True,
    eps: float = 1e-4,
) -> Tensor:
    """Multi-reward advantages as MixGRPO and DanceGRPO aggregate them (``train.advantage_aggregation:
    per_reward``; docs/methods/grpo.md#several-rewards): each reward is normalised on its own
    (:func:`group_advantages`), and the advantages are summed with the weights normalised to sum 1.

    ``A_i = sum_k (w_k / sum_j w_j) * group_advantages(r_k)_i``. Unlike normalising the weighted sum of the rewards
    (``sum``), a reward with a large scale or spread cannot drown the others.

    Args:
        parts: ``{name: [N]}`` each reward's scores (gathered over processes).
        weights: ``{name: weight}`` for every name of ``parts``; their sum must be > 0.
        group_ids: ``[N]`` group of each sample.
        global_std: as in :func:`group_advantages`.
        eps: as in :func:`group_advantages`.

    Returns:
        ``[N]`` advantages (float64 when the parts are).
    """
    if set(parts) != set(weights) or not parts:
        raise ValueError(f"parts {sorted(parts)} and weights {sorted(weights)} must name the same rewards")
    total = sum(weights.values())
    if not total > 0:
        raise ValueError(f"the reward weights must sum to > 0 to be normalised, got {dict(weights)}")
    return sum(
        (weights[name] / total) * group_advantages(values, group_ids, global_std=global_std, eps=eps)
        for name, values in parts.items()
    )


def group_stds(rewards: Tensor, group_ids: GroupIds) -> Tensor:
    """Population std of each group's rewards (flow_grpo logs their mean as ``reward_std_mean``).

    Args:
        rewards: ``[N]`` rewards.
        group_ids: ``[N]`` group of each sample (tensor or sequence of prompts).

    Returns:
        ``[G]`` float64 stds, groups in order of first appearance.
    """
    _check_rewards(rewards)
    index, num_groups = _group_index(group_ids, rewards.shape[0])
    r = rewards.detach().to(torch.float64)
    return _group_mean_std(r, index.to(r.device), num_groups)[1]


def zero_std_ratio(rewards: Tensor, group_ids: GroupIds) -> float:
    """Fraction of groups whose rewards are all equal (std exactly 0), flow_grpo's ``zero_std_ratio``.

    Such groups get zero advantages and give no learning signal; a high ratio means the reward saturates or the
    group is too small. Singleton groups count as zero-std.

    Args:
        rewards: ``[N]`` rewards.
        group_ids: ``[N]`` group of each sample.

    Returns:
        A float in [0, 1].
    """
    return float((group_stds(rewards, group_ids) == 0).double().mean())


def clip_advantages(advantages: Tensor, max_abs: float) -> Tensor:
    """Clamp advantages to ``[-max_abs, max_abs]`` (``train.adv_clip_max``, 5 in every reference).

    See docs/methods/grpo.md#advantages.
    """
    if not max_abs > 0:
        raise ValueError(f"max_abs must be > 0, got {max_abs}")
    return advantages.clamp(-max_abs, max_abs)


def nonzero_advantage_mask(advantages: Tensor) -> Tensor:
    """Samples with a non-zero advantage at some timestep, for flow_grpo's zero-advantage filtering
    (docs/methods/grpo.md#advantages).

    Args:
        advantages: ``[B]`` or ``[B, T]`` (per trained timestep) advantages.

    Returns:
        ``[B]`` bool mask; samples where it is False contribute nothing to the policy loss and can be dropped.
    """
    flat = advantages.reshape(advantages.shape[0], -1)
    return (flat != 0).any(dim=1)


class PerPromptStatTracker:
    """DDPO's per-prompt running reward statistics (``ddpo_pytorch/stat_tracking.py``).

    See docs/methods/grpo.md#running-per-prompt-statistics.

    For prompt streams without groups: each prompt keeps a ``deque(maxlen=buffer_size)`` of its latest rewards
    that persists across epochs. On :meth:`update`, the batch's rewards are appended first; then a prompt whose
    buffer holds at least ``min_count`` rewards is normalised by its buffer's mean and std, otherwise by the
    mean and std of the *whole current batch*: ``A = (r - mean) / (std + eps)``, population std, ``eps=1e-6``.
    Defaults (16, 16) are ddpo-pytorch's and TRL's. Save :meth:`state_dict` with checkpoints so that a resumed
    run normalises exactly as an uninterrupted one.

    Args:
        buffer_size: Rewards kept per prompt.
        min_count: Buffered rewards needed before a prompt's own statistics are used.
        eps: Added to the std.
    """

    def __init__(self, buffer_size: int = 16, min_count: int = 16, eps: float = 1e-6) -> None:
        if buffer_size < 1 or min_count < 1:
            raise ValueError(f"buffer_size and min_count must be >= 1, got {buffer_size}, {min_count}")
        if min_count > buffer_size:
            raise ValueError(
                f"min_count={min_count} > buffer_size={buffer_size}: the prompt stats would never be used"
            )
        self.buffer_size = buffer_size
        self.min_count = min_count
        self.eps = eps
        self._buffers: dict[str, deque[float]] = {}

    def update(self, prompts: Sequence[str], rewards: Tensor) -> Tensor:
        """Add a batch of rewards and return its advantages.

        Args:
            prompts: ``N`` prompts (gathered over processes).
            rewards: ``[N]`` rewards.

        Returns:
            ``[N]`` advantages in the dtype and on the device of ``rewards``.
        """
        _check_rewards(rewards)
        if len(prompts) != rewards.shape[0]:
            raise ValueError(f"got {len(prompts)} prompts for {rewards.shape[0]} rewards")
        r = rewards.detach().to(torch.float64).cpu()
        batch_mean, batch_std = r.mean(), r.std(correction=0)
        advantages = torch.empty_like(r)
        rows_of: dict[str, list[int]] = {}
        for i, prompt in enumerate(prompts):
            rows_of.setdefault(prompt, []).append(i)
        for prompt, row_list in rows_of.items():
            rows = torch.tensor(row_list)
            buffer = self._buffers.setdefault(prompt, deque(maxlen=self.buffer_size))
            buffer.extend(r[rows].tolist())
            if len(buffer) < self.min_count:
                mean, std = batch_mean, batch_std
            else:
                values = torch.tensor(list(buffer), dtype=torch.float64)
                mean, std = values.mean(), values.std(correction=0)
            advantages[rows] = (r[rows] - mean) / (std + self.eps)
        return advantages.to(device=rewards.device, dtype=rewards.dtype)

    def stats(self) -> dict[str, dict[str, float]]:
        """``{prompt: {"mean", "std", "count"}}`` of each buffer (population std), as ddpo's ``get_stats``."""
        out = {}
        for prompt, buffer in self._buffers.items():
            values = torch.tensor(list(buffer), dtype=torch.float64)
            out[prompt] = {"mean": float(values.mean()), "std": float(values.std(correction=0)), "count": len(buffer)}
        return out

    def clear(self) -> None:
        """Forget every buffer (Flow-GRPO-style per-epoch reset)."""
        self._buffers.clear()

    def state_dict(self) -> dict[str, Any]:
        """Plain-Python state (settings and buffers) for checkpoints."""
        return {
            "buffer_size": self.buffer_size,
            "min_count": self.min_count,
            "eps": self.eps,
            "buffers": {prompt: list(buffer) for prompt, buffer in self._buffers.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; the saved settings replace the current ones."""
        self.buffer_size = int(state["buffer_size"])
        self.min_count = int(state["min_count"])
        self.eps = float(state["eps"])
        self._buffers = {p: deque(map(float, v), maxlen=self.buffer_size) for p, v in state["buffers"].items()}


# --- branching rollouts ----------------------------------------------------------------------------------------------


def branch_advantages(
    rewards: Tensor, path_ids: GroupIds, eps: float = 1e-4, scale: float | Tensor | None = None
) -> Tensor:
    """TempFlow-GRPO's advantages of branched rollouts (docs/methods/grpo.md#tempflow-grpo): per branch step, the
    children of one main path form a group (its "seed group").

    ``A[b, s] = (R[b, s] - mean_{b' in path(b)} R[b', s]) / (std_{b' in path(b)} R[b', s] + eps)``, population std,
    as flow_grpo's per-prompt tracker applied column by column with the group's own std. The initial noise is shared
    within a group, so its effect on the reward cancels.

    Args:
        rewards: ``[B, S]`` reward of child ``b``'s image branched at step position ``s``.
        path_ids: ``[B]`` main path of each row.
        eps: added to the std (TempFlow-GRPO: 1e-4).
        scale: divide the deviations by this (a float, or ``[S]`` one per branch step) instead of each group's std,
            e.g. the std of each column of the epoch's rewards (flow_grpo's tracker with ``global_std=True``;
            TempFlow-GRPO's configs turn it off).

    Returns:
        ``[B, S]`` advantages.
    """
    if rewards.ndim != 2:
        raise ValueError(f"rewards must be [rows, branch steps], got shape {tuple(rewards.shape)}")
    if scale is None:
        columns = [
            group_advantages(rewards[:, s], path_ids, global_std=False, eps=eps) for s in range(rewards.shape[1])
        ]
        return torch.stack(columns, dim=1)
    index, num_groups = _group_index(path_ids, rewards.shape[0])
    r = rewards.detach().to(torch.float64)
    means = torch.stack([_group_mean_std(r[:, s], index, num_groups)[0][index] for s in range(r.shape[1])], dim=1)
    scale = torch.as_tensor(scale, dtype=torch.float64)
    return ((r - means) / (scale + eps)).to(rewards.dtype)


def fuse_tree_rewards(
    leaf_rewards: Tensor,
    parents: Tensor,
    leaves: Tensor,
    fusion: str = "mean",
    edge_log_probs: Tensor | None = None,
) -> Tensor:
    """BranchGRPO's reward of every node of a forest (docs/methods/grpo.md#branchgrpo): a leaf's own reward, an inner
    node's fused from its children's.

    ``mean``: the mean reward of the node's leaf descendants (BranchGRPO's default). ``prob_weighted``: bottom-up
    ``r(n) = sum_c softmax_c(log p(n -> c)) r(c)`` over the children (a single child passes its reward through).

    Args:
        leaf_rewards: ``[L]`` rewards of the leaves, in the order of ``leaves``.
        parents: ``[N]`` parent id of each node (-1 for roots); nodes are numbered so that a parent's id is below its
            children's.
        leaves: ``[L]`` node ids of the leaves.
        fusion: ``mean`` or ``prob_weighted``.
        edge_log_probs: ``[N]`` log-prob of the edge into each node (``prob_weighted``; NaN counts as 0, as
            BranchGRPO treats a missing log-prob).

    Returns:
        ``[N]`` fused rewards, float64.
    """
    if fusion not in ("mean", "prob_weighted"):
        raise ValueError(f"fusion must be 'mean' or 'prob_weighted', got {fusion!r}")
    num = parents.shape[0]
    children: list[list[int]] = [[] for _ in range(num)]
    for node, parent in enumerate(parents.tolist()):
        if parent >= 0:
            children[parent].append(node)
    reward = torch.zeros(num, dtype=torch.float64)
    reward[leaves] = leaf_rewards.detach().to(torch.float64).cpu()
    leaf_sum, leaf_count = reward.clone(), torch.zeros(num, dtype=torch.float64)
    leaf_count[leaves] = 1.0
    if fusion == "prob_weighted":
        if edge_log_probs is None:
            raise ValueError("prob_weighted fusion needs the edge log-probs")
        log_p = torch.nan_to_num(edge_log_probs.detach().to(torch.float64).cpu(), nan=0.0)
    for node in range(num - 1, -1, -1):  # children before parents
        kids = children[node]
        if not kids:
            continue
        if fusion == "mean":
            leaf_sum[node] = leaf_sum[kids].sum()
            leaf_count[node] = leaf_count[kids].sum()
            reward[node] = leaf_sum[node] / leaf_count[node]
        else:
            reward[node] = (torch.softmax(log_p[kids], dim=0) * reward[kids]).sum()
    return reward


def tree_advantages(node_rewards: Tensor, depths: Tensor, trees: Tensor, scale: float | None = None) -> Tensor:
    """BranchGRPO's depth-wise advantages: within each tree, the nodes of one depth are normalised together.

    ``A(n) = (r(n) - mean_d r) / (std_d r + 1e-8)`` with the unbiased std over the tree's nodes at depth ``d``, and 0
    when the depth has one node or ``std_d < 1e-6`` (BranchGRPO's ``compute_hierarchical_advantages_by_depth``). An
    edge ``parent -> child`` trains with its child's advantage.

    Args:
        node_rewards: ``[N]`` fused rewards (:func:`fuse_tree_rewards`).
        depths: ``[N]`` depth of each node.
        trees: ``[N]`` tree of each node.
        scale: divide every depth's deviations by this (e.g. the std of all leaf rewards, Flow-GRPO's global std)
            instead of the depth's own std; an option beyond BranchGRPO. Depths of one node still get 0.

    Returns:
        ``[N]`` advantages, float64.
    """
    advantages = torch.zeros(node_rewards.shape[0], dtype=torch.float64)
    r = node_rewards.to(torch.float64)
    for tree, depth in torch.unique(torch.stack([trees, depths], dim=1), dim=0).tolist():
        members = torch.nonzero((trees == tree) & (depths == depth)).flatten()
        if members.numel() < 2:
            continue
        values = r[members]
        if scale is not None:
            advantages[members] = (values - values.mean()) / (scale + 1e-8)
            continue
        std = values.std()  # unbiased, as BranchGRPO's torch.std
        if std >= 1e-6:
            advantages[members] = (values - values.mean()) / (std + 1e-8)
    return advantages


def prune_tree_edges(
    edge_steps: Tensor,
    edge_depths: Tensor,
    edge_advantages: Tensor,
    edge_branches: Tensor,
    last_split: int,
    depths: Sequence[int] = (),
    width: str = "none",
    width_ratio: float = 0.5,
) -> Tensor:
    """BranchGRPO's pruning of the edges to train (the rollout and rewards are unchanged; backprop is cut).

    - depth: drop the edges whose child depth is in ``depths``.
    - width (edges after the last split only, ``step > last_split``): ``per_branch`` keeps, within each branch made
      by the last split (``edge_branches``), the ``max(1, int(n * width_ratio))`` edges of highest advantage
      (BranchGRPO's mode 1); ``extremes`` keeps the best ``k // 2`` and the worst ``k - k // 2`` of all of them,
      ``k = max(2, int(n * width_ratio))`` (mode 2). Ties keep the earlier edge.

    Args:
        edge_steps: ``[E]`` step of each edge.
        edge_depths: ``[E]`` depth of each edge's child.
        edge_advantages: ``[E]`` advantage of each edge.
        edge_branches: ``[E]`` id of the last-split branch an edge descends from (any id for earlier edges).
        last_split: the last split step.
        depths: child depths to prune.
        width: ``none``, ``per_branch`` or ``extremes``.
        width_ratio: share of the late edges kept.

    Returns:
        ``[E]`` bool mask of the edges kept.
    """
    if width not in ("none", "per_branch", "extremes"):
        raise ValueError(f"width must be 'none', 'per_branch' or 'extremes', got {width!r}")
    keep = ~torch.isin(edge_depths, torch.tensor(list(depths), dtype=edge_depths.dtype))
    late = keep & (edge_steps > last_split)
    if width == "none" or not bool(late.any()):
        return keep
    if width == "per_branch":
        groups = [torch.nonzero(late & (edge_branches == b)).flatten() for b in torch.unique(edge_branches[late])]
        chosen = [g[_descending(edge_advantages[g])[: max(1, int(g.numel() * width_ratio))]] for g in groups]
    else:
        candidates = torch.nonzero(late).flatten()
        order = candidates[_descending(edge_advantages[candidates])]
        count = max(2, int(order.numel() * width_ratio))
        best = count // 2
        chosen = [order[:best], order[order.numel() - (count - best) :]]
    keep = keep & ~late
    keep[torch.cat(chosen)] = True
    return keep


def _descending(values: Tensor) -> Tensor:
    """Indices sorting ``values`` from high to low, ties in their original order."""
    return torch.sort(values, descending=True, stable=True).indices
