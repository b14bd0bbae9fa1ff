"""Stable Diffusion 3 / 3.5 (MMDiT transformer, CLIP-L + CLIP-G + T5, rectified flow)."""

from __future__ import annotations

from torch import Tensor

from diffalign.adapters.base import Conditioning, DiffusionAdapter, PromptInput, Schedule
from diffalign.adapters.sd import _negative_list


SD3_LORA_TARGETS = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
)
"""Flow-GRPO's SD3 LoRA targets: the joint attention projections of both streams
(docs/architecture.md#lora-targets)."""


class StableDiffusion3Adapter(DiffusionAdapter):
    """Adapter for ``StableDiffusion3Pipeline``: velocity prediction, timesteps on the 0..1000 scale.

    Args:
        max_sequence_length: T5 tokens (the pipeline's default, 256).
    """

    family = "sd3"
    denoiser_name = "transformer"
    pipeline_class_names = ("StableDiffusion3Pipeline",)
    default_lora_targets = SD3_LORA_TARGETS
    default_guidance_scale = 4.5  # SD3.5's recommended value (the pipeline's own default is 7.0)
    # flow_grpo's Flow-DPO config on SD3.5-M.
    default_dpo_beta = 100.0

    def __init__(self, pipe, *args, max_sequence_length: int = 256, **kwargs) -> None:
        self.max_sequence_length = max_sequence_length
        super().__init__(pipe, *args, **kwargs)

    def _encode(self, prompts: list[str], negative_prompt: PromptInput | None, with_negative: bool) -> Conditioning:
        embeds, negative, pooled, negative_pooled = self.pipe.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            prompt_3=None,
            device=self.device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=with_negative,
            negative_prompt=_negative_list(negative_prompt, len(prompts)),
            max_sequence_length=self.max_sequence_length,
        )
        cond = Conditioning({"encoder_hidden_states": embeds, "pooled_projections": pooled})
        if with_negative:
            cond.negative = {"encoder_hidden_states": negative, "pooled_projections": negative_pooled}
        return cond

    def _forward(self, latents: Tensor, timesteps: Tensor, inputs: dict[str, Tensor], cond: Conditioning) -> Tensor:
        return self.call_denoiser(
            hidden_states=latents,
            timestep=timesteps,
            encoder_hidden_states=inputs["encoder_hidden_states"],
            pooled_projections=inputs["pooled_projections"],
            return_dict=False,
        )[0]

    def set_timesteps(self, num_inference_steps: int) -> Schedule:
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import (
            calculate_shift,
            retrieve_timesteps,
        )

        config = self.scheduler.config

        def mu() -> float:
            patch = self.denoiser.config.patch_size
            seq_len = (self.height // self.vae_scale_factor // patch) * (self.width // self.vae_scale_factor // patch)
            return calculate_shift(
                seq_len,
                config.get("base_image_seq_len", 256),
                config.get("max_image_seq_len", 4096),
                config.get("base_shift", 0.5),
                config.get("max_shift", 1.16),
            )

        shift = self.flow_shift_options(mu)
        timesteps, _ = retrieve_timesteps(self.scheduler, num_inference_steps, self.device, **shift)
        return Schedule(timesteps, sigmas=self.scheduler.sigmas.to(self.device))
