"""Z-Image (single-stream DiT over a Qwen3 text encoder; per-sample lists of image and text tokens)."""

from __future__ import annotations

import torch
from torch import Tensor

from diffalign.adapters.base import Conditioning, DiffusionAdapter, PromptInput, Schedule, _cat_padded
from diffalign.adapters.sd import _negative_list


Z_IMAGE_LORA_TARGETS = (
    "attention.to_q",
    "attention.to_k",
    "attention.to_v",
    "attention.to_out.0",
    "feed_forward.w1",
    "feed_forward.w2",
    "feed_forward.w3",
)
"""The attention projections and SwiGLU MLP of every block (refiners and main layers): Flow-Factory's Z-Image
defaults (``default_target_modules`` in X-GenGroup/Flow-Factory ``src/flow_factory/models/z_image/z_image.py``;
docs/architecture.md#lora-targets)."""

_TEXT_KEYS = frozenset({"cap_feats", "cap_mask"})


class ZImageAdapter(DiffusionAdapter):
    """Adapter for ``ZImagePipeline``.

    The transformer takes Python lists, one ``[C, 1, h, w]`` latent and one ``[L_i, D]`` caption per sample, with
    the caption's padding removed; the adapter keeps captions as a ragged ``cap_feats [B, L, D]`` with
    ``cap_mask [B, L]`` (:class:`~diffalign.adapters.base.Conditioning`) and splits them per sample at each call.
    Latents are ``[B, C, h, w]`` as in SD3. The transformer's time runs the other way (``(1000 - t) / 1000``) and it
    predicts the negated velocity, which :meth:`_forward` turns back into the library's ``noise - x0`` convention.

    Guidance: ``guidance_scale`` here is classifier-free guidance in the usual form, ``uncond + s (text - uncond)``.
    The pipeline writes it as ``text + g (text - uncond)``, so its ``guidance_scale=g`` is ``s = g + 1`` here (the
    model card's 4.0 is 5.0 here); ``s <= 1`` means no CFG, as ``g = 0`` does there. Its optional
    ``cfg_normalization`` and ``cfg_truncation`` are not applied.

    Args:
        max_sequence_length: text tokens per prompt before padding is removed (the pipeline's default, 512).
    """

    family = "zimage"
    denoiser_name = "transformer"
    pipeline_class_names = ("ZImagePipeline",)
    default_lora_targets = Z_IMAGE_LORA_TARGETS
    default_num_steps = 50
    default_guidance_scale = 6.0  # the pipeline's default guidance_scale=5.0 in its own convention
    default_dpo_beta = 100.0  # no published DPO recipe: the flow-matching scale of SD3

    def __init__(self, pipe, *args, max_sequence_length: int = 512, **kwargs) -> None:
        self.max_sequence_length = max_sequence_length
        super().__init__(pipe, *args, **kwargs)

    @property
    def default_resolution(self) -> int:
        return 1024  # the pipeline's default height and width

    @property
    def latent_multiple(self) -> int:
        return self.vae_scale_factor * 2  # the transformer patchifies 2x2

    def _encode(self, prompts: list[str], negative_prompt: PromptInput | None, with_negative: bool) -> Conditioning:
        cond = Conditioning(self._encode_texts(prompts), ragged=_TEXT_KEYS)
        if with_negative:
            cond.negative = self._encode_texts(_negative_list(negative_prompt, len(prompts)) or [""] * len(prompts))
        return cond

    def _encode_texts(self, texts: list[str]) -> dict[str, Tensor]:
        """The pipeline's per-prompt captions (chat template, Qwen3's second-to-last hidden states, padding
        removed), padded back into one ``[B, L, D]`` tensor with its mask."""
        captions, _ = self.pipe.encode_prompt(
            list(texts), self.device, do_classifier_free_guidance=False, max_sequence_length=self.max_sequence_length
        )
        feats = _cat_padded([caption[None] for caption in captions], ragged=True)
        masks = [torch.ones(1, len(caption), dtype=torch.long, device=caption.device) for caption in captions]
        return {"cap_feats": feats.to(self.dtype), "cap_mask": _cat_padded(masks, ragged=True)}

    def prepare_latents(
        self, batch_size: int, generator: torch.Generator | list[torch.Generator] | None = None
    ) -> Tensor:
        channels = self.denoiser.config.in_channels
        return self.pipe.prepare_latents(
            batch_size, channels, self.height, self.width, self.dtype, self.device, generator
        )

    def _forward(self, latents: Tensor, timesteps: Tensor, inputs: dict[str, Tensor], cond: Conditioning) -> Tensor:
        lengths = inputs["cap_mask"].sum(dim=1).tolist()
        captions = [feats[:length] for feats, length in zip(inputs["cap_feats"], lengths)]
        frames = list(latents.unsqueeze(2).unbind(dim=0))  # B x [C, 1, h, w]
        # The time in float32, as the pipeline computes it (bf16 would round t = 997 to 996).
        outputs = self.call_denoiser(frames, (1000 - timesteps.float()) / 1000, captions, return_dict=False)[0]
        return -torch.stack(outputs).squeeze(2)

    def set_timesteps(self, num_inference_steps: int) -> Schedule:
        # The pipeline always passes mu; a scheduler without dynamic shifting ignores it and applies its own shift.
        h, w = self.height // self.vae_scale_factor, self.width // self.vae_scale_factor
        return self.linear_flow_schedule(num_inference_steps, (h // 2) * (w // 2))
