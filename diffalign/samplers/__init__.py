"""The ODE-to-SDE sampler layer: stateless fp32 step kernels, step plans and the one rollout loop."""

from diffalign.samplers.plan import (
    StepPlan,
    ode_plan,
    per_sample_train_steps,
    random_fraction_plan,
    random_window_plan,
    sde_plan,
    sliding_window_plan,
)
from diffalign.samplers.rollout import (
    GradientPath,
    InitialNoise,
    Trajectory,
    encode_prompts,
    rollout,
    step_transition,
    transition_log_probs,
)
from diffalign.samplers.steps import (
    KERNELS,
    StepOutput,
    cps_step,
    ddim_step,
    dpm_solver_2m_step,
    flow_sde_const_step,
    flow_sde_step,
    gaussian_log_prob,
    ode_step,
)


__all__ = [
    "KERNELS",
    "GradientPath",
    "InitialNoise",
    "StepOutput",
    "StepPlan",
    "Trajectory",
    "cps_step",
    "ddim_step",
    "dpm_solver_2m_step",
    "encode_prompts",
    "flow_sde_const_step",
    "flow_sde_step",
    "gaussian_log_prob",
    "ode_plan",
    "ode_step",
    "per_sample_train_steps",
    "random_fraction_plan",
    "random_window_plan",
    "rollout",
    "sde_plan",
    "sliding_window_plan",
    "step_transition",
    "transition_log_probs",
]
