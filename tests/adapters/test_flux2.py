"""FLUX.2's own latent layout: encode_images matches the pipeline's reference-image encoding, and decode inverts it."""

import torch

from diffalign.adapters import load_adapter


def test_encoded_images_are_the_pipelines_packed_reference_latents_and_decode_back(tiny_pipeline_dir):
    adapter = load_adapter(tiny_pipeline_dir("flux2"), height=32, width=32, max_sequence_length=32)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    latents = adapter.encode_images(images, sample=False)
    assert latents.shape == (2, 8 * 8, 4 * 4)  # 16x16 latents -> 8x8 patches of 2x2x4 channels
    with torch.no_grad():
        # The pipeline's own path for a conditioning image: VAE mode, 2x2 patches, batch-norm statistics, packing.
        expected = adapter.pipe._pack_latents(adapter.pipe._encode_vae_image(images * 2 - 1, generator=None))
        torch.testing.assert_close(latents, expected)
        # decode() undoes the packing and the statistics: the same images as the VAE decoding the unpacked mode.
        vae_latents = adapter.vae.encode(images * 2 - 1).latent_dist.mode()
        direct = (adapter.vae.decode(vae_latents).sample / 2 + 0.5).clamp(0, 1)
        torch.testing.assert_close(adapter.decode(latents), direct, atol=1e-5, rtol=1e-5)
