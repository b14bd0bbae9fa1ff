"""Step plans: which denoising steps are stochastic, which are stored with a log-prob, which are trained.

A :class:`StepPlan` is plain, frozen data read by the rollout loop: step ``i`` (0-based, from the noisiest) uses
the plan's stochastic kernel with ``noise_levels[i]`` when that is > 0 and the deterministic ODE step
(``ode_solver``) otherwise; the transitions of ``stored`` steps are kept with their log-probs, and the loss uses
the ``trained`` ones. The builders below reproduce the reference recipes (docs/samplers.md#step-plans,
docs/methods/grpo.md):

==========================  ====================================================================================
:func:`ode_plan`            every step deterministic, nothing stored: evaluation and reward backprop.
:func:`sde_plan`            every step but the last stochastic (Flow-GRPO, DanceGRPO); an in-order training
                            fraction (Flow-GRPO's ``timestep_fraction``); ``include_last`` for DDPO.
:func:`random_fraction_plan` a random subset of the stochastic steps is trained (DDPO / DanceGRPO shuffle).
:func:`random_window_plan`  SDE only in a window of random start, ODE elsewhere (Flow-GRPO-Fast).
:func:`sliding_window_plan` SDE only in a window that moves with the training iteration (MixGRPO).
:func:`union_plan`          the plans of several rollout chunks as one (a Fast window drawn per chunk).
==========================  ====================================================================================

Denoising reduction (Flow-GRPO: 10 sampling steps for training, 40 for evaluation) is two plans built
independently, e.g. ``sde_plan(10, 0.7)`` and ``ode_plan(40)``; the step count is the plan's ``num_steps``.
"""

import dataclasses
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from diffalign.samplers.steps import KERNELS


__all__ = [
    "ODE_SOLVERS",
    "StepPlan",
    "ode_plan",
    "per_sample_train_steps",
    "random_fraction_plan",
    "random_window_plan",
    "sde_plan",
    "sliding_window_plan",
    "sliding_window_start",
    "union_plan",
    "window_bounds",
]

ODE_SOLVERS = ("euler", "dpm_solver_2m")
"""``euler``: the kernel's own zero-noise step (Euler for flows, DDIM eta=0 for ``ddim``); ``dpm_solver_2m``:
:func:`~diffalign.samplers.steps.dpm_solver_2m_step` (flow kernels only)."""

RandomSource = random.Random | torch.Generator | None


@dataclass(frozen=True)
class StepPlan:
    """Which steps of a ``num_steps``-step sampler are stochastic, stored and trained.

    Attributes:
        num_steps: Number of denoising steps (model calls) of the sampler.
        kernel: Stochastic kernel for steps with noise, a key of ``steps.KERNELS``: ``"sde"`` (Flow-GRPO),
            ``"const"`` (DanceGRPO), ``"cps"`` or ``"ddim"`` (DDPO).
        noise_levels: ``[num_steps]`` noise scale of each step passed to the kernel (``noise_level``, ``eta``);
            0 means the deterministic ODE step.
        stored: Increasing step indices whose transitions ``(latents, next_latents, log_prob)`` the rollout
            keeps; each must have a noise level > 0.
        trained: Increasing subset of ``stored`` that the policy loss uses.
        ode_solver: Solver of the deterministic steps, one of :data:`ODE_SOLVERS`.
        log_prob: ``"gaussian"`` (the transition's log-density) or ``"unnormalized"`` (the ``cps`` kernel only:
            flow_grpo's CPS score ``-mean((x' - mean)^2)``, docs/samplers.md#cps-step).
        std_scales: ``[num_steps]`` multiplier of each stochastic step's std around the kernel's unchanged mean
            (BranchGRPO's wider splits, :func:`~diffalign.samplers.steps.widened_step`); empty: all 1.
    """

    num_steps: int
    kernel: str
    noise_levels: tuple[float, ...]
    stored: tuple[int, ...]
    trained: tuple[int, ...]
    ode_solver: str = "euler"
    log_prob: str = "gaussian"
    std_scales: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {self.num_steps}")
        if self.kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {sorted(KERNELS)}, got {self.kernel!r}")
        if self.ode_solver not in ODE_SOLVERS:
            raise ValueError(f"ode_solver must be one of {ODE_SOLVERS}, got {self.ode_solver!r}")
        if self.log_prob not in ("gaussian", "unnormalized"):
            raise ValueError(f"log_prob must be 'gaussian' or 'unnormalized', got {self.log_prob!r}")
        if self.log_prob == "unnormalized" and self.kernel != "cps":
            raise ValueError(f"the unnormalized log-prob is the cps kernel's score, not the {self.kernel!r} kernel's")
        if self.kernel == "ddim" and self.ode_solver != "euler":
            raise ValueError("the ddim kernel has no higher-order ODE solver here; use ode_solver='euler'")
        if len(self.noise_levels) != self.num_steps:
            raise ValueError(f"noise_levels has {len(self.noise_levels)} entries for {self.num_steps} steps")
        if any(not level >= 0 for level in self.noise_levels):  # also rejects NaN
            raise ValueError(f"noise levels must be >= 0, got {self.noise_levels}")
        if self.std_scales and (len(self.std_scales) != self.num_steps or any(not v > 0 for v in self.std_scales)):
            raise ValueError(f"std_scales must be empty or {self.num_steps} values > 0, got {self.std_scales}")
        if self.std_scales and self.log_prob == "unnormalized":
            raise ValueError("std_scales widen a Gaussian transition; the unnormalized CPS score has none")
        _check_increasing(self.stored, self.num_steps, "stored")
        _check_increasing(self.trained, self.num_steps, "trained")
        deterministic = [i for i in self.stored if self.noise_levels[i] == 0]
        if deterministic:
            raise ValueError(f"stored steps {deterministic} have noise level 0 and hence no log-prob")
        if not set(self.trained) <= set(self.stored):
            raise ValueError(f"trained steps {sorted(set(self.trained) - set(self.stored))} are not stored")

    def std_scale(self, index: int) -> float:
        """The std multiplier of step ``index`` (1 unless ``std_scales`` says otherwise)."""
        return self.std_scales[index] if self.std_scales else 1.0

    @property
    def stochastic(self) -> tuple[int, ...]:
        """Indices of the steps with a noise level > 0."""
        return tuple(i for i, level in enumerate(self.noise_levels) if level > 0)


def _check_increasing(indices: tuple[int, ...], num_steps: int, name: str) -> None:
    if any(not 0 <= i < num_steps for i in indices):
        raise ValueError(f"{name} steps {indices} must lie in [0, {num_steps})")
    if any(a >= b for a, b in zip(indices, indices[1:])):
        raise ValueError(f"{name} steps {indices} must be strictly increasing")


def _window_plan(num_steps, noise_level, window, kernel, ode_solver) -> StepPlan:
    """SDE on ``range(*window)``, ODE elsewhere; the window is stored and trained."""
    steps = tuple(range(*window))
    levels = tuple(float(noise_level) if i in steps else 0.0 for i in range(num_steps))
    return StepPlan(num_steps, kernel, levels, steps, steps, ode_solver)


def _randint(low: int, high: int, generator: RandomSource) -> int:
    """Uniform integer in ``[low, high]`` (inclusive, like ``random.randint``)."""
    if isinstance(generator, torch.Generator):
        return int(torch.randint(low, high + 1, (), generator=generator))
    return (generator or random.Random()).randint(low, high)


def _check_noise(noise_level: float) -> None:
    if not noise_level > 0:
        raise ValueError(f"noise_level must be > 0 for a plan with stochastic steps, got {noise_level}")


# --- builders ----------------------------------------------------------------------------------------------------


def ode_plan(num_steps: int, kernel: str = "sde", ode_solver: str = "euler") -> StepPlan:
    """Every step deterministic and nothing stored: evaluation (flow_grpo evaluates with ``noise_level=0``).

    Args:
        num_steps: Number of steps (e.g. 40 for SD3.5 evaluation while training samples 10).
        kernel: Recorded on the plan only: deterministic steps follow the model's prediction type (Euler for flow
            models, DDIM eta=0 for epsilon / v models), so the default serves every family.
        ode_solver: ``"euler"`` or ``"dpm_solver_2m"``.
    """
    return StepPlan(num_steps, kernel, (0.0,) * num_steps, (), (), ode_solver)


def sde_plan(
    num_steps: int,
    noise_level: float,
    kernel: str = "sde",
    train_fraction: float = 1.0,
    include_last: bool = False,
) -> StepPlan:
    """Stochastic steps everywhere (but the last), all stored, the first ``train_fraction`` of them trained.

    Reference behaviour: flow_grpo's unified sampler with ``sde_window_size=0`` makes steps ``0..T-2``
    stochastic and the last one ODE; DanceGRPO drops the last step from training
    (docs/methods/grpo.md#denoising-reduction-and-trained-steps).
    The older ``train_sd3.py`` also noises the last step but trains ``int(T * 0.99) = T - 1`` steps in order,
    i.e. the same trained set. DDPO noises and trains every step: ``kernel="ddim", include_last=True``.

    Args:
        num_steps: Number of sampling steps ``T``.
        noise_level: Noise scale of every stochastic step (0.7 SD3.5, 0.9 FLUX, 0.8 CPS, DDPO eta 1.0).
        kernel: Stochastic kernel name.
        train_fraction: Fraction of the stored steps trained, in order from the noisiest (Flow-GRPO's
            ``timestep_fraction``, which drops the low-noise steps); ``int(len(stored) * train_fraction)`` steps.
        include_last: Make the last step stochastic too.
    """
    _check_noise(noise_level)
    stored = tuple(range(num_steps if include_last else num_steps - 1))
    num_train = int(len(stored) * train_fraction)
    if not 0 < train_fraction <= 1 or num_train == 0:
        raise ValueError(f"train_fraction={train_fraction} trains none of the {len(stored)} stochastic steps")
    levels = tuple(float(noise_level) if i in stored else 0.0 for i in range(num_steps))
    return StepPlan(num_steps, kernel, levels, stored, stored[:num_train])


def random_fraction_plan(
    num_steps: int,
    noise_level: float,
    train_fraction: float,
    generator: RandomSource = None,
    kernel: str = "sde",
    include_last: bool = False,
) -> StepPlan:
    """Like :func:`sde_plan`, but a random subset of ``int(len(stored) * train_fraction)`` steps is trained.

    ddpo-pytorch and DanceGRPO draw an independent permutation of the steps *per sample* and train its first
    ``int(T * timestep_fraction)`` entries (DanceGRPO: 0.6 of the ``T - 1`` non-final steps). This plan draws
    one subset shared by the batch; :func:`per_sample_train_steps` gives the per-sample draw.

    Args:
        num_steps: Number of sampling steps.
        noise_level: Noise scale of every stochastic step.
        train_fraction: Fraction of the stored steps trained.
        generator: ``random.Random`` or ``torch.Generator`` for the draw (reproducible when seeded).
        kernel: Stochastic kernel name.
        include_last: Make the last step stochastic too.
    """
    base = sde_plan(num_steps, noise_level, kernel, train_fraction, include_last)
    order = _permutation(len(base.stored), generator)
    trained = tuple(sorted(base.stored[j] for j in order[: len(base.trained)]))
    return StepPlan(num_steps, kernel, base.noise_levels, base.stored, trained)


def _permutation(n: int, generator: RandomSource) -> list[int]:
    if isinstance(generator, torch.Generator):
        return torch.randperm(n, generator=generator).tolist()
    order = list(range(n))
    (generator or random.Random()).shuffle(order)
    return order


def per_sample_train_steps(plan: StepPlan, batch_size: int, generator: torch.Generator | None = None) -> Tensor:
    """Per-sample random training steps, as ddpo-pytorch and DanceGRPO draw them.

    Each row is an independent random permutation of ``plan.stored`` truncated to ``len(plan.trained)``
    entries, so every sample trains the same number of steps, each chosen uniformly.

    Args:
        plan: The plan whose stored steps are drawn from.
        batch_size: Number of samples ``B``.
        generator: CPU ``torch.Generator`` for the draw.

    Returns:
        ``[B, len(plan.trained)]`` int64 tensor of step indices.
    """
    stored = torch.tensor(plan.stored, dtype=torch.long)
    rows = [stored[torch.randperm(len(stored), generator=generator)] for _ in range(batch_size)]
    return torch.stack(rows)[:, : len(plan.trained)]


def window_bounds(num_steps: int, window_range: tuple[int, int] | None = None) -> tuple[int, int]:
    """The ``(low, high)`` steps a random window lies in: ``window_range``, default ``(0, num_steps // 2)`` as
    flow_grpo's fast configs (``sde_window_range=(0, num_steps // 2)``)."""
    return window_range if window_range is not None else (0, num_steps // 2)


def random_window_plan(
    num_steps: int,
    noise_level: float,
    window_size: int,
    window_range: tuple[int, int] | None = None,
    generator: RandomSource = None,
    kernel: str = "sde",
    ode_solver: str = "euler",
) -> StepPlan:
    """Flow-GRPO-Fast: SDE on a window of ``window_size`` steps at a random start, ODE elsewhere.

    See docs/methods/grpo.md#flow-grpo-fast-window.

    ``start = randint(window_range[0], window_range[1] - window_size)`` (both ends inclusive, flow_grpo's
    ``random.randint``), drawn anew for each rollout; steps ``start .. start + window_size - 1`` are stochastic,
    stored and trained. flow_grpo's ``sde_window_size=0`` ("SDE everywhere but the last step") is
    :func:`sde_plan`.

    Args:
        num_steps: Number of sampling steps.
        noise_level: Noise scale inside the window.
        window_size: Number of stochastic steps (flow_grpo fast configs: 2-3).
        window_range: ``(low, high)`` range the window must lie in; default :func:`window_bounds`.
        generator: ``random.Random`` or ``torch.Generator`` for the start (reproducible when seeded).
        kernel: Stochastic kernel name.
        ode_solver: Solver outside the window.
    """
    _check_noise(noise_level)
    low, high = window_bounds(num_steps, window_range)
    if window_size < 1 or not 0 <= low <= high - window_size or high > num_steps:
        raise ValueError(f"a window of {window_size} steps does not fit in {(low, high)} of {num_steps} steps")
    start = _randint(low, high - window_size, generator)
    return _window_plan(num_steps, noise_level, (start, start + window_size), kernel, ode_solver)


def union_plan(plans: Sequence[StepPlan]) -> StepPlan:
    """One plan covering several chunks' plans (e.g. a Flow-GRPO-Fast window drawn for each rollout chunk): a step
    is stochastic, stored or trained when it is in any of them.

    The plans must agree on everything but their windows: step count, kernel, ODE solver, log-prob, and the noise
    level of every step that is stochastic in more than one, so that re-scoring a sample's own steps with the union
    plan uses the kernel it was sampled with.

    Raises:
        ValueError: no plans, or plans that disagree.
    """
    if not plans:
        raise ValueError("union_plan needs at least one plan")
    first = plans[0]
    if all(plan == first for plan in plans):
        return first
    shared = ("num_steps", "kernel", "ode_solver", "log_prob")
    for plan in plans[1:]:
        differing = [name for name in shared if getattr(plan, name) != getattr(first, name)]
        if differing:
            raise ValueError(f"the plans differ in {differing}; only their stochastic steps may differ")
    levels = []
    for i in range(first.num_steps):
        nonzero = {plan.noise_levels[i] for plan in plans} - {0.0}
        if len(nonzero) > 1:
            raise ValueError(f"the plans give step {i} different noise levels {sorted(nonzero)}")
        levels.append(nonzero.pop() if nonzero else 0.0)
    stored = tuple(sorted({i for plan in plans for i in plan.stored}))
    trained = tuple(sorted({i for plan in plans for i in plan.trained}))
    return dataclasses.replace(first, noise_levels=tuple(levels), stored=stored, trained=trained)


def sliding_window_start(
    iteration: int, window_end: int, shift_every: int = 25, stride: int = 1, roll_back: bool = True
) -> int:
    """First step of MixGRPO's progressive window at training ``iteration`` (0-based).

    MixGRPO's ``GRPOTrainingStates`` (``sample_strategy="progressive"``) as a pure function
    (docs/methods/grpo.md#mixgrpo-sliding-window): the window starts at step 0 and moves ``stride`` steps later
    every ``shift_every`` iterations
    (``iters_per_group``; ``stride`` is ``prog_overlap_step``, or the window size without overlap). Starts run
    over ``0, stride, 2 * stride, ...`` while they are ``< window_end``; after the last one the window goes back
    to 0 (``roll_back``) or stays at the last start. ``stride=0`` freezes it at 0 (MixGRPO-Flash*).

    Deviation: MixGRPO also visits ``start == window_end`` (an empty window, one shift interval without a
    trainable step) before rolling back; here the starts skip it.

    Args:
        iteration: Training iteration (number of optimiser iterations done before this rollout).
        window_end: Exclusive end of the steps a window may cover (MixGRPO: ``num_steps - 2``).
        shift_every: Iterations between two moves.
        stride: Steps per move.
        roll_back: Restart from 0 after the last start instead of staying there.
    """
    if iteration < 0 or shift_every < 1 or stride < 0 or window_end < 1:
        raise ValueError("need iteration >= 0, shift_every >= 1, stride >= 0 and window_end >= 1")
    if stride == 0:
        return 0
    num_starts = (window_end - 1) // stride + 1
    move = iteration // shift_every
    return stride * (move % num_starts if roll_back else min(move, num_starts - 1))


def sliding_window_plan(
    num_steps: int,
    noise_level: float,
    iteration: int,
    window_size: int = 4,
    shift_every: int = 25,
    stride: int = 1,
    roll_back: bool = True,
    kernel: str = "sde",
    ode_solver: str = "euler",
) -> StepPlan:
    """MixGRPO: SDE (stored and trained) on a window that slides with training, ODE before and after it.

    The window is ``[start, min(start + window_size, num_steps - 2))`` with ``start`` from
    :func:`sliding_window_start` (``window_end = num_steps - 2``, MixGRPO's ``max_timesteps``), so it shrinks
    near the end and the last two steps are never stochastic. Defaults are MixGRPO's script (25 steps, window 4,
    ``iters_per_group=25``, ``prog_overlap_step=1``, ``roll_back``, ``eta=0.7`` with the Flow-GRPO kernel).
    MixGRPO-Flash: ``ode_solver="dpm_solver_2m"`` (its ``post`` mode also re-spaces the steps after the window
    into fewer ones, which the plan does not do).

    Args:
        num_steps: Number of sampling steps (>= 3).
        noise_level: Noise scale inside the window.
        iteration: Training iteration (0-based).
        window_size: Window length (``group_size``).
        shift_every: Iterations between moves (``iters_per_group``).
        stride: Steps per move (``prog_overlap_step``; ``window_size`` reproduces ``prog_overlap=False``).
        roll_back: Restart from the first step after the last position.
        kernel: Stochastic kernel name.
        ode_solver: Solver outside the window.
    """
    _check_noise(noise_level)
    window_end = num_steps - 2
    if window_size < 1 or window_end < 1:
        raise ValueError(f"need window_size >= 1 and num_steps >= 3, got {window_size} and {num_steps}")
    start = sliding_window_start(iteration, window_end, shift_every, stride, roll_back)
    return _window_plan(num_steps, noise_level, (start, min(start + window_size, window_end)), kernel, ode_solver)
