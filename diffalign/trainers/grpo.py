"""Flow-GRPO (and, for epsilon / v models, DDPO) on the one rollout loop.

Algorithm, per epoch (one ``max_steps`` step):

1. Every process draws the same ``sampling.prompts_per_epoch`` prompts (seeded by the epoch) and samples
   ``sampling.images_per_prompt`` images each; the images are split contiguously over processes, so a group may
   span processes. Sampling uses the step plan of ``sampling.plan`` (all-SDE, a random window -- Flow-GRPO-Fast --,
   or MixGRPO's sliding window) with the ``sampling.kernel`` (Flow-GRPO's SDE, CPS, DanceGRPO's constant noise, or
   DDIM with eta for DDPO).
2. Rewards are scored chunk by chunk in a background thread while the next chunk samples, gathered over processes,
   and turned into advantages: per-prompt group normalisation with the global std (Flow-GRPO,
   docs/methods/grpo.md#advantages) or DDPO's per-prompt running buffer
   (docs/methods/grpo.md#running-per-prompt-statistics); clipped to ``train.adv_clip_max``; samples with zero
   advantage are dropped (Flow-GRPO's filter).
3. Training re-scores the stored transitions of the trained steps under the current weights with the same guidance
   (``train.cfg``) and minimises the PPO clipped objective (docs/methods/grpo.md#clipped-policy-loss) plus
   ``train.beta`` x KL to the reference (LoRA disabled) in the mean-difference form. Every (micro-batch, trained
   step) is one backward; one optimizer step averages ``optim.gradient_accumulation_steps`` micro-batches x all
   trained steps, as in Flow-GRPO (docs/methods/grpo.md#optimisation-schedule).

An option beyond the references: ``sampling.lora_in_window_only`` limits the LoRA to the timesteps of the window
plan's range (the base model takes the ODE steps after it, in rollouts and at evaluation), so that the untrained
late steps do not drift with weights they share with the trained ones (measured in :mod:`diffalign.shapes.demo`).

Deviations from the references: the epoch's samples are split into micro-batches of ``train.batch_size`` images
(Flow-GRPO reshapes them into ``num_batches_per_epoch`` chunks); the KL denominator convention is a config key
(``train.kl_convention``), since beta values do not carry between conventions.

Launch: ``diffalign train configs/grpo/sd35m_pickscore.yaml`` (``accelerate launch -m diffalign.cli train ...``
for several GPUs).
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

import torch
from torch import Tensor

from diffalign.config import ConfigError, TrainerConfig
from diffalign.config.groups import RewardSpec
from diffalign.data.edits import SourceImages, resolve_source_images, source_conditioning
from diffalign.data.prompts import load_prompts_and_metadata
from diffalign.eval.evaluator import Evaluator
from diffalign.losses.advantages import (
    PerPromptStatTracker,
    branch_advantages,
    fuse_tree_rewards,
    group_advantages,
    per_reward_advantages,
    prune_tree_edges,
    tree_advantages,
    zero_std_ratio,
)
from diffalign.losses.policy_gradient import (
    clipped_policy_loss,
    grpo_guard_log_ratio,
    kl_to_reference,
    noise_aware_weights,
    recentred_log_ratio,
)
from diffalign.rewarding import RewardLike, build_reward
from diffalign.samplers.branching import (
    TreePlan,
    TreeRollout,
    branch_plan,
    branch_rollout,
    count_branch_calls,
    count_tree_calls,
    tree_plan,
    tree_rollout,
)
from diffalign.samplers.plan import (
    StepPlan,
    per_sample_train_steps,
    random_window_plan,
    sde_plan,
    sliding_window_plan,
    window_bounds,
)
from diffalign.samplers.rollout import InitialNoise, Trajectory, rollout, step_stds, transition_log_probs
from diffalign.seeding import derive_seed
from diffalign.trainers.common import TrainingRun, check_text_cache
from rewards import metadata_kwargs


@dataclasses.dataclass(kw_only=True)
class GRPOSamplingConfig:
    """How training rollouts are sampled."""

    prompts: list[str] | Path
    """Training prompts: a list, a text file with one prompt per line, or a JSONL file of records
    ``{"prompt": ..., <metadata>}`` whose fields reach rewards that take metadata (docs/rewards.md)."""
    num_steps: int = 10
    """Denoising steps of training rollouts (denoising reduction: evaluation may use more)."""
    guidance_scale: float = 4.5
    """CFG scale while sampling (FLUX: the guidance embedding)."""
    kernel: Literal["auto", "sde", "cps", "const", "ddim"] = "auto"
    """Stochastic step: Flow-GRPO ``sde``, ``cps``, DanceGRPO ``const``; ``ddim`` for epsilon/v models (DDPO).
    ``auto`` picks ``sde`` for flow models and ``ddim`` otherwise."""
    noise_level: float = 0.7
    """Noise scale of stochastic steps (Flow-GRPO ``noise_level`` 0.7; DDPO's eta 1.0; CPS 0.8)."""
    plan: Literal["sde", "window", "sliding", "branch_at", "tree"] = "sde"
    """``sde``: every step but the last stochastic; ``window``: Flow-GRPO-Fast; ``sliding``: MixGRPO; ``branch_at``:
    TempFlow-GRPO's trajectory branching (an ODE path per image, ``branch_children`` SDE children at each of
    ``branch_steps``, each completed by the ODE, so a reward credits its branch step); ``tree``: BranchGRPO's tree
    rollouts (one tree per prompt, split at ``tree_splits``; docs/methods/grpo.md)."""
    branch_steps: list[int] | None = None
    """``branch_at``: the steps branched at (default every step but the last, as TempFlow-GRPO's code)."""
    branch_children: int = 6
    """``branch_at``: children per branch step (TempFlow-GRPO: 6). ``images_per_prompt`` counts the ODE paths (seeds)
    per prompt, so an epoch scores ``prompts x images_per_prompt x branch_children x len(branch_steps)`` images."""
    tree_splits: list[int] = dataclasses.field(default_factory=lambda: [0, 3, 6])
    """``tree``: steps at which every node branches (BranchGRPO: 0, 3, 6, 9 of 20)."""
    tree_branching: int = 2
    """``tree``: children per node at a split; ``images_per_prompt`` must equal the leaves,
    ``tree_branching ** len(tree_splits)``."""
    tree_split_noise_scale: float = 1.0
    """``tree``: noise multiplier at the split steps (BranchGRPO's script: 4.0), so that siblings spread apart."""
    sde_steps: list[int] | None = None
    """``tree``: the stochastic steps besides the splits (ODE elsewhere, BranchGRPO's "Mix"); default every step but
    the last. Every stochastic edge is trained."""
    train_fraction: float = 1.0
    """``sde`` plan: the fraction of the stochastic steps trained (Flow-GRPO ``timestep_fraction``); which ones:
    ``train_steps``."""
    train_steps: Literal["auto", "first", "random"] = "auto"
    """With ``train_fraction < 1``: ``first`` trains the noisiest steps in order (Flow-GRPO); ``random`` an
    independent random subset for each sample, drawn again every epoch (ddpo-pytorch, DanceGRPO); ``auto``:
    ``random`` with the ``ddim`` kernel (DDPO), ``first`` otherwise."""
    window_size: int = 2
    """``window``/``sliding`` plans: stochastic steps per rollout."""
    window_range: tuple[int, int] | None = None
    """``window`` plan: the window's start is drawn in ``[lo, hi - window_size]``; default ``(0, num_steps // 2)``."""
    window_draw: Literal["per_chunk", "per_epoch"] = "per_chunk"
    """``window`` plan: a window for each rollout chunk (``batch_size`` images of a process), as flow_grpo's fast
    script draws one per sampling call; or one window for the whole epoch, so that every sample shares its
    trained steps (needed by ``train.ratio_guard: recenter``)."""
    lora_in_window_only: bool = False
    """``window`` plan with a LoRA: the LoRA acts only at the timesteps of ``window_range`` (those GRPO trains),
    and the base model takes the steps after it, in rollouts and at evaluation; the saved LoRA records the limit
    (``diffalign_lora.json``). Without it the untrained later steps share the trained weights and drift."""
    shift_every: int = 25
    """``sliding`` plan: epochs between window moves."""
    ode_solver: Literal["euler", "dpm_solver_2m"] = "euler"
    """Solver outside the SDE steps (MixGRPO-Flash uses DPM-Solver++ 2M)."""
    images_per_prompt: int = 8
    """Group size K (Flow-GRPO SD3.5: 24)."""
    prompts_per_epoch: int = 4
    """Groups per epoch over all processes (Flow-GRPO: 48)."""
    batch_size: int = 8
    """Images per rollout chunk on each process (memory bound)."""
    same_noise_per_prompt: bool = False
    """All images of a group start from the same noise (Flow-GRPO ``same_latent``)."""
    negative_prompt: str | None = None
    """CFG's unconditional text (default: the pipeline's)."""
    precompute_text_embeddings: bool = False
    """Encode every training and evaluation prompt once at the start and answer the rollouts from that cache
    (docs/performance.md#text-embedding-cache); with ``model.offload_text_encoders`` the encoders then leave the
    GPU. Off: prompts are encoded at every rollout."""
    resolution: int | None = None
    """Image side (default: the model's native resolution)."""

    def __post_init__(self) -> None:
        for key in ("num_steps", "images_per_prompt", "prompts_per_epoch", "batch_size", "window_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"must be >= 1, got {getattr(self, key)}", key=key)
        if not 0 < self.train_fraction <= 1:
            raise ConfigError(f"must be in (0, 1], got {self.train_fraction}", key="train_fraction")
        if self.noise_level <= 0:
            raise ConfigError("must be > 0: GRPO needs stochastic steps", key="noise_level")
        if self.lora_in_window_only and self.plan not in ("window", "branch_at", "tree"):
            raise ConfigError(f"needs plan: window, branch_at or tree, got {self.plan!r}", key="lora_in_window_only")
        self._check_branching()
        if self.train_steps == "random" and self.plan != "sde":
            raise ConfigError(f"needs plan: sde, got {self.plan!r}", key="train_steps")
        if self.ode_solver != "euler" and self.plan == "sde":
            # DPM-Solver++(2M) restarts its history after every stochastic step: the sde plan's one deterministic
            # step (the last) would be an Euler step whatever this says.
            raise ConfigError(
                "the sde plan's only ODE step follows a stochastic one, where DPM-Solver++(2M) has no history (it is "
                "an Euler step): use plan: window or sliding, or ode_solver: euler",
                key=("ode_solver", "plan"),
            )

    def _check_branching(self) -> None:
        """The ``branch_at`` / ``tree`` keys: steps in range, a tree whose leaves are the group."""
        if self.plan not in ("branch_at", "tree"):
            return
        used = ("branch_steps",) if self.plan == "branch_at" else ("tree_splits", "sde_steps")
        for key in used:
            values = getattr(self, key)
            if values is not None and not all(0 <= i < self.num_steps - 1 for i in values):
                # The last step lands on the image: noise drawn there would be decoded and rewarded as it is.
                raise ConfigError(
                    f"steps must lie in [0, {self.num_steps - 1}) (not the last step, which lands on the image), "
                    f"got {values}",
                    key=key,
                )
        if self.ode_solver != "euler":
            raise ConfigError("branching rollouts complete their paths with the Euler ODE", key=("ode_solver", "plan"))
        if self.plan == "branch_at" and (self.branch_children < 2 or self.branch_steps == []):
            raise ConfigError(
                "needs branch_children >= 2 (a group of one has no advantage) and at least one branch step",
                key=("branch_children", "branch_steps"),
            )
        if self.plan == "tree":
            if self.tree_branching < 2 or not self.tree_splits or self.tree_split_noise_scale <= 0:
                raise ConfigError(
                    "needs tree_branching >= 2, at least one split and tree_split_noise_scale > 0",
                    key=("tree_branching", "tree_splits", "tree_split_noise_scale"),
                )
            leaves = self.tree_branching ** len(set(self.tree_splits))
            if self.images_per_prompt != leaves:
                raise ConfigError(
                    f"a tree's leaves are its prompt's group: set images_per_prompt to tree_branching ** "
                    f"len(tree_splits) = {leaves}, got {self.images_per_prompt}",
                    key=("images_per_prompt", "tree_branching", "tree_splits"),
                )


@dataclasses.dataclass(kw_only=True)
class GRPOTrainConfig:
    """The policy update."""

    batch_size: int = 4
    """Images per training micro-batch on each process."""
    clip_range: float = 1e-4
    """PPO clip range on the ratio (Flow-GRPO 1e-4; 1e-5 for the fast/CPS variants)."""
    adv_clip_max: float = 5.0
    """Advantages are clipped to ``[-adv_clip_max, adv_clip_max]``."""
    beta: float = 0.0
    """KL coefficient to the reference (Flow-GRPO SD3.5: 0.04 geneval, 0.01 pickscore; 0 for FLUX)."""
    log_prob: Literal["gaussian", "unnormalized"] = "gaussian"
    """The log-probability the ratio uses: the transition's Gaussian log-density, or with the ``cps`` kernel
    flow_grpo's unnormalised CPS score ``-mean((x' - mean)^2)`` (its CPS recipes and their clip range 1e-5 were
    tuned on it; the log-ratio scale differs by ``1 / (2 std^2)``; docs/methods/grpo.md, CPS section)."""
    kl_convention: Literal["flow_grpo", "true_kl"] = "flow_grpo"
    """``flow_grpo``: divide the squared mean difference by ``2 std_dev_t^2`` (= true KL x dt, the reference's
    code); ``true_kl``: by the step variance. beta values do not carry over between the two. With the ``cps``
    kernel both are the true KL, as flow_grpo's CPS code divides by the CPS step variance."""
    cfg: bool = True
    """Re-evaluate the policy with CFG during training (the no-CFG recipe sets this false and guidance 1)."""
    cfg_uncond_grad: bool = True
    """With CFG in training: the gradient flows through the unconditional branch too (the exact gradient of the
    guided policy, as DDPO's references). ``false`` detaches that branch as flow_grpo's ``train_sd3.py`` does, and
    runs it as a no-grad call of its own, which skips its backward (docs/performance.md)."""
    advantage: Literal["group", "running"] = "group"
    """``group``: Flow-GRPO per-prompt normalisation of each epoch; ``running``: DDPO's per-prompt buffer."""
    global_std: bool = True
    """``group``: divide by the std of all rewards of the epoch (Flow-GRPO default) instead of the group's."""
    advantage_aggregation: Literal["sum", "per_reward"] = "sum"
    """Several rewards (``reward: {name: weight, ...}``): ``sum`` normalises their weighted sum within each group
    (Flow-GRPO); ``per_reward`` normalises each reward within its group and sums the advantages with the weights
    normalised to sum 1 (MixGRPO, DanceGRPO; docs/methods/grpo.md#several-rewards). ``group`` advantages only."""
    buffer_size: int = 16
    """``running``: rewards kept per prompt."""
    min_count: int = 16
    """``running``: below this many rewards a prompt uses the batch statistics."""
    filter_zero_advantage: bool = True
    """Drop samples whose advantage is exactly zero (groups with identical rewards)."""
    ratio_guard: Literal["none", "recenter", "grpo_guard"] = "none"
    """Correction of the per-step importance ratio, whose mean sits below 1 (docs/methods/grpo.md, "Ratio
    guards"): ``grpo_guard`` is GRPO-Guard as published (adds back the per-sample bias
    ``mean((mu - mu_old)^2) / (2 s^2)``, rescales the log-ratio by the step std ``s`` and weights each step's loss
    by ``1 / |dt|``; flow kernels, Gaussian log-prob; its clip range is ~1e-6, not 1e-4); ``recenter`` subtracts
    each step's detached batch-mean log-ratio (a simpler stand-in, gradient unchanged); ``none``."""
    ratio_norm: bool | None = None
    """Deprecated, the name of ``ratio_guard: recenter`` in runs saved before ``ratio_guard`` existed (their
    config.yaml holds it, so they still resume): ``true`` sets ``ratio_guard: recenter``; leave it unset."""
    num_inner_epochs: int = 1
    """Passes over each epoch's samples."""
    timestep_chunk: int | Literal["auto"] = "auto"
    """Trained steps re-scored per denoiser call: ``auto`` takes the most that keep a call within
    ``max_rescore_rows`` rows; 0 all of a micro-batch's trained steps in one call (the fastest, for small models
    and the CPU); a number that many. The gradient is the same either way."""
    max_rescore_rows: int = 32
    """``timestep_chunk: auto``: the most denoiser rows one re-scoring call may hold (micro-batch samples x steps,
    x2 with CFG), which bounds its activation memory."""
    timestep_weighting: Literal["none", "noise_aware"] = "none"
    """``noise_aware``: TempFlow-GRPO's weighting, each step's policy loss times its transition std over the mean std
    of the trained steps (noisier steps explore more and weigh more; docs/methods/grpo.md#tempflow-grpo)."""
    tree_fusion: Literal["mean", "prob_weighted"] = "mean"
    """``tree`` plan: an inner node's reward is the mean of its leaves' (BranchGRPO's default) or the softmax of its
    child edges' log-probs times their rewards (``--tree_prob_weighted``)."""
    depth_pruning: list[int] = dataclasses.field(default_factory=list)
    """``tree`` plan: edges whose child depth (the step that made it + 1) is listed are not trained."""
    width_pruning: Literal["none", "per_branch", "extremes"] = "none"
    """``tree`` plan: of the edges after the last split, train only the best ``width_pruning_ratio`` of each
    last-split branch (``per_branch``) or the best and worst halves of that share overall (``extremes``)."""
    width_pruning_ratio: float = 0.5
    """Share of the late edges that width pruning keeps."""

    def __post_init__(self) -> None:
        for key in ("batch_size", "num_inner_epochs"):
            if getattr(self, key) < 1:
                raise ConfigError(f"must be >= 1, got {getattr(self, key)}", key=key)
        if self.ratio_norm is not None:
            if self.ratio_norm and self.ratio_guard not in ("none", "recenter"):
                raise ConfigError(
                    f"ratio_norm (deprecated) means ratio_guard: recenter, not {self.ratio_guard}",
                    key=("ratio_norm", "ratio_guard"),
                )
            self.ratio_guard = "recenter" if self.ratio_norm else self.ratio_guard
            self.ratio_norm = None  # resolved into ratio_guard; saved configs then compare equal
        if self.timestep_chunk != "auto" and self.timestep_chunk < 0:
            raise ConfigError(
                f"must be 'auto' or >= 0 (0 = all trained steps at once), got {self.timestep_chunk}",
                key="timestep_chunk",
            )
        if self.max_rescore_rows < 1:
            raise ConfigError(f"must be >= 1, got {self.max_rescore_rows}", key="max_rescore_rows")
        if not 0 < self.width_pruning_ratio <= 1:
            raise ConfigError(f"must be in (0, 1], got {self.width_pruning_ratio}", key="width_pruning_ratio")
        if self.advantage == "running" and not 1 <= self.min_count <= self.buffer_size:
            raise ConfigError(
                f"needs 1 <= min_count <= buffer_size (a prompt's own statistics need min_count rewards in its "
                f"buffer), got min_count {self.min_count}, buffer_size {self.buffer_size}",
                key=("min_count", "buffer_size"),
            )


@dataclasses.dataclass(kw_only=True)
class GRPOConfig(TrainerConfig):
    """Config of the ``grpo`` trainer (Flow-GRPO; DDPO for epsilon / v models)."""

    method: Literal["grpo"] = "grpo"
    """Trainer name (``diffalign train`` picks the trainer from it)."""
    default_log_every: ClassVar[int] = 1
    """An epoch is a large step: each one is logged unless ``logging.log_every`` says otherwise."""
    resume_safe_keys: ClassVar[tuple[str, ...]] = (
        "train.timestep_chunk",
        "train.max_rescore_rows",
        "sampling.precompute_text_embeddings",
    )
    """How the re-scoring is chunked and whether prompts are cached change how a step is computed, not its result:
    a resumed run may change them (e.g. to fit memory)."""
    reward: RewardSpec = "shapes"
    """Reward: a registered name, ``module:fn`` / ``file.py:fn``, or a mapping of those to weights or to term
    options (``{pickscore: {weight: 1.0, scale: 0.038461538461538464}}``, docs/rewards.md#weighted-sums)."""
    max_steps: int = 100
    """Epochs: each samples a batch of groups and trains on it."""
    sampling: GRPOSamplingConfig
    train: GRPOTrainConfig = dataclasses.field(default_factory=GRPOTrainConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.train.beta < 0:
            raise ConfigError("must be >= 0", key="train.beta")
        if not self.train.cfg and self.sampling.guidance_scale != 1:
            # Re-scoring without guidance what was sampled with it is off-policy from the first step (every ratio
            # clipped, the policy collapses): the no-CFG recipe samples without guidance too.
            raise ConfigError(
                f"train.cfg: false re-scores samples without guidance, but sampling.guidance_scale is "
                f"{self.sampling.guidance_scale}; set sampling.guidance_scale: 1 (the no-CFG recipe) "
                "or train.cfg: true",
                key=("train.cfg", "sampling.guidance_scale"),
            )
        check_text_cache(self.model.offload_text_encoders, self.sampling.precompute_text_embeddings)
        if self.train.log_prob == "unnormalized" and self.sampling.kernel != "cps":
            raise ConfigError(
                f"the unnormalized log-prob is the cps kernel's score; sampling.kernel is {self.sampling.kernel!r}",
                key=("train.log_prob", "sampling.kernel"),
            )
        if self.train.ratio_guard == "grpo_guard" and self.train.log_prob != "gaussian":
            raise ConfigError(
                "GRPO-Guard's bias term is that of the Gaussian log-density: use train.log_prob: gaussian",
                key=("train.ratio_guard", "train.log_prob"),
            )
        if self.train.advantage_aggregation == "per_reward" and self.train.advantage != "group":
            raise ConfigError(
                "per_reward normalises each reward within its group: it needs train.advantage: group",
                key=("train.advantage_aggregation", "train.advantage"),
            )
        branching = self.sampling.plan in ("branch_at", "tree")
        if branching and self.train.ratio_guard == "grpo_guard":
            raise ConfigError(
                "grpo_guard needs the stored transition means, which branching rollouts do not keep: use "
                "ratio_guard: none or recenter",
                key=("train.ratio_guard", "sampling.plan"),
            )
        if branching and (self.train.advantage != "group" or self.train.advantage_aggregation != "sum"):
            raise ConfigError(
                "branching rollouts normalise each branch step's (or tree depth's) rewards within their own group: "
                "use train.advantage: group and train.advantage_aggregation: sum",
                key=("train.advantage", "train.advantage_aggregation", "sampling.plan"),
            )
        tree_keys = self.train.tree_fusion != "mean" or self.train.depth_pruning or self.train.width_pruning != "none"
        if tree_keys and self.sampling.plan != "tree":
            raise ConfigError(
                f"tree_fusion and pruning act on a tree's edges: they need sampling.plan: tree, got "
                f"{self.sampling.plan!r}",
                key=("train.tree_fusion", "train.depth_pruning", "train.width_pruning", "sampling.plan"),
            )
        kernel = self.sampling.kernel  # may still be "auto": the trainer checks again with the resolved one
        check_ratio_guard(self.train.ratio_guard, kernel, mixes_steps(self.sampling, kernel))
        if self.train.ratio_guard == "recenter" and self.train.batch_size < 2:
            raise ConfigError(
                "ratio_guard: recenter re-centres over the micro-batch: with one sample its ratio is always 1 and the "
                "clip never acts; raise train.batch_size or use ratio_guard: none",
                key=("train.ratio_guard", "train.batch_size"),
            )


def mixes_steps(sampling: GRPOSamplingConfig, kernel: str) -> bool:
    """Whether the samples of a micro-batch may train different steps: per-sample random steps, or a window drawn
    per rollout chunk (``kernel`` as in :func:`uses_random_train_steps`)."""
    per_chunk_windows = sampling.plan == "window" and sampling.window_draw == "per_chunk"
    return per_chunk_windows or sampling.plan == "tree" or uses_random_train_steps(sampling, kernel)


def check_several_rewards(reward: Any) -> None:
    """``advantage_aggregation: per_reward`` needs a weighted sum of two or more rewards (the one built from
    ``reward:``, or the one passed to the trainer)."""
    if not hasattr(reward, "normalized_part") or len(getattr(reward, "weights", {})) < 2:
        raise ConfigError(
            f"per_reward normalises several rewards one by one; the reward is {reward!r}: give a mapping such as "
            "{hpsv2.1: 1.0, pickscore: 1.0}, or use advantage_aggregation: sum",
            key=("train.advantage_aggregation", "reward"),
        )


def uses_random_train_steps(sampling: GRPOSamplingConfig, kernel: str) -> bool:
    """Whether each sample trains its own random subset of steps (``sampling.train_steps`` resolved for
    ``kernel``; ``"auto"`` when the kernel is not known yet, which counts only an explicit ``random``)."""
    random_steps = sampling.train_steps == "random" or (sampling.train_steps == "auto" and kernel == "ddim")
    return random_steps and sampling.plan == "sde" and sampling.train_fraction < 1


def check_ratio_guard(ratio_guard: str, kernel: str, steps_mixed: bool) -> None:
    """Refuse ratio guards the sampling set-up cannot support (``kernel`` may be ``"auto"``: not checked)."""
    if ratio_guard == "grpo_guard" and kernel == "ddim":
        raise ConfigError(
            "grpo_guard weights each step by 1 / |dt| of a flow schedule; the ddim kernel (DDPO) has none: "
            "use train.ratio_guard: recenter or none",
            key=("train.ratio_guard", "sampling.kernel"),
        )
    if ratio_guard == "recenter" and steps_mixed:
        raise ConfigError(
            "ratio_guard: recenter re-centres each step's log-ratio over the batch, but a batch mixes steps with "
            "per-sample random train steps (sampling.train_steps: random, or auto with the ddim kernel) or a window "
            "per rollout chunk: set sampling.train_steps: first, or sampling.window_draw: per_epoch",
            key=("train.ratio_guard", "sampling.train_steps", "sampling.window_draw"),
        )


# ---------------------------------------------------------------------------------------------------------------------


T = TypeVar("T")


def epoch_prompts(prompts: Sequence[T], count: int, seed: int, epoch: int) -> list[T]:
    """The epoch's prompts (or prompt indices), identical on every process: a seeded draw without replacement
    (cycling the list); the draw depends on the length of ``prompts`` only."""
    rng = random.Random(derive_seed(seed, "grpo/prompts", epoch))
    chosen: list[T] = []
    while len(chosen) < count:
        order = list(prompts)
        rng.shuffle(order)
        chosen.extend(order[: count - len(chosen)])
    return chosen


def epoch_image_seeds(seed: int, epoch: int, count: int) -> list[int]:
    """The sampling seeds of the epoch's ``count`` images, all processes' (image ``i`` of the epoch's prompt-major
    layout gets ``derive_seed(seed, "grpo/image", epoch, i)``); never an evaluation seed (:mod:`diffalign.seeding`)."""
    return [derive_seed(seed, "grpo/image", epoch, i) for i in range(count)]


def build_tree_plan(sampling: GRPOSamplingConfig, kernel: str) -> TreePlan:
    """The ``tree`` plan's tree (BranchGRPO)."""
    return tree_plan(
        sampling.num_steps,
        sampling.noise_level,
        sampling.tree_splits,
        sampling.tree_branching,
        sampling.sde_steps,
        sampling.tree_split_noise_scale,
        kernel,
    )


def build_plan(
    sampling: GRPOSamplingConfig, kernel: str, epoch: int, seed: int, window_key: tuple[int, ...] = ()
) -> StepPlan:
    """The epoch's step plan: a random window drawn from (seed, epoch, ``window_key``) -- ``window_key`` names the
    rollout chunk (process, chunk) when windows are drawn per chunk --; the sliding window moves with the epoch; the
    branch steps of ``branch_at``; the step plan of a ``tree``."""
    if sampling.plan == "branch_at":
        return branch_plan(sampling.num_steps, sampling.noise_level, sampling.branch_steps, kernel)
    if sampling.plan == "tree":
        return build_tree_plan(sampling, kernel).plan
    if sampling.plan == "window":
        generator = random.Random(derive_seed(seed, "grpo/window", epoch, *window_key))
        return random_window_plan(
            sampling.num_steps,
            sampling.noise_level,
            sampling.window_size,
            sampling.window_range,
            generator,
            kernel=kernel,
            ode_solver=sampling.ode_solver,
        )
    if sampling.plan == "sliding":
        return sliding_window_plan(
            sampling.num_steps,
            sampling.noise_level,
            epoch,
            window_size=sampling.window_size,
            shift_every=sampling.shift_every,
            kernel=kernel,
            ode_solver=sampling.ode_solver,
        )
    # DDPO trains every DDIM step, the last included; Flow-GRPO's last flow step is deterministic.
    return sde_plan(
        sampling.num_steps,
        sampling.noise_level,
        kernel=kernel,
        train_fraction=sampling.train_fraction,
        include_last=kernel == "ddim",
    )


def window_end_timestep(adapter: Any, sampling: GRPOSamplingConfig, kernel: str = "sde") -> float:
    """The timestep the trainable steps end at: steps ``0 .. hi - 1`` start above it, with ``hi`` the end of the
    ``window`` plan's ``window_range = (lo, hi)``, or one past the last stochastic step of a ``branch_at`` or
    ``tree`` plan. A LoRA limited to timesteps above it acts on exactly the steps GRPO can train."""
    if not adapter.has_lora:
        raise ConfigError("needs a LoRA (model.lora.rank > 0)", key="sampling.lora_in_window_only")
    if sampling.plan in ("branch_at", "tree"):
        hi = build_plan(sampling, kernel, 0, 0).stochastic[-1] + 1
    else:
        _, hi = window_bounds(sampling.num_steps, sampling.window_range)
    timesteps = adapter.set_timesteps(sampling.num_steps).timesteps
    return float(timesteps[hi]) if hi < len(timesteps) else 0.0


class GRPOTrainer:
    """Flow-GRPO / DDPO trainer; see the module docstring.

    Args:
        config: a :class:`GRPOConfig`.
        run: an existing :class:`TrainingRun` (tests, the Python API); built from the config by default.
        reward: the reward to train on instead of ``config.reward``: a :class:`rewards.Reward`, a scoring function
            ``fn(images, prompts) -> Tensor[B]``, or anything ``config.reward`` may hold.
    """

    def __init__(self, config: GRPOConfig, run: TrainingRun | None = None, reward: RewardLike | None = None) -> None:
        self.config = config
        kwargs = {}
        if config.sampling.resolution:
            kwargs = {"height": config.sampling.resolution, "width": config.sampling.resolution}
        self.run = run or TrainingRun(config, adapter_kwargs=kwargs)
        self.adapter = self.run.adapter
        self.reward = build_reward(reward if reward is not None else config.reward, device=self.run.device)
        if config.train.advantage_aggregation == "per_reward":
            check_several_rewards(self.reward)
        self.prompts, self.prompt_metadata = load_prompts_and_metadata(config.sampling.prompts)
        self.sources = self._source_images()
        """The prompts' source images when the run edits (docs/architecture.md#editing), else ``None``."""
        kernel = config.sampling.kernel
        if kernel == "auto":
            kernel = "sde" if self.adapter.prediction_type == "flow" else "ddim"
        self.kernel = kernel
        # flow_grpo's KL form divides by the SDE's std_dev_t^2 = std^2 / |dt|; its CPS code divides by the CPS
        # std^2 itself, i.e. the true KL: the same name means that here too.
        self.kl_convention = "true_kl" if kernel == "cps" else config.train.kl_convention
        self.random_train_steps = uses_random_train_steps(config.sampling, kernel)
        if config.train.timestep_chunk == "auto" and self._rows_per_step() > config.train.max_rescore_rows:
            raise ConfigError(
                f"one trained step of a micro-batch is {self._rows_per_step()} denoiser rows (train.batch_size, x2 "
                f"with CFG), more than train.max_rescore_rows ({config.train.max_rescore_rows}): lower "
                "train.batch_size or raise max_rescore_rows",
                key=("train.max_rescore_rows", "train.batch_size"),
            )
        check_ratio_guard(config.train.ratio_guard, kernel, mixes_steps(config.sampling, kernel))
        running = config.train.advantage == "running"
        self.tracker = PerPromptStatTracker(config.train.buffer_size, config.train.min_count) if running else None
        """DDPO's per-prompt reward buffers (``train.advantage: running``); ``None`` for group advantages."""
        if config.sampling.lora_in_window_only:
            self.adapter.lora_min_timestep = window_end_timestep(self.adapter, config.sampling, kernel)
        self.evaluator = Evaluator.from_config(
            config, self.adapter, self.reward, self.run.output_dir, self.run.accelerator
        )
        if config.sampling.precompute_text_embeddings:
            self.run.cache_text_embeddings(self.prompts, config.sampling, self.evaluator)
        self.run.snapshot_reference() if config.train.beta > 0 else None
        self._scorer = ThreadPoolExecutor(max_workers=1)
        self._weight_tables: dict[StepPlan, Tensor] = {}

    def _source_images(self) -> SourceImages | None:
        paths = resolve_source_images(self.prompt_metadata, self.config.sampling.prompts)
        if paths is None:
            return None
        if not self.adapter.edits_images:
            raise ConfigError(
                f"sampling.prompts name source images ('image') but {self.adapter.family} does not edit; use an "
                "editing model (FluxKontextPipeline) or prompts without images",
                key="sampling.prompts",
            )
        if self.config.sampling.plan in ("branch_at", "tree"):
            raise ConfigError(
                "editing runs sample flat groups: plan branch_at and tree are not supported", key="sampling.plan"
            )
        return SourceImages(paths, self.adapter.height, self.adapter.width)

    # --- sampling ---------------------------------------------------------------------------------------------------

    def _local_slice(self, total: int) -> slice:
        """This process's contiguous share of the epoch's ``total`` images (main paths for ``branch_at``, trees for
        ``tree``)."""
        accelerator = self.run.accelerator
        per_process, remainder = divmod(total, accelerator.num_processes)
        if remainder:
            what = {"branch_at": "ODE paths", "tree": "trees"}.get(self.config.sampling.plan, "images")
            counted = "" if what == "trees" else " x sampling.images_per_prompt"
            raise ConfigError(
                f"sampling.prompts_per_epoch{counted} = {total} {what} must divide evenly over "
                f"{accelerator.num_processes} processes",
                key=("sampling.prompts_per_epoch", "sampling.images_per_prompt"),
            )
        start = accelerator.process_index * per_process
        return slice(start, start + per_process)

    def sample_epoch(self, epoch: int) -> tuple[Trajectory, Tensor, dict[str, Tensor], Tensor]:
        """Sample this process's share of the epoch and score it.

        Returns:
            ``(trajectory, rewards [b], reward_parts {name: [b]}, group_ids [b])`` for the local images.
        """
        sampling, seed = self.config.sampling, self.config.seed
        # Indices, not texts: two records may share a prompt. The shuffle depends on the length only: same draws.
        group_indices = epoch_prompts(range(len(self.prompts)), sampling.prompts_per_epoch, seed, epoch)
        groups = [self.prompts[i] for i in group_indices]
        images_per_group = sampling.images_per_prompt
        total = len(groups) * images_per_group
        local = self._local_slice(total)
        image_prompts = [p for p in groups for _ in range(images_per_group)][local]
        image_metadata = [self.prompt_metadata[i] for i in group_indices for _ in range(images_per_group)][local]
        group_ids = torch.arange(len(groups)).repeat_interleave(images_per_group)[local]
        seeds = epoch_image_seeds(seed, epoch, total)
        noise_seeds = [seeds[i - i % images_per_group] for i in range(total)][local]
        seeds = seeds[local]
        plan = self.epoch_plans(epoch, len(image_prompts))

        futures: list[Future] = []

        def score_chunk(chunk: slice, images: Tensor | None) -> None:
            futures.append(self._scorer.submit(self._score, images, image_prompts[chunk], image_metadata[chunk]))

        conditioning = None
        if self.sources is not None:  # an edit: each image's source rides in its conditioning
            image_units = [i for i in group_indices for _ in range(images_per_group)][local]
            conditioning = source_conditioning(
                self.adapter,
                self.prompts,
                self.sources,
                image_units,
                sampling.guidance_scale,
                sampling.negative_prompt,
                sampling.batch_size,
            )
        trajectory = rollout(
            self.adapter,
            image_prompts,
            plan,
            conditioning=conditioning,
            guidance_scale=sampling.guidance_scale,
            seeds=seeds,
            chunk_size=sampling.batch_size,
            negative_prompt=sampling.negative_prompt,
            initial_noise=InitialNoise(seeds=noise_seeds) if sampling.same_noise_per_prompt else None,
            on_chunk=score_chunk,
            store_means=self.config.train.ratio_guard == "grpo_guard",
        )
        results = [f.result() for f in futures]
        rewards = torch.cat([r[0] for r in results])
        parts = {name: torch.cat([r[1][name] for r in results]) for name in results[0][1]}
        return trajectory, rewards, parts, group_ids

    def sample_branched_epoch(self, epoch: int) -> tuple[Trajectory, Tensor, dict[str, float], Tensor | None]:
        """``branch_at`` / ``tree``: sample this process's main paths or trees, score the images and compute the
        advantages, which are local (a path's children, a tree's nodes).

        Returns:
            ``(trajectory, advantages, stats, candidates)``: ``branch_at`` advantages are ``[rows, branch steps]``;
            ``tree`` ones ``[edges]`` with ``candidates`` the edges pruning leaves to train (``None``: all).
        """
        sampling, seed = self.config.sampling, self.config.seed
        group_indices = epoch_prompts(range(len(self.prompts)), sampling.prompts_per_epoch, seed, epoch)
        per_prompt = 1 if sampling.plan == "tree" else sampling.images_per_prompt  # trees, or ODE paths
        units = [i for i in group_indices for _ in range(per_prompt)]
        local = self._local_slice(len(units))
        units = units[local]
        prompts = [self.prompts[i] for i in units]
        seeds = epoch_image_seeds(seed, epoch, len(group_indices) * per_prompt)[local]
        options = {
            "guidance_scale": sampling.guidance_scale,
            "negative_prompt": sampling.negative_prompt,
            "seeds": seeds,
            "chunk_size": sampling.batch_size,
        }
        log_prob = self.config.train.log_prob
        if sampling.plan == "branch_at":
            plan = dataclasses.replace(build_plan(sampling, self.kernel, epoch, seed), log_prob=log_prob)
            out = branch_rollout(self.adapter, prompts, plan, sampling.branch_children, **options)
            per_image = len(plan.stored)
            rows_units = [u for u in units for _ in range(sampling.branch_children)]
            rewards, parts = self._score_images(out.images.flatten(0, 1), rows_units, per_image)
            rewards = rewards.view(-1, per_image)
            advantages = branch_advantages(rewards, out.path_ids, scale=self._global_std(rewards, per_column=True))
            trajectory, candidates = out.trajectory, None
            calls = count_branch_calls(plan.num_steps, plan.stored, sampling.branch_children) * len(prompts)
        else:
            tree = build_tree_plan(sampling, self.kernel)
            tree = dataclasses.replace(tree, plan=dataclasses.replace(tree.plan, log_prob=log_prob))
            out = tree_rollout(self.adapter, prompts, tree, **options)
            leaf_units = [u for u in units for _ in range(tree.num_leaves)]
            rewards, parts = self._score_images(out.images, leaf_units, 1)
            advantages, candidates = self.tree_edge_advantages(out, rewards, tree)
            trajectory = out.trajectory
            calls = count_tree_calls(tree) * len(prompts)
        all_rewards = self.run.accelerator.gather(rewards.flatten().to(self.run.device)).cpu()
        stats = {
            "reward_mean": all_rewards.mean().item(),
            "reward_std": all_rewards.std(unbiased=False).item(),
            "rollout_denoiser_calls": float(calls),
        }
        for name, values in parts.items():
            stats[f"reward/{name}"] = self.run.accelerator.gather(values.to(self.run.device)).mean().item()
        clip = self.config.train.adv_clip_max
        return trajectory, advantages.float().clamp(-clip, clip), stats, candidates

    def tree_edge_advantages(self, out: TreeRollout, leaf_rewards: Tensor, tree: TreePlan) -> tuple[Tensor, Tensor]:
        """BranchGRPO: fuse the leaf rewards up each tree, normalise per depth, give each edge its child's advantage,
        and prune. Returns ``(advantages [E], kept edge indices [k])``."""
        train = self.config.train
        fused = fuse_tree_rewards(leaf_rewards, out.parents, out.leaves, train.tree_fusion, out.edge_log_probs)
        node_advantages = tree_advantages(fused, out.depths, out.trees, scale=self._global_std(leaf_rewards))
        children = out.edge_children
        last_split = tree.split_steps[-1]
        keep = prune_tree_edges(
            out.trajectory.row_steps[:, 0],
            out.depths[children],
            node_advantages[children],
            out.ancestors_at(last_split + 1)[children],
            last_split,
            train.depth_pruning,
            train.width_pruning,
            train.width_pruning_ratio,
        )
        return node_advantages[children], torch.nonzero(keep).flatten()

    def _global_std(self, rewards: Tensor, per_column: bool = False) -> float | Tensor | None:
        """With ``train.global_std``, the population std of the epoch's rewards over every process (Flow-GRPO's
        ``global_std``), per branch step (``[S]``) for ``[B, S]`` rewards when ``per_column``, as flow_grpo's tracker
        takes the std of a reward matrix column by column; ``None`` otherwise: each group's (depth's) own std."""
        if not self.config.train.global_std:
            return None
        gathered = self.run.accelerator.gather(rewards.to(self.run.device)).cpu().double()
        return gathered.std(dim=0, correction=0) if per_column else gathered.std(correction=0).item()

    def _score_images(self, images: Tensor, units: list[int], per_unit: int) -> tuple[Tensor, dict[str, Tensor]]:
        """Rewards ``[N]`` and parts of ``images`` ``[N, 3, H, W]``, image ``n`` of prompt index
        ``units[n // per_unit]``, in chunks of ``sampling.batch_size``."""
        indices = [u for u in units for _ in range(per_unit)]
        size = self.config.sampling.batch_size
        results = [
            self._score(
                images[i : i + size],
                [self.prompts[u] for u in indices[i : i + size]],
                [self.prompt_metadata[u] for u in indices[i : i + size]],
            )
            for i in range(0, len(indices), size)
        ]
        parts = {name: torch.cat([r[1][name] for r in results]) for name in results[0][1]}
        return torch.cat([r[0] for r in results]), parts

    def epoch_plans(self, epoch: int, num_local_images: int) -> StepPlan | list[StepPlan]:
        """The epoch's step plan, or with ``window_draw: per_chunk`` one window plan per rollout chunk of this
        process (seeded by seed, epoch, process and chunk)."""
        sampling, seed = self.config.sampling, self.config.seed

        def plan(*window_key: int) -> StepPlan:
            drawn = build_plan(sampling, self.kernel, epoch, seed, window_key)
            return dataclasses.replace(drawn, log_prob=self.config.train.log_prob)

        if sampling.plan != "window" or sampling.window_draw == "per_epoch":
            return plan()
        process = self.run.accelerator.process_index
        return [plan(process, chunk) for chunk in range(-(-num_local_images // sampling.batch_size))]

    @torch.no_grad()
    def _score(
        self, images: Tensor, prompts: list[str], metadata: list[dict] | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        total, parts = self.reward.score_parts(images, prompts, **metadata_kwargs(self.reward, metadata))
        return total.float().cpu(), {k: v.float().cpu() for k, v in parts.items()}

    # --- advantages -------------------------------------------------------------------------------------------------

    def advantages(
        self, rewards: Tensor, group_ids: Tensor, prompts: list[str], parts: dict[str, Tensor] | None = None
    ) -> tuple[Tensor, dict[str, float]]:
        """Advantages of the local samples, computed on the rewards gathered from every process (``parts``: each
        reward's local ``[b]`` scores, for ``train.advantage_aggregation: per_reward``)."""
        accelerator = self.run.accelerator
        all_rewards = accelerator.gather(rewards.to(self.run.device)).cpu()
        all_groups = accelerator.gather(group_ids.to(self.run.device)).cpu()
        all_prompts = _gather_strings(accelerator, prompts)
        train = self.config.train
        if train.advantage == "running":
            advantages = self.tracker.update(all_prompts, all_rewards)
        elif train.advantage_aggregation == "per_reward":
            if parts is None:
                raise ValueError("advantage_aggregation: per_reward needs each reward's scores (parts)")
            # Each part through its term's shift and scale: a negative scale turns the reward around.
            oriented = {name: self.reward.normalized_part(name, values) for name, values in parts.items()}
            all_parts = {name: accelerator.gather(v.to(self.run.device)).cpu() for name, v in oriented.items()}
            advantages = per_reward_advantages(all_parts, self.reward.weights, all_groups, global_std=train.global_std)
        else:
            advantages = group_advantages(all_rewards, all_groups, global_std=train.global_std)
        stats = {
            "reward_mean": all_rewards.mean().item(),
            "reward_std": all_rewards.std(unbiased=False).item(),
            "zero_std_ratio": zero_std_ratio(all_rewards, all_groups),
        }
        local = self._local_slice(all_rewards.shape[0])
        return advantages[local].clamp(-train.adv_clip_max, train.adv_clip_max), stats

    # --- training ---------------------------------------------------------------------------------------------------

    def _micro_batches(self, keep: Tensor, epoch: int, inner: int) -> list[Tensor]:
        generator = torch.Generator().manual_seed(derive_seed(self.config.seed, "grpo/micro_batches", epoch, inner))
        order = keep[torch.randperm(keep.shape[0], generator=generator)]
        size = self.config.train.batch_size
        return [order[i : i + size] for i in range(0, order.shape[0], size)]

    def _step_loss(self, trajectory: Trajectory, samples: Tensor, positions: Tensor, advantages: Tensor):
        """Clipped policy loss (+ beta x KL) of ``samples`` at their stored ``positions`` (int64 ``[b, k]``, each
        sample's own), in one denoiser call.

        The loss is the mean over samples x positions, i.e. the mean of the per-step losses.
        """
        train = self.config.train
        guidance = trajectory.guidance_scale if train.cfg else 1.0
        traj = (
            trajectory
            if guidance == trajectory.guidance_scale
            else dataclasses.replace(trajectory, guidance_scale=guidance)
        )
        with self.run.autocast():
            log_probs, means, stds = transition_log_probs(
                self.adapter, traj, positions, samples=samples, uncond_grad=train.cfg_uncond_grad
            )
        old = trajectory.log_probs[samples].gather(1, positions).to(log_probs.device)
        steps = trajectory.steps_at(positions, samples)  # [b, k] plan step indices
        log_ratio, weights = self._guarded_log_ratio(
            trajectory, samples, positions, steps, log_probs, old, means, stds
        )
        if train.timestep_weighting == "noise_aware":
            noise_weights = self._noise_aware_weights(trajectory)[steps].to(log_probs.device)
            weights = noise_weights if weights is None else weights * noise_weights
        if advantages.ndim == 2:  # per (sample, stored step): branched rollouts
            step_advantages = advantages[samples].gather(1, positions).to(log_probs.device)
        else:
            step_advantages = advantages[samples].to(log_probs.device).unsqueeze(1).expand_as(old)
        loss, metrics = clipped_policy_loss(
            log_probs.flatten(),
            old.flatten(),
            step_advantages.flatten(),
            train.clip_range,
            log_ratio=None if log_ratio is None else log_ratio.flatten(),
            weights=None if weights is None else weights.flatten(),
        )
        if train.beta > 0:
            with torch.no_grad(), self.run.reference(), self.run.autocast():
                _, ref_means, _ = transition_log_probs(self.adapter, traj, positions, samples=samples)
            kl = torch.stack(
                [
                    kl_to_reference(
                        means[:, j],
                        ref_means[:, j],
                        stds[:, j],
                        convention=self.kl_convention,
                        step_size=self._step_sizes(trajectory, steps[:, j]),
                    ).mean()
                    for j in range(positions.shape[1])
                ]
            ).mean()
            loss = loss + train.beta * kl
            metrics["kl"] = kl.detach()
        return loss, metrics

    def _guarded_log_ratio(
        self,
        trajectory: Trajectory,
        samples: Tensor,
        positions: Tensor,
        steps: Tensor,
        log_probs: Tensor,
        old: Tensor,
        means: Tensor,
        stds: Tensor,
    ) -> tuple[Tensor | None, Tensor | None]:
        """The ``train.ratio_guard`` log-ratio ``[b, k]`` and per-element loss weights ``[b, k]`` (``None``: the
        plain log-ratio, unit weights). ``means`` ``[b, k, ...]`` and ``stds`` (``[k]`` or ``[b, k]``) are the
        current transitions' (:func:`transition_log_probs`)."""
        guard = self.config.train.ratio_guard
        if guard == "recenter":
            return recentred_log_ratio(log_probs - old), None
        if guard != "grpo_guard":
            return None, None
        rows = torch.arange(positions.shape[0]).unsqueeze(1)
        old_means = trajectory.means[samples][rows, positions].to(means.device)
        std = stds.to(log_probs.device).expand_as(old)
        guarded = grpo_guard_log_ratio(
            log_probs.flatten(), old.flatten(), means.flatten(0, 1), old_means.flatten(0, 1), std.flatten()
        )
        # GRPO-Guard's reweighting: each step's loss over |dt|, so every step pulls with a comparable gradient.
        return guarded.view_as(old), 1.0 / self._step_sizes(trajectory, steps).to(log_probs.device)

    @staticmethod
    def _step_sizes(trajectory: Trajectory, steps: Tensor) -> Tensor | float:
        """``sigma - sigma_next`` of the plan ``steps`` (int64, any shape, e.g. ``[b]`` or ``[b, k]``); 1.0 for DDIM
        schedules."""
        sigmas = trajectory.schedule.sigmas
        if sigmas is None:
            return 1.0
        index = steps.flatten().to(sigmas.device)
        return (sigmas[index] - sigmas[index + 1]).float().view(steps.shape)

    def _noise_aware_weights(self, trajectory: Trajectory) -> Tensor:
        """``[num_steps]`` TempFlow-GRPO's weight of each trained step of the trajectory's plan (0 elsewhere)."""
        plan = trajectory.plan
        if plan not in self._weight_tables:
            weights = torch.zeros(plan.num_steps)
            stds = step_stds(self.adapter, plan, trajectory.schedule, plan.trained)
            weights[list(plan.trained)] = noise_aware_weights(stds)
            self._weight_tables = {plan: weights}  # plans change with the epoch's window: keep the last one
        return self._weight_tables[plan]

    def train_positions(self, trajectory: Trajectory, epoch: int) -> Tensor:
        """Each local sample's trained positions on the stored axis, int64 ``[N, n]``: the plan's trained steps
        for every sample, its chunk's own window (``window_draw: per_chunk``), or with per-sample random steps an
        independent draw of ``n`` of the stored steps per sample (``sampling.train_steps``), seeded by (seed,
        epoch, process)."""
        num_samples = trajectory.log_probs.shape[0]
        if trajectory.row_steps is not None:  # tree edges: one stored position each
            return torch.zeros(num_samples, 1, dtype=torch.long)
        position_of = {step: position for position, step in enumerate(trajectory.step_indices)}
        if trajectory.trained_steps is not None:  # each chunk's own window
            return trajectory.trained_steps.clone().apply_(position_of.__getitem__)
        if not self.random_train_steps:
            return torch.tensor(trajectory.trained_positions, dtype=torch.long).expand(num_samples, -1)
        seed = derive_seed(self.config.seed, "grpo/train_steps", epoch, self.run.accelerator.process_index)
        steps = per_sample_train_steps(trajectory.plan, num_samples, torch.Generator().manual_seed(seed))
        return steps.apply_(position_of.__getitem__)

    def rescore_chunk(self, count_per_sample: int) -> int:
        """Trained steps re-scored per denoiser call (``train.timestep_chunk``): with ``auto`` the most that keep a
        call of ``train.batch_size`` samples (twice the rows with CFG) within ``train.max_rescore_rows``."""
        train = self.config.train
        if train.timestep_chunk != "auto":
            return train.timestep_chunk or count_per_sample
        return max(1, min(count_per_sample, train.max_rescore_rows // self._rows_per_step()))

    def _rows_per_step(self) -> int:
        """Denoiser rows of one trained step of a micro-batch: ``train.batch_size``, twice that with a CFG batch."""
        train = self.config.train
        guided = train.cfg and self.config.sampling.guidance_scale > 1 and not self.adapter.guidance_embedded
        return train.batch_size * (2 if guided else 1)

    def kept_samples(self, advantages: Tensor, candidates: Tensor | None = None) -> Tensor:
        """Indices of the local samples trained this epoch, int64 ``[k]``: of ``candidates`` (default all; a tree's
        unpruned edges), with ``train.filter_zero_advantage`` those with a non-zero advantage (at any stored step,
        for ``[N, S]`` advantages), topped up with zero-advantage ones to the largest such count on any process.

        Every process must run the same number of micro-batches and optimizer steps, since their gradients are
        all-reduced together (a process with fewer would leave the others waiting); flow_grpo likewise re-admits
        filtered samples. A zero-advantage sample adds no policy gradient (only its KL term, when ``beta > 0``).
        """
        index = torch.arange(advantages.shape[0]) if candidates is None else candidates
        if not self.config.train.filter_zero_advantage:
            return index
        informative = (advantages != 0) if advantages.ndim == 1 else (advantages != 0).any(dim=1)
        nonzero, zero = index[informative[index]], index[~informative[index]]
        count = torch.tensor([nonzero.shape[0]], device=self.run.device)
        target = int(self.run.accelerator.gather(count).max())
        return torch.cat([nonzero, zero[: target - nonzero.shape[0]]]).sort().values

    def train_epoch(
        self, trajectory: Trajectory, advantages: Tensor, epoch: int, candidates: Tensor | None = None
    ) -> dict[str, float]:
        """Policy updates on one epoch's samples (``candidates``: the rows that may train, default all); returns the
        averaged metrics."""
        keep = self.kept_samples(advantages, candidates)
        positions = self.train_positions(trajectory, epoch)  # [N, n]
        count_per_sample = positions.shape[1]
        chunk = self.rescore_chunk(count_per_sample)
        chunks = [list(range(i, min(i + chunk, count_per_sample))) for i in range(0, count_per_sample, chunk)]
        totals: dict[str, float] = {}
        optimizer_metrics: dict[str, float] = {}
        count = 0
        accumulation = self.config.optim.gradient_accumulation_steps
        for inner in range(self.config.train.num_inner_epochs):
            batches = self._micro_batches(keep, epoch, inner)
            for b, samples in enumerate(batches):
                group_start = (b // accumulation) * accumulation
                group_end = min(group_start + accumulation, len(batches))
                # Every sample of the optimizer step weighs the same, also in a short last micro-batch.
                group_samples = sum(len(batch) for batch in batches[group_start:group_end])
                for j, part in enumerate(chunks):
                    last = b == group_end - 1 and j == len(chunks) - 1
                    with self.run.accumulate(sync=last):
                        loss, metrics = self._step_loss(trajectory, samples, positions[samples][:, part], advantages)
                        # The loss is a mean over this call's samples x steps: the step's gradient is the mean
                        # over all of its samples x trained steps.
                        share = len(samples) * len(part) / (group_samples * count_per_sample)
                        self.run.backward(loss * share, step=epoch)
                    for key, value in metrics.items():
                        totals[key] = totals.get(key, 0.0) + float(value) * len(samples) * len(part)
                    count += len(samples) * len(part)
                if b == group_end - 1:
                    optimizer_metrics = self.run.optimizer_step(step=epoch)
        averaged = {key: value / max(count, 1) for key, value in totals.items()}
        # Each process's means and sample count, over all processes (the optimizer's metrics are global already).
        local = {
            **averaged,
            "num_train_samples": float(keep.shape[0]),
            "num_train_transitions": float(keep.shape[0] * count_per_sample),
        }
        sums = ("num_train_samples", "num_train_transitions")
        return {**self.run.reduce_metrics(local, sums=sums), **optimizer_metrics}

    # --- the loop ---------------------------------------------------------------------------------------------------

    def train_step(self, epoch: int) -> dict[str, float]:
        """One epoch: sample and score the groups, compute advantages, update the policy; returns its metrics."""
        began = time.perf_counter()
        candidates = None
        if self.config.sampling.plan in ("branch_at", "tree"):
            trajectory, advantages, stats, candidates = self.sample_branched_epoch(epoch)
            sampled = time.perf_counter()
        else:
            trajectory, rewards, parts, group_ids = self.sample_epoch(epoch)
            sampled = time.perf_counter()
            advantages, stats = self.advantages(rewards, group_ids, trajectory.prompts, parts)
            for name, values in parts.items():
                stats[f"reward/{name}"] = self.run.accelerator.gather(values.to(self.run.device)).mean().item()
            stats["rollout_denoiser_calls"] = float(trajectory.plan.num_steps * len(trajectory))
        metrics = {**stats, **self.train_epoch(trajectory, advantages, epoch, candidates)}
        metrics["time/sample_s"] = sampled - began
        metrics["time/epoch_s"] = time.perf_counter() - began
        return metrics

    def train(self) -> dict[str, Any]:
        """Run ``max_steps`` epochs on the shared step loop (resuming when ``checkpoint.resume_from`` is set, stopping
        early when ``max_minutes`` are spent); returns the last epoch's metrics."""
        state = self.run.resume()
        if "tracker" in state and self.tracker is not None:
            self.tracker.load_state_dict(state["tracker"])
        try:
            return self.run.run_steps(
                self.train_step,
                self.trainer_state,
                self.evaluator,
                desc="grpo",
                postfix=("reward_mean", "approx_kl"),
                log_mean=True,
                resumed=state,
            )
        finally:
            self._scorer.shutdown()

    def trainer_state(self) -> dict[str, Any]:
        return {"tracker": self.tracker.state_dict()} if self.tracker is not None else {}


def _gather_strings(accelerator, strings: list[str]) -> list[str]:
    if accelerator.num_processes == 1:
        return list(strings)
    from accelerate.utils import gather_object

    return list(gather_object(list(strings)))
