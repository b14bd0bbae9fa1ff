"""ImageReward against an independent reference BLIP written here in the original module layout
(docs/rewards.md#imagereward).

The reference below re-implements BLIP's ViT (timm naming: ``patch_embed.proj``, ``blocks.N.attn.qkv``...) and
its "med" BERT with cross-attention (``encoder.layer.N.crossattention``...) in plain torch, the way ImageReward's
``score`` uses them. Its state dict *is* the checkpoint format, so saving it gives an ``ImageReward.pt`` that the
package must map onto transformers' BLIP modules; every parameter is randomised (LayerNorms included) so that a
swapped or dropped key changes the score.
"""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from rewards_testing import AestheticMLP, smooth_images
from test_preprocess import torchvision_reference
from torch import nn

import rewards
from rewards.imagereward import IMAGEREWARD_MEAN, IMAGEREWARD_STD


WORDS = "a an the of on left right red blue green cube ball two cats cat dog photo mat astronaut".split()
VISION_WIDTH, VISION_HEADS, PATCH = 48, 2, 16
TEXT_WIDTH, TEXT_HEADS, TEXT_LAYERS, MAX_POSITIONS = 32, 2, 2, 40
PROMPTS = ["a red cube left of a blue ball", "two green cats on a mat", "a photo of a dog", "an astronaut"]


class RefVitBlock(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn = nn.Module()
        self.attn.qkv, self.attn.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x):
        batch, tokens, dim = x.shape
        qkv = self.attn.qkv(self.norm1(x)).reshape(batch, tokens, 3, self.heads, dim // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        weights = (q @ k.transpose(-2, -1) / math.sqrt(dim // self.heads)).softmax(-1)
        x = x + self.attn.proj((weights @ v).transpose(1, 2).reshape(batch, tokens, dim))
        return x + self.mlp.fc2(F.gelu(self.mlp.fc1(self.norm2(x))))


class RefViT(nn.Module):
    """BLIP's VisionTransformer: patch embedding, [CLS], positions, pre-norm blocks, final norm on every token."""

    def __init__(self, dim=VISION_WIDTH, depth=2, heads=VISION_HEADS, patch=PATCH, image=224):
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, (image // patch) ** 2 + 1, dim))
        self.blocks = nn.ModuleList(RefVitBlock(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, pixels):
        x = self.patch_embed.proj(pixels).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


class RefBertAttention(nn.Module):
    """``attention``/``crossattention`` of med BERT: ``self.{query,key,value}`` + ``output.{dense,LayerNorm}``."""

    def __init__(self, dim, heads, kv_dim):
        super().__init__()
        self.heads = heads
        self.add_module("self", nn.Module())
        inner = self.self
        inner.query, inner.key, inner.value = nn.Linear(dim, dim), nn.Linear(kv_dim, dim), nn.Linear(kv_dim, dim)
        self.output = nn.Module()
        self.output.dense, self.output.LayerNorm = nn.Linear(dim, dim), nn.LayerNorm(dim, eps=1e-12)

    def forward(self, hidden, context, additive_mask):
        inner = self.self

        def split(x):
            return x.reshape(x.shape[0], x.shape[1], self.heads, -1).transpose(1, 2)

        q, k, v = split(inner.query(hidden)), split(inner.key(context)), split(inner.value(context))
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) + additive_mask
        out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(hidden.shape)
        return self.output.LayerNorm(self.output.dense(out) + hidden)


class RefBertLayer(nn.Module):
    def __init__(self, dim, heads, kv_dim):
        super().__init__()
        self.attention = RefBertAttention(dim, heads, dim)
        self.crossattention = RefBertAttention(dim, heads, kv_dim)
        self.intermediate = nn.Module()
        self.intermediate.dense = nn.Linear(dim, 2 * dim)
        self.output = nn.Module()
        self.output.dense, self.output.LayerNorm = nn.Linear(2 * dim, dim), nn.LayerNorm(dim, eps=1e-12)

    def forward(self, hidden, text_mask, image_tokens):
        hidden = self.attention(hidden, hidden, text_mask)
        hidden = self.crossattention(hidden, image_tokens, 0.0)  # every image token is attended
        return self.output.LayerNorm(self.output.dense(F.gelu(self.intermediate.dense(hidden))) + hidden)


class RefMedBert(nn.Module):
    """BLIP's ``BertModel(add_pooling_layer=False)`` in "multimodal" mode (bidirectional, cross-attending)."""

    def __init__(self, vocab_size, dim=TEXT_WIDTH, heads=TEXT_HEADS, layers=TEXT_LAYERS, kv_dim=VISION_WIDTH):
        super().__init__()
        self.embeddings = nn.Module()
        self.embeddings.word_embeddings = nn.Embedding(vocab_size, dim)
        self.embeddings.position_embeddings = nn.Embedding(MAX_POSITIONS, dim)
        self.embeddings.LayerNorm = nn.LayerNorm(dim, eps=1e-12)
        # med.py registers position_ids as a persistent buffer, so real checkpoints carry it.
        self.embeddings.register_buffer("position_ids", torch.arange(MAX_POSITIONS)[None])
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(RefBertLayer(dim, heads, kv_dim) for _ in range(layers))

    def forward(self, ids, mask, image_tokens):
        emb = self.embeddings
        hidden = emb.LayerNorm(emb.word_embeddings(ids) + emb.position_embeddings(emb.position_ids[:, : ids.shape[1]]))
        additive = (1.0 - mask[:, None, None, :].float()) * -10000.0  # BERT's extended attention mask
        for layer in self.encoder.layer:
            hidden = layer(hidden, additive, image_tokens)
        return hidden


class RefImageReward(nn.Module):
    """``ImageReward``: ``blip.{visual_encoder,text_encoder,vision_proj,text_proj}`` + ``mlp``."""

    def __init__(self, vocab_size):
        super().__init__()
        self.blip = nn.Module()
        self.blip.visual_encoder = RefViT()
        self.blip.text_encoder = RefMedBert(vocab_size)
        self.blip.vision_proj, self.blip.text_proj = nn.Linear(VISION_WIDTH, 8), nn.Linear(TEXT_WIDTH, 8)
        self.mlp = AestheticMLP(TEXT_WIDTH)  # ImageReward's MLP has the aesthetic head's layout

    def forward(self, pixels, ids, mask):
        hidden = self.blip.text_encoder(ids, mask, self.blip.visual_encoder(pixels))
        return (self.mlp(hidden[:, 0]).squeeze(-1) - IMAGEREWARD_MEAN) / IMAGEREWARD_STD


def randomise(module, seed):
    """Random values for every parameter (LayerNorm weights around 1) so that no key is a no-op."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            is_norm_weight = ("norm" in name.lower()) and name.endswith("weight")
            param.normal_(1.0 if is_norm_weight else 0.0, 0.1)
    return module.eval()


@pytest.fixture(scope="module")
def tiny_imagereward(tmp_path_factory):
    """``(folder, tokenizer_dir, reference, tokenizer)``: ImageReward.pt + med_config.json, a BERT vocab folder."""
    from transformers import BertTokenizer

    folder = tmp_path_factory.mktemp("imagereward")
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tokenizer_dir = folder / "bert-tokenizer"
    BertTokenizer(str(vocab)).save_pretrained(tokenizer_dir)
    tokenizer = BertTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    reference = randomise(RefImageReward(len(tokenizer)), seed=3)
    torch.save(reference.state_dict(), folder / "ImageReward.pt")
    med_config = {
        "architectures": ["BertModel"],
        "hidden_act": "gelu",
        "hidden_size": TEXT_WIDTH,
        "intermediate_size": 2 * TEXT_WIDTH,
        "layer_norm_eps": 1e-12,
        "max_position_embeddings": MAX_POSITIONS,
        "num_attention_heads": TEXT_HEADS,
        "num_hidden_layers": TEXT_LAYERS,
        "pad_token_id": 0,
        "vocab_size": len(tokenizer),
        "encoder_width": 768,  # BLIP overwrites it with the ViT width, as the package must
        "add_cross_attention": True,
    }
    (folder / "med_config.json").write_text(json.dumps(med_config))
    return folder, tokenizer_dir, reference, tokenizer


def reference_scores(tiny, images, prompts):
    _, _, reference, tokenizer = tiny
    tokens = tokenizer(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    with torch.no_grad():
        return reference(torchvision_reference(images), tokens["input_ids"], tokens["attention_mask"])


def load(tiny, **kwargs):
    folder, tokenizer_dir, _, _ = tiny
    return rewards.load(
        "imagereward", path=folder, tokenizer_path=tokenizer_dir, vision_num_heads=VISION_HEADS, **kwargs
    )


@pytest.mark.parametrize("size", [(224, 224), (64, 90), (240, 320)])
def test_imagereward_matches_reference(tiny_imagereward, size):
    images = smooth_images(4, *size)
    ref = reference_scores(tiny_imagereward, images, PROMPTS)
    ours = load(tiny_imagereward).score(images, PROMPTS)
    if size == (224, 224):
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    else:
        torch.testing.assert_close(ours, ref, rtol=0, atol=2e-3)  # measured <= 4e-4 (PIL's uint8 rounding)
    same_prompt = reference_scores(tiny_imagereward, images, PROMPTS[:1] * 4)
    assert same_prompt.max() - same_prompt.min() > 20 * 2e-3, "scores barely depend on the image"


def test_imagereward_gradients_reach_images(tiny_imagereward):
    images = smooth_images(2, 96, 80).requires_grad_(True)
    scores = load(tiny_imagereward).score(images, PROMPTS[:2])
    scores.sum().backward()
    assert torch.isfinite(images.grad).all() and (images.grad.flatten(1).abs().sum(1) > 0).all()


def test_imagereward_finds_med_config_next_to_a_checkpoint_file(tiny_imagereward):
    folder, tokenizer_dir, _, _ = tiny_imagereward
    images = smooth_images(2, 224, 224)
    reward = rewards.load(
        "imagereward", path=folder / "ImageReward.pt", tokenizer_path=tokenizer_dir, vision_num_heads=VISION_HEADS
    )
    torch.testing.assert_close(
        reward.score(images, PROMPTS[:2]), reference_scores(tiny_imagereward, images, PROMPTS[:2])
    )


def test_imagereward_refuses_unknown_checkpoint_keys(tiny_imagereward, tmp_path):
    folder, tokenizer_dir, reference, _ = tiny_imagereward
    state = dict(reference.state_dict(), **{"blip.extra_head.weight": torch.zeros(1)})
    torch.save(state, tmp_path / "ImageReward.pt")
    (tmp_path / "med_config.json").write_text((folder / "med_config.json").read_text())
    reward = rewards.load("imagereward", path=tmp_path, tokenizer_path=tokenizer_dir, vision_num_heads=VISION_HEADS)
    with pytest.raises(KeyError, match="blip.extra_head.weight"):
        reward.score(smooth_images(1, 32, 32), ["a cat"])
