"""FLUX.1 (double/single-stream transformer, CLIP-L pooled + T5, packed 2x2 latents, guidance embedding)."""

from __future__ import annotations

import torch
from torch import Tensor

from diffalign.adapters.base import Conditioning, PromptInput
from diffalign.adapters.packed import PackedFlowAdapter
from diffalign.adapters.sd3 import SD3_LORA_TARGETS


FLUX_LORA_TARGETS = SD3_LORA_TARGETS + ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")
"""Flow-GRPO's FLUX LoRA targets: attention projections plus both streams' MLPs (docs/architecture.md#lora-targets)."""


class FluxAdapter(PackedFlowAdapter):
    """Adapter for ``FluxPipeline``.

    Latents live packed, ``[B, (h/2)(w/2), 4C]`` (:class:`~diffalign.adapters.packed.PackedFlowAdapter`).
    FLUX.1-dev is guidance-distilled: ``guidance_scale`` feeds the guidance embedding in one call and no negative
    branch is built (``with_negative`` is ignored); checkpoints without a guidance embedding (schnell) ignore
    ``guidance_scale``, as the pipeline does. The transformer sees ``timestep / 1000``.

    Args:
        max_sequence_length: T5 tokens (the pipeline's default, 512).
    """

    family = "flux"
    denoiser_name = "transformer"
    pipeline_class_names = ("FluxPipeline",)
    default_lora_targets = FLUX_LORA_TARGETS
    default_guidance_scale = 3.5
    # No reference trains FLUX with DPO: the flow-matching scale of SD3.
    default_dpo_beta = 100.0
    guidance_embedded = True

    def __init__(self, pipe, *args, max_sequence_length: int = 512, **kwargs) -> None:
        self.max_sequence_length = max_sequence_length
        super().__init__(pipe, *args, **kwargs)

    def _encode(self, prompts: list[str], negative_prompt: PromptInput | None, with_negative: bool) -> Conditioning:
        embeds, pooled, text_ids = self.pipe.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            device=self.device,
            num_images_per_prompt=1,
            max_sequence_length=self.max_sequence_length,
        )
        return Conditioning(
            {"encoder_hidden_states": embeds, "pooled_projections": pooled}, None, {"txt_ids": text_ids}
        )

    def _image_ids(self) -> Tensor:
        h, w = self._latent_hw
        return self.pipe._prepare_latent_image_ids(1, h // 2, w // 2, self.device, self.dtype)

    def _predict(
        self,
        latents: Tensor,
        t: Tensor | float,
        cond: Conditioning,
        guidance_scale: float = 1.0,
        uncond_grad: bool = True,
    ) -> Tensor:
        """Velocity at ``(latents, t)``; ``guidance_scale`` goes to the guidance embedding (see the class doc), so
        there is no unconditional branch and ``uncond_grad`` has nothing to act on."""
        latents = latents.to(self.dtype)
        batch = latents.shape[0]
        if len(cond) != batch:
            raise ValueError(f"conditioning has batch {len(cond)} but latents have batch {batch}")
        guidance = None
        if self.denoiser.config.guidance_embeds:
            guidance = torch.full([batch], guidance_scale, device=self.device, dtype=torch.float32)
        timesteps = self._timesteps(t, batch).to(latents.dtype)
        return self._forward_guided(latents, timesteps / 1000, guidance, cond)

    def _forward_guided(self, latents: Tensor, time: Tensor, guidance: Tensor | None, cond: Conditioning) -> Tensor:
        """One denoiser call: ``latents [B, L, 4C]``, ``time [B]`` in ``[0, 1]``, ``guidance [B]`` or ``None``."""
        return self.call_denoiser(
            hidden_states=latents,
            timestep=time,
            guidance=guidance,
            pooled_projections=cond.embeds["pooled_projections"],
            encoder_hidden_states=cond.embeds["encoder_hidden_states"],
            txt_ids=cond.extras["txt_ids"],
            img_ids=self._image_ids(),
            return_dict=False,
        )[0]

    def decode(self, latents: Tensor) -> Tensor:
        """Unpack ``[B, L, 4C]`` to ``[B, C, h, w]`` (the pipeline's ``_unpack_latents``), then decode."""
        unpacked = self.pipe._unpack_latents(latents, self.height, self.width, self.vae_scale_factor)
        return super().decode(unpacked)

    def encode_images(self, images: Tensor, generator: torch.Generator | None = None, sample: bool = True) -> Tensor:
        latents = super().encode_images(images, generator=generator, sample=sample)
        b, c, h, w = latents.shape
        return self.pipe._pack_latents(latents, b, c, h, w)
