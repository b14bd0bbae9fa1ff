"""Random-weight checkpoints in the published on-disk formats of each scorer, at full or tiny size.

Runs in the project's environment (torch, open_clip, transformers; never diffalign). ``run.sh`` calls
``python writers.py WORKDIR`` once to write full-size files that both the reference packages (in their own
environment) and ``rewards.load(..., path=...)`` read; tests/rewards/test_parity_writers.py calls the same writers with
tiny geometries so that the formats cannot rot unnoticed.

Formats written (one folder per scorer under ``WORKDIR``):

- ``hps/HPS_v2_compressed.pt``: ``{"state_dict": <open_clip ViT-H-14 keys>}`` in float16 (the published "compressed"
  files are about 2 bytes per parameter).
- ``aesthetic/sac+logos+ava1-l14-linearMSE.pth``: the LAION head's plain state dict (``layers.{0,2,4,6,7}.*``);
  ``aesthetic/ViT-L-14.pt``: OpenAI CLIP ViT-L/14 state dict in OpenAI key names, float16 (the ``clip`` package
  publishes a TorchScript archive of float16 weights; ``clip.load(jit=False)`` reduces it to ``state_dict()`` and
  ``build_model``, and accepts a plain state dict through the same path); ``aesthetic/clip-vit-large-patch14/``: the
  same weights converted to a transformers ``CLIPModel`` folder, for our scorer.
- ``imagereward/ImageReward.pt`` (plain state dict, ``blip.*`` + ``mlp.*``) + ``med_config.json`` + ``bert/vocab.txt``.
- ``pickscore/``: a transformers ``CLIPModel`` folder (ViT-H/14 geometry) with CLIP tokenizer files and the
  ``preprocessor_config.json`` of the LAION ViT-H/14 processor.
- ``images/``: smooth random PNGs at 224 x 224 (no resampling on either side) and 320 x 256, and ``manifest.json``.
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor


CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
PROMPTS = [
    "a red cube to the left of a blue ball",
    "two green cats sleeping on a mat",
    "a photo of a dog on the beach at sunset",
    "an astronaut riding a horse, oil painting",
]
IMAGE_SIZES = [(224, 224), (256, 320)]  # (height, width)

# Full architectures (facts: open_clip's ViT-H-14 config, OpenAI CLIP ViT-L/14, BLIP ViT-L/16 + med_config.json).
HPS_FULL = "ViT-H-14"
AESTHETIC_FULL = "ViT-L-14-quickgelu"  # OpenAI CLIP ViT-L/14: QuickGELU, 64-wide heads
PICKSCORE_FULL = {
    "text": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16),
    "vision": dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16),
    "projection_dim": 1024,
}
IMAGEREWARD_FULL = {
    "vision": dict(width=1024, depth=24, patch=16, image=224),
    "med": {
        "architectures": ["BertModel"],
        "attention_probs_dropout_prob": 0.1,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "hidden_size": 768,
        "initializer_range": 0.02,
        "intermediate_size": 3072,
        "layer_norm_eps": 1e-12,
        "max_position_embeddings": 512,
        "model_type": "bert",
        "num_attention_heads": 12,
        "num_hidden_layers": 12,
        "pad_token_id": 0,
        "type_vocab_size": 2,
        "vocab_size": 30524,
        "encoder_width": 768,
        "add_cross_attention": True,
    },
}
CLIP_BOS, CLIP_EOT = 49406, 49407


def perturb_(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Give every LayerNorm a non-trivial affine map and every bias a random value, in place.

    Default initialisations leave LayerNorm at (1, 0) and biases at 0, which would hide a swapped or dropped
    norm/bias key in a converted checkpoint.
    """
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith("bias"):
                param.copy_(0.02 * noise)
            elif param.ndim == 1 and ("ln" in name or "norm" in name.lower()):
                param.copy_(1.0 + 0.1 * noise)


def random_open_clip(folder: Path, model: str | dict, config_name: str, seed: int):
    """An open_clip model with random weights: ``model`` is an architecture name, or a config dict registered with
    open_clip as ``folder / f"{config_name}.json"`` (its stem names it)."""
    import open_clip

    folder.mkdir(parents=True, exist_ok=True)
    name = model
    if isinstance(model, dict):
        config = folder / f"{config_name}.json"
        config.write_text(json.dumps(model))
        open_clip.add_model_config(config)
        name = config.stem
    torch.manual_seed(seed)
    clip = open_clip.create_model(name, pretrained=None)
    perturb_(clip, torch.Generator().manual_seed(seed))
    return clip


def half_state(module: torch.nn.Module) -> dict[str, Tensor]:
    """The module's state dict with floating tensors in float16 (the published checkpoints' precision)."""
    return {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in module.state_dict().items()}


# --- tokenizers ---------------------------------------------------------------------------------------------------


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable character table, in the order that numbers the BPE base vocabulary.

    The printable bytes come first and map to themselves; the other bytes follow, mapped to ``chr(256 + n)``.
    """
    order = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    order += list(range(ord("®"), ord("ÿ") + 1))
    others = [b for b in range(256) if b not in order]
    chars = [chr(b) for b in order] + [chr(256 + n) for n in range(len(others))]
    return dict(zip(order + others, chars))


def write_clip_tokenizer(folder: Path) -> None:
    """The real CLIP BPE tokenizer (``vocab.json`` + ``merges.txt``, 49,408 ids) from open_clip's shipped merges."""
    import open_clip

    bpe_file = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    merges = gzip.open(bpe_file).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "do_lower_case": True,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1))


def write_bert_vocab(folder: Path, vocab_size: int = 30522) -> None:
    """A ``bert-base-uncased``-shaped ``vocab.txt``: the special tokens at their real ids, the prompts' words, fillers.

    ImageReward adds ``[DEC]`` and ``[ENC]`` after these, so the text encoder's vocabulary is ``vocab_size + 2``.
    """
    tokens = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words = sorted({w for p in PROMPTS for w in p.replace(",", " , ").split()} | set("abcdefghijklmnopqrstuvwxyz,."))
    tokens += [w for w in words if w not in tokens]
    tokens += [f"filler{i}" for i in range(vocab_size - len(tokens))]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(tokens[:vocab_size]) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True, "model_max_length": 512}))


# --- HPSv2 ----------------------------------------------------------------------------------------------------------


def write_hps(folder: Path, model: str | dict = HPS_FULL, seed: int = 0) -> Path:
    """``HPS_v2_compressed.pt`` for the open_clip architecture ``model`` (a name, or a config dict for tiny tests).

    Returns:
        The checkpoint path. For a config dict, ``folder / "model.json"`` holds it (pass it as ``model=``).
    """
    clip = random_open_clip(folder, model, "parity-hps", seed)
    path = folder / "HPS_v2_compressed.pt"
    torch.save({"state_dict": half_state(clip), "epoch": 1}, path)
    return path


# --- aesthetic ------------------------------------------------------------------------------------------------------


def openai_to_hf_clip(state: dict[str, Tensor]) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Convert an OpenAI CLIP state dict to ``(CLIPConfig kwargs, transformers CLIPModel state dict)``.

    Geometry is read from the tensors as ``clip.model.build_model`` does (heads = width // 64, QuickGELU).
    """
    v_width, _, patch, _ = state["visual.conv1.weight"].shape
    v_layers = len({k.split(".")[3] for k in state if k.startswith("visual.transformer.resblocks.")})
    t_width = state["ln_final.weight"].shape[0]
    t_layers = len({k.split(".")[2] for k in state if k.startswith("transformer.resblocks.")})
    embed_dim = state["text_projection"].shape[1]
    grid = round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    config = {
        "text_config": dict(
            vocab_size=state["token_embedding.weight"].shape[0],
            hidden_size=t_width,
            intermediate_size=4 * t_width,
            num_hidden_layers=t_layers,
            num_attention_heads=max(t_width // 64, 1),
            max_position_embeddings=state["positional_embedding"].shape[0],
            hidden_act="quick_gelu",
            bos_token_id=CLIP_BOS,
            eos_token_id=CLIP_EOT,
            pad_token_id=CLIP_EOT,
        ),
        "vision_config": dict(
            hidden_size=v_width,
            intermediate_size=4 * v_width,
            num_hidden_layers=v_layers,
            num_attention_heads=max(v_width // 64, 1),
            image_size=grid * patch,
            patch_size=patch,
            hidden_act="quick_gelu",
            projection_dim=embed_dim,
        ),
        "projection_dim": embed_dim,
    }
    out: dict[str, Tensor] = {
        "logit_scale": state["logit_scale"],
        "text_projection.weight": state["text_projection"].t(),
        "visual_projection.weight": state["visual.proj"].t(),
        "text_model.embeddings.token_embedding.weight": state["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": state["positional_embedding"],
        "text_model.final_layer_norm.weight": state["ln_final.weight"],
        "text_model.final_layer_norm.bias": state["ln_final.bias"],
        "vision_model.embeddings.class_embedding": state["visual.class_embedding"],
        "vision_model.embeddings.position_embedding.weight": state["visual.positional_embedding"],
        "vision_model.embeddings.patch_embedding.weight": state["visual.conv1.weight"],
        "vision_model.pre_layrnorm.weight": state["visual.ln_pre.weight"],
        "vision_model.pre_layrnorm.bias": state["visual.ln_pre.bias"],
        "vision_model.post_layernorm.weight": state["visual.ln_post.weight"],
        "vision_model.post_layernorm.bias": state["visual.ln_post.bias"],
    }
    towers = (("transformer.resblocks.", "text_model.encoder.layers."),)
    towers += (("visual.transformer.resblocks.", "vision_model.encoder.layers."),)
    renames = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
    renames["attn.out_proj"] = "self_attn.out_proj"
    for key, value in state.items():
        for source, target in towers:
            if not key.startswith(source):
                continue
            index, rest = key.removeprefix(source).split(".", 1)
            prefix = f"{target}{index}."
            if rest.startswith("attn.in_proj_"):
                kind = rest.removeprefix("attn.in_proj_")  # "weight" or "bias"
                for name, chunk in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                    out[f"{prefix}self_attn.{name}.{kind}"] = chunk
            else:
                module, kind = rest.rsplit(".", 1)
                out[f"{prefix}{renames[module]}.{kind}"] = value
    return config, out


def write_hf_clip(folder: Path, config: dict[str, Any], state: dict[str, Tensor]) -> Path:
    """Save ``state`` (transformers names) as a ``CLIPModel`` folder, refusing any missing or unused key."""
    from transformers import CLIPConfig, CLIPModel

    model = CLIPModel(CLIPConfig(**config))
    result = model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("position_ids")]
    if missing or result.unexpected_keys:
        raise KeyError(f"CLIP conversion: missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}")
    model.save_pretrained(folder)
    return folder


def write_aesthetic_head(path: Path, input_size: int, seed: int) -> Path:
    """The LAION predictor head (``Linear 768-1024-128-64-16-1``, dropouts at 1, 3, 5) as a plain state dict.

    Weights are scaled up from the default init so that scores depend clearly on the embedding (the real head is
    affine with ``|w| = 18``); the last bias is set near the real one (5.24).
    """
    generator = torch.Generator().manual_seed(seed)
    widths = [input_size, 1024, 128, 64, 16, 1]
    state = {}
    for index, (fan_in, fan_out) in zip((0, 2, 4, 6, 7), zip(widths, widths[1:])):
        state[f"layers.{index}.weight"] = 2.0 * torch.randn(fan_out, fan_in, generator=generator) / fan_in**0.5
        state[f"layers.{index}.bias"] = 0.1 * torch.randn(fan_out, generator=generator)
    state["layers.7.bias"] = torch.tensor([5.0])
    torch.save(state, path)
    return path


def write_aesthetic(folder: Path, model: str | dict = AESTHETIC_FULL, seed: int = 1) -> dict[str, Path]:
    """Head ``.pth``, OpenAI-format ``ViT-L-14.pt`` and the converted HF ``CLIPModel`` folder.

    ``model`` is an open_clip QuickGELU architecture name or config dict; open_clip's CLIP uses OpenAI's key names.
    """
    clip = random_open_clip(folder, model, "parity-clip-l", seed)
    state = half_state(clip)  # OpenAI's archives hold float16 weights; clip.load(...).float() on CPU
    torch.save(state, folder / "ViT-L-14.pt")
    hf_config, hf_state = openai_to_hf_clip(state)
    hf_folder = write_hf_clip(folder / "clip-vit-large-patch14", hf_config, hf_state)
    head = write_aesthetic_head(folder / "sac+logos+ava1-l14-linearMSE.pth", hf_config["projection_dim"], seed)
    return {"head": head, "openai_clip": folder / "ViT-L-14.pt", "hf_clip": hf_folder}


# --- PickScore ------------------------------------------------------------------------------------------------------


def write_pickscore(folder: Path, geometry: dict = PICKSCORE_FULL, seed: int = 2) -> Path:
    """A ``CLIPModel`` folder (GELU, LAION ViT-H/14 layout) + CLIP tokenizer + LAION ViT-H/14 processor config."""
    from transformers import CLIPConfig, CLIPModel

    folder.mkdir(parents=True, exist_ok=True)
    text = dict(geometry["text"], vocab_size=49408, max_position_embeddings=77, hidden_act="gelu")
    text.update(bos_token_id=CLIP_BOS, eos_token_id=CLIP_EOT, pad_token_id=CLIP_EOT)
    vision = dict(geometry["vision"], image_size=224, patch_size=14, hidden_act="gelu")
    vision["projection_dim"] = geometry["projection_dim"]
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=geometry["projection_dim"]))
    perturb_(model, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        model.logit_scale.fill_(4.0)  # not HF's init value (2.659) nor log(100): a wrong scale cannot pass
    model.save_pretrained(folder)
    write_clip_tokenizer(folder)
    processor = {
        "crop_size": 224,
        "do_center_crop": True,
        "do_normalize": True,
        "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor",
        "image_mean": CLIP_MEAN,
        "image_std": CLIP_STD,
        "resample": 3,
        "size": 224,
    }
    (folder / "preprocessor_config.json").write_text(json.dumps(processor, indent=1))
    return folder


# --- ImageReward ----------------------------------------------------------------------------------------------------


def imagereward_state(vision: dict[str, int], med: dict[str, Any], seed: int) -> dict[str, Tensor]:
    """An ``ImageReward.pt`` state dict (BLIP ViT + med BERT with cross-attention + MLP head), random values.

    Key names and shapes follow ImageReward's ``BLIP_Pretrain(vit='large')`` + ``MLP(768)``; the reference run loads
    it with ``strict=False`` and reports any missing or unexpected key, so this list is checked against the real
    module tree.
    """
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float = 0.02) -> Tensor:
        return scale * torch.randn(*shape, generator=generator)

    def linear(name: str, fan_out: int, fan_in: int) -> None:
        state[f"{name}.weight"], state[f"{name}.bias"] = rand(fan_out, fan_in), rand(fan_out)

    def norm(name: str, width: int) -> None:
        state[f"{name}.weight"], state[f"{name}.bias"] = 1.0 + rand(width, scale=0.1), rand(width, scale=0.05)

    state: dict[str, Tensor] = {}
    width, patch = vision["width"], vision["patch"]
    vit = "blip.visual_encoder."
    state[vit + "cls_token"] = rand(1, 1, width)
    state[vit + "pos_embed"] = rand(1, (vision["image"] // patch) ** 2 + 1, width)
    state[vit + "patch_embed.proj.weight"] = rand(width, 3, patch, patch)
    state[vit + "patch_embed.proj.bias"] = rand(width)
    for i in range(vision["depth"]):
        block = f"{vit}blocks.{i}."
        norm(block + "norm1", width)
        linear(block + "attn.qkv", 3 * width, width)
        linear(block + "attn.proj", width, width)
        norm(block + "norm2", width)
        linear(block + "mlp.fc1", 4 * width, width)
        linear(block + "mlp.fc2", width, 4 * width)
    norm(vit + "norm", width)

    hidden, inner = med["hidden_size"], med["intermediate_size"]
    bert = "blip.text_encoder."
    state[bert + "embeddings.word_embeddings.weight"] = rand(med["vocab_size"], hidden)
    state[bert + "embeddings.position_embeddings.weight"] = rand(med["max_position_embeddings"], hidden)
    state[bert + "embeddings.position_ids"] = torch.arange(med["max_position_embeddings"])[None]
    norm(bert + "embeddings.LayerNorm", hidden)
    for i in range(med["num_hidden_layers"]):
        layer = f"{bert}encoder.layer.{i}."
        for attention, kv_width in (("attention", hidden), ("crossattention", width)):
            linear(f"{layer}{attention}.self.query", hidden, hidden)
            linear(f"{layer}{attention}.self.key", hidden, kv_width)
            linear(f"{layer}{attention}.self.value", hidden, kv_width)
            linear(f"{layer}{attention}.output.dense", hidden, hidden)
            norm(f"{layer}{attention}.output.LayerNorm", hidden)
        linear(layer + "intermediate.dense", inner, hidden)
        linear(layer + "output.dense", hidden, inner)
        norm(layer + "output.LayerNorm", hidden)
    linear("blip.vision_proj", 256, width)
    linear("blip.text_proj", 256, hidden)

    widths = [hidden, 1024, 128, 64, 16, 1]
    for index, (fan_in, fan_out) in zip((0, 2, 4, 6, 7), zip(widths, widths[1:])):
        state[f"mlp.layers.{index}.weight"] = 2.0 * torch.randn(fan_out, fan_in, generator=generator) / fan_in**0.5
        state[f"mlp.layers.{index}.bias"] = rand(fan_out, scale=0.1)
    return state


def write_imagereward(folder: Path, geometry: dict = IMAGEREWARD_FULL, seed: int = 3) -> Path:
    """``ImageReward.pt`` + ``med_config.json`` + a BERT vocabulary folder ``bert/``; returns the checkpoint."""
    folder.mkdir(parents=True, exist_ok=True)
    med = geometry["med"]
    torch.save(imagereward_state(geometry["vision"], med, seed), folder / "ImageReward.pt")
    (folder / "med_config.json").write_text(json.dumps(med, indent=2))
    write_bert_vocab(folder / "bert", vocab_size=med["vocab_size"] - 2)
    return folder / "ImageReward.pt"


# --- images ---------------------------------------------------------------------------------------------------------


def write_images(folder: Path, sizes: list[tuple[int, int]] = IMAGE_SIZES, seed: int = 4) -> Path:
    """Smooth random RGB PNGs (bilinear-upsampled noise, per-image contrast) and ``manifest.json``.

    Smooth content keeps bicubic resizing free of clipping, so PIL's uint8 resize and our float resize differ by the
    uint8 rounding only. Every size uses the same prompts; the manifest lists ``{"file", "prompt", "size"}``.
    """
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    entries = []
    for height, width in sizes:
        for index, prompt in enumerate(PROMPTS):
            gain = 0.3 + 0.7 * torch.rand(1, generator=generator)
            coarse = (1 - gain) * torch.rand(3, 1, 1, generator=generator)
            coarse = coarse + gain * torch.rand(1, 3, height // 16 + 2, width // 16 + 2, generator=generator)
            image = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear")[0]
            pixels = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
            name = f"image{index}_{height}x{width}.png"
            Image.fromarray(pixels).save(folder / name)
            entries.append({"file": name, "prompt": prompt, "size": [height, width]})
    (folder / "manifest.json").write_text(json.dumps(entries, indent=1))
    return folder / "manifest.json"


WRITERS = {
    "hpsv2": lambda work: write_hps(work / "hps"),
    "aesthetic": lambda work: write_aesthetic(work / "aesthetic"),
    "pickscore": lambda work: write_pickscore(work / "pickscore"),
    "imagereward": lambda work: write_imagereward(work / "imagereward"),
}


def main(argv: list[str]) -> None:
    """``python writers.py WORKDIR [scorer ...]``: images, then each scorer's files (all scorers by default)."""
    work = Path(argv[0])
    torch.set_num_threads(2)
    write_images(work / "images")
    for name in argv[1:] or list(WRITERS):
        WRITERS[name](work)
        print(f"wrote {name} files under {work}", flush=True)  # noqa: T201


if __name__ == "__main__":
    main(sys.argv[1:])
