"""Tiny random-weight scorers saved in their original on-disk formats, built once per session
(docs/rewards.md#testing-offline).

Every model here has the real architecture class and state-dict layout of its scorer, with hidden sizes of 32-64 so
that a forward pass at 224 px takes milliseconds on a CPU. Nothing is downloaded: the CLIP tokenizer is rebuilt
from open_clip's shipped BPE file, the BERT tokenizer from a hand-written vocabulary.
"""

import json
import os


os.environ["HF_HUB_OFFLINE"] = "1"  # no test may reach a model hub
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from rewards_testing import CLIP_EOT_ID, TINY_LOGIT_SCALE, AestheticMLP  # noqa: E402

import rewards  # noqa: E402


@pytest.fixture(autouse=True)
def _single_thread():
    """One intra-op thread: these models are tiny, and on a shared 2-core machine a second OpenMP thread that spins
    waiting for a busy core makes every forward pass ~10x slower. Restored after each test."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def fresh_reward_cache():
    """No loaded reward models before and after the test, for tests about loading itself."""
    rewards.clear_cache()
    yield
    rewards.clear_cache()


@pytest.fixture(scope="session")
def clip_tokenizer_dir(tmp_path_factory):
    """A folder with the real CLIP BPE tokenizer (vocab.json, merges.txt, tokenizer config)."""
    from diffalign.tokenizer import build_clip_tokenizer

    folder = tmp_path_factory.mktemp("clip-tokenizer")
    build_clip_tokenizer(folder).save_pretrained(folder)
    return folder


def _tiny_clip(folder, tokenizer_dir, projection_dim: int, seed: int):
    from transformers import AutoTokenizer, CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    text = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    text.update(max_position_embeddings=77, bos_token_id=49406, eos_token_id=CLIP_EOT_ID, pad_token_id=CLIP_EOT_ID)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    # projection_dim also in vision_config: CLIPVisionModelWithProjection reads it from there
    # (docs/rewards.md#testing-offline).
    vision.update(image_size=224, patch_size=14, projection_dim=projection_dim)
    config = CLIPConfig(
        text_config=text, vision_config=vision, projection_dim=projection_dim, logit_scale_init_value=TINY_LOGIT_SCALE
    )
    CLIPModel(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory, clip_tokenizer_dir):
    """A tiny ``CLIPModel`` folder (config.json + model.safetensors + tokenizer), projection 16, as PickScore's."""
    return _tiny_clip(tmp_path_factory.mktemp("tiny-clip"), clip_tokenizer_dir, projection_dim=16, seed=0)


@pytest.fixture(scope="session")
def tiny_clip_l_dir(tmp_path_factory, clip_tokenizer_dir):
    """A tiny ``CLIPModel`` folder with 768-d projections, the embedding width the aesthetic head expects."""
    return _tiny_clip(tmp_path_factory.mktemp("tiny-clip-l"), clip_tokenizer_dir, projection_dim=768, seed=1)


@pytest.fixture(scope="session")
def aesthetic_head_file(tmp_path_factory):
    """A random head saved like ``sac+logos+ava1-l14-linearMSE.pth``: ``torch.save(state_dict)``."""
    torch.manual_seed(2)
    head = AestheticMLP()
    with torch.no_grad():
        # The default init shrinks every layer, leaving scores that hardly depend on the image; the real head is
        # affine with |w| = 18 and b = 5.24, so scale the weights up and add a comparable offset.
        for index in (0, 2, 4, 6, 7):
            head.layers[index].weight.mul_(4.0)
        head.layers[7].bias.fill_(5.0)
    path = tmp_path_factory.mktemp("aesthetic") / "sac+logos+ava1-l14-linearMSE.pth"
    torch.save(head.state_dict(), path)
    return path


TINY_OPEN_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "head_width": 32, "patch_size": 14},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


@pytest.fixture(scope="session")
def tiny_hps(tmp_path_factory):
    """``(config_json, folder)``: a tiny ViT-H-14-like open_clip config and HPS v2.0/v2.1 checkpoints in ``folder``.

    The checkpoints are ``{"state_dict": <open_clip keys>, "epoch": 1}``, the HPS file format, with different weights
    per version so that loading the wrong file is caught.
    """
    import open_clip

    folder = tmp_path_factory.mktemp("hps")
    config = folder / "tiny-hps-vit-h-14.json"
    config.write_text(json.dumps(TINY_OPEN_CLIP))
    open_clip.add_model_config(config)
    for seed, filename in enumerate(["HPS_v2_compressed.pt", "HPS_v2.1_compressed.pt"]):
        torch.manual_seed(10 + seed)
        model = open_clip.create_model(config.stem, pretrained=None)
        torch.save({"state_dict": model.state_dict(), "epoch": 1}, folder / filename)
    return config, folder
