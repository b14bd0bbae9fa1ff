"""FLUX.2 (double/single-stream transformer over a Mistral Small 3 text encoder, guidance embedding, 2x2-patchified
latents with batch-norm statistics, 4-axis RoPE)."""

from __future__ import annotations

import torch
from torch import Tensor

from diffalign.adapters.base import Conditioning, PromptInput, Schedule
from diffalign.adapters.flux import FluxAdapter
from diffalign.adapters.sd3 import SD3_LORA_TARGETS


FLUX2_LORA_TARGETS = SD3_LORA_TARGETS + (
    "ff.linear_in",
    "ff.linear_out",
    "ff_context.linear_in",
    "ff_context.linear_out",
    "attn.to_qkv_mlp_proj",
)
"""FLUX.1's Flow-GRPO set carried over to FLUX.2's names: both streams' attention and MLPs of the double blocks, and
the fused attention+MLP input projection of the single blocks (docs/architecture.md#lora-targets). The single blocks'
output projection is left out: its name, ``attn.to_out``, is also the double blocks' ``ModuleList`` (whose Linear
is ``attn.to_out.0``), which a suffix target cannot tell apart."""


class Flux2Adapter(FluxAdapter):
    """Adapter for ``Flux2Pipeline`` (FLUX.2-dev).

    Like FLUX.1-dev it is guidance-distilled: ``guidance_scale`` feeds the guidance embedding, with no negative
    branch. The text is Mistral Small 3's hidden states of layers 10, 20 and 30, stacked per token
    (``encoder_hidden_states [B, L, 3D]``, padded to ``max_sequence_length``). Latents are patchified 2x2 into the
    channels and flattened to ``[B, (h/2)(w/2), 4C]``, normalised by the VAE's batch-norm statistics; positions are
    4-axis ids ``(t, h, w, l)``. The schedule's shift is FLUX.2's empirical ``mu``, which depends on the number of
    steps as well as on the image size.

    Args:
        max_sequence_length: text tokens (the pipeline's default, 512).
    """

    family = "flux2"
    pipeline_class_names = ("Flux2Pipeline",)
    default_lora_targets = FLUX2_LORA_TARGETS
    default_num_steps = 50
    default_guidance_scale = 4.0

    def _encode(self, prompts: list[str], negative_prompt: PromptInput | None, with_negative: bool) -> Conditioning:
        embeds, _ = self.pipe.encode_prompt(
            prompt=list(prompts), device=self.device, max_sequence_length=self.max_sequence_length
        )
        return Conditioning({"encoder_hidden_states": embeds.to(self.dtype)})

    def _grid_ids(self) -> Tensor:
        """``[1, (h/2)(w/2), 4]`` position ids of the packed latent grid."""
        h, w = self._latent_hw
        grid = torch.empty(1, 0, h // 2, w // 2)  # only its shape is read
        return self.pipe._prepare_latent_ids(grid).to(self.device)

    def _forward_guided(self, latents: Tensor, time: Tensor, guidance: Tensor | None, cond: Conditioning) -> Tensor:
        states = cond.embeds["encoder_hidden_states"]
        batch = latents.shape[0]
        return self.call_denoiser(
            hidden_states=latents,
            timestep=time,
            guidance=guidance,
            encoder_hidden_states=states,
            txt_ids=self.pipe._prepare_text_ids(states).to(self.device),
            img_ids=self._grid_ids().expand(batch, -1, -1),
            return_dict=False,
        )[0]

    def set_timesteps(self, num_inference_steps: int) -> Schedule:
        from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu, retrieve_timesteps

        sigmas = torch.linspace(1.0, 1 / num_inference_steps, num_inference_steps).numpy()
        if self.scheduler.config.get("use_flow_sigmas", False):
            sigmas = None
        h, w = self._latent_hw

        def mu() -> float:
            return compute_empirical_mu((h // 2) * (w // 2), num_inference_steps)

        shift = self.flow_shift_options(mu)
        timesteps, _ = retrieve_timesteps(self.scheduler, num_inference_steps, self.device, sigmas=sigmas, **shift)
        return Schedule(timesteps, sigmas=self.scheduler.sigmas.to(self.device))

    # --- VAE: 2x2 patches in the channels, normalised by the VAE's batch-norm running statistics --------------------

    def _batch_norm_statistics(self, like: Tensor) -> tuple[Tensor, Tensor]:
        bn = self.vae.bn
        mean = bn.running_mean.view(1, -1, 1, 1).to(like.device, like.dtype)
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + self.vae.config.batch_norm_eps).to(like.device, like.dtype)
        return mean, std

    def decode(self, latents: Tensor) -> Tensor:
        """``[B, L, 4C]`` -> patch grid ``[B, 4C, h/2, w/2]`` -> de-normalised -> ``[B, C, h, w]`` -> images."""
        latents = latents.to(torch.float32)
        ids = self._grid_ids().expand(latents.shape[0], -1, -1)
        patches = self.pipe._unpack_latents_with_ids(latents, ids)
        mean, std = self._batch_norm_statistics(patches)
        vae_latents = self.pipe._unpatchify_latents(patches * std + mean)
        images = self.vae.decode(vae_latents, return_dict=False)[0]
        return (images / 2 + 0.5).clamp(0, 1)

    def encode_images(self, images: Tensor, generator: torch.Generator | None = None, sample: bool = True) -> Tensor:
        pixels = images.to(self.device, torch.float32) * 2 - 1
        dist = self.vae.encode(pixels).latent_dist
        patches = self.pipe._patchify_latents(dist.sample(generator) if sample else dist.mode())
        mean, std = self._batch_norm_statistics(patches)
        return self.pipe._pack_latents((patches - mean) / std).to(self.dtype)
