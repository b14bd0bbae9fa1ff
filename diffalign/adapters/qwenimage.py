"""Qwen-Image (MMDiT over a Qwen2.5-VL text encoder, packed 2x2 latents of a Wan-style causal VAE, true CFG with a
norm rescale)."""

from __future__ import annotations

import torch
from torch import Tensor

from diffalign.adapters.base import Conditioning, PromptInput
from diffalign.adapters.packed import PackedFlowAdapter
from diffalign.adapters.sd import _negative_list
from diffalign.adapters.sd3 import SD3_LORA_TARGETS


QWEN_IMAGE_LORA_TARGETS = SD3_LORA_TARGETS + (
    "img_mlp.net.0.proj",
    "img_mlp.net.2",
    "txt_mlp.net.0.proj",
    "txt_mlp.net.2",
)
"""Flow-GRPO's Qwen-Image LoRA targets: the joint attention projections of both streams plus both streams' MLPs
(``config/base.py`` of yifan123/flow_grpo at 9745241; docs/architecture.md#lora-targets)."""

_TEXT_KEYS = frozenset({"encoder_hidden_states", "encoder_hidden_states_mask"})


class QwenImageAdapter(PackedFlowAdapter):
    """Adapter for ``QwenImagePipeline``.

    The pipeline encodes each prompt to its own length (the system-prompt template's tokens dropped), so the text
    conditioning is ragged: ``encoder_hidden_states [B, L, D]`` and ``encoder_hidden_states_mask [B, L]``, padded
    with masked zeros when prompts of different lengths share a batch (:class:`~diffalign.adapters.base.Conditioning`).
    Guidance is "true CFG" with a negative prompt (the pipeline's ``true_cfg_scale``; ``" "`` unless one is given),
    and the guided velocity is rescaled per token to the conditional one's norm, as the pipeline and flow_grpo do.
    The transformer sees ``timestep / 1000``; the VAE is a causal video VAE, decoded one frame at a time.

    Args:
        max_sequence_length: the most text tokens kept per prompt (``pipe(...)``'s default, 512, as flow_grpo's;
            the pipeline refuses more than 1024).
    """

    family = "qwenimage"
    denoiser_name = "transformer"
    pipeline_class_names = ("QwenImagePipeline",)
    default_lora_targets = QWEN_IMAGE_LORA_TARGETS
    default_num_steps = 50
    default_guidance_scale = 4.0  # the pipeline's true_cfg_scale
    default_dpo_beta = 100.0  # no published DPO recipe: the flow-matching scale of SD3
    default_negative_prompt = " "  # the pipeline's documented negative prompt; flow_grpo uses it too

    def __init__(self, pipe, *args, max_sequence_length: int = 512, **kwargs) -> None:
        if not 0 < max_sequence_length <= 1024:
            raise ValueError(
                f"qwenimage: max_sequence_length must be in 1..1024 (the pipeline's limit), got {max_sequence_length}"
            )
        self.max_sequence_length = max_sequence_length
        super().__init__(pipe, *args, **kwargs)

    def _encode(self, prompts: list[str], negative_prompt: PromptInput | None, with_negative: bool) -> Conditioning:
        cond = Conditioning(self._encode_texts(prompts), ragged=_TEXT_KEYS)
        if with_negative:
            negative = _negative_list(negative_prompt, len(prompts))
            cond.negative = self._encode_texts(negative or [self.default_negative_prompt] * len(prompts))
        return cond

    def _encode_texts(self, texts: list[str]) -> dict[str, Tensor]:
        embeds, mask = self.pipe.encode_prompt(
            prompt=texts, device=self.device, max_sequence_length=self.max_sequence_length
        )
        if mask is None:  # the pipeline drops an all-ones mask; keep one, so that batches can be padded
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        return {"encoder_hidden_states": embeds.to(self.dtype), "encoder_hidden_states_mask": mask}

    def _forward(self, latents: Tensor, timesteps: Tensor, inputs: dict[str, Tensor], cond: Conditioning) -> Tensor:
        mask = inputs["encoder_hidden_states_mask"]
        h, w = self._latent_hw
        return self.call_denoiser(
            hidden_states=latents,
            timestep=timesteps.to(latents.dtype) / 1000,
            guidance=None,
            # An all-ones mask is dropped, as the pipeline does: attention then needs no mask (flash kernels).
            encoder_hidden_states_mask=None if bool(mask.all()) else mask,
            encoder_hidden_states=inputs["encoder_hidden_states"],
            img_shapes=[[(1, h // 2, w // 2)]] * latents.shape[0],
            return_dict=False,
        )[0]

    def combine_guidance(self, uncond: Tensor, text: Tensor, guidance_scale: float) -> Tensor:
        """True CFG, then each token's guided velocity rescaled to the norm of its conditional one (``[B, L, 4C]``,
        the norm over the packed channels): the pipeline's rule, which flow_grpo keeps for training too."""
        guided = super().combine_guidance(uncond, text, guidance_scale)
        return guided * (text.norm(dim=-1, keepdim=True) / guided.norm(dim=-1, keepdim=True))

    # --- VAE: a causal video VAE with per-channel latent statistics, used on one-frame videos -----------------------

    def _latent_statistics(self, like: Tensor) -> tuple[Tensor, Tensor]:
        config = self.vae.config
        shape = (1, config.z_dim, 1, 1, 1)
        mean = torch.tensor(config.latents_mean, device=like.device, dtype=like.dtype).view(shape)
        std = torch.tensor(config.latents_std, device=like.device, dtype=like.dtype).view(shape)
        return mean, std

    def _latents_to_vae(self, latents: Tensor) -> Tensor:
        mean, std = self._latent_statistics(latents)
        return latents * std + mean

    def _vae_to_latents(self, vae_latents: Tensor) -> Tensor:
        mean, std = self._latent_statistics(vae_latents)
        return (vae_latents - mean) / std

    def decode(self, latents: Tensor) -> Tensor:
        """Unpack ``[B, L, 4C]`` to one-frame videos ``[B, C, 1, h, w]``, decode, and keep the frame."""
        unpacked = self.pipe._unpack_latents(latents.to(torch.float32), self.height, self.width, self.vae_scale_factor)
        images = self.vae.decode(self._latents_to_vae(unpacked), return_dict=False)[0][:, :, 0]
        return (images / 2 + 0.5).clamp(0, 1)

    def encode_images(self, images: Tensor, generator: torch.Generator | None = None, sample: bool = True) -> Tensor:
        frames = images.to(self.device, torch.float32)[:, :, None] * 2 - 1  # [B, 3, 1, H, W]
        dist = self.vae.encode(frames).latent_dist
        latents = self._vae_to_latents(dist.sample(generator) if sample else dist.mode())
        b, c, _, h, w = latents.shape
        return self.pipe._pack_latents(latents, b, c, h, w).to(self.dtype)
