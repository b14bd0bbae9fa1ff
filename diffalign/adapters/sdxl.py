"""Stable Diffusion XL (UNet, two CLIP text encoders, size/crop micro-conditioning)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from diffalign.adapters.base import Conditioning, PromptInput
from diffalign.adapters.sd import StableDiffusionAdapter, _negative_list


class StableDiffusionXLAdapter(StableDiffusionAdapter):
    """Adapter for ``StableDiffusionXLPipeline``.

    The conditioning carries SDXL's micro-conditioning ``time_ids [B, 6]`` = (original size, crop top-left, target
    size). By default it is ``(H, W, 0, 0, H, W)`` as the pipeline uses at inference; Diffusion-DPO replaces it per
    sample with the true original size and crop (:meth:`micro_conditioning`).
    """

    family = "sdxl"
    pipeline_class_names = ("StableDiffusionXLPipeline",)
    default_guidance_scale = 5.0
    # DiffusionDPO's SDXL launcher (diffusers' SDXL DPO script's 5000 is 10000 in this module's convention).
    default_dpo_beta = 5000.0

    def _encode(self, prompts: list[str], negative_prompt: PromptInput | None, with_negative: bool) -> Conditioning:
        embeds, negative, pooled, negative_pooled = self.pipe.encode_prompt(
            prompt=prompts,
            device=self.device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=with_negative,
            negative_prompt=_negative_list(negative_prompt, len(prompts)),
        )
        time_ids = self.micro_conditioning().repeat(len(prompts), 1)
        cond = Conditioning({"encoder_hidden_states": embeds, "text_embeds": pooled, "time_ids": time_ids})
        if with_negative:
            cond.negative = {"encoder_hidden_states": negative, "text_embeds": negative_pooled, "time_ids": time_ids}
        return cond

    def micro_conditioning(
        self,
        original_size: Sequence[int] | None = None,
        crop_top_left: Sequence[int] = (0, 0),
        target_size: Sequence[int] | None = None,
    ) -> Tensor:
        """SDXL's ``add_time_ids [1, 6]`` through the pipeline's ``_get_add_time_ids`` (sizes as ``(H, W)``)."""
        size = (self.height, self.width)
        encoder_2 = self.pipe.text_encoder_2
        return self.pipe._get_add_time_ids(
            tuple(original_size or size),
            tuple(crop_top_left),
            tuple(target_size or size),
            dtype=self.dtype,
            text_encoder_projection_dim=encoder_2.config.projection_dim if encoder_2 is not None else None,
        ).to(self.device)

    def with_size_conditioning(
        self, cond: Conditioning, original_sizes: Tensor, crop_top_lefts: Tensor
    ) -> Conditioning:
        """``cond`` with ``time_ids`` from each sample's true original size and crop (Diffusion-DPO on SDXL)."""
        time_ids = [
            self.micro_conditioning(tuple(size.tolist()), tuple(crop.tolist()))
            for size, crop in zip(original_sizes, crop_top_lefts)
        ]
        cond.embeds["time_ids"] = torch.cat(time_ids)
        return cond

    def _forward(self, latents: Tensor, timesteps: Tensor, inputs: dict[str, Tensor], cond: Conditioning) -> Tensor:
        added = {"text_embeds": inputs["text_embeds"], "time_ids": inputs["time_ids"]}
        return self.call_denoiser(
            latents,
            timesteps,
            encoder_hidden_states=inputs["encoder_hidden_states"],
            added_cond_kwargs=added,
            return_dict=False,
        )[0]

    def _latents_stats(self, like: Tensor) -> tuple[Tensor, Tensor] | None:
        config = self.vae.config
        mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
        if mean is None or std is None:
            return None
        shape = (1, len(mean), 1, 1)
        return (torch.tensor(mean).view(shape).to(like), torch.tensor(std).view(shape).to(like))

    def _latents_to_vae(self, latents: Tensor) -> Tensor:
        stats = self._latents_stats(latents)
        if stats is None:
            return latents / self.vae.config.scaling_factor
        mean, std = stats
        return latents * std / self.vae.config.scaling_factor + mean

    def _vae_to_latents(self, vae_latents: Tensor) -> Tensor:
        stats = self._latents_stats(vae_latents)
        if stats is None:
            return vae_latents * self.vae.config.scaling_factor
        mean, std = stats
        return (vae_latents - mean) * self.vae.config.scaling_factor / std
