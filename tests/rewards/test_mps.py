"""MPS against a forward pass assembled here from the published formulas, on a tiny random checkpoint.

The checkpoint is written in the published key layout (``model.*`` = a tiny ``CLIPModel``, ``cross_model.*`` with
the key names and shapes of Kwai-Kolors/MPS ``trainer/models/cross_modeling.py``), so a state dict converted from
the released checkpoint loads the same way. The reference forward below follows the MPS evaluation script
(``eval_overall_mps_on_hpdv2.py``): one prompt per call, batch max = sample max, einsum attention with the mask
repeated over queries and heads, rotary embedding by halves.
"""

import pytest
import torch
import torch.nn.functional as F
from rewards_testing import TINY_LOGIT_SCALE, smooth_images
from test_clip_scorers import hf_load
from test_preprocess import hf_clip_reference

import rewards
from rewards.mps import OVERALL_CONDITION, condition_mask, load_mps_state


PROMPTS = ["a red cube left of a blue ball", "two green cats on a mat, photo, detailed hands"]
DIM, HEADS, DIM_HEAD, FF_MULT, LAYERS = 16, 2, 8, 4, 2  # tiny CLIP projection_dim is 16


def published_cross_keys(layer):
    """``{key: shape}`` of one cross-model layer, as ``Cross_model(dim, layer_num, dim_head, heads, ff_mult)`` saves
    it: ``Residual(CrossAttention(parallel_ff=True))`` then ``Residual(ParallelTransformerBlock)``."""
    cross, block = f"cross_model.layers.{layer}.0.fn.", f"cross_model.layers.{layer}.1.fn."
    inner, ff = HEADS * DIM_HEAD, FF_MULT * DIM
    return {
        cross + "norm.weight": (DIM,),
        cross + "norm.bias": (DIM,),  # LayerNorm bias is a registered (saved) buffer
        cross + "to_q.weight": (inner, DIM),
        cross + "to_kv.weight": (2 * DIM_HEAD, DIM),
        cross + "to_out.weight": (DIM, inner),
        cross + "ff.0.weight": (2 * ff, DIM),
        cross + "ff.2.weight": (DIM, ff),
        block + "norm.weight": (DIM,),
        block + "norm.bias": (DIM,),
        block + "rotary_emb.inv_freq": (DIM_HEAD // 2,),
        block + "fused_attn_ff_proj.weight": (inner + 2 * DIM_HEAD + 2 * ff, DIM),
        block + "attn_out.weight": (DIM, inner),
        block + "ff_out.1.weight": (DIM, ff),
    }


@pytest.fixture(scope="session")
def mps_checkpoint(tmp_path_factory, tiny_clip_dir):
    """A random MPS state dict in the published layout, saved as safetensors; returns ``(file, state)``."""
    from safetensors.torch import save_file

    state = {f"model.{k}": v.clone() for k, v in hf_load("CLIPModel", tiny_clip_dir).state_dict().items()}
    gen = torch.Generator().manual_seed(3)
    for layer in range(LAYERS):
        for key, shape in published_cross_keys(layer).items():
            if key.endswith("inv_freq"):
                value = 1.0 / (10000 ** (torch.arange(0, DIM_HEAD, 2).float() / DIM_HEAD))
            elif key.endswith("norm.weight"):
                value = 1 + 0.2 * torch.randn(shape, generator=gen)
            elif key.endswith("norm.bias"):
                value = 0.2 * torch.randn(shape, generator=gen)  # zeros upstream; random here to prove it is read
            else:
                value = torch.randn(shape, generator=gen) / shape[1] ** 0.5
            state[key] = value
    path = tmp_path_factory.mktemp("mps") / "mps.safetensors"
    save_file(state, str(path))
    return path, state


def load_mps(path, config_dir, **options):
    return rewards.load("mps", path=path, config_path=config_dir, **options)


# --- the reference forward, written from the published code --------------------------------------------------------


def layer_weights(state, layer, part):
    prefix = f"cross_model.layers.{layer}.{part}.fn."
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def ref_cross_attention(w, x, context, mask):
    batch, n, _ = x.shape
    x = F.layer_norm(x, x.shape[-1:], w["norm.weight"], w["norm.bias"])
    q = (x @ w["to_q.weight"].T).view(batch, n, HEADS, DIM_HEAD).transpose(1, 2) * DIM_HEAD**-0.5
    k, v = (context @ w["to_kv.weight"].T).chunk(2, dim=-1)
    sim = torch.einsum("bhid,bjd->bhij", q, k) + mask.unsqueeze(1).repeat(1, HEADS, 1, 1)
    out = torch.einsum("bhij,bjd->bhid", sim.softmax(dim=-1), v).transpose(1, 2).reshape(batch, n, -1)
    hidden, gate = (x @ w["ff.0.weight"].T).chunk(2, dim=-1)
    return out @ w["to_out.weight"].T + (F.silu(gate) * hidden) @ w["ff.2.weight"].T


def ref_rotate(t, angles):
    t1, t2 = t[..., : DIM_HEAD // 2], t[..., DIM_HEAD // 2 :]
    return t * angles.cos() + torch.cat((-t2, t1), dim=-1) * angles.sin()


def ref_parallel_block(w, x):
    batch, n, _ = x.shape
    x = F.layer_norm(x, x.shape[-1:], w["norm.weight"], w["norm.bias"])
    inner, ff = HEADS * DIM_HEAD, FF_MULT * DIM
    q, k, v, hidden = (x @ w["fused_attn_ff_proj.weight"].T).split((inner, DIM_HEAD, DIM_HEAD, 2 * ff), dim=-1)
    q = q.view(batch, n, HEADS, DIM_HEAD).transpose(1, 2)
    freqs = torch.einsum("i,j->ij", torch.arange(n).float(), w["rotary_emb.inv_freq"])
    angles = torch.cat((freqs, freqs), dim=-1)
    q, k = ref_rotate(q, angles) * DIM_HEAD**-0.5, ref_rotate(k, angles)
    attn = torch.einsum("bhid,bjd->bhij", q, k).softmax(dim=-1)
    out = torch.einsum("bhij,bjd->bhid", attn, v).transpose(1, 2).reshape(batch, n, -1)
    hidden, gate = hidden.chunk(2, dim=-1)
    return out @ w["attn_out.weight"].T + (F.silu(gate) * hidden) @ w["ff_out.1.weight"].T


def reference_scores(config_dir, state, images, prompts, condition=OVERALL_CONDITION, threshold=0.3):
    """Scores and kept-token counts, one prompt per forward as in the MPS evaluation scripts."""
    clip, tokenizer = hf_load("CLIPModel", config_dir), hf_load("AutoTokenizer", config_dir)

    def tokenize(texts):
        return tokenizer(texts, max_length=77, padding="max_length", truncation=True, return_tensors="pt").input_ids

    def text_features(ids):
        out = clip.text_model(input_ids=ids)
        return clip.text_projection(out[0]), clip.text_projection(out[1])

    scores, kept = [], []
    with torch.no_grad():
        for pixels, prompt in zip(hf_clip_reference(images), prompts):
            text_f, text_eos = text_features(tokenize([prompt]))
            condition_f, _ = text_features(tokenize([condition]))
            image_f = clip.visual_projection(clip.vision_model(pixel_values=pixels[None])[0])
            sim = torch.einsum("bid,bjd->bji", text_f, condition_f).max(dim=1, keepdim=True)[0]
            sim = sim / sim.max()
            mask = torch.where(sim > threshold, 0.0, float("-inf")).repeat(1, image_f.shape[1], 1)
            x = image_f
            for layer in range(LAYERS):
                x = ref_cross_attention(layer_weights(state, layer, 0), x, text_f, mask) + x
                x = ref_parallel_block(layer_weights(state, layer, 1), x) + x
            cosine = F.cosine_similarity(x[:, 0], text_eos, dim=-1)
            scores.append(clip.logit_scale.exp() * cosine)
            kept.append(int(torch.isfinite(mask[0, 0]).sum()))
    return torch.cat(scores), kept


# --- tests -----------------------------------------------------------------------------------------------------------


def test_condition_mask_matches_hand_computation():
    text = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], [[2.0, 0.0], [0.0, 0.1], [-1.0, 0.0]]])
    condition = torch.tensor([[[1.0, 0.0], [0.0, 0.5]]])  # one condition, shared by the batch
    # Best dot product per token: sample 0 -> (1, 0.5, 1), ratio (1, 0.5, 1); sample 1 -> (2, 0.05, 0), ratio
    # (1, 0.025, 0).
    inf = float("-inf")
    expected = {
        0.3: [[0, 0, 0], [0, inf, inf]],
        0.6: [[0, inf, 0], [0, inf, inf]],
        0.01: [[0, 0, 0], [0, 0, inf]],
    }
    for threshold, rows in expected.items():
        mask = condition_mask(text, condition, threshold)
        assert mask.shape == (2, 1, 3) and mask.dtype == torch.float32
        torch.testing.assert_close(mask[:, 0], torch.tensor(rows))
    # Per sample: sample 0 alone gives the same mask as inside the batch. The reference's batch max (2, from
    # sample 1) would have turned its ratios into (0.5, 0.25, 0.5) and hidden token 1 at 0.3.
    torch.testing.assert_close(condition_mask(text[:1], condition, 0.3), condition_mask(text, condition, 0.3)[:1])


def test_condition_mask_keeps_the_best_token_when_all_similarities_are_zero():
    mask = condition_mask(torch.zeros(1, 3, 2), torch.ones(1, 2, 2), 0.3)
    assert torch.isfinite(mask).sum() == 3  # 0/0: the reference would hide everything and return NaN


def test_feature_shapes(mps_checkpoint, tiny_clip_dir):
    path, _ = mps_checkpoint
    reward = load_mps(path, tiny_clip_dir).load_weights()
    model, tokenizer = reward._bundle
    ids = reward.tokenize(tokenizer, PROMPTS, model, torch.device("cpu"))
    with torch.no_grad():
        tokens, eos = model.text_features(ids)
        image_tokens = model.image_features(torch.zeros(2, 3, 224, 224))
    assert ids.shape == (2, 77)
    assert tokens.shape == (2, 77, DIM) and eos.shape == (2, DIM)
    assert image_tokens.shape == (2, 1 + 16 * 16, DIM)  # CLS + (224 / 14)^2 patches
    # Image tokens come before post_layernorm: the CLS token differs from the pooled (post-normed) output.
    with torch.no_grad():
        pooled = model.model.visual_projection(model.model.vision_model(torch.zeros(1, 3, 224, 224)).pooler_output)
    assert not torch.allclose(image_tokens[:1, 0], pooled, atol=1e-3)


# On this random tiny CLIP every token's ratio lies in [0.26, 1] (padding tokens 0.30-0.47), so thresholds in that
# range exercise the mask; the real model's ratios spread further, where 0.3 and 0.01 select.
@pytest.mark.parametrize("threshold", [0.45, 0.8])
def test_scores_match_the_reference_forward(mps_checkpoint, tiny_clip_dir, threshold):
    path, state = mps_checkpoint
    images = smooth_images(2, 224, 224)
    ref, kept = reference_scores(tiny_clip_dir, state, images, PROMPTS, threshold=threshold)
    assert all(0 < k < 77 for k in kept), f"the mask must hide some tokens and keep some: kept {kept}"
    ours = load_mps(path, tiny_clip_dir, threshold=threshold).score(images, PROMPTS)
    assert ours.dtype == torch.float32 and ours.shape == (2,)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    # Not vacuous: the two images score differently under one prompt by far more than the tolerance.
    same_prompt = load_mps(path, tiny_clip_dir, threshold=threshold).score(images, PROMPTS[:1] * 2)
    assert (same_prompt[0] - same_prompt[1]).abs() > 1e-2
    assert ours.abs().max() <= torch.exp(torch.tensor(TINY_LOGIT_SCALE)) + 1e-4


def test_threshold_and_condition_change_the_scores(mps_checkpoint, tiny_clip_dir):
    path, state = mps_checkpoint
    images = smooth_images(2, 224, 224)
    ref_low, kept_low = reference_scores(tiny_clip_dir, state, images, PROMPTS, threshold=0.45)
    ref_high, kept_high = reference_scores(tiny_clip_dir, state, images, PROMPTS, threshold=0.8)
    assert kept_low != kept_high and not torch.allclose(ref_low, ref_high)
    custom = "light, color, clarity"
    ref_custom, _ = reference_scores(tiny_clip_dir, state, images, PROMPTS, condition=custom, threshold=0.8)
    ours = load_mps(path, tiny_clip_dir, condition=custom, threshold=0.8).score(images, PROMPTS)
    torch.testing.assert_close(ours, ref_custom, rtol=1e-4, atol=1e-4)
    assert rewards.load("mps").condition == OVERALL_CONDITION


def test_gradients_reach_images(mps_checkpoint, tiny_clip_dir):
    path, _ = mps_checkpoint
    images = smooth_images(2, 96, 80).requires_grad_(True)
    scores = load_mps(path, tiny_clip_dir).score(images, PROMPTS)
    scores.sum().backward()
    assert torch.isfinite(images.grad).all()
    assert (images.grad.flatten(1).abs().sum(1) > 0).all()


def test_state_dict_round_trip_and_known_layouts(mps_checkpoint, tiny_clip_dir, tmp_path):
    from safetensors.torch import save_file

    path, state = mps_checkpoint
    images = smooth_images(2, 224, 224)
    reward = load_mps(path, tiny_clip_dir).load_weights()
    expected = reward.score(images, PROMPTS)
    saved = reward._bundle[0].state_dict()
    assert set(saved) == set(state)  # exactly the published key names, nothing more
    save_file({k: v.contiguous() for k, v in saved.items()}, str(tmp_path / "again.safetensors"))
    torch.testing.assert_close(
        load_mps(tmp_path / "again.safetensors", tiny_clip_dir).score(images, PROMPTS), expected
    )
    # imscore's layout (``mps.`` prefix) and a transformers-4.27 export (saved position_ids), as a .pth state dict.
    legacy = {f"mps.{k}": v for k, v in state.items()}
    legacy["mps.model.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    legacy["mps.model.vision_model.embeddings.position_ids"] = torch.arange(257)[None]
    torch.save(legacy, tmp_path / "legacy.pth")
    torch.testing.assert_close(load_mps(tmp_path / "legacy.pth", tiny_clip_dir).score(images, PROMPTS), expected)
    # A folder holding the default file name.
    save_file(state, str(tmp_path / "model.safetensors"))
    torch.testing.assert_close(load_mps(tmp_path, tiny_clip_dir).score(images, PROMPTS), expected)


def test_a_missing_key_fails_strict_loading(mps_checkpoint, tiny_clip_dir, tmp_path):
    from safetensors.torch import save_file

    _, state = mps_checkpoint
    partial = {k: v for k, v in state.items() if not k.endswith("1.1.fn.attn_out.weight")}
    save_file(partial, str(tmp_path / "partial.safetensors"))
    with pytest.raises(RuntimeError, match="attn_out"):
        load_mps(tmp_path / "partial.safetensors", tiny_clip_dir).score(smooth_images(1, 32, 32), ["x"])


def test_pickled_modules_are_refused_with_the_conversion_hint(tmp_path):
    torch.save(torch.nn.Linear(2, 2), tmp_path / "MPS_overall_checkpoint.pth")  # a pickled module, like the release
    with pytest.raises(ValueError, match="pickled nn.Module.*safetensors"):
        load_mps_state(tmp_path / "MPS_overall_checkpoint.pth")


def test_options_are_checked_and_defaults_point_to_safe_sources(tiny_clip_dir):
    with pytest.raises(ValueError, match="threshold"):
        rewards.load("mps", threshold=1.0)
    with pytest.raises(ValueError, match="condition"):
        rewards.load("mps", condition=" ")
    reward = rewards.load("mps")
    assert (reward.path, reward.filename) == ("RE-N-Y/mpsv1", "model.safetensors")
    assert reward.threshold == 0.3
    with pytest.raises(OSError, match="'model.safetensors' from the hub repository 'RE-N-Y/mpsv1'.*path="):
        rewards.load("mps", config_path=tiny_clip_dir).score(smooth_images(1, 32, 32), ["x"])


def test_verify_hashes_the_checkpoint_before_loading(mps_checkpoint, tiny_clip_dir, fresh_reward_cache):
    from rewards.model import WeightsHashError, file_sha256

    path, _ = mps_checkpoint
    good = file_sha256(path)
    assert load_mps(path, tiny_clip_dir, verify=True, sha256=good).load_weights("cpu")._bundle is not None
    rewards.clear_cache()
    with pytest.raises(WeightsHashError, match=f"has SHA-256 {good}, expected {'0' * 64}"):
        load_mps(path, tiny_clip_dir, verify=True, sha256="0" * 64).load_weights("cpu")


def test_rotary_angles_stay_float32_in_a_bf16_model():
    """A bf16 model casts the inv_freq buffer too; the angles of 257 positions must still be float32-accurate (in
    bf16 they were off by up to 0.5 rad), so the bf16 rotation matches the float32 one to bf16 rounding."""
    from rewards.mps import RotaryEmbedding, apply_rotary

    rotary = RotaryEmbedding(64)
    x = torch.randn(2, 257, 64, generator=torch.Generator().manual_seed(0))
    exact = apply_rotary(rotary(257, x.device), x)
    rotary_bf16 = RotaryEmbedding(64).to(torch.bfloat16)
    angles = rotary_bf16(257, x.device)
    assert angles.dtype == torch.float32
    assert torch.allclose(angles, rotary(257, x.device))
    rotated = apply_rotary(angles, x.to(torch.bfloat16)).float()
    assert (rotated - exact).abs().max() < 0.05  # bf16 rounding of values of order 1; the bug gave errors ~1
