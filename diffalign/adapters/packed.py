"""The shared part of the flow families whose transformer reads 2x2-packed latents (FLUX.1, Qwen-Image).

Their pipelines draw the noise unpacked, pack it with ``_pack_latents`` to ``[B, (h/2)(w/2), 4C]`` and set the
schedule the same way: sigmas ``linspace(1, 1/N, N)`` shifted by ``mu``, which grows with the number of packed tokens
(``calculate_shift``). This base holds that; each family adds its text conditioning, its denoiser call and its VAE.
"""

from __future__ import annotations

import torch
from torch import Tensor

from diffalign.adapters.base import DiffusionAdapter, Schedule


class PackedFlowAdapter(DiffusionAdapter):
    """Base of the adapters whose latents live packed, ``[B, (h/2)(w/2), 4C]``, through the whole sampling loop
    (the step kernels are layout agnostic); subclasses unpack in :meth:`decode` and pack in :meth:`encode_images`."""

    @property
    def default_resolution(self) -> int:
        return self.pipe.default_sample_size * self.vae_scale_factor

    @property
    def latent_multiple(self) -> int:
        return self.vae_scale_factor * 2

    @property
    def _latent_hw(self) -> tuple[int, int]:
        return self.height // self.vae_scale_factor, self.width // self.vae_scale_factor

    def prepare_latents(
        self, batch_size: int, generator: torch.Generator | list[torch.Generator] | None = None
    ) -> Tensor:
        channels = self.denoiser.config.in_channels // 4
        latents = self.pipe.prepare_latents(
            batch_size, channels, self.height, self.width, self.dtype, self.device, generator
        )
        return latents[0] if isinstance(latents, tuple) else latents  # FLUX also returns its image ids

    def set_timesteps(self, num_inference_steps: int) -> Schedule:
        h, w = self._latent_hw
        return self.linear_flow_schedule(num_inference_steps, (h // 2) * (w // 2))
