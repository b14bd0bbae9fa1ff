"""A model family diffalign has never heard of trains through the public interface alone.

Everything of the family lives in this file: a diffusers pipeline class diffalign does not know, a denoiser of its
own (two convolutions with FiLM conditioning on the timestep and a pooled CLIP embedding, nothing any stock
diffusers pipeline has), its :class:`~diffalign.adapters.DiffusionAdapter` and a tiny builder. Once registered
with :func:`~diffalign.adapters.register_adapter`, it samples through the one rollout loop and takes a Flow-GRPO
step, with no diffalign module touched.

LoRA is opt-in through diffusers' own mixins: ``PeftAdapterMixin`` on the denoiser (``add_adapter``) and a LoRA
loader mixin on the pipeline (``save_lora_weights``, which checkpoints call to export the LoRA).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, ConfigMixin, DiffusionPipeline, FlowMatchEulerDiscreteScheduler, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.loaders import PeftAdapterMixin, StableDiffusionLoraLoaderMixin
from diffusers.models.embeddings import get_timestep_embedding
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor, nn
from transformers import CLIPTextModel, CLIPTokenizer

import rewards
from diffalign.adapters import (
    Conditioning,
    DiffusionAdapter,
    Schedule,
    UnsupportedPipelineError,
    load_adapter,
    register_adapter,
    unregister_adapter,
)
from diffalign.adapters.base import PromptInput
from diffalign.config import load_config
from diffalign.samplers.plan import ode_plan, sde_plan
from diffalign.samplers.rollout import rollout, transition_log_probs
from diffalign.testing import SHAPES_VAE, tiny_clip_text_config
from diffalign.tokenizer import build_clip_tokenizer
from diffalign.trainers.common import TrainingRun
from diffalign.trainers.grpo import GRPOConfig, GRPOTrainer


PROMPTS = ["a red circle", "two blue squares"]
LATENT_SIZE = 8  # 8x8 latents -> 16x16 images through the shapes VAE (vae_scale_factor 2)
IMAGE_SIZE = 2 * LATENT_SIZE
REWARD_NAME = "test-new-family-brightness"


# ---------------------------------------------------------------------------------------------------------------------
# The new family: denoiser, pipeline, adapter, builder
# ---------------------------------------------------------------------------------------------------------------------


class TinyFlowDenoiser(ModelMixin, ConfigMixin, PeftAdapterMixin):
    """A velocity model no diffusers pipeline has: conv -> FiLM(timestep, pooled text) -> SiLU -> conv."""

    @register_to_config
    def __init__(
        self,
        in_channels: int = 4,
        sample_size: int = LATENT_SIZE,
        hidden_channels: int = 16,
        text_embed_dim: int = 32,
        time_embed_dim: int = 16,
    ) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, hidden_channels, 3, padding=1)
        self.film = nn.Linear(time_embed_dim + text_embed_dim, 2 * hidden_channels)
        self.conv_out = nn.Conv2d(hidden_channels, in_channels, 3, padding=1)

    def forward(self, sample: Tensor, timestep: Tensor, text_embeds: Tensor) -> Tensor:
        """``sample [B, C, h, w]``, ``timestep [B]`` on the 0..1000 scale, ``text_embeds [B, D]`` -> velocity."""
        temb = get_timestep_embedding(timestep.flatten(), self.config.time_embed_dim).to(sample.dtype)
        scale, shift = self.film(torch.cat([temb, text_embeds.to(sample.dtype)], dim=1)).chunk(2, dim=1)
        hidden = self.conv_in(sample) * (1 + scale[:, :, None, None]) + shift[:, :, None, None]
        return self.conv_out(nn.functional.silu(hidden))


class TinyFlowPipeline(DiffusionPipeline, StableDiffusionLoraLoaderMixin):
    """A pipeline class diffalign does not know. It has no ``__call__``: diffalign never uses one."""

    model_cpu_offload_seq = "text_encoder->unet->vae"

    def __init__(
        self,
        unet: TinyFlowDenoiser,
        vae: AutoencoderKL,
        scheduler: FlowMatchEulerDiscreteScheduler,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
    ) -> None:
        super().__init__()
        self.register_modules(unet=unet, vae=vae, scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)

    def prepare_latents(
        self,
        batch_size: int,
        num_channels_latents: int,
        height: int,
        width: int,
        dtype: torch.dtype,
        device: torch.device,
        generator: torch.Generator | list[torch.Generator] | None,
    ) -> Tensor:
        """Initial noise ``[B, C, H / f, W / f]``; with a list of generators, sample ``i`` uses generator ``i``."""
        shape = (batch_size, num_channels_latents, height // self.vae_scale_factor, width // self.vae_scale_factor)
        return randn_tensor(shape, generator=generator, device=device, dtype=dtype)


class TinyFlowAdapter(DiffusionAdapter):
    """The family's adapter: pooled-CLIP conditioning, velocity prediction, Euler flow-matching schedule."""

    family = "tinyflow"
    denoiser_name = "unet"
    pipeline_class_names = ("TinyFlowPipeline",)
    default_lora_targets = ("conv_in", "film", "conv_out")
    default_num_steps = 5
    default_guidance_scale = 3.0
    default_dpo_beta = 250.0

    def _pooled(self, texts: list[str]) -> Tensor:
        tokenizer = self.pipe.tokenizer
        ids = tokenizer(
            texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids
        return self.pipe.text_encoder(ids.to(self.device)).pooler_output.to(self.dtype)

    def _encode(self, prompts: list[str], negative_prompt: PromptInput | None, with_negative: bool) -> Conditioning:
        cond = Conditioning({"text_embeds": self._pooled(prompts)})
        if with_negative:
            negatives = negative_prompt if negative_prompt is not None else ""
            negatives = [negatives] * len(prompts) if isinstance(negatives, str) else list(negatives)
            if len(negatives) != len(prompts):
                raise ValueError(f"got {len(negatives)} negative prompts for {len(prompts)} prompts")
            cond.negative = {"text_embeds": self._pooled(negatives)}
        return cond

    def _forward(self, latents: Tensor, timesteps: Tensor, inputs: dict[str, Tensor], cond: Conditioning) -> Tensor:
        return self.call_denoiser(latents, timesteps, inputs["text_embeds"])

    def set_timesteps(self, num_inference_steps: int) -> Schedule:
        self.scheduler.set_timesteps(num_inference_steps, device=self.device)
        return Schedule(self.scheduler.timesteps, sigmas=self.scheduler.sigmas.to(self.device))


def build_tiny_flow_pipeline(tokenizer: CLIPTokenizer, seed: int = 0) -> TinyFlowPipeline:
    """The family's tiny builder: random denoiser and CLIP text tower, the trained shapes-world VAE."""
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(tiny_clip_text_config())
    pipe = TinyFlowPipeline(
        unet=TinyFlowDenoiser(),
        # A trained VAE: colours follow the latents, so a brightness reward varies between samples.
        vae=AutoencoderKL.from_pretrained(SHAPES_VAE),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
    )
    for module in pipe.components.values():
        if isinstance(module, nn.Module):
            module.eval()
    return pipe


# ---------------------------------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> CLIPTokenizer:
    return build_clip_tokenizer(tmp_path_factory.mktemp("tinyflow-tokenizer"))


@pytest.fixture
def pipe(tokenizer: CLIPTokenizer) -> TinyFlowPipeline:
    return build_tiny_flow_pipeline(tokenizer)


@pytest.fixture
def registered() -> Iterator[type[TinyFlowAdapter]]:
    """The family registered for the test, forgotten after it (other tests see the stock registry)."""
    register_adapter(TinyFlowAdapter)
    try:
        yield TinyFlowAdapter
    finally:
        unregister_adapter(TinyFlowAdapter)


class Brightness(rewards.Reward):
    """Mean pixel value: depends on the image only, and differs between samples."""

    name = REWARD_NAME
    differentiable = True
    needs_prompts = False

    def __init__(self, device: torch.device | str | None = None, dtype: torch.dtype | str | None = None) -> None:
        pass

    def _score(self, images: Tensor, prompts: list[str] | None) -> Tensor:
        return images.mean(dim=(1, 2, 3))


@pytest.fixture
def brightness_reward() -> Iterator[str]:
    rewards.register(REWARD_NAME)(Brightness)
    try:
        yield REWARD_NAME
    finally:
        rewards.unregister(REWARD_NAME)


# ---------------------------------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------------------------------


def test_load_adapter_serves_the_family_only_while_registered(pipe: TinyFlowPipeline) -> None:
    with pytest.raises(UnsupportedPipelineError) as err:
        load_adapter(pipe)
    assert "TinyFlowPipeline" in str(err.value)
    for name in ("StableDiffusionPipeline", "StableDiffusion3Pipeline", "FluxPipeline"):
        assert name in str(err.value)

    register_adapter(TinyFlowAdapter)
    try:
        adapter = load_adapter(pipe)
        assert type(adapter) is TinyFlowAdapter
        assert adapter.denoiser is pipe.unet
        assert adapter.prediction_type == "flow"
        assert (adapter.height, adapter.width) == (IMAGE_SIZE, IMAGE_SIZE)  # sample_size x vae_scale_factor
        assert "TinyFlowPipeline (tinyflow)" in _unsupported_message()
    finally:
        unregister_adapter(TinyFlowAdapter)
    with pytest.raises(UnsupportedPipelineError):
        load_adapter(pipe)


def _unsupported_message() -> str:
    class NotAPipeline:
        pass

    with pytest.raises(UnsupportedPipelineError) as err:
        load_adapter(NotAPipeline())
    return str(err.value)


def test_rollout_samples_the_new_family(pipe: TinyFlowPipeline, registered: type[TinyFlowAdapter]) -> None:
    adapter = load_adapter(pipe)
    steps, guidance = adapter.default_num_steps, adapter.default_guidance_scale
    prompts = [PROMPTS[0], PROMPTS[0], PROMPTS[1]]
    trajectory = rollout(adapter, prompts, ode_plan(steps), guidance_scale=guidance, seeds=[3, 4, 3])
    images = trajectory.images
    assert images.shape == (3, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1
    assert trajectory.log_probs.shape == (3, 0)  # an ODE plan stores nothing

    again = rollout(adapter, prompts, ode_plan(steps), guidance_scale=guidance, seeds=[3, 4, 3]).images
    torch.testing.assert_close(again, images, rtol=0, atol=0)
    # Seeds, the text conditioning and the guidance scale all reach the images (image 2 shares image 0's seed).
    assert (images[0] - images[1]).abs().max() > 1e-3
    assert (images[0] - images[2]).abs().max() > 1e-3
    unguided = rollout(adapter, prompts, ode_plan(steps), guidance_scale=1.0, seeds=[3, 4, 3]).images
    assert (unguided - images).abs().max() > 1e-3

    plan = sde_plan(steps, noise_level=0.7)
    sde = rollout(adapter, PROMPTS, plan, num_images_per_prompt=2, guidance_scale=guidance, seeds=0)
    assert sde.log_probs.shape == (4, steps - 1)
    assert torch.isfinite(sde.log_probs).all()
    assert sde.latents.shape == (4, steps - 1, 4, LATENT_SIZE, LATENT_SIZE)
    # Re-scoring the stored transitions under unchanged weights gives back the sampling log-probs (PPO ratio 1),
    # which needs the family's forward to be deterministic and batch-independent with per-row timesteps.
    with torch.no_grad():
        rescored, _, _ = transition_log_probs(adapter, sde, list(range(steps - 1)))
    torch.testing.assert_close(rescored, sde.log_probs, rtol=0, atol=1e-4)


@pytest.mark.parametrize("lora_rank", [0, 4], ids=["full", "lora"])
def test_one_grpo_step_trains_the_new_family(
    pipe: TinyFlowPipeline, registered: type[TinyFlowAdapter], brightness_reward: str, tmp_path: Path, lora_rank: int
) -> None:
    from accelerate import PartialState

    adapter = load_adapter(pipe, device=PartialState().device)  # where the run's accelerator puts the denoiser
    config = load_config(
        GRPOConfig,
        {
            "model": {"path": "not-loaded/tinyflow", "lora": {"rank": lora_rank}},
            "reward": brightness_reward,
            "output_dir": str(tmp_path / "run"),
            "seed": 0,
            "max_steps": 1,
            "optim": {"lr": 1e-3},
            "logging": {"log_with": "none"},
            "checkpoint": {"every": 0},
            "eval": {"every": 0},
            "sampling": {
                "prompts": PROMPTS,
                "num_steps": 3,
                "images_per_prompt": 4,
                "prompts_per_epoch": 2,
                "batch_size": 8,
                "guidance_scale": adapter.default_guidance_scale,
                "noise_level": 0.7,
            },
            "train": {"batch_size": 4, "beta": 0.0, "clip_range": 1e-2},
        },
    )
    before = {name: p.detach().clone() for name, p in pipe.unet.named_parameters()}
    frozen = {name: p.detach().clone() for name, p in pipe.text_encoder.named_parameters()}

    run = TrainingRun(config, adapter=adapter)
    trainer = GRPOTrainer(config, run=run)
    metrics = trainer.train()

    assert trainer.adapter is adapter
    assert math.isfinite(metrics["reward_mean"])
    assert 0 < metrics["reward_mean"] < 1  # mean brightness of images in [0, 1]
    assert metrics["reward_std"] > 0  # the samples differ, so the advantages are not all zero
    assert f"reward/{REWARD_NAME}" in metrics
    assert metrics["num_train_samples"] == 8
    for name, p in pipe.text_encoder.named_parameters():
        torch.testing.assert_close(p.detach(), frozen[name], rtol=0, atol=0)
    after = dict(pipe.unet.named_parameters())
    if lora_rank == 0:
        changed = [name for name, p in after.items() if not torch.equal(p.detach(), before[name])]
        assert sorted(changed) == sorted(before)  # full fine-tuning: every tensor of the denoiser moved
        return
    # LoRA: only the LoRA factors moved (B starts at 0), the base weights are untouched, and the exported LoRA
    # loads back into a fresh pipeline of the family.
    lora = {name: p for name, p in after.items() if "lora_" in name}
    assert len(lora) == 2 * len(TinyFlowAdapter.default_lora_targets)
    assert any(p.detach().abs().max() > 0 for name, p in lora.items() if "lora_B" in name)
    base = {name.replace(".base_layer", ""): p for name, p in after.items() if "lora_" not in name}
    assert sorted(base) == sorted(before)
    for name, p in base.items():
        torch.testing.assert_close(p.detach(), before[name], rtol=0, atol=0)
    fresh = load_adapter(build_tiny_flow_pipeline(pipe.tokenizer, seed=1))
    fresh.load_lora(tmp_path / "run" / "lora")
    exported, live = fresh.lora_state_dict(), adapter.lora_state_dict()
    assert sorted(exported) == sorted(live)
    for key, value in live.items():
        torch.testing.assert_close(exported[key], value.cpu(), rtol=0, atol=0)
