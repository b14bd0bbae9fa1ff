"""Tiny offline pipelines of the real architectures, for tests and examples.

Every family diffalign supports gets a builder that makes a random-weight pipeline of the *real* diffusers classes
(UNet2DConditionModel / SD3Transformer2DModel / FluxTransformer2DModel, AutoencoderKL, CLIP and T5 text encoders),
shrunk to a few hundred thousand parameters, with the real CLIP tokenizer rebuilt offline from open_clip's BPE file
(:mod:`diffalign.tokenizer`). The T5 slots of SD3/FLUX take the same CLIP tokenizer: a tiny T5 encoder with CLIP's
vocabulary size accepts its ids. Nothing here touches the network.

Sizes: a VAE with two blocks (``vae_scale_factor`` 2), so the default 32x32 image has 16x16 latents; a 10-step
batch of 4 runs in well under a second on a laptop CPU.

Example::

    from diffalign.testing import save_tiny_pipeline
    from diffalign.adapters import load_adapter

    folder = save_tiny_pipeline("sd3", "/tmp/tiny-sd3")
    adapter = load_adapter(folder)
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
from pathlib import Path

import torch

from diffalign.tokenizer import CLIP_VOCAB_SIZE, build_clip_tokenizer


FAMILIES = ("sd15", "sd2v", "sdxl", "sd3", "flux", "flux_kontext", "flux2", "qwenimage", "zimage", "sana")
"""The tiny pipelines :func:`build_tiny_pipeline` can build."""

TINY_IMAGE_SIZE = 32
"""Default image side of the tiny pipelines (16x16 latents)."""

_TOKENIZER_DIR: Path | None = None


def _tokenizer(model_max_length: int = 77, pad_token: str = "<|endoftext|>"):
    """The real CLIP tokenizer, rebuilt once per process into a private temporary folder."""
    global _TOKENIZER_DIR
    if _TOKENIZER_DIR is None:
        _TOKENIZER_DIR = Path(tempfile.mkdtemp(prefix="diffalign-clip-tokenizer-"))
    return build_clip_tokenizer(_TOKENIZER_DIR, model_max_length=model_max_length, pad_token=pad_token)


def tiny_clip_text_config(projection_dim: int | None = None):
    """The config of the tiny CLIP text towers every tiny pipeline uses (2 layers, width 32, the real vocabulary)."""
    from transformers import CLIPTextConfig

    kwargs = {"projection_dim": projection_dim} if projection_dim is not None else {}
    return CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
        hidden_act="gelu",
        **kwargs,
    )


def _clip_text_encoder(seed: int, with_projection: bool = False):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    if with_projection:
        return CLIPTextModelWithProjection(tiny_clip_text_config(projection_dim=32))
    return CLIPTextModel(tiny_clip_text_config())


def _t5_encoder(seed: int, d_model: int = 64):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=CLIP_VOCAB_SIZE,
        d_model=d_model,
        d_kv=16,
        d_ff=96,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        decoder_start_token_id=0,
        pad_token_id=49407,
        eos_token_id=49407,
    )
    return T5EncoderModel(config)


def _vae(seed: int, latent_channels: int, **config):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=latent_channels,
        sample_size=TINY_IMAGE_SIZE,
        **config,
    )


def _ddim_scheduler(prediction_type: str):
    from diffusers import DDIMScheduler

    # SD1.5/SD2 scheduler settings (scaled-linear betas, leading spacing with offset 1).
    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )


def _unet(seed: int, **config):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    base = dict(
        sample_size=TINY_IMAGE_SIZE // 2,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=32,
        cross_attention_dim=32,
        attention_head_dim=8,
    )
    base.update(config)
    return UNet2DConditionModel(**base)


def _sd_pipeline(seed: int, prediction_type: str, unet_config: dict):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=_vae(seed, latent_channels=4, scaling_factor=0.18215),
        text_encoder=_clip_text_encoder(seed + 1),
        tokenizer=_tokenizer(),
        unet=_unet(seed + 2, **unet_config),
        scheduler=_ddim_scheduler(prediction_type),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def tiny_sd15(seed: int = 0):
    """SD1.5-style pipeline: UNet with cross-attention, one CLIP text encoder, epsilon prediction, DDIM."""
    return _sd_pipeline(seed, "epsilon", {})


def tiny_sd2v(seed: int = 0):
    """SD2-style pipeline: linear-projection attention, per-block head dims, v_prediction, DDIM."""
    return _sd_pipeline(seed, "v_prediction", {"use_linear_projection": True, "attention_head_dim": (2, 4)})


def tiny_sdxl(seed: int = 0):
    """SDXL-style pipeline: two CLIP text encoders (the second with projection) and micro-conditioning."""
    from diffusers import StableDiffusionXLPipeline

    unet = _unet(
        seed + 3,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        # 6 size/crop numbers x 8 + the pooled text embedding of text_encoder_2 (projection_dim 32).
        projection_class_embeddings_input_dim=6 * 8 + 32,
        cross_attention_dim=64,  # hidden states of both text encoders, concatenated (32 + 32)
    )
    return StableDiffusionXLPipeline(
        vae=_vae(seed, latent_channels=4, scaling_factor=0.13025),
        text_encoder=_clip_text_encoder(seed + 1),
        text_encoder_2=_clip_text_encoder(seed + 2, with_projection=True),
        tokenizer=_tokenizer(),
        tokenizer_2=_tokenizer(pad_token="!"),
        unet=unet,
        scheduler=_ddim_scheduler("epsilon"),
        force_zeros_for_empty_prompt=True,
    )


def tiny_sd3(seed: int = 0, latent_channels: int = 16):
    """SD3-style pipeline: MMDiT transformer, two CLIP encoders with projection + T5, flow matching."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(seed + 4)
    transformer = SD3Transformer2DModel(
        sample_size=TINY_IMAGE_SIZE // 2,
        patch_size=2,
        in_channels=latent_channels,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=64,  # T5 d_model; the CLIP hidden states (32 + 32) are zero-padded to it
        caption_projection_dim=32,
        pooled_projection_dim=64,  # pooled CLIP-L + CLIP-G projections (32 + 32)
        out_channels=latent_channels,
        pos_embed_max_size=16,
    )
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(
            seed,
            latent_channels=16,
            scaling_factor=1.5305,
            shift_factor=0.0609,
            use_quant_conv=False,
            use_post_quant_conv=False,
        ),
        text_encoder=_clip_text_encoder(seed + 1, with_projection=True),
        tokenizer=_tokenizer(),
        text_encoder_2=_clip_text_encoder(seed + 2, with_projection=True),
        tokenizer_2=_tokenizer(),
        text_encoder_3=_t5_encoder(seed + 3),
        tokenizer_3=_tokenizer(model_max_length=512),
    )


def flux_scheduler():
    """FLUX's flow scheduler: shift 3 with the resolution-dependent (dynamic, exponential) shift between 0.5 and
    1.15 over 256 to 4096 image tokens; FLUX.2 ships the same settings."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )


def tiny_flux(seed: int = 0, latent_channels: int = 16):
    """FLUX.1-dev-style pipeline: double/single-stream transformer, packed latents, guidance embedding."""
    from diffusers import FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(seed + 4)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * latent_channels,  # latent channels x 2x2 packing
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=64,  # T5 d_model
        pooled_projection_dim=32,  # pooled CLIP-L output
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    )
    return FluxPipeline(
        scheduler=flux_scheduler(),
        vae=_vae(
            seed,
            latent_channels=16,
            scaling_factor=0.3611,
            shift_factor=0.1159,
            use_quant_conv=False,
            use_post_quant_conv=False,
        ),
        text_encoder=_clip_text_encoder(seed + 1),
        tokenizer=_tokenizer(),
        text_encoder_2=_t5_encoder(seed + 3),
        tokenizer_2=_tokenizer(model_max_length=512),
        transformer=transformer,
    )


QWEN_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
"""The special tokens of Qwen's chat template that the tiny Qwen tokenizer knows."""

_QWEN_TOKENIZER_CORPUS = (
    "Describe the image by detailing the color, shape, size, texture, quantity, text, spatial relationships of the "
    "objects and background:",
    "a photo of one two three red green blue yellow purple circle square triangle star dot to the left right of above "
    "below a cat dog on the table",
)


def tiny_qwen2_tokenizer():
    """A byte-level BPE tokenizer of Qwen's kind (:class:`transformers.Qwen2TokenizerFast`, 400 tokens with Qwen's
    chat special tokens), trained here on a fixed two-line corpus, so every text tokenises and nothing is downloaded.

    Qwen-Image's pipeline drops the first 34 tokens of its system-prompt template (their count under the real
    tokenizer); this one splits the template's prefix into 42, so the last 8 template tokens stay with the prompt,
    like a longer system prompt. The prompt itself is never cut.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=list(QWEN_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_QWEN_TOKENIZER_CORPUS, trainer)
    return Qwen2TokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None, bos_token=None
    )


def tiny_decoder_config(vocab_size: int) -> dict:
    """The settings of the tiny decoder-only text encoders (Qwen3 for Z-Image, Gemma 2 for SANA): 2 layers of width
    32, 4 query and 2 key-value heads of 8 dimensions, padding id 0."""
    return dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=2048,
        pad_token_id=0,
    )


def _qwen25_vl_text_encoder(seed: int, vocab_size: int, hidden_size: int = 32):
    """A tiny Qwen2.5-VL (2 text layers of width 32 with multimodal RoPE, a one-block vision tower)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=2048,
            rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]},  # sums to head_dim / 2 = 4
            bos_token_id=None,
            eos_token_id=2,
            pad_token_id=0,
        ),
        vision_config=dict(
            depth=1,
            hidden_size=16,
            intermediate_size=16,
            num_heads=2,
            out_hidden_size=hidden_size,
            fullatt_block_indexes=[0],
        ),
    )
    return Qwen2_5_VLForConditionalGeneration(config)


def tiny_qwenimage(seed: int = 0, latent_channels: int = 4):
    """Qwen-Image-style pipeline: MMDiT with separate image/text MLPs over a Qwen2.5-VL encoder, a causal video VAE
    (one frame per image), packed latents, true CFG."""
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )

    tokenizer = tiny_qwen2_tokenizer()
    torch.manual_seed(seed)
    vae = AutoencoderKLQwenImage(
        base_dim=8,
        z_dim=latent_channels,
        dim_mult=[1, 2],
        num_res_blocks=1,
        temperal_downsample=[False],  # vae_scale_factor 2, as every tiny pipeline here
        latents_mean=[0.1 * i for i in range(latent_channels)],
        latents_std=[1.0 + 0.1 * i for i in range(latent_channels)],
    )
    torch.manual_seed(seed + 4)
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=4 * latent_channels,
        out_channels=latent_channels,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,  # the text encoder's width
        axes_dims_rope=(4, 6, 6),
    )
    # Qwen-Image's own scheduler settings (dynamic shift up to 0.9, terminal sigma 0.02).
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=1.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=0.9,
        base_image_seq_len=256,
        max_image_seq_len=8192,
        shift_terminal=0.02,
        time_shift_type="exponential",
    )
    return QwenImagePipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=_qwen25_vl_text_encoder(seed + 1, len(tokenizer)),
        tokenizer=tokenizer,
        transformer=transformer,
    )


QWEN3_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
"""Qwen3's chat template, reduced to what a text-to-image prompt uses: messages, the generation prompt and the empty
thinking block that ``enable_thinking=False`` adds."""


def tiny_zimage(seed: int = 0, latent_channels: int = 4):
    """Z-Image-style pipeline: single-stream DiT with noise and caption refiners over a Qwen3 encoder (second-to-last
    hidden states), list inputs of per-sample length, a FLUX-style VAE."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    tokenizer = tiny_qwen2_tokenizer()
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
    torch.manual_seed(seed + 1)
    text_encoder = Qwen3Model(Qwen3Config(**tiny_decoder_config(len(tokenizer))))
    torch.manual_seed(seed + 4)
    transformer = ZImageTransformer2DModel(
        in_channels=latent_channels,
        dim=32,
        n_layers=2,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        cap_feat_dim=32,  # the text encoder's width
        axes_dims=[4, 6, 6],
        axes_lens=[1024, 64, 64],
    )
    vae = _vae(seed, latent_channels=latent_channels, scaling_factor=0.3611, shift_factor=0.1159)
    return ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),  # Z-Image's scheduler
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )


def tiny_flux_kontext(seed: int = 0, latent_channels: int = 16):
    """FLUX.1 Kontext-style pipeline: the tiny FLUX.1 components in ``FluxKontextPipeline``, which edits a source
    image (its packed latents sit beside the noise's in the transformer's sequence)."""
    from diffusers import FluxKontextPipeline

    return FluxKontextPipeline(**tiny_flux(seed, latent_channels).components)


MISTRAL_CHAT_TEMPLATE = (
    "{% for message in messages %}[{{ message['role'] | upper }}]"
    "{% for part in message['content'] %}{{ part['text'] }}{% endfor %}[/{{ message['role'] | upper }}]{% endfor %}"
)
"""A chat template of Mistral's shape for the tiny FLUX.2 tokenizer: FLUX.2's pipeline sends a system message and the
prompt as lists of text parts."""


def tiny_flux2(seed: int = 0, latent_channels: int = 4):
    """FLUX.2-dev-style pipeline: double/single-stream transformer with 4-axis RoPE and a guidance embedding, a
    Mistral-3 text encoder read at layers 10, 20 and 30 (so 30 tiny layers), a VAE with batch-norm statistics."""
    from diffusers import AutoencoderKLFlux2, Flux2Pipeline, Flux2Transformer2DModel
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    tokenizer = tiny_qwen2_tokenizer()
    tokenizer.chat_template = MISTRAL_CHAT_TEMPLATE
    torch.manual_seed(seed + 1)
    text_config = dict(
        model_type="mistral",
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=30,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=1024,
        pad_token_id=0,
    )
    vision_config = dict(
        model_type="pixtral",
        hidden_size=16,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        head_dim=8,
        image_size=28,
        patch_size=14,
    )
    text_encoder = Mistral3ForConditionalGeneration(
        Mistral3Config(text_config=text_config, vision_config=vision_config, spatial_merge_size=2)
    )
    torch.manual_seed(seed + 4)
    transformer = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=4 * latent_channels,  # latent channels x 2x2 patch
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=3 * 16,  # three text-encoder layers, stacked per token
        timestep_guidance_channels=32,
        axes_dims_rope=(4, 4, 4, 4),
    )
    torch.manual_seed(seed)
    vae = AutoencoderKLFlux2(
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=TINY_IMAGE_SIZE,
    )
    with torch.no_grad():  # statistics of a trained VAE, not the identity a fresh batch norm holds
        vae.bn.running_mean.copy_(torch.linspace(-0.2, 0.2, vae.bn.running_mean.numel()))
        vae.bn.running_var.copy_(torch.linspace(0.5, 1.5, vae.bn.running_var.numel()))
    return Flux2Pipeline(
        scheduler=flux_scheduler(), vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer
    )


def tiny_sana(seed: int = 0, latent_channels: int = 4):
    """SANA-style pipeline: linear-attention DiT with cross-attention to a Gemma 2 encoder and a deep-compression
    autoencoder (one ResBlock and one EfficientViT stage, so 2x here). The released models ship a flow DPM-Solver++;
    the tiny one steps with FlowMatchEulerDiscreteScheduler (shift 3, SANA's flow_shift), whose Euler step is the ODE
    kernel diffalign's rollouts use, so rollouts can be compared with the pipeline."""
    from diffusers import AutoencoderDC, FlowMatchEulerDiscreteScheduler, SanaPipeline, SanaTransformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    tokenizer = tiny_qwen2_tokenizer()
    torch.manual_seed(seed + 1)
    text_encoder = Gemma2Model(Gemma2Config(**tiny_decoder_config(len(tokenizer))))
    torch.manual_seed(seed + 4)
    transformer = SanaTransformer2DModel(
        in_channels=latent_channels,
        out_channels=latent_channels,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=2,
        num_cross_attention_heads=2,
        cross_attention_head_dim=8,
        cross_attention_dim=16,
        caption_channels=32,  # the text encoder's width
        sample_size=TINY_IMAGE_SIZE // 2,
    )
    torch.manual_seed(seed)
    vae = AutoencoderDC(
        latent_channels=latent_channels,
        attention_head_dim=8,
        encoder_block_types=("ResBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "EfficientViTBlock"),
        encoder_block_out_channels=(8, 16),
        decoder_block_out_channels=(8, 16),
        encoder_layers_per_block=(1, 1),
        decoder_layers_per_block=(1, 1),
        encoder_qkv_multiscales=((), (5,)),
        decoder_qkv_multiscales=((), (5,)),
        scaling_factor=0.41407,  # SANA's DC-AE f32c32
    )
    return SanaPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
    )


_BUILDERS = {
    "sd15": tiny_sd15,
    "sd2v": tiny_sd2v,
    "sdxl": tiny_sdxl,
    "sd3": tiny_sd3,
    "flux": tiny_flux,
    "flux_kontext": tiny_flux_kontext,
    "flux2": tiny_flux2,
    "qwenimage": tiny_qwenimage,
    "zimage": tiny_zimage,
    "sana": tiny_sana,
}


SHAPES_VAE = Path(__file__).resolve().parent / "shapes" / "assets" / "base_model" / "vae"
"""The tiny VAE trained on the shapes world (32x32 images <-> 16x16x4 latents), shipped with the demo model."""


def build_tiny_pipeline(family: str, seed: int = 0, vae: str = "random"):
    """Build a tiny random-weight pipeline of ``family`` (one of :data:`FAMILIES`), in fp32 on the CPU.

    Args:
        family: which architecture.
        seed: weight initialisation seed.
        vae: ``"random"`` (every component random) or ``"shapes"``: the trained shapes-world VAE (4 latent
            channels) with a random denoiser. A random VAE decodes almost every latent to the same flat colours
            (its GroupNorms cancel latent shifts), so a colour reward barely varies between samples; learning
            tests use the trained VAE, through which colours follow the latents.
    """
    if family not in _BUILDERS:
        raise ValueError(f"unknown tiny pipeline family {family!r}; choose one of {', '.join(FAMILIES)}")
    if vae not in ("random", "shapes"):
        raise ValueError(f"vae must be 'random' or 'shapes', got {vae!r}")
    if vae == "shapes" and family == "qwenimage":
        raise ValueError(
            "the shapes VAE is a 2-D AutoencoderKL; qwenimage's causal video VAE has no trained tiny form"
        )
    if vae == "shapes":
        from diffusers import AutoencoderKL

        kwargs = {"latent_channels": 4} if family in ("sd3", "flux", "flux_kontext") else {}
        pipe = _BUILDERS[family](seed, **kwargs)
        pipe.vae = AutoencoderKL.from_pretrained(SHAPES_VAE)
        pipe.register_modules(vae=pipe.vae)
    else:
        pipe = _BUILDERS[family](seed)
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval()  # freshly constructed modules are in train mode (T5 dropout); from_pretrained gives eval
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_pipeline(family: str, folder: str | os.PathLike, seed: int = 0, vae: str = "random") -> Path:
    """Build a tiny ``family`` pipeline (see :func:`build_tiny_pipeline`) and ``save_pretrained`` it to ``folder``."""
    folder = Path(folder)
    build_tiny_pipeline(family, seed, vae=vae).save_pretrained(folder)
    return folder


def random_lora_adapter(folder: str | os.PathLike, size: int = 16, rank: int = 4, scale: float = 0.3, seed: int = 0):
    """A tiny pipeline's adapter at ``size`` px with a LoRA of random weights (``scale`` times standard normal, so
    that the LoRA model differs from the base model; a fresh LoRA's zero B matrices would leave them equal)."""
    from diffalign.adapters import load_adapter

    adapter = load_adapter(folder, height=size, width=size)
    adapter.add_lora(rank=rank)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in adapter.denoiser.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
    return adapter


def redness(images: torch.Tensor, prompts=None) -> torch.Tensor:
    """A differentiable toy reward: mean red minus the mean of green and blue, per image, in ``[-1, 1]``.

    Args:
        images: ``[B, 3, H, W]`` in ``[0, 1]``.
        prompts: ignored.
    """
    red, green, blue = images[:, 0], images[:, 1], images[:, 2]
    return (red - (green + blue) / 2).flatten(1).mean(1)


redness.differentiable = True


def redder_than_source(images: torch.Tensor, prompts=None, metadata=None) -> torch.Tensor:
    """A toy edit reward: :func:`redness` of each image minus that of its source image (``metadata[i]["image"]``, the
    path an edit run's prompt record names), per image; the edit is scored relative to what it started from.

    Args:
        images: ``[B, 3, H, W]`` in ``[0, 1]``.
        prompts: ignored.
        metadata: ``B`` dicts, each with the source image's path under ``"image"``.
    """
    from diffalign.data.image_captions import load_real_image

    if metadata is None or any("image" not in item for item in metadata):
        raise ValueError("redder_than_source scores edits: every image needs its source's path in metadata['image']")
    height, width = images.shape[-2:]
    sources = torch.stack([load_real_image(Path(item["image"]), height, width) for item in metadata])
    return redness(images) - redness(sources.to(images.device))


def free_port() -> int:
    """A loopback TCP port that was free a moment ago (the system picks it), for a server or launch to bind."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def cpu_launch_command(num_processes: int = 2) -> list[str]:
    """The ``accelerate launch`` command prefix for a multi-process run on this machine, on a free port.

    accelerate's default port (29500) fails with EADDRINUSE when an earlier launch's socket still holds it, so each
    launch asks the system for its own. Add ``--multi_gpu`` or ``--config_file`` and the script; run it with
    ``ACCELERATE_USE_CPU=1`` for gloo on CPU.
    """
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(num_processes)]
    return launch + ["--num_machines", "1", "--main_process_port", str(free_port())]
