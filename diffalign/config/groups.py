"""The config groups shared by every trainer (model, LoRA, optimizer, logging, checkpoints, evaluation, EMA) and
their base :class:`TrainerConfig`, with the reward-spec checks.

Each trainer's own config subclasses ``TrainerConfig`` beside the trainer (e.g. ``GRPOConfig`` in
:mod:`diffalign.trainers.grpo`). Cross-field checks raise the loader's :class:`~diffalign.config.loader.ConfigError`.
"""

import dataclasses
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

from diffalign.config.loader import ConfigError
from diffalign.seeding import USER_SEED_LIMIT, is_user_seed


__all__ = [
    "CheckpointConfig",
    "EMAConfig",
    "EvalConfig",
    "LoggingConfig",
    "LoraConfig",
    "ModelConfig",
    "OptimConfig",
    "TrainerConfig",
]


def _require(condition: bool, key: str | Sequence[str], message: str) -> None:
    if not condition:
        raise ConfigError(message, key=key)


@dataclasses.dataclass(kw_only=True)
class LoraConfig:
    """LoRA adapter on the denoiser (peft), or full fine-tuning when ``rank`` is 0."""

    rank: int = 0
    """LoRA rank r; 0 trains every denoiser weight (full fine-tuning, which needs a frozen reference copy for
    methods with a reference model). Higher ranks learn more and cost more memory; 4-64 is typical."""
    alpha: int | None = None
    """LoRA alpha; the update is scaled by alpha / rank. Null means alpha = rank (scale 1)."""
    target_modules: list[str] | None = None
    """Module names to adapt (e.g. [to_q, to_k, to_v, to_out.0]); null uses the model family's default."""
    init: Literal["gaussian", "default"] = "gaussian"
    """Initialisation of the LoRA A matrix ("gaussian" as in the diffusers training scripts, or peft's default
    Kaiming-uniform); B starts at zero either way, so training starts from the base model."""
    dropout: float = 0.0
    """Dropout on the LoRA branch input."""

    def __post_init__(self) -> None:
        _require(self.rank >= 0, "rank", f"must be >= 0 (0 = full fine-tuning), got {self.rank}")
        _require(self.alpha is None or self.alpha > 0, "alpha", f"must be > 0 or null (= rank), got {self.alpha}")
        _require(0.0 <= self.dropout < 1.0, "dropout", f"must be in [0, 1), got {self.dropout}")
        _require(self.target_modules != [], "target_modules", "is empty; list module names or use null")

    @property
    def enabled(self) -> bool:
        """True when a LoRA adapter is trained, False for full fine-tuning."""
        return self.rank > 0

    @property
    def effective_alpha(self) -> int:
        """``alpha`` with the null default resolved to ``rank``."""
        return self.rank if self.alpha is None else self.alpha


@dataclasses.dataclass(kw_only=True)
class ModelConfig:
    """The diffusers pipeline to align and how its denoiser is trained."""

    path: str
    """Hub id (e.g. stabilityai/stable-diffusion-3.5-medium) or local folder of a diffusers pipeline. Required."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) to load; null = the default branch. Ignored for local folders."""
    variant: str | None = None
    """Weight file variant to load, e.g. fp16 (diffusion_pytorch_model.fp16.safetensors); null = the default."""
    vae_path: str | None = None
    """A VAE to use instead of the pipeline's: an AutoencoderKL folder or hub id (e.g. madebyollin/sdxl-vae-fp16-fix,
    the SDXL VAE that does not overflow in fp16, as DiffusionDPO's SDXL script), or a pipeline folder whose vae/ is
    taken. Null = the pipeline's own."""
    lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)
    """LoRA adapter settings; lora.rank = 0 means full fine-tuning."""
    attention: Literal["sdpa", "xformers"] = "sdpa"
    """Attention kernel: PyTorch scaled-dot-product attention, or xformers (needs the diffalign[xformers] extra)."""
    max_sequence_length: int | None = None
    """T5 tokens per prompt for SD3 and FLUX (null: the pipeline's default, 256 for SD3, 512 for FLUX); flow_grpo
    encodes SD3.5 prompts at 128. Families without T5 refuse it."""
    offload_text_encoders: Literal["keep", "cpu", "delete"] = "keep"
    """After the trainer has cached every prompt's text embeddings (``sampling.precompute_text_embeddings``), move
    the text encoders to the CPU (``cpu``) or drop them (``delete``) to free their GPU memory (T5-XXL: ~9 GB in
    bf16); ``keep`` leaves them in place. Needs the precomputed cache."""
    timestep_shift: float | None = None
    """Flow models (SD3, FLUX): sample with the fixed schedule shift ``sigma -> shift * sigma / (1 + (shift - 1) *
    sigma)`` instead of the scheduler's own (SD3's static 3, FLUX's resolution-dependent shift); MixGRPO and
    DanceGRPO use 3 on FLUX. Null keeps the scheduler's. Flow-DPO's timestep density follows it
    (``dpo.sigma_shift: scheduler``)."""
    compile: Literal["none", "default", "max-autotune-no-cudagraphs"] = "none"
    """``torch.compile`` the denoiser (inductor, CPU or GPU) for sampling, training and evaluation: ``default``, or
    ``max-autotune-no-cudagraphs`` (autotuned kernels, a longer first compile); ``none`` runs eagerly. The first calls
    compile (tens of seconds to minutes) and each new case (grad on / off, LoRA on / off, a second batch size) once
    more, so it pays off on long runs. The saved LoRA, checkpoints and results are those of an eager run
    (docs/performance.md#torchcompile)."""

    def __post_init__(self) -> None:
        _require(bool(str(self.path).strip()), "path", "is empty; give a hub id or a local pipeline folder")
        _require(
            self.max_sequence_length is None or self.max_sequence_length >= 1,
            "max_sequence_length",
            f"must be >= 1, or null for the pipeline's default, got {self.max_sequence_length}",
        )
        _require(
            self.timestep_shift is None or self.timestep_shift > 0,
            "timestep_shift",
            f"must be > 0 (1 = unshifted), or null for the scheduler's, got {self.timestep_shift}",
        )


@dataclasses.dataclass(kw_only=True)
class OptimConfig:
    """Optimizer (AdamW or Adafactor), gradient clipping and learning-rate schedule."""

    optimizer: Literal["adamw", "adafactor"] = "adamw"
    """``adamw`` (torch's AdamW, or bitsandbytes' 8-bit one with ``use_8bit_adam``), or ``adafactor``:
    transformers' Adafactor with a fixed learning rate (``relative_step`` and ``scale_parameter`` off, update
    clipping 1.0), as DiffusionDPO trains SDXL; it keeps factored second moments (far less optimizer memory than
    AdamW) and has no ``betas`` / ``eps`` of AdamW's kind (leave them at their defaults)."""
    lr: float = 1e-4
    """Peak learning rate (after warmup)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW (beta1, beta2)."""
    weight_decay: float = 1e-2
    """AdamW decoupled weight decay."""
    eps: float = 1e-8
    """AdamW epsilon."""
    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm to this value; null disables clipping."""
    lr_scheduler: Literal["constant", "constant_with_warmup", "cosine", "linear"] = "constant"
    """Learning-rate schedule (diffusers.optimization.get_scheduler); cosine and linear decay to 0 at max_steps.

    The schedule advances once per trainer step (``max_steps`` unit: an optimizer step for DPO and reward
    backprop, an epoch for Flow-GRPO, whose epochs take several optimizer steps)."""
    warmup_steps: int = 0
    """Linear warmup from 0 over this many trainer steps (not with lr_scheduler = constant)."""
    lr_horizon: Literal["max_steps", "max_minutes"] = "max_steps"
    """What the schedule spans: ``max_steps``, or the ``max_minutes`` wall-clock budget (the schedule then stands at
    the fraction of the budget spent times max_steps, or at the step count if that is further, so that a cosine or
    linear decay ends with the budget). A resumed run's budget starts afresh; its schedule never moves back."""
    gradient_accumulation_steps: int = 1
    """Micro-batches accumulated per optimizer step."""
    use_8bit_adam: bool = False
    """Use bitsandbytes' 8-bit AdamW to save optimizer memory (needs bitsandbytes and a CUDA device)."""

    def __post_init__(self) -> None:
        if self.optimizer == "adafactor":
            defaults = {field.name: field.default for field in dataclasses.fields(self)}
            adam_only = [key for key in _ADAM_ONLY if _plain(getattr(self, key)) != _plain(defaults[key])]
            _require(
                not adam_only,
                [*adam_only, "optimizer"],
                f"{', '.join(adam_only)} belong to AdamW; Adafactor has no such setting: remove them, "
                "or use optimizer: adamw",
            )
        _require(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        _require(all(0.0 <= b < 1.0 for b in self.betas), "betas", f"must both be in [0, 1), got {self.betas}")
        _require(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        _require(self.eps > 0, "eps", f"must be > 0, got {self.eps}")
        _require(
            self.max_grad_norm is None or self.max_grad_norm > 0,
            "max_grad_norm",
            f"must be > 0, or null to disable clipping, got {self.max_grad_norm}",
        )
        _require(self.warmup_steps >= 0, "warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        _require(
            self.gradient_accumulation_steps >= 1,
            "gradient_accumulation_steps",
            f"must be >= 1, got {self.gradient_accumulation_steps}",
        )
        # get_scheduler("constant") ignores warmup silently; make the mismatch loud instead.
        _require(
            not (self.warmup_steps > 0 and self.lr_scheduler == "constant"),
            ("warmup_steps", "lr_scheduler"),
            "warmup_steps > 0 has no effect with lr_scheduler = constant; "
            "use lr_scheduler = constant_with_warmup, or warmup_steps = 0",
        )


_ADAM_ONLY = ("betas", "eps", "use_8bit_adam")
"""AdamW's own settings: ``optim.optimizer: adafactor`` refuses any but their defaults."""


def _plain(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


@dataclasses.dataclass(kw_only=True)
class LoggingConfig:
    """Where and how often training metrics go."""

    log_with: Literal["tensorboard", "wandb", "none"] = "tensorboard"
    """Tracker: tensorboard (in <output_dir>/logs), wandb (needs the diffalign[wandb] extra), or none."""
    log_every: int | None = None
    """Log scalar metrics every this many trainer steps (the mean over them where a trainer averages); null = the
    trainer's default: every epoch of Flow-GRPO, every 10 optimizer steps of DPO and reward backprop."""
    project: str = "diffalign"
    """Tracker project name (the wandb project)."""
    run_name: str | None = None
    """The wandb run's name; null = the name of output_dir (tensorboard writes to <output_dir>/<project>)."""

    def __post_init__(self) -> None:
        _require(
            self.log_every is None or self.log_every >= 1, "log_every", f"must be >= 1 or null, got {self.log_every}"
        )


@dataclasses.dataclass(kw_only=True)
class CheckpointConfig:
    """Training-state checkpoints (model or LoRA, optimizer, schedule, EMA, RNG) for resuming."""

    every: int = 500
    """Save a checkpoint every this many optimizer steps; 0 saves only at the end of training."""
    keep_last: int | None = None
    """Keep only the newest this-many checkpoints; null keeps all."""
    resume_from: str | None = None
    """Resume from this checkpoint folder; "latest" for the newest one in <output_dir>/checkpoints (an error when
    there is none); "auto" for the newest one, or a fresh start when there is none; null starts from scratch
    (in an empty output_dir, or with overwrite)."""
    overwrite: bool = False
    """Start from scratch in an output_dir that holds another run, deleting that run's checkpoints, metrics, config
    and LoRA (without it such a folder is refused)."""
    allow_config_change: bool = False
    """On resume, accept a config that differs from the run's saved config.yaml in keys that change the training
    trajectory (seed, model, batch geometry, optimizer, method options); the differences are printed either way."""

    def __post_init__(self) -> None:
        _require(self.every >= 0, "every", f"must be >= 0 (0 = only at the end), got {self.every}")
        _require(self.keep_last is None or self.keep_last >= 1, "keep_last", "must be >= 1, or null to keep all")
        _require(
            not (self.overwrite and self.resume_from is not None),
            ("overwrite", "resume_from"),
            "overwrite starts afresh and deletes the run's checkpoints: it cannot go with resume_from",
        )


@dataclasses.dataclass(kw_only=True)
class EvalConfig:
    """Periodic evaluation: a grid of images for fixed prompts and seeds, scored with the reward."""

    every: int = 0
    """Evaluate every this many optimizer steps; 0 disables evaluation during training."""
    prompts: list[str] | Path | None = None
    """Evaluation prompts: a list, a text file with one prompt per line, or a JSONL file of ``{"prompt": ...,
    <metadata>}`` records (the metadata reaches rewards that take it). Required when every > 0."""
    seeds: list[int] = dataclasses.field(default_factory=lambda: [0])
    """Seeds; each prompt is sampled once per seed, with the same noise at every evaluation."""
    num_steps: int | None = None
    """Denoising steps for evaluation samples; null = the training sampler's ``sampling.num_steps`` for
    trainers with a ``sampling`` group (grpo, reward_backprop), otherwise the model family's default
    (``adapter.default_num_steps``, e.g. 50 for SD1.5, 28 for SD3)."""
    guidance_scale: float | None = None
    """Classifier-free guidance scale for evaluation samples; null = the training sampler's
    ``sampling.guidance_scale`` for trainers with a ``sampling`` group (grpo, reward_backprop), otherwise the
    model family's default (``adapter.default_guidance_scale``, e.g. 7.5 for SD1.5, 4.5 for SD3)."""
    batch_size: int = 4
    """Images generated per forward pass during evaluation."""
    early_stopping_patience: int = 0
    """Stop when ``eval.metric`` has not improved (by more than ``eval.min_delta``) for this many evaluations in a
    row, and end the run with the weights of its best evaluation (the exported LoRA/model holds them; checkpoints
    keep the training state, with the best weights beside it for a resume); 0 = off. Needs ``every > 0``. It guards
    against over-optimising the trained reward when the evaluation judges with something the run does not train on
    (other prompts or seeds, another reward)."""
    metric: str = "reward"
    """The evaluation score early stopping follows, higher being better: ``reward`` (the evaluation reward's
    total) or a part the reward reports (e.g. ``strict``, a verifier's all-correct rate)."""
    min_delta: float = 0.0
    """How much an evaluation must beat the best one by to count as an improvement."""

    def __post_init__(self) -> None:
        _require(self.every >= 0, "every", f"must be >= 0 (0 = no evaluation), got {self.every}")
        _require(
            self.early_stopping_patience >= 0,
            "early_stopping_patience",
            f"must be >= 0 (0 = off), got {self.early_stopping_patience}",
        )
        _require(
            self.early_stopping_patience == 0 or self.every > 0,
            ("early_stopping_patience", "every"),
            "early stopping follows the periodic evaluation: set every > 0 (and prompts), or patience 0",
        )
        _require(self.min_delta >= 0, "min_delta", f"must be >= 0, got {self.min_delta}")
        _require(bool(self.metric.strip()), "metric", "is empty; use reward or a part the reward reports")
        _require(
            self.every == 0 or self.prompts is not None,
            ("prompts", "every"),
            "every > 0 needs prompts (a list or a file with one prompt per line); or set every = 0",
        )
        _require(bool(self.seeds), "seeds", "is empty; give at least one seed")
        _require(
            all(is_user_seed(seed) for seed in self.seeds),
            "seeds",
            f"must lie in [0, {USER_SEED_LIMIT}) (the rest is where training draws its own), got {self.seeds}",
        )
        _require(self.num_steps is None or self.num_steps >= 1, "num_steps", "must be >= 1, or null")
        _require(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")


@dataclasses.dataclass(kw_only=True)
class EMAConfig:
    """Exponential moving average of the trained weights, used for evaluation and the saved model."""

    enabled: bool = False
    """Keep an EMA copy of the trainable parameters."""
    decay: float = 0.9999
    """EMA decay per update (diffusers EMAModel's default; Flow-GRPO uses 0.9 with update_every = 8)."""
    update_every: int = 1
    """Update the EMA every this many optimizer steps."""

    def __post_init__(self) -> None:
        _require(0.0 <= self.decay < 1.0, "decay", f"must be in [0, 1), got {self.decay}")
        _require(self.update_every >= 1, "update_every", f"must be >= 1, got {self.update_every}")


_REWARD_NAME = re.compile(r"[\w.\-]+")
_REWARD_FORMS = (
    "a reward name (pickscore), 'package.module:function', 'path/to/file.py:function' or a reward server "
    "'remote:http://host:port'"
)

RewardSpec = str | dict[str, float | dict[str, Any]]
"""The type of a config's ``reward``: a name or spec, or a mapping of names/specs to a weight or to a term mapping
``{weight, scale, shift, device, dtype, options, <factory option>: value}`` (docs/rewards.md#weighted-sums).
Trainer configs that redeclare ``reward`` use it too."""


def _reward_spec_problem(spec: str) -> str | None:
    """Why ``spec`` is not a reward name, ``target:callable`` or ``remote:URL[,URL]`` spec; None if it is one."""
    if spec.startswith("remote:"):  # reward-server URLs (rewards.remote), checked without connecting
        from rewards.remote import parse_urls

        try:
            parse_urls(spec.removeprefix("remote:"))
        except ValueError as err:
            return str(err)
        return None
    if ":" not in spec:
        return None if _REWARD_NAME.fullmatch(spec) else f"{spec!r} is not {_REWARD_FORMS}"
    target, _, attr = spec.rpartition(":")
    if target.strip() and all(part.isidentifier() for part in attr.split(".")):
        return None
    return f"{spec!r} is not {_REWARD_FORMS}"


def _check_reward(reward: RewardSpec | None) -> None:
    if isinstance(reward, str):
        problem = _reward_spec_problem(reward)
        _require(problem is None, "reward", str(problem))
    elif reward is not None:
        _require(bool(reward), "reward", "is an empty mapping; give at least one, e.g. {pickscore: 1.0}")
        for name, term in reward.items():
            problem = _reward_spec_problem(name)
            _require(problem is None, f"reward.{name}", str(problem))
            if isinstance(term, dict):
                _check_reward_term(name, term)
            else:
                _require(math.isfinite(term), f"reward.{name}", f"weight must be a finite number, got {term}")


def _check_reward_term(name: str, term: dict[str, Any]) -> None:
    """A term mapping's weight, scale, shift, device, dtype and factory options, checked by ``rewards.parse_term``
    (options against the registered factory's signature, with a did-you-mean; nothing loads)."""
    from rewards import RewardSpecError, parse_term  # lazy: torch loads only for configs with term mappings

    try:
        parse_term(name, term)
    except RewardSpecError as err:
        raise ConfigError(err.message, key="reward." + ".".join(err.key)) from None


@dataclasses.dataclass(kw_only=True)
class TrainerConfig:
    """Settings every trainer has. A trainer's config subclasses it (``@dataclass(kw_only=True)``), adds its own
    groups and redeclares fields whose defaults differ; a subclass ``__post_init__`` must call
    ``super().__post_init__()``."""

    default_log_every: ClassVar[int] = 10
    """Trainer steps between logs when ``logging.log_every`` is null (a class constant, not a config key)."""
    resume_safe_keys: ClassVar[tuple[str, ...]] = ()
    """Dotted keys of this trainer that may change on resume without changing what it trains (besides the
    bookkeeping keys every trainer has; a class constant)."""

    model: ModelConfig
    """The pipeline to align (model.path is required)."""
    reward: RewardSpec | None = None
    """Reward: a registered name (pickscore), a user function ('package.module:function' or
    'path/to/file.py:function'), or a mapping of those to weights ({pickscore: 1.0, aesthetic: 0.5}) or to options
    ({pickscore: {weight: 1.0, scale: 0.038461538461538464, shift: 0, path: ..., revision: ..., dtype: bf16,
    device: cuda:1}}: the term is weight * scale * (score - shift); other keys go to the reward's loader). A
    one-entry mapping is how a single reward gets options. Null for trainers that need none (offline
    Diffusion-DPO). See docs/rewards.md#weighted-sums."""
    output_dir: Path = Path("outputs")
    """Run folder: checkpoints, logs, evaluation grids, the final weights and the resolved config.yaml."""
    seed: int = 42
    """Seed for every random number generator (model init, data order, sampling noise)."""
    max_steps: int = 1000
    """Training budget in optimizer steps."""
    max_minutes: float | None = None
    """Optional wall-clock budget: training stops (and saves) after the step during which it runs out."""
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    """Autocast precision of the trained model (accelerate); trainable weights stay fp32. fp16 needs a GPU."""
    gradient_checkpointing: bool = False
    """Recompute the denoiser's activations in the backward pass: less memory, about 30% slower steps."""
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    """Optimizer and learning-rate schedule."""
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)
    """Metric logging."""
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    """Checkpoints and resuming."""
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    """Periodic evaluation grids."""
    ema: EMAConfig = dataclasses.field(default_factory=EMAConfig)
    """Exponential moving average of the trained weights."""

    @property
    def log_every(self) -> int:
        """``logging.log_every``, or the trainer's :attr:`default_log_every` when that is null."""
        return self.logging.log_every or self.default_log_every

    def __post_init__(self) -> None:
        _check_reward(self.reward)
        _require(self.max_steps >= 1, "max_steps", f"must be >= 1, got {self.max_steps}")
        _require(
            self.max_minutes is None or self.max_minutes > 0, "max_minutes", f"must be > 0, got {self.max_minutes}"
        )
        _require(
            self.optim.warmup_steps <= self.max_steps,
            ("optim.warmup_steps", "max_steps"),
            f"warmup ({self.optim.warmup_steps} steps) is longer than training ({self.max_steps} steps); "
            "lower optim.warmup_steps or raise max_steps",
        )
        _require(
            self.optim.lr_horizon == "max_steps" or self.max_minutes is not None,
            ("optim.lr_horizon", "max_minutes"),
            "lr_horizon = max_minutes needs a wall-clock budget; set max_minutes, or use lr_horizon = max_steps",
        )
