"""Step plans: validation, the reference recipes, and how the windows move."""

import random

import pytest
import torch

from diffalign.samplers.plan import (
    StepPlan,
    ode_plan,
    per_sample_train_steps,
    random_fraction_plan,
    random_window_plan,
    sde_plan,
    sliding_window_plan,
    sliding_window_start,
)


def test_ode_plan_is_deterministic_and_stores_nothing():
    plan = ode_plan(40, ode_solver="dpm_solver_2m")
    assert plan.noise_levels == (0.0,) * 40 and plan.stored == () and plan.trained == () and plan.stochastic == ()
    assert ode_plan(50, kernel="ddim").kernel == "ddim"


def test_sde_plan_flow_grpo_default_and_in_order_fraction():
    plan = sde_plan(10, 0.7)
    assert plan.noise_levels == (0.7,) * 9 + (0.0,)  # the last step is ODE
    assert plan.stored == plan.trained == tuple(range(9))
    assert sde_plan(10, 0.7, train_fraction=0.5).trained == (0, 1, 2, 3)  # in order: the noisiest steps
    ddpo = sde_plan(50, 1.0, kernel="ddim", include_last=True)
    assert ddpo.stochastic == ddpo.stored == ddpo.trained == tuple(range(50))
    with pytest.raises(ValueError, match="trains none"):
        sde_plan(10, 0.7, train_fraction=0.05)


def test_random_fraction_plan_is_reproducible_and_covers_all_steps():
    # DanceGRPO: 16 steps, the last dropped, 0.6 of the remaining 15 trained -> 9.
    plans = [random_fraction_plan(16, 0.3, 0.6, random.Random(seed), kernel="const") for seed in range(40)]
    assert all(len(p.trained) == 9 and set(p.trained) <= set(range(15)) for p in plans)
    assert plans[0] == random_fraction_plan(16, 0.3, 0.6, random.Random(0), kernel="const")
    assert random_fraction_plan(16, 0.3, 0.6, torch.Generator().manual_seed(1)).trained == (
        random_fraction_plan(16, 0.3, 0.6, torch.Generator().manual_seed(1)).trained
    )
    assert set().union(*(p.trained for p in plans)) == set(range(15))  # not stuck on a fixed subset
    assert len({p.trained for p in plans}) > 1


def test_per_sample_train_steps_draws_independent_subsets():
    plan = sde_plan(16, 0.3, kernel="const", train_fraction=0.6)
    steps = per_sample_train_steps(plan, batch_size=64, generator=torch.Generator().manual_seed(0))
    assert steps.shape == (64, 9) and steps.dtype == torch.long
    assert all(len(set(row.tolist())) == 9 and set(row.tolist()) <= set(plan.stored) for row in steps)
    assert len({tuple(row.tolist()) for row in steps}) > 1


def test_random_window_stores_and_trains_only_the_window():
    for seed in range(50):
        plan = random_window_plan(10, 0.8, window_size=3, window_range=(0, 5), generator=random.Random(seed))
        start = plan.stored[0]
        window = tuple(range(start, start + 3))
        assert plan.stored == plan.trained == plan.stochastic == window
        assert 0 <= start <= 2  # randint(0, 5 - 3), inclusive
        assert all(level == (0.8 if i in window else 0.0) for i, level in enumerate(plan.noise_levels))
    starts = {random_window_plan(10, 0.8, 3, (0, 5), random.Random(s)).stored[0] for s in range(50)}
    assert starts == {0, 1, 2}  # both ends of the inclusive range are reached
    assert random_window_plan(10, 0.8, 2, generator=torch.Generator().manual_seed(3)).stored[-1] < 5  # (0, T // 2)
    with pytest.raises(ValueError, match="does not fit"):
        random_window_plan(10, 0.8, window_size=6, window_range=(0, 5))


def test_sliding_window_moves_by_stride_every_shift_interval_and_rolls_back():
    # MixGRPO script: 25 steps -> window_end 23, window 4, moves 1 step every 25 iterations, roll_back.
    starts = [sliding_window_start(it, window_end=23, shift_every=25, stride=1) for it in range(0, 25 * 24, 25)]
    assert starts == list(range(23)) + [0]  # 0..22, then back to 0
    assert [sliding_window_start(it, 23) for it in (0, 24, 25, 49, 50)] == [0, 0, 1, 1, 2]
    # Without overlap the stride is the window size; without roll_back the window stays at its last start.
    assert [sliding_window_start(k * 10, 23, 10, stride=4) for k in range(8)] == [0, 4, 8, 12, 16, 20, 0, 4]
    assert sliding_window_start(10_000, 23, 10, stride=4, roll_back=False) == 20
    assert sliding_window_start(10_000, 23, stride=0) == 0  # MixGRPO-Flash*: frozen


def test_sliding_window_plan_stores_only_the_window_and_shrinks_at_the_end():
    plan = sliding_window_plan(25, 0.7, iteration=60)  # third position: start 2
    assert plan.stored == plan.trained == plan.stochastic == (2, 3, 4, 5)
    late = sliding_window_plan(25, 0.7, iteration=25 * 21)  # start 21: window [21, min(25, 23)) = (21, 22)
    assert late.stored == (21, 22)
    assert late.noise_levels[23:] == (0.0, 0.0)  # the last two steps are never stochastic
    flash = sliding_window_plan(25, 0.7, iteration=0, ode_solver="dpm_solver_2m")
    assert flash.ode_solver == "dpm_solver_2m"


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(noise_levels=(0.7,) * 3), "entries"),
        (dict(kernel="heun"), "kernel"),
        (dict(ode_solver="rk4"), "ode_solver"),
        (dict(kernel="ddim", ode_solver="dpm_solver_2m"), "ddim"),
        (dict(noise_levels=(0.7, float("nan"), 0.7, 0.0)), ">= 0"),
        (dict(stored=(1, 0), trained=()), "increasing"),
        (dict(stored=(0, 4), trained=()), r"\[0, 4\)"),
        (dict(stored=(0, 3), trained=()), "noise level 0"),
        (dict(stored=(0,), trained=(1,)), "not stored"),
    ],
)
def test_step_plan_validation(kwargs, match):
    fields = dict(num_steps=4, kernel="sde", noise_levels=(0.7, 0.7, 0.7, 0.0), stored=(0, 1, 2), trained=(0, 1))
    StepPlan(**fields)  # the base is valid
    with pytest.raises(ValueError, match=match):
        StepPlan(**{**fields, **kwargs})


def test_step_plan_is_frozen():
    plan = sde_plan(4, 0.7)
    with pytest.raises(AttributeError):
        plan.num_steps = 5


def test_union_plan_covers_each_chunks_window():
    from diffalign.samplers.plan import random_window_plan, union_plan

    first = random_window_plan(6, 0.7, 2, (0, 4), random.Random(0))
    plans = [first] + [random_window_plan(6, 0.7, 2, (0, 4), random.Random(seed)) for seed in range(1, 20)]
    union = union_plan(plans)
    windows = {plan.stored for plan in plans}
    assert len(windows) > 1
    assert union.stored == union.trained == tuple(sorted({i for w in windows for i in w}))
    assert all((union.noise_levels[i] == 0.7) == (i in union.stored) for i in range(6))
    assert union_plan([first]) == first
    with pytest.raises(ValueError, match="noise levels"):
        union_plan([first, random_window_plan(6, 0.9, 2, (0, 4), random.Random(0))])
    with pytest.raises(ValueError, match="differ in"):
        union_plan([first, random_window_plan(6, 0.7, 2, (0, 4), random.Random(0), kernel="cps")])
