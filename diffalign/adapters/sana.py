"""SANA (linear-attention DiT with cross-attention to a Gemma 2 encoder, deep-compression autoencoder)."""

from __future__ import annotations

import inspect

import torch
from torch import Tensor

from diffalign.adapters.base import Conditioning, DiffusionAdapter, PromptInput, Schedule


SANA_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
"""The projections of every block's self- and cross-attention, as for the UNet families (docs/architecture.md#lora-
targets); no public RL or DPO recipe for SANA names others."""


class SanaAdapter(DiffusionAdapter):
    """Adapter for ``SanaPipeline``.

    Prompts are encoded as the pipeline's ``__call__`` does: its "complex human instruction" is prepended to each
    prompt (not to the negative one) and the first token plus the last ``max_sequence_length - 1`` are kept, with
    their attention mask (``encoder_hidden_states [B, L, D]``, ``encoder_attention_mask [B, L]``). CFG is the usual
    batched one. The transformer sees ``t * timestep_scale``; a transformer that also predicts a variance (twice the
    latent channels out) has its second half dropped. Latents are ``[B, C, h, w]`` of a deep-compression autoencoder
    (32x in the released models), which has no posterior to sample: :meth:`encode_images` is deterministic.

    SANA's checkpoints ship a flow-matching DPM-Solver++; :meth:`set_timesteps` takes its timesteps and flow sigmas,
    and diffalign's rollouts step on them with their own Euler / SDE kernels (docs/samplers.md). Its shift is the
    scheduler's ``flow_shift``: ``model.timestep_shift`` needs a scheduler with ``set_shift``
    (``FlowMatchEulerDiscreteScheduler``).

    Args:
        max_sequence_length: text tokens kept per prompt (the pipeline's default, 300).
    """

    family = "sana"
    denoiser_name = "transformer"
    pipeline_class_names = ("SanaPipeline",)
    default_lora_targets = SANA_LORA_TARGETS
    default_num_steps = 20  # the pipeline's defaults
    default_guidance_scale = 4.5
    default_dpo_beta = 100.0  # no published DPO recipe: the flow-matching scale of SD3

    def __init__(self, pipe, *args, max_sequence_length: int = 300, **kwargs) -> None:
        self.max_sequence_length = max_sequence_length
        super().__init__(pipe, *args, **kwargs)

    @property
    def complex_human_instruction(self) -> list[str] | None:
        """The instruction ``pipe(...)`` prepends by default (its ``complex_human_instruction`` argument)."""
        return inspect.signature(type(self.pipe).__call__).parameters["complex_human_instruction"].default

    def _encode(self, prompts: list[str], negative_prompt: PromptInput | None, with_negative: bool) -> Conditioning:
        embeds, mask, negative, negative_mask = self.pipe.encode_prompt(
            list(prompts),
            do_classifier_free_guidance=with_negative,
            negative_prompt="" if negative_prompt is None else negative_prompt,
            device=self.device,
            max_sequence_length=self.max_sequence_length,
            complex_human_instruction=self.complex_human_instruction,
        )
        cond = Conditioning({"encoder_hidden_states": embeds.to(self.dtype), "encoder_attention_mask": mask})
        if with_negative:
            cond.negative = {"encoder_hidden_states": negative.to(self.dtype), "encoder_attention_mask": negative_mask}
        return cond

    def _forward(self, latents: Tensor, timesteps: Tensor, inputs: dict[str, Tensor], cond: Conditioning) -> Tensor:
        config = self.denoiser.config
        output = self.call_denoiser(
            latents,
            encoder_hidden_states=inputs["encoder_hidden_states"],
            encoder_attention_mask=inputs["encoder_attention_mask"],
            timestep=timesteps.float() * config.timestep_scale,  # float32, as the pipeline's
            return_dict=False,
        )[0]
        if config.out_channels // 2 == config.in_channels:  # learned variance: keep the velocity half
            output = output.chunk(2, dim=1)[0]
        return output

    def set_timesteps(self, num_inference_steps: int) -> Schedule:
        from diffusers.pipelines.sana.pipeline_sana import retrieve_timesteps

        if hasattr(self.scheduler, "set_shift"):
            self.flow_shift_options(lambda: 0.0)  # a static flow scheduler: the fixed or the configured shift
        elif self.timestep_shift is not None:
            raise ValueError(
                f"model.timestep_shift needs a scheduler with set_shift; {type(self.scheduler).__name__} sets its "
                "shift in its config (flow_shift): load the pipeline with a FlowMatchEulerDiscreteScheduler to set one"
            )
        timesteps, _ = retrieve_timesteps(self.scheduler, num_inference_steps, self.device)
        return Schedule(timesteps, sigmas=self.scheduler.sigmas.to(self.device))

    def encode_images(self, images: Tensor, generator: torch.Generator | None = None, sample: bool = True) -> Tensor:
        """Deterministic: the autoencoder has no posterior, so ``generator`` and ``sample`` change nothing."""
        pixels = images.to(self.device, torch.float32) * 2 - 1
        return (self.vae.encode(pixels).latent * self.vae.config.scaling_factor).to(self.dtype)
