"""``torch.compile`` of the denoiser (``model.compile``, ``--compile``): where calls go, and that compiled sampling and
training give the eager results.

The fast tests replace ``torch.compile`` by a recorder, so they check the routing (which module is compiled, when,
with which options) without running inductor. The slow ones compile for real on the CPU (inductor's C++ backend,
tens of seconds per graph on 2 cores) and compare with eager runs of the same weights: rollout images and
log-probs (also after the weights change in place), the GRPO on-policy ratio and the KL to the LoRA-disabled
reference, a DDPO step's gradient and weight update, reward backprop's gradient through checkpointed calls, and the
keys of the saved LoRA and checkpoint. Each slow test starts from a reset dynamo and fails instead of
silently running eagerly when the recompile limit is hit.
"""

from __future__ import annotations

import copy
import typing

import pytest
import torch
from safetensors import safe_open

from diffalign import cli
from diffalign.adapters import load_adapter
from diffalign.adapters.base import COMPILE_MODES
from diffalign.config import ConfigError, ModelConfig, load_config
from diffalign.samplers.plan import sde_plan
from diffalign.samplers.rollout import rollout
from diffalign.trainers import checkpoints as ckpt
from diffalign.trainers.grpo import GRPOConfig, GRPOTrainer
from diffalign.trainers.reward_backprop import RewardBackpropConfig, RewardBackpropTrainer


SIZE = 32
PROMPTS = ["a red circle", "a blue square", "a green triangle", "two yellow circles"]


# --- a recorder in place of torch.compile ----------------------------------------------------------------------------


class _Recorded(torch.nn.Module):
    """What the fake ``torch.compile`` returns: calls the module it was given and counts the calls."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.inner = module
        self.calls = 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self.inner(*args, **kwargs)


@pytest.fixture
def fake_compile(monkeypatch):
    """``torch.compile`` replaced: returns a :class:`_Recorded` and appends ``(module, kwargs, recorded)``."""
    made: list[tuple[torch.nn.Module, dict, _Recorded]] = []

    def compile(module, **kwargs):
        recorded = _Recorded(module)
        made.append((module, kwargs, recorded))
        return recorded

    monkeypatch.setattr(torch, "compile", compile)
    return made


@pytest.fixture(scope="module")
def sd15(tiny_pipeline_dir):
    return tiny_pipeline_dir("sd15")


def _predict_once(adapter) -> torch.Tensor:
    cond = adapter.encode_prompt(PROMPTS[:2], negative_prompt="", with_negative=True)
    latents = adapter.prepare_latents(2, torch.Generator().manual_seed(0))
    with torch.no_grad():
        return adapter.predict(latents, adapter.set_timesteps(4).timesteps[0], cond, guidance_scale=3.0)


def test_compile_routes_the_denoiser_calls_and_leaves_other_modules_eager(sd15, fake_compile):
    adapter = load_adapter(sd15, height=SIZE, width=SIZE)
    eager = _predict_once(adapter)
    assert adapter.compile_mode == "none" and not fake_compile

    adapter.compile_denoiser("default")
    assert adapter.compile_mode == "default" and not fake_compile  # compiled on the first call, not before
    assert torch.equal(_predict_once(adapter), eager)
    _predict_once(adapter)
    ((module, options, compiled),) = fake_compile  # made once, reused
    assert module is adapter.denoiser and options == {"mode": None, "dynamic": None} and compiled.calls == 2

    # A distributed wrapper (accelerate's prepare) is what gets compiled once it is set.
    wrapper = torch.nn.Sequential(adapter.denoiser)
    wrapper.forward = adapter.denoiser.forward
    adapter.wrap_denoiser(wrapper)
    _predict_once(adapter)
    assert len(fake_compile) == 2 and fake_compile[1][0] is wrapper and fake_compile[1][2].calls == 1

    # Another denoiser swapped into the pipeline (a full fine-tune's frozen reference copy) runs eagerly.
    live = adapter.pipe.unet
    adapter.wrap_denoiser(None)
    adapter.pipe.unet = copy.deepcopy(live)
    _predict_once(adapter)
    adapter.pipe.unet = live
    assert len(fake_compile) == 2 and fake_compile[0][2].calls == 2

    adapter.compile_denoiser("max-autotune-no-cudagraphs", dynamic=True)
    _predict_once(adapter)
    assert fake_compile[2][1] == {"mode": "max-autotune-no-cudagraphs", "dynamic": True}
    adapter.compile_denoiser("none")
    _predict_once(adapter)
    assert adapter.compile_mode == "none" and len(fake_compile) == 3 and fake_compile[2][2].calls == 1


def test_an_already_compiled_wrapper_is_not_compiled_twice(sd15, fake_compile):
    """accelerate's own ``dynamo_backend`` returns an OptimizedModule from prepare: it is called as it is."""
    adapter = load_adapter(sd15, height=SIZE, width=SIZE)
    calls = []
    compiled = torch._dynamo.eval_frame.OptimizedModule(adapter.denoiser, lambda fn: fn)
    compiled.forward = lambda *args, **kwargs: calls.append(1) or adapter.denoiser(*args, **kwargs)
    adapter.wrap_denoiser(compiled)
    adapter.compile_denoiser("default")
    _predict_once(adapter)
    assert not fake_compile and calls == [1]


def test_an_unknown_compile_mode_is_refused(sd15, tmp_path):
    adapter = load_adapter(sd15, height=SIZE, width=SIZE)
    with pytest.raises(ValueError, match="unknown compile mode 'fast'; choose one of none, default, max-autotune"):
        adapter.compile_denoiser("fast")
    with pytest.raises(ConfigError) as caught:
        load_config(GRPOConfig, {"model": {"path": str(sd15), "compile": "fast"}, "output_dir": str(tmp_path)})
    assert "model.compile" in caught.value.issues[0].keys


def test_the_three_lists_of_modes_agree():
    """The config and the command line spell the modes without importing the adapters (layering, start-up)."""
    config_modes = typing.get_args(typing.get_type_hints(ModelConfig)["compile"])
    assert config_modes == COMPILE_MODES == cli.COMPILE_CHOICES


@pytest.mark.parametrize(
    "flag",
    [
        ["--compile"],
        pytest.param(["--compile", "max-autotune-no-cudagraphs"], marks=pytest.mark.slow),  # fast suite's time
        pytest.param([], marks=pytest.mark.slow),
    ],
)
def test_sample_compile_flag(sd15, tmp_path, fake_compile, flag):
    out = tmp_path / "a.png"
    args = ["sample", "--model", str(sd15), "--prompt", "a red circle", "--steps", "2", "--out", str(out)]
    assert cli.main([*args, "--height", str(SIZE), "--width", str(SIZE), *flag]) == 0
    assert out.is_file()
    if not flag:
        assert not fake_compile
        return
    mode = None if len(flag) == 1 else flag[1]
    assert [options["mode"] for _, options, _ in fake_compile] == [mode]
    assert fake_compile[0][2].calls == 2  # both steps went through it


def test_grid_takes_compile_and_refuses_an_unknown_mode(sd15, tmp_path, fake_compile, capsys):
    args = ["grid", "--model", str(sd15), "--prompt", "a red circle", "--steps", "1", "--cell-size", "32"]
    args += ["--height", str(SIZE), "--width", str(SIZE), "--out", str(tmp_path / "g.png")]
    assert cli.main([*args, "--compile"]) == 0
    assert len(fake_compile) == 1 and fake_compile[0][2].calls == 1
    assert cli.main([*args, "--compile", "fast"]) == cli.EXIT_USAGE
    assert "invalid choice: 'fast'" in capsys.readouterr().err


# --- real compilation (inductor on the CPU) --------------------------------------------------------------------------


@pytest.fixture
def fresh_dynamo():
    """Dynamo's caches empty before and after (graphs of other tests neither help nor count towards the limit); a
    hit recompile limit fails the test instead of falling back to eager. Yields the number of graphs compiled."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        yield lambda: torch._dynamo.utils.counters["stats"]["unique_graphs"]
    torch._dynamo.reset()


@pytest.mark.slow
def test_compiled_rollout_equals_the_eager_one(sd15, fresh_dynamo):
    """DDPO-style rollout (DDIM eta 1, every step stored), CFG, 5 images in chunks of 3 and 2: the compiled
    denoiser gives the eager images within 1e-4 and log-probs within 1e-3 relative (float reassociation only; the
    noise is the same draws), and the smaller last chunk reuses a graph with a symbolic batch."""
    adapter = load_adapter(sd15, height=SIZE, width=SIZE)
    adapter.add_lora(4)
    with torch.no_grad():
        for name, param in adapter.denoiser.named_parameters():
            if "lora_B" in name:  # a LoRA that acts, so that the compiled graph must include it
                param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(1)) * 0.2)
    plan = sde_plan(6, 1.0, kernel="ddim", include_last=True)

    def sample():
        options = dict(guidance_scale=4.0, negative_prompt="", seeds=list(range(5)), chunk_size=3)
        return rollout(adapter, [*PROMPTS, PROMPTS[0]], plan, **options)

    eager = sample()
    adapter.compile_denoiser("default")
    compiled = sample()
    assert 1 <= fresh_dynamo() <= 2  # batch 6, then one symbolic-batch graph for the batch-4 chunk
    torch.testing.assert_close(compiled.images, eager.images, atol=1e-4, rtol=0)
    torch.testing.assert_close(compiled.log_probs, eager.log_probs, atol=0, rtol=1e-3)
    assert (eager.images - adapter.decode(eager.final_latents)).abs().max() < 1e-6  # compared what was sampled

    # Weights changed in place (an optimizer step, EMA swapped in) reach the compiled graphs: they are inputs.
    with torch.no_grad():
        for name, param in adapter.denoiser.named_parameters():
            if "lora_B" in name:
                param.mul_(-1)
    graphs, updated = fresh_dynamo(), sample()
    adapter.compile_denoiser("none")
    updated_eager = sample()
    assert fresh_dynamo() == graphs  # no recompilation for new weight values
    assert (updated_eager.images - eager.images).abs().max() > 1e-2
    torch.testing.assert_close(updated.images, updated_eager.images, atol=1e-4, rtol=0)


def _grpo_config(folder, output_dir, compile="none", gradient_checkpointing=False):
    raw = {
        "model": {"path": str(folder), "lora": {"rank": 4}, "compile": compile},
        "gradient_checkpointing": gradient_checkpointing,
        "reward": "diffalign.testing:redness",
        "output_dir": str(output_dir),
        "seed": 0,
        "max_steps": 1,
        "optim": {"lr": 1e-2},
        "logging": {"log_with": "none"},
        "checkpoint": {"every": 0},
        "sampling": {
            "prompts": PROMPTS[:2],
            "num_steps": 4,
            "images_per_prompt": 2,
            "prompts_per_epoch": 2,
            "batch_size": 4,
            "guidance_scale": 3.0,
            "noise_level": 0.7,
            "resolution": SIZE,
        },
        "train": {"batch_size": 4, "clip_range": 1e-2, "beta": 0.05, "timestep_chunk": 0},
    }
    return load_config(GRPOConfig, raw)


@pytest.mark.slow
def test_compiled_grpo_is_on_policy_and_its_reference_is_lora_free(tiny_pipeline_dir, tmp_path, fresh_dynamo):
    """Flow-GRPO on SD3 with a LoRA that acts: sampled (compiled, no grad) and re-scored (compiled, grad) give ratio
    1, and the reference (LoRA disabled: another graph, not the stale LoRA one) gives the eager KL, which is > 0."""
    trainer = GRPOTrainer(_grpo_config(tiny_pipeline_dir("sd3"), tmp_path, compile="default"))
    with torch.no_grad():
        for name, param in zip(trainer.run.trainable_names(), trainer.run.params):
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(1)) * 0.2)
    trajectory, rewards, _, group_ids = trainer.sample_epoch(0)
    advantages, _ = trainer.advantages(rewards, group_ids, trajectory.prompts)
    samples, positions = torch.arange(4), trainer.train_positions(trajectory, 0)
    _, compiled = trainer._step_loss(trajectory, samples, positions, advantages)
    graphs = fresh_dynamo()
    assert graphs >= 3  # sampling, re-scoring with grad, the reference with the LoRA off
    trainer.adapter.compile_denoiser("none")
    _, eager = trainer._step_loss(trajectory, samples, positions, advantages)
    assert fresh_dynamo() == graphs  # the eager pass compiled nothing
    assert abs(compiled["ratio_mean"].item() - 1) <= 1e-5 and compiled["clipfrac"].item() == 0
    assert abs(eager["ratio_mean"].item() - 1) <= 1e-5
    assert eager["kl"].item() > 1e-4  # the LoRA moves the policy away from the reference
    assert compiled["kl"].item() == pytest.approx(eager["kl"].item(), rel=1e-3)


def _trainable_keys(folder) -> list[str]:
    with safe_open(str(folder / ckpt.TRAINABLE_FILE), framework="pt") as handle:
        return sorted(handle.keys())


def _lora_keys(folder) -> list[str]:
    with safe_open(str(folder / "pytorch_lora_weights.safetensors"), framework="pt") as handle:
        return sorted(handle.keys())


@pytest.mark.slow
def test_a_compiled_training_step_updates_the_weights_as_an_eager_one(tiny_pipeline_dir, tmp_path, fresh_dynamo):
    """DDPO (the DDIM kernel, CFG, KL to the reference) on SD1.5, one epoch = one AdamW step at lr 1e-2: with compile
    and gradient checkpointing the gradient is the eager one within 1e-3 relative (float reassociation), so the
    weights move the same way, within 5e-4 = lr / 20 per weight (AdamW's first step is about lr * g / |g|, which turns
    the rounding of a gradient entry near zero into up to a few percent of lr); and the denoiser's keys, the
    checkpoint's and the exported LoRA's are those of the eager run."""
    folder = tiny_pipeline_dir("sd15")
    runs = {}
    for name, compile in {"eager": "none", "compiled": "default"}.items():
        trainer = GRPOTrainer(_grpo_config(folder, tmp_path / name, compile, gradient_checkpointing=compile != "none"))
        before = [p.detach().clone() for p in trainer.run.params]
        grads, real_step = [], trainer.run.optimizer_step

        def record(*args, real_step=real_step, grads=grads, params=trainer.run.params, **kwargs):
            grads.extend(p.grad.detach().clone() for p in params)  # before clipping and the AdamW step
            return real_step(*args, **kwargs)

        trainer.run.optimizer_step = record
        trainer.train_step(0)
        delta = [p.detach() - b for p, b in zip(trainer.run.params, before)]
        checkpoint = trainer.run.save(1, trainer.trainer_state())
        lora = trainer.run.export_lora(tmp_path / name / "lora")
        runs[name] = (trainer, grads, delta, checkpoint, lora)
    assert fresh_dynamo() >= 2  # sampling and training graphs were compiled and used
    (eager, eager_grads, eager_delta, eager_ckpt, eager_lora), (compiled, grads, delta, compiled_ckpt, lora) = (
        runs.values()
    )
    scale = max(g.abs().max() for g in eager_grads)
    assert len(grads) == len(eager_grads) and scale > 0
    for got, want in zip(grads, eager_grads):
        torch.testing.assert_close(got, want, atol=1e-3 * scale, rtol=1e-3)
    assert sum(d.abs().sum() for d in eager_delta) > 0
    for got, want in zip(delta, eager_delta):
        torch.testing.assert_close(got, want, atol=5e-4, rtol=0)
    keys = list(compiled.adapter.denoiser.state_dict())
    assert keys == list(eager.adapter.denoiser.state_dict()) and not any("_orig_mod" in key for key in keys)
    assert _trainable_keys(compiled_ckpt) == _trainable_keys(eager_ckpt)
    assert _lora_keys(lora) == _lora_keys(eager_lora) and _lora_keys(lora)[0].startswith("unet.")


@pytest.mark.slow
def test_compiled_reward_backprop_gives_the_eager_gradient(tiny_pipeline_dir, tmp_path, fresh_dynamo):
    """DRaFT-K (K = 2) on SD1.5 with gradient checkpointing: the gradient flows through compiled denoiser calls
    run under ``torch.utils.checkpoint`` (recomputed in backward) and equals the eager one within 1e-3 relative."""
    raw = {
        "model": {"path": str(tiny_pipeline_dir("sd15")), "lora": {"rank": 4}, "compile": "default"},
        "gradient_checkpointing": True,
        "reward": "diffalign.testing:redness",
        "output_dir": str(tmp_path),
        "logging": {"log_with": "none"},
        "checkpoint": {"every": 0},
        "sampling": {"prompts": PROMPTS[:2], "num_steps": 4, "guidance_scale": 3.0, "batch_size": 2, "resolution": 16},
        "backprop": {"mode": "draft_k", "k": 2},
    }
    trainer = RewardBackpropTrainer(load_config(RewardBackpropConfig, raw))

    def loss_and_grads():
        for param in trainer.run.params:
            param.grad = None
        loss, _ = trainer.micro_batch_loss(0, 0)
        loss.backward()
        return loss.detach(), [param.grad.detach().clone() for param in trainer.run.params]

    compiled_loss, compiled = loss_and_grads()
    assert fresh_dynamo() >= 2  # the no-grad steps and the grad-enabled ones
    trainer.adapter.compile_denoiser("none")
    eager_loss, eager = loss_and_grads()
    torch.testing.assert_close(compiled_loss, eager_loss, atol=0, rtol=1e-4)
    scale = max(g.abs().max() for g in eager)
    assert scale > 0
    for got, want in zip(compiled, eager):
        torch.testing.assert_close(got, want, atol=1e-3 * scale, rtol=1e-3)
