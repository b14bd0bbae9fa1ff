"""The stochastic kernels keep the ODE's marginals: checked on analytic models whose predictions are exact.

Data is a 1-D Gaussian mixture, for which the Bayes-optimal model outputs are closed-form (derived below), so
any deviation of the final distribution comes from the kernel or from discretisation, not from a network.
Statistics use 20,000 samples; each tolerance is written next to the assertion as (sampling error) +
(discretisation bias), both computed or measured. The observed statistics sit at 1/4 to 1/2 of the tolerances,
and a 15% error in a noise std or a 25% error in a drift correction fails (checked by mutating the kernels).
"""

import math

import pytest
import torch
from diffusers import DDIMScheduler

from diffalign.adapters.sd import ddim_alpha_prods
from diffalign.samplers.steps import KERNELS, cps_step, ddim_step, ode_step


NUM_SAMPLES = 20_000
WEIGHTS = torch.tensor([0.3, 0.7])
MEANS = torch.tensor([-1.5, 1.0])
STDS = torch.tensor([0.4, 0.6])

# Mixture moments: mean m = sum w mu; variance = sum w (s^2 + mu^2) - m^2; the 4th central moment gives the
# standard error of the sample variance, sqrt((mu4 - var^2) / n).
DATA_MEAN = float((WEIGHTS * MEANS).sum())
DATA_VAR = float((WEIGHTS * (STDS**2 + MEANS**2)).sum() - DATA_MEAN**2)
_CENTRED = MEANS - DATA_MEAN
DATA_MU4 = float((WEIGHTS * (_CENTRED**4 + 6 * _CENTRED**2 * STDS**2 + 3 * STDS**4)).sum())
MEAN_SE = math.sqrt(DATA_VAR / NUM_SAMPLES)  # ~0.009
VAR_SE = math.sqrt((DATA_MU4 - DATA_VAR**2) / NUM_SAMPLES)  # ~0.011
# Kolmogorov-Smirnov critical values at alpha = 1e-5: c = sqrt(-ln(alpha / 2) / 2) = 2.47, times sqrt(1 / n)
# (one sample) or sqrt(2 / n) (two samples of n). False alarm rate 1e-5 per assertion, before the bias allowance.
KS_ONE = 2.47 * math.sqrt(1 / NUM_SAMPLES)  # 0.0175
KS_TWO = 2.47 * math.sqrt(2 / NUM_SAMPLES)  # 0.0247


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    # Tiny 1-D tensors: with threads contended by other processes, intra-op parallelism is 100x slower here.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _sample_data(n, generator):
    component = torch.multinomial(WEIGHTS, n, replacement=True, generator=generator)
    return MEANS[component] + STDS[component] * torch.randn(n, generator=generator)


def _data_cdf(x):
    z = (x[:, None] - MEANS) / (STDS * math.sqrt(2))
    return (WEIGHTS * 0.5 * (1 + torch.erf(z))).sum(-1)


def _ks_one_sample(x):
    x = x.sort().values.double()
    cdf, n = _data_cdf(x).double(), len(x)
    ranks = torch.arange(1, n + 1, dtype=torch.float64) / n
    return max((ranks - cdf).abs().max().item(), (cdf - (ranks - 1 / n)).abs().max().item())


def _ks_two_sample(x, y):
    grid = torch.cat([x, y]).sort().values
    cdf_x = torch.searchsorted(x.sort().values, grid, right=True) / len(x)
    cdf_y = torch.searchsorted(y.sort().values, grid, right=True) / len(y)
    return (cdf_x - cdf_y).abs().max().item()


def _assert_matches_data(x, bias_mean, bias_var, bias_ks):
    assert abs(x.mean().item() - DATA_MEAN) < 5 * MEAN_SE + bias_mean
    assert abs(x.var().item() - DATA_VAR) < 5 * VAR_SE + bias_var
    assert _ks_one_sample(x) < KS_ONE + bias_ks


# --- flow matching -------------------------------------------------------------------------------------------------

# x_sigma = (1 - sigma) x0 + sigma eps. Given component k, (x0, eps, x_sigma) are jointly Gaussian with
# x_sigma ~ N(m_k, V_k), m_k = (1 - sigma) mu_k, V_k = (1 - sigma)^2 s_k^2 + sigma^2, and
#   E[x0 | x, k] = mu_k + (1 - sigma) s_k^2 / V_k (x - m_k),   E[eps | x, k] = sigma / V_k (x - m_k).
# The posterior over components is r_k(x) ∝ w_k N(x; m_k, V_k), so the exact velocity is
#   v(x, sigma) = E[eps - x0 | x] = sum_k r_k(x) (E[eps | x, k] - E[x0 | x, k]).


def _flow_velocity(x, sigma):
    variance = (1 - sigma) ** 2 * STDS**2 + sigma**2
    offset = x[:, None] - (1 - sigma) * MEANS
    log_resp = torch.log(WEIGHTS) - 0.5 * torch.log(variance) - offset**2 / (2 * variance)
    eps = sigma / variance * offset
    x0 = MEANS + (1 - sigma) * STDS**2 / variance * offset
    return (torch.softmax(log_resp, dim=-1) * (eps - x0)).sum(-1)


FLOW_STEPS = 200  # uniform sigmas; Euler's bias on the variance at 200 steps is ~0.01 (measured)


def _run_flow(kernel, noise_level, seed):
    """Sample from pure noise at sigma = 1 to 0; the last step is ODE, as in the default plans."""
    generator = torch.Generator().manual_seed(seed)
    sigmas = torch.linspace(1.0, 0.0, FLOW_STEPS + 1, dtype=torch.float64).tolist()
    x = torch.randn(NUM_SAMPLES, generator=generator)
    for i, (sigma, sigma_next) in enumerate(zip(sigmas, sigmas[1:])):
        velocity = _flow_velocity(x, sigma)
        if kernel == "ode" or i == FLOW_STEPS - 1:
            x = ode_step(velocity, x, sigma, sigma_next).prev_sample
        else:
            x = KERNELS[kernel](velocity, x, sigma, sigma_next, noise_level, generator=generator).prev_sample
    return x


@pytest.fixture(scope="module")
def ode_samples(_single_thread):
    return _run_flow("ode", 0.0, seed=1000)


def test_ode_reaches_the_data_distribution(ode_samples):
    # Discretisation bias at 200 Euler steps (measured): |d mean| < 0.005, |d var| < 0.03, KS < 0.003.
    _assert_matches_data(ode_samples, bias_mean=0.005, bias_var=0.03, bias_ks=0.003)


@pytest.mark.parametrize(
    "kernel,noise_level",
    [("sde", 0.3), ("sde", 0.7), ("sde", 1.5), ("const", 0.3), ("const", 1.0)],
)
def test_flow_sde_kernels_keep_the_ode_marginals(kernel, noise_level, ode_samples):
    x = _run_flow(kernel, noise_level, seed=1)
    # Euler-Maruyama bias at 200 steps (measured over seeds): |d var| < 0.03, KS < 0.005.
    _assert_matches_data(x, bias_mean=0.005, bias_var=0.03, bias_ks=0.005)
    assert _ks_two_sample(x, ode_samples) < KS_TWO + 0.005


def test_cps_preserves_coefficients_given_the_true_x0():
    # CPS is the DDIM posterior in flow coordinates: fed the velocity of the true (x0, eps) pair it maps
    # x_sigma = (1 - sigma) x0 + sigma eps to (1 - sigma') x0 + sigma' eps' with eps' ~ N(0, 1) independent of x0,
    # for any noise level: the marginal at sigma' is exact.
    generator = torch.Generator().manual_seed(2)
    x0 = _sample_data(NUM_SAMPLES, generator)
    eps = torch.randn(NUM_SAMPLES, generator=generator)
    sigma, sigma_next = 0.7, 0.4
    for noise_level in (0.3, 0.8, 1.0):
        out = cps_step(eps - x0, (1 - sigma) * x0 + sigma * eps, sigma, sigma_next, noise_level, generator=generator)
        new_eps = (out.prev_sample - (1 - sigma_next) * x0) / sigma_next
        # Mean 0 and variance 1 within 5 standard errors (1/sqrt(n) and sqrt(2/n)); correlation with x0 within
        # 5/sqrt(n).
        assert abs(new_eps.mean().item()) < 5 / math.sqrt(NUM_SAMPLES)
        assert abs(new_eps.var().item() - 1) < 5 * math.sqrt(2 / NUM_SAMPLES)
        assert abs(torch.corrcoef(torch.stack([new_eps, x0]))[0, 1].item()) < 5 / math.sqrt(NUM_SAMPLES)


def test_cps_with_the_posterior_mean_shrinks_the_variance_as_predicted():
    # With the Bayes-optimal velocity (a posterior *mean*), CPS does not keep the ODE marginals: each step
    # replaces a fraction sin^2(a pi / 2) of the noise but re-uses eps_hat = E[eps | x] for the rest. For Gaussian
    # data N(0, S2) and x ~ N(0, V), V = (1 - sigma)^2 S2 + sigma^2 (the exact marginal), the step is linear:
    #   Var(x') = ((1 - sigma') (1 - sigma) S2 + sigma' c sigma)^2 / V + sigma'^2 s^2,  c, s = cos, sin(a pi / 2),
    # below the ODE's (1 - sigma')^2 S2 + sigma'^2 unless a = 0. The kernel must reproduce this closed form.
    s2, sigma, sigma_next = 0.25, 0.6, 0.5
    generator = torch.Generator().manual_seed(3)
    variance = (1 - sigma) ** 2 * s2 + sigma**2
    x = math.sqrt(variance) * torch.randn(NUM_SAMPLES, generator=generator)
    velocity = (sigma - (1 - sigma) * s2) / variance * x  # the Gaussian case of _flow_velocity
    for noise_level in (0.5, 0.8):
        c, s = math.cos(noise_level * math.pi / 2), math.sin(noise_level * math.pi / 2)
        predicted = ((1 - sigma_next) * (1 - sigma) * s2 + sigma_next * c * sigma) ** 2 / variance + (
            sigma_next * s
        ) ** 2
        out = cps_step(velocity, x, sigma, sigma_next, noise_level, generator=generator)
        # Sample variance of a Gaussian: standard error predicted * sqrt(2 / n); 5 of them.
        assert abs(out.prev_sample.var().item() - predicted) < 5 * predicted * math.sqrt(2 / NUM_SAMPLES)
        assert predicted < (1 - sigma_next) ** 2 * s2 + sigma_next**2 - 0.01  # a real deficit, not noise


# --- epsilon prediction (DDIM / DDPO) --------------------------------------------------------------------------------

# x_t = sqrt(a) x0 + sqrt(1 - a) eps with a = alphas_cumprod[t]. Given component k, x_t ~ N(sqrt(a) mu_k, V_k),
# V_k = a s_k^2 + 1 - a, and E[eps | x, k] = sqrt(1 - a) / V_k (x - sqrt(a) mu_k); the exact epsilon model is
# the responsibility-weighted sum, as for the flow above.


def _eps_model(x, alpha_prod):
    variance = alpha_prod * STDS**2 + 1 - alpha_prod
    offset = x[:, None] - math.sqrt(alpha_prod) * MEANS
    log_resp = torch.log(WEIGHTS) - 0.5 * torch.log(variance) - offset**2 / (2 * variance)
    return (torch.softmax(log_resp, dim=-1) * (math.sqrt(1 - alpha_prod) / variance * offset)).sum(-1)


DDIM_STEPS = 500  # DDPM-like (eta = 1) steps converge slower than DDIM's; bias at 500 (measured): |d var| < 0.03


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_reaches_the_data_distribution_for_any_eta(eta):
    scheduler = DDIMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False, set_alpha_to_one=True
    )
    scheduler.set_timesteps(DDIM_STEPS)
    generator = torch.Generator().manual_seed(4)
    # Start from the exact marginal at the first timestep (alpha_prod ~ 0.005, not exactly pure noise).
    alpha_first = float(scheduler.alphas_cumprod[scheduler.timesteps[0]])
    x0 = _sample_data(NUM_SAMPLES, generator)
    x = math.sqrt(alpha_first) * x0 + math.sqrt(1 - alpha_first) * torch.randn(NUM_SAMPLES, generator=generator)
    for t in scheduler.timesteps:
        alpha_prod_t, alpha_prod_prev = ddim_alpha_prods(scheduler, t)
        eps = _eps_model(x, float(alpha_prod_t))
        x = ddim_step(eps, x, alpha_prod_t, alpha_prod_prev, eta, generator=generator).prev_sample
    _assert_matches_data(x, bias_mean=0.005, bias_var=0.03, bias_ks=0.005)
