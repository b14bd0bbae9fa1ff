"""The parity benchmark's weight writers (benchmarks/parity/writers.py) at tiny size, so they cannot rot unnoticed.

The full-size parity run (benchmarks/parity/run.sh, results in benchmarks/parity/RESULTS.md) needs the reference
packages and minutes of CPU; here every writer runs with a tiny geometry and its files must load through our scorers
(which load strictly), and the OpenAI -> transformers CLIP conversion must reproduce open_clip's features.
"""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from rewards_testing import smooth_images

import rewards
from rewards.preprocess import clip_preprocess


WRITERS_FILE = Path(__file__).resolve().parents[2] / "benchmarks" / "parity" / "writers.py"
TINY_CLIP_L = {  # OpenAI-style (QuickGELU, 64-wide heads) like ViT-L/14, tiny
    "embed_dim": 32,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "patch_size": 14},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 2},
}
TINY_HPS = {  # open_clip ViT-H-14-like, tiny
    "embed_dim": 32,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "head_width": 32, "patch_size": 14},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
TINY_PICKSCORE = {
    "text": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
    "vision": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
    "projection_dim": 16,
}


@pytest.fixture(scope="module")
def writers():
    spec = importlib.util.spec_from_file_location("parity_writers", WRITERS_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_imagereward(writers):
    return {
        "vision": dict(width=48, depth=2, patch=16, image=224),
        "med": dict(
            writers.IMAGEREWARD_FULL["med"],
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=40,
        ),
    }


def assert_image_dependent(scores: torch.Tensor) -> None:
    assert torch.isfinite(scores).all() and scores.std() > 1e-3 * scores.abs().mean()


def test_hps_checkpoint_is_state_dict_in_float16_and_loads_strictly(writers, tmp_path):
    checkpoint = writers.write_hps(tmp_path, model=TINY_HPS)
    stored = torch.load(checkpoint, weights_only=True)
    assert set(stored) == {"state_dict", "epoch"}
    assert {v.dtype for v in stored["state_dict"].values() if v.is_floating_point()} == {torch.float16}
    reward = rewards.load("hpsv2", path=checkpoint, model=tmp_path / "parity-hps.json")
    assert_image_dependent(reward.score(smooth_images(3, 224, 224), ["a red cube"] * 3))


def test_aesthetic_files_and_clip_conversion_match_open_clip(writers, tmp_path):
    import open_clip

    files = writers.write_aesthetic(tmp_path, model=TINY_CLIP_L)
    reference = open_clip.create_model("parity-clip-l", pretrained=None).eval()
    state = torch.load(files["openai_clip"], weights_only=True)  # OpenAI key names == open_clip's, float16
    reference.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    assert state["visual.conv1.weight"].dtype == torch.float16

    images = smooth_images(3, 224, 224)
    reward = rewards.load("aesthetic", path=files["head"], clip_path=files["hf_clip"])
    with torch.no_grad():
        embedding = F.normalize(reference.encode_image(clip_preprocess(images)), dim=-1)
        expected = reward.load_weights()._bundle[1].layers(embedding).squeeze(-1)
        torch.testing.assert_close(reward.score(images), expected, rtol=1e-5, atol=1e-5)
    assert_image_dependent(expected)

    from transformers import CLIPModel

    hf = CLIPModel.from_pretrained(files["hf_clip"]).eval()
    tokens = open_clip.get_tokenizer("parity-clip-l")(["a photo of a dog", "two cats"])
    with torch.no_grad():
        hf_text = hf.text_projection(hf.text_model(input_ids=tokens).pooler_output)
        torch.testing.assert_close(hf_text, reference.encode_text(tokens), rtol=1e-4, atol=1e-5)


def test_pickscore_folder_and_tokenizer_files(writers, tmp_path):
    import open_clip

    folder = writers.write_pickscore(tmp_path, geometry=TINY_PICKSCORE)
    assert json.loads((folder / "preprocessor_config.json").read_text())["resample"] == 3
    reward = rewards.load("pickscore", path=folder)
    prompts = ["a red cube to the left of a blue ball", "an astronaut riding a horse, oil painting"]
    tokenizer = reward.load_weights()._bundle[1]
    ids = tokenizer(prompts, padding="max_length", max_length=77, return_tensors="pt")["input_ids"]
    # open_clip pads with 0, the HF tokenizer with <|endoftext|>: compare up to and including the end token.
    reference = open_clip.tokenize(prompts)
    for row, ref in zip(ids, reference):
        end = int(ref.argmax()) + 1
        assert row[:end].tolist() == ref[:end].tolist()
    assert_image_dependent(reward.score(smooth_images(3, 224, 224), prompts[:1] * 3))


def test_imagereward_checkpoint_loads_with_every_key_mapped(writers, tmp_path, tiny_imagereward):
    checkpoint = writers.write_imagereward(tmp_path, geometry=tiny_imagereward)
    reward = rewards.load("imagereward", path=checkpoint, tokenizer_path=tmp_path / "bert", vision_num_heads=2)
    tokenizer = reward.load_weights()._bundle[3]
    assert len(tokenizer) == tiny_imagereward["med"]["vocab_size"]  # 30522 + [DEC] + [ENC]
    assert tokenizer.tokenize("two green cats") == ["two", "green", "cats"]  # prompt words are whole tokens
    assert_image_dependent(reward.score(smooth_images(3, 224, 224), ["two green cats sleeping on a mat"] * 3))


def test_images_and_manifest(writers, tmp_path):
    import numpy as np
    from PIL import Image

    writers.write_images(tmp_path, sizes=[(32, 48)])
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert [e["prompt"] for e in manifest] == writers.PROMPTS
    pixels = [np.asarray(Image.open(tmp_path / e["file"])) for e in manifest]
    assert all(p.shape == (32, 48, 3) and p.dtype == np.uint8 for p in pixels)
    assert len({p.tobytes() for p in pixels}) == len(pixels)
