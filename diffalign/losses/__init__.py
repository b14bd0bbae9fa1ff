"""The math of the training losses as pure functions (no I/O, no models): Diffusion-DPO, PPO-clip with KL,
group / per-prompt advantages, and reward backpropagation helpers."""

from diffalign.losses.advantages import (
    PerPromptStatTracker,
    branch_advantages,
    clip_advantages,
    fuse_tree_rewards,
    group_advantages,
    group_stds,
    nonzero_advantage_mask,
    per_reward_advantages,
    prune_tree_edges,
    tree_advantages,
    zero_std_ratio,
)
from diffalign.losses.dpo import (
    anchored_dpo_loss_from_mse,
    diffusion_dpo_loss,
    diffusion_sft_loss,
    dpo_loss_from_mse,
    per_sample_mse,
    smoothed_pair_beta,
)
from diffalign.losses.policy_gradient import (
    clipped_policy_loss,
    grpo_guard_log_ratio,
    kl_to_reference,
    noise_aware_weights,
    recentred_log_ratio,
)
from diffalign.losses.reward_backprop import (
    ALIGNPROP_AESTHETIC_TARGET,
    REFL_HINGE_TARGET,
    refl_step_range,
    reward_loss,
    sample_refl_step,
    sample_truncation_steps,
    truncated_grad_steps,
)


__all__ = [
    "ALIGNPROP_AESTHETIC_TARGET",
    "PerPromptStatTracker",
    "REFL_HINGE_TARGET",
    "branch_advantages",
    "clip_advantages",
    "clipped_policy_loss",
    "anchored_dpo_loss_from_mse",
    "diffusion_dpo_loss",
    "diffusion_sft_loss",
    "dpo_loss_from_mse",
    "smoothed_pair_beta",
    "fuse_tree_rewards",
    "group_advantages",
    "group_stds",
    "grpo_guard_log_ratio",
    "kl_to_reference",
    "noise_aware_weights",
    "nonzero_advantage_mask",
    "per_reward_advantages",
    "per_sample_mse",
    "prune_tree_edges",
    "recentred_log_ratio",
    "refl_step_range",
    "reward_loss",
    "sample_refl_step",
    "sample_truncation_steps",
    "tree_advantages",
    "truncated_grad_steps",
    "zero_std_ratio",
]
