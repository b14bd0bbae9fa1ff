"""Stable Diffusion 1.x / 2.x (UNet, one CLIP text encoder; epsilon or v_prediction)."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from diffalign.adapters.base import Conditioning, DiffusionAdapter, PredictionType, PromptInput, Schedule


UNET_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
"""Attention projections of every UNet attention block (diffusers' LoRA training scripts, DDPO, AlignProp)."""


def _negative_list(negative_prompt: PromptInput | None, batch: int) -> list[str] | None:
    if negative_prompt is None:
        return None
    if isinstance(negative_prompt, str):
        return [negative_prompt] * batch
    if len(negative_prompt) != batch:
        raise ValueError(f"got {len(negative_prompt)} negative prompts for {batch} prompts")
    return list(negative_prompt)


def ddim_alpha_prods(scheduler, timestep: int | Tensor, clamp_at_zero: bool = False) -> tuple[Tensor, Tensor]:
    """``(alpha_prod_t, alpha_prod_prev)`` of a DDIM step, exactly as ``DDIMScheduler.step`` picks them
    (the inputs of :func:`~diffalign.samplers.steps.ddim_step`).

    ``prev_timestep = t - num_train_timesteps // num_inference_steps``; ``alphas_cumprod[prev_timestep]`` when
    it is >= 0, else ``final_alpha_cumprod`` (1.0 with ``set_alpha_to_one=True``, else ``alphas_cumprod[0]``).
    ddpo-pytorch clamps ``prev_timestep`` to 0 instead (``clamp_at_zero``), which agrees for SD1.x
    (``set_alpha_to_one=False``) but not for schedulers that set it to one: there the last step would move to
    ``alpha_bar = 1`` and have no noise, so stochastic steps take the clamped value.

    Args:
        scheduler: A diffusers DDIM-style scheduler after ``set_timesteps`` (``alphas_cumprod``,
            ``final_alpha_cumprod``, ``config.num_train_timesteps``, ``num_inference_steps``).
        timestep: An entry of ``scheduler.timesteps``, or a ``[B]`` tensor of them.
        clamp_at_zero: ``alphas_cumprod[0]`` past timestep 0 (ddpo-pytorch) instead of ``final_alpha_cumprod``.

    Returns:
        fp32 tensors of the shape of ``timestep`` (0-d or ``[B]``).
    """
    if scheduler.num_inference_steps is None:
        raise ValueError("call scheduler.set_timesteps(...) first")
    alphas_cumprod = scheduler.alphas_cumprod.float()
    timestep = torch.as_tensor(timestep, dtype=torch.long, device=alphas_cumprod.device)
    prev_timestep = timestep - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    final = alphas_cumprod[0] if clamp_at_zero else scheduler.final_alpha_cumprod
    final = torch.as_tensor(final, dtype=torch.float32, device=alphas_cumprod.device)
    alpha_prod_prev = torch.where(prev_timestep >= 0, alphas_cumprod[prev_timestep.clamp(min=0)], final)
    return alphas_cumprod[timestep], alpha_prod_prev


class StableDiffusionAdapter(DiffusionAdapter):
    """Adapter for ``StableDiffusionPipeline`` (SD1.5: epsilon; SD2.x 768: v_prediction).

    Sampling uses DDIM (as DDPO does): when the pipeline ships another scheduler (PNDM, Euler, ...), the adapter
    samples with a ``DDIMScheduler`` built from the same config and leaves ``pipe.scheduler`` untouched.
    """

    family: ClassVar[str] = "sd"
    denoiser_name = "unet"
    pipeline_class_names = ("StableDiffusionPipeline",)
    default_lora_targets = UNET_LORA_TARGETS
    default_num_steps = 50
    default_guidance_scale = 7.5
    # DiffusionDPO's SD1.5 launcher and argparse default.
    default_dpo_beta = 5000.0

    def __init__(self, pipe, *args, **kwargs) -> None:
        from diffusers import DDIMScheduler

        scheduler = pipe.scheduler
        self._scheduler = (
            scheduler if isinstance(scheduler, DDIMScheduler) else DDIMScheduler.from_config(scheduler.config)
        )
        config = self._scheduler.config
        if config.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"{type(pipe).__name__}: prediction_type {config.prediction_type!r} is not supported")
        if config.get("thresholding", False):
            raise ValueError(
                f"{type(pipe).__name__}: the scheduler's dynamic thresholding (thresholding: true) is not supported "
                "by the DDIM/DDPO steps; set it to false in scheduler/scheduler_config.json"
            )
        self.clip_sample_range = float(config.clip_sample_range) if config.get("clip_sample", False) else None
        super().__init__(pipe, *args, **kwargs)

    @property
    def scheduler(self):
        return self._scheduler

    @property
    def prediction_type(self) -> PredictionType:
        return self._scheduler.config.prediction_type

    def _encode(self, prompts: list[str], negative_prompt: PromptInput | None, with_negative: bool) -> Conditioning:
        embeds, negative = self.pipe.encode_prompt(
            prompts, self.device, 1, with_negative, negative_prompt=_negative_list(negative_prompt, len(prompts))
        )
        neg = {"encoder_hidden_states": negative} if with_negative else None
        return Conditioning({"encoder_hidden_states": embeds}, neg)

    def _forward(self, latents: Tensor, timesteps: Tensor, inputs: dict[str, Tensor], cond: Conditioning) -> Tensor:
        return self.call_denoiser(
            latents, timesteps, encoder_hidden_states=inputs["encoder_hidden_states"], return_dict=False
        )[0]

    def set_timesteps(self, num_inference_steps: int) -> Schedule:
        from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps

        timesteps, _ = retrieve_timesteps(self.scheduler, num_inference_steps, self.device)
        alphas, alphas_prev = ddim_alpha_prods(self.scheduler, timesteps)
        _, stochastic_prev = ddim_alpha_prods(self.scheduler, timesteps, clamp_at_zero=True)
        device = self.device
        return Schedule(
            timesteps,
            alphas_cumprod=alphas.to(device),
            alphas_cumprod_prev=alphas_prev.to(device),
            stochastic_alphas_cumprod_prev=stochastic_prev.to(device),
        )

    def add_noise(self, x0: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """``sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) noise`` (the scheduler's ``add_noise``)."""
        return self.scheduler.add_noise(x0, noise, timesteps.to(x0.device))

    def training_target(self, x0: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """``noise`` for epsilon models; ``v = sqrt(alpha_bar) noise - sqrt(1 - alpha_bar) x0`` for v_prediction."""
        if self.prediction_type == "v_prediction":
            return self.scheduler.get_velocity(x0, noise, timesteps.to(x0.device))
        return noise
