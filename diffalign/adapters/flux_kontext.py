"""FLUX.1 Kontext: FLUX.1 that edits, reading the packed latents of a source image beside its own."""

from __future__ import annotations

import torch
from torch import Tensor

from diffalign.adapters.base import Conditioning
from diffalign.adapters.flux import FLUX_LORA_TARGETS, FluxAdapter


KONTEXT_LORA_TARGETS = FLUX_LORA_TARGETS + ("proj_mlp",)
"""Flow-GRPO's FLUX.1 Kontext targets: the FLUX set plus the single blocks' MLP input (``proj_mlp``;
``scripts/train_flux_kontext.py`` of yifan123/flow_grpo at 9745241)."""


class FluxKontextAdapter(FluxAdapter):
    """Adapter for ``FluxKontextPipeline``.

    :meth:`with_source_images` VAE-encodes each sample's source image (the posterior's mode, as the pipeline does),
    packs it like the noise and keeps it in the conditioning as ``image_latents [B, L, 4C]``, so that it is repeated,
    sliced and cached with the text. Each denoiser call then reads ``cat([latents, image_latents])`` with the source
    tokens at position-id time 1, and only the noise tokens' output is kept. Without a source image the adapter
    samples as FLUX.1-dev. The pipeline resizes source images (by default to one of Kontext's preferred
    resolutions); the adapter takes them at its working size.
    """

    family = "flux_kontext"
    pipeline_class_names = ("FluxKontextPipeline",)
    default_lora_targets = KONTEXT_LORA_TARGETS
    edits_images = True

    def prepare_latents(
        self, batch_size: int, generator: torch.Generator | list[torch.Generator] | None = None
    ) -> Tensor:
        channels = self.denoiser.config.in_channels // 4
        latents, *_ = self.pipe.prepare_latents(
            None, batch_size, channels, self.height, self.width, self.dtype, self.device, generator
        )
        return latents

    def with_source_images(self, cond: Conditioning, images: Tensor, batch_size: int | None = None) -> Conditioning:
        if len(images) != len(cond):
            raise ValueError(f"got {len(images)} source images for {len(cond)} prompts")
        size = batch_size or len(images)
        with torch.no_grad():  # [B, L, 4C], the pipeline's argmax, a chunk of images per VAE call
            latents = torch.cat([self.encode_images(chunk, sample=False) for chunk in images.split(size)])
        edited = Conditioning(dict(cond.embeds), None, dict(cond.extras), cond.ragged)
        edited.embeds["image_latents"] = latents.to(self.dtype)
        if cond.negative is not None:
            edited.negative = {**cond.negative, "image_latents": edited.embeds["image_latents"]}
        return edited

    def _source_ids(self) -> Tensor:
        """Position ids of the source tokens: the noise grid's, with the first coordinate set to 1."""
        ids = self._image_ids().clone()
        ids[..., 0] = 1
        return ids

    def _forward_guided(self, latents: Tensor, time: Tensor, guidance: Tensor | None, cond: Conditioning) -> Tensor:
        source = cond.embeds.get("image_latents")
        if source is None:
            return super()._forward_guided(latents, time, guidance, cond)
        tokens = latents.shape[1]
        output = self.call_denoiser(
            hidden_states=torch.cat([latents, source.to(latents.dtype)], dim=1),
            timestep=time,
            guidance=guidance,
            pooled_projections=cond.embeds["pooled_projections"],
            encoder_hidden_states=cond.embeds["encoder_hidden_states"],
            txt_ids=cond.extras["txt_ids"],
            img_ids=torch.cat([self._image_ids(), self._source_ids()]),
            return_dict=False,
        )[0]
        return output[:, :tokens]
