"""Step kernels against diffusers' schedulers, the Gaussian density written out, and the PPO rescoring contract."""

import math

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

from diffalign.adapters.sd import ddim_alpha_prods
from diffalign.samplers.steps import (
    KERNELS,
    StepOutput,
    cps_step,
    ddim_step,
    dpm_solver_2m_step,
    flow_sde_const_step,
    flow_sde_step,
    ode_step,
    predict_x0,
)


FLOW_KERNELS = {"sde": flow_sde_step, "const": flow_sde_const_step, "cps": cps_step}


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _flow_scheduler(num_steps=10):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(num_steps)
    return scheduler


# --- zero noise == the scheduler's own step ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["sde", "const", "cps", "ode", "dpm_first_order"])
def test_flow_kernels_at_zero_noise_equal_flow_match_euler_step(name):
    scheduler = _flow_scheduler()
    sample = _randn(2, 4, 8, 8)
    for i, t in enumerate(scheduler.timesteps):
        velocity = _randn(2, 4, 8, 8, seed=i + 1)
        expected = scheduler.step(velocity, t, sample).prev_sample
        sigma, sigma_next = scheduler.sigmas[i], scheduler.sigmas[i + 1]
        if name == "ode":
            out = ode_step(velocity, sample, sigma, sigma_next)
        elif name == "dpm_first_order":
            out = dpm_solver_2m_step(velocity, sample, sigma, sigma_next)
        else:
            out = FLOW_KERNELS[name](velocity, sample, sigma, sigma_next, 0.0)
        torch.testing.assert_close(out.prev_sample, expected, atol=1e-6, rtol=0)
        assert out.log_prob is None
        sample = expected


def test_flow_kernels_broadcast_per_sample_sigmas_over_packed_latents():
    # FLUX packs latents as [B, L, C]; per-sample sigmas are [B] tensors.
    sample, velocity = _randn(3, 16, 64), _randn(3, 16, 64, seed=1)
    sigma, sigma_next = torch.tensor([1.0, 0.6, 0.3]), torch.tensor([0.8, 0.5, 0.0])
    prev_x0, sigma_prev = _randn(3, 16, 64, seed=2), torch.tensor([1.0, 0.7, 0.4])  # history for the 2M step
    out = flow_sde_step(velocity, sample, sigma, sigma_next, 0.0)
    sigma_dpm = torch.tensor([0.9, 0.6, 0.3])  # < sigma_prev
    dpm = dpm_solver_2m_step(velocity, sample, sigma_dpm, sigma_next, prev_x0, sigma_prev)
    for b in range(3):
        row = ode_step(velocity[b : b + 1], sample[b : b + 1], float(sigma[b]), float(sigma_next[b]))
        torch.testing.assert_close(out.prev_sample[b : b + 1], row.prev_sample, atol=1e-6, rtol=0)
        dpm_row = dpm_solver_2m_step(
            velocity[b : b + 1],
            sample[b : b + 1],
            float(sigma_dpm[b]),
            float(sigma_next[b]),
            prev_x0[b : b + 1],
            float(sigma_prev[b]),
        )
        torch.testing.assert_close(dpm.prev_sample[b : b + 1], dpm_row.prev_sample, atol=1e-6, rtol=0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("set_alpha_to_one", [False, True])
def test_ddim_at_eta_zero_equals_ddim_scheduler_step(prediction_type, set_alpha_to_one):
    # SD1.5-style config; set_alpha_to_one=True exercises the final_alpha_cumprod branch with alpha_prev = 1.
    scheduler = DDIMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        set_alpha_to_one=set_alpha_to_one,
        steps_offset=1,
        prediction_type=prediction_type,
    )
    scheduler.set_timesteps(20)
    sample = _randn(2, 4, 8, 8)
    for i, t in enumerate(scheduler.timesteps):
        model_output = _randn(2, 4, 8, 8, seed=i + 1)
        expected = scheduler.step(model_output, t, sample, eta=0.0).prev_sample
        alpha_prod_t, alpha_prod_prev = ddim_alpha_prods(scheduler, t)
        out = ddim_step(model_output, sample, alpha_prod_t, alpha_prod_prev, 0.0, prediction_type)
        torch.testing.assert_close(out.prev_sample, expected, atol=1e-6, rtol=0)
        assert out.log_prob is None
        sample = expected


def test_ddim_with_eta_draws_the_same_noise_as_ddim_scheduler():
    # Both draw torch.randn(shape, generator) on the CPU: equal seeds give the same stochastic step.
    scheduler = DDIMScheduler(clip_sample=True, set_alpha_to_one=False)
    scheduler.set_timesteps(10)
    sample, model_output = _randn(2, 4, 8, 8), _randn(2, 4, 8, 8, seed=1)
    t = scheduler.timesteps[3]
    expected = scheduler.step(model_output, t, sample, eta=1.0, generator=torch.Generator().manual_seed(7))
    out = ddim_step(
        model_output,
        sample,
        *ddim_alpha_prods(scheduler, t),
        eta=1.0,
        generator=torch.Generator().manual_seed(7),
        clip_sample_range=1.0,
    )
    torch.testing.assert_close(out.prev_sample, expected.prev_sample, atol=1e-6, rtol=0)


def test_ddim_alpha_prods_final_step():
    for set_alpha_to_one, expected in [(True, 1.0), (False, None)]:
        scheduler = DDIMScheduler(set_alpha_to_one=set_alpha_to_one)
        scheduler.set_timesteps(50)
        last = scheduler.timesteps[-1]
        alpha_prod_t, alpha_prod_prev = ddim_alpha_prods(scheduler, last)
        assert alpha_prod_t == scheduler.alphas_cumprod[last]
        assert alpha_prod_prev == (expected if expected is not None else scheduler.alphas_cumprod[0])
    # [B] timesteps give [B] alphas.
    prods = ddim_alpha_prods(scheduler, scheduler.timesteps[[0, -1]])
    assert prods[1].shape == (2,) and prods[1][1] == scheduler.alphas_cumprod[0]


def test_dpm_solver_2m_matches_diffusers_multistep_scheduler():
    scheduler = DPMSolverMultistepScheduler(
        use_flow_sigmas=True,
        prediction_type="flow_prediction",
        flow_shift=3.0,
        solver_order=2,
        algorithm_type="dpmsolver++",
        solver_type="midpoint",
    )
    scheduler.set_timesteps(12)
    sample = expected = _randn(2, 3, 4, 4)
    prev_x0 = sigma_prev = None
    weight = _randn(3, 3, seed=99) * 0.3  # a fixed linear "model" so both paths see velocities of their state
    for i, t in enumerate(scheduler.timesteps):
        sigma, sigma_next = scheduler.sigmas[i], scheduler.sigmas[i + 1]
        expected = scheduler.step(torch.einsum("ij,bjhw->bihw", weight, expected), t, expected).prev_sample
        velocity = torch.einsum("ij,bjhw->bihw", weight, sample)
        sample_next = dpm_solver_2m_step(velocity, sample, sigma, sigma_next, prev_x0, sigma_prev).prev_sample
        prev_x0, sigma_prev, sample = predict_x0(velocity, sample, sigma), sigma, sample_next
        torch.testing.assert_close(sample, expected, atol=1e-6, rtol=0)


# --- log-prob == the Gaussian density, written out independently ------------------------------------------------


def _expected_mean_std(name, velocity, sample, sigma, sigma_next, level):
    """The formulas of docs/samplers.md#step-kernels in float64, separately from the kernels."""
    v, x = velocity.double(), sample.double()
    dt = sigma_next - sigma
    if name == "sde":
        std_dev_t = level * math.sqrt(sigma / (1 - sigma))
        mean = x * (1 + std_dev_t**2 / (2 * sigma) * dt) + v * (1 + std_dev_t**2 * (1 - sigma) / (2 * sigma)) * dt
        return mean, std_dev_t * math.sqrt(-dt)
    if name == "const":
        x0 = x - sigma * v
        score = -(x - x0 * (1 - sigma)) / sigma**2
        return x + dt * v - 0.5 * level**2 * score * dt, level * math.sqrt(-dt)
    if name == "cps":
        std = sigma_next * math.sin(level * math.pi / 2)
        mean = (x - sigma * v) * (1 - sigma_next) + (x + v * (1 - sigma)) * math.sqrt(sigma_next**2 - std**2)
        return mean, std
    raise AssertionError(name)


@pytest.mark.parametrize("name,level", [("sde", 0.7), ("const", 0.3), ("cps", 0.8)])
def test_flow_log_prob_equals_gaussian_density(name, level):
    sample, velocity = _randn(4, 2, 6, 6), _randn(4, 2, 6, 6, seed=1)
    sigma, sigma_next = 0.75, 0.6
    out = FLOW_KERNELS[name](velocity, sample, sigma, sigma_next, level, generator=torch.Generator().manual_seed(3))
    mean, std = _expected_mean_std(name, velocity, sample, sigma, sigma_next, level)
    density = torch.distributions.Normal(mean, std).log_prob(out.prev_sample.double()).mean(dim=(1, 2, 3))
    torch.testing.assert_close(out.mean.double(), mean, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.as_tensor(out.std).double().expand_as(mean), torch.full_like(mean, std))
    torch.testing.assert_close(out.log_prob.double(), density, atol=1e-4, rtol=1e-5)
    # The draw really has that std: the standardised residual is ~N(0, 1) over 576 values.
    z = (out.prev_sample.double() - mean) / std
    assert abs(z.std().item() - 1) < 0.15


def test_ddim_log_prob_equals_gaussian_density():
    sample, eps = _randn(4, 2, 6, 6), _randn(4, 2, 6, 6, seed=1)
    a_t, a_prev, eta = 0.3, 0.5, 1.0
    out = ddim_step(eps, sample, a_t, a_prev, eta, generator=torch.Generator().manual_seed(3))
    x0 = (sample.double() - math.sqrt(1 - a_t) * eps.double()) / math.sqrt(a_t)
    std = eta * math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
    mean = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev - std**2) * eps.double()
    density = torch.distributions.Normal(mean, std).log_prob(out.prev_sample.double()).mean(dim=(1, 2, 3))
    torch.testing.assert_close(out.log_prob.double(), density, atol=1e-4, rtol=1e-5)


def test_flow_sde_at_sigma_one_uses_next_sigma_like_flow_grpo():
    # flow_grpo substitutes scheduler.sigmas[1] for sigma == 1 (only the first step), which is sigma_next there.
    sample, velocity = _randn(2, 8), _randn(2, 8, seed=1)
    out = flow_sde_step(velocity, sample, 1.0, 0.9, 0.7)
    assert torch.isfinite(out.log_prob).all()
    torch.testing.assert_close(torch.as_tensor(out.std), torch.tensor(0.7 * math.sqrt(1 / 0.1) * math.sqrt(0.1)))


def test_cps_unnormalized_log_prob_is_flow_grpo_score():
    sample, velocity = _randn(2, 8), _randn(2, 8, seed=1)
    out = cps_step(velocity, sample, 0.5, 0.4, 0.8, generator=torch.Generator().manual_seed(0))
    raw = cps_step(velocity, sample, 0.5, 0.4, 0.8, prev_sample=out.prev_sample, unnormalized_log_prob=True)
    torch.testing.assert_close(raw.log_prob, -((out.prev_sample - out.mean) ** 2).mean(dim=1))


# --- rescoring contract, generators, dtypes ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["sde", "const", "cps", "ddim"])
def test_prev_sample_given_draws_no_noise_and_rescoring_reproduces_log_prob(name):
    sample, model_output = _randn(3, 4, 5), _randn(3, 4, 5, seed=1)
    args = (0.3, 0.5, 1.0) if name == "ddim" else (0.8, 0.7, 0.7)
    generator = torch.Generator().manual_seed(5)
    drawn = KERNELS[name](model_output, sample, *args, generator=generator)
    state = generator.get_state()
    torch.manual_seed(0)
    global_state = torch.get_rng_state()
    rescored = KERNELS[name](model_output, sample, *args, prev_sample=drawn.prev_sample)
    assert torch.equal(torch.get_rng_state(), global_state) and torch.equal(generator.get_state(), state)
    assert torch.equal(rescored.prev_sample, drawn.prev_sample)
    torch.testing.assert_close(rescored.log_prob, drawn.log_prob, atol=0, rtol=0)  # on-policy ratio == 1
    # A different model output scores the same transition lower on average (it is not its mean).
    other = KERNELS[name](model_output + 0.5, sample, *args, prev_sample=drawn.prev_sample)
    assert (other.log_prob < drawn.log_prob).all()


def test_log_prob_gradient_flows_through_mean_only():
    velocity = _randn(2, 8, seed=1).requires_grad_()
    out = flow_sde_step(velocity, _randn(2, 8), 0.8, 0.7, 0.7, generator=torch.Generator().manual_seed(0))
    rescored = flow_sde_step(velocity, _randn(2, 8), 0.8, 0.7, 0.7, prev_sample=out.prev_sample)
    rescored.log_prob.sum().backward()
    assert velocity.grad is not None and velocity.grad.abs().sum() > 0


def test_generator_list_draws_per_sample():
    sample, velocity = _randn(3, 4, 5), _randn(3, 4, 5, seed=1)
    seeds = [11, 12, 13]
    batch = flow_sde_step(velocity, sample, 0.8, 0.7, 0.7, generator=[torch.Generator().manual_seed(s) for s in seeds])
    for b, seed in enumerate(seeds):
        alone = flow_sde_step(
            velocity[b : b + 1], sample[b : b + 1], 0.8, 0.7, 0.7, generator=torch.Generator().manual_seed(seed)
        )
        torch.testing.assert_close(batch.prev_sample[b : b + 1], alone.prev_sample, atol=0, rtol=0)


def test_kernels_compute_in_fp32_from_half_precision_inputs():
    sample, velocity = _randn(2, 4, 8).bfloat16(), _randn(2, 4, 8, seed=1).bfloat16()
    out = flow_sde_step(velocity, sample, 0.8, 0.7, 0.7, generator=torch.Generator().manual_seed(0))
    assert out.prev_sample.dtype == out.mean.dtype == out.log_prob.dtype == torch.float32
    assert isinstance(out, StepOutput)


def test_zero_noise_steps_have_no_log_prob():
    sample, velocity = _randn(2, 8), _randn(2, 8, seed=1)
    assert cps_step(velocity, sample, 0.2, 0.0, 0.8).log_prob is None  # last CPS step: std = sigma_next * ... = 0
    assert ddim_step(velocity, sample, 0.99, 1.0, 1.0).log_prob is None  # into alpha_prev = 1: variance 0
    assert flow_sde_step(velocity, sample, 0.5, 0.4, torch.zeros(2)).log_prob is None
    with pytest.raises(ValueError, match="zero noise"):
        flow_sde_step(velocity, sample, 0.5, 0.4, torch.tensor([0.0, 0.7]))
    with pytest.raises(ValueError, match="not both"):
        flow_sde_step(velocity, sample, 0.5, 0.4, 0.7, prev_sample=sample, generator=torch.Generator())


# --- order of the ODE solvers on an exactly solvable flow ------------------------------------------------------

# Data x0 ~ N(MU, S^2): x_sigma = (1 - sigma) x0 + sigma eps is Gaussian with mean m(sigma) = (1 - sigma) MU and
# variance V(sigma) = (1 - sigma)^2 S^2 + sigma^2, so E[eps - x0 | x] = (sigma - (1 - sigma) S^2) / V (x - m) - MU,
# and the ODE flow map is affine: x(sigma') = m(sigma') + sqrt(V(sigma') / V(sigma)) (x(sigma) - m(sigma)).
MU, S = 0.8, 0.5


def _gaussian_velocity(x, sigma):
    variance = (1 - sigma) ** 2 * S**2 + sigma**2
    return (sigma - (1 - sigma) * S**2) / variance * (x - (1 - sigma) * MU) - MU


def _ode_error(solver, num_steps, sigma_end=0.1):
    # Uniform schedule down to sigma_end = 0.1: the order is measured where lambda = log((1 - s) / s) is finite.
    sigmas = torch.linspace(1.0, sigma_end, num_steps + 1, dtype=torch.float64).tolist()
    start = torch.linspace(-2, 2, 11)
    x, prev_x0, sigma_prev = start, None, None
    for sigma, sigma_next in zip(sigmas, sigmas[1:]):
        velocity = _gaussian_velocity(x, sigma)
        if solver == "euler":
            x_next = ode_step(velocity, x, sigma, sigma_next).prev_sample
        else:
            x_next = dpm_solver_2m_step(velocity, x, sigma, sigma_next, prev_x0, sigma_prev).prev_sample
        prev_x0, sigma_prev, x = predict_x0(velocity, x, sigma), sigma, x_next

    # From sigma = 1 (m = 0, V = 1) the exact solution is m(sigma_end) + sqrt(V(sigma_end)) * x(1).
    exact = (1 - sigma_end) * MU + math.sqrt((1 - sigma_end) ** 2 * S**2 + sigma_end**2) * start.double()
    return (x.double() - exact).abs().max().item()


def test_dpm_solver_2m_is_second_order_and_euler_first_order():
    # Halving the step divides the global error by 2^p. Measured ratios: Euler 1.97-1.99, 2M 3.9-4.1 for
    # 20 -> 40 -> 80 steps; the bounds leave room for the pre-asymptotic regime but separate p = 1 from p = 2.
    euler = [_ode_error("euler", n) for n in (20, 40, 80)]
    dpm = [_ode_error("dpm", n) for n in (20, 40, 80)]
    for coarse, fine in zip(euler, euler[1:]):
        assert 1.7 < coarse / fine < 2.3
    for coarse, fine in zip(dpm, dpm[1:]):
        assert 3.3 < coarse / fine < 4.8
    assert dpm[-1] < euler[-1] / 20
