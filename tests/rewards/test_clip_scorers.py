"""PickScore, CLIP score, aesthetic and HPSv2/v2.1 against reference computations on tiny saved models.

Each reference is computed independently of the package: the PIL/processor preprocessing of the original code
(see test_preprocess.py), the model loaded by its own library (``CLIPModel.from_pretrained``,
``open_clip.create_model(pretrained=file)``), and the published formula written out here.

Tolerances: at 224 x 224 no resampling happens on either side, so scores agree to float error (rtol 1e-5). After a
resize the torch path differs from PIL's uint8 resize by the output rounding only (<= 1.5/255 per pixel, asserted in
test_preprocess.py); on these tiny models that moves scores by the amounts measured in the comments below, and the
tolerances are about 3x those. Each test also checks that the scores of different images differ by much more than
the tolerance, so the comparison is not vacuous.
"""

import functools

import pytest
import torch
from rewards_testing import TINY_LOGIT_SCALE, AestheticMLP, smooth_images
from test_preprocess import hf_clip_reference, hps_reference

import rewards


PROMPTS = ["a red cube left of a blue ball", "two green cats on a mat", "a photo of a dog", "an astronaut"]
SIZES = [(224, 224), (64, 90), (240, 320)]


@functools.lru_cache
def hf_load(cls_name, folder):
    """A transformers class loaded once per test session (tokenizer JSON parsing dominates otherwise)."""
    import transformers

    loaded = getattr(transformers, cls_name).from_pretrained(folder)
    return loaded.eval() if hasattr(loaded, "eval") else loaded


def clip_reference(folder, images, prompts):
    """``(cos, logits)`` from HF ``CLIPModel.forward`` on processor pixels and tokenizer ids."""
    model = hf_load("CLIPModel", folder)
    tokens = hf_load("AutoTokenizer", folder)(
        prompts, padding=True, truncation=True, max_length=77, return_tensors="pt"
    )
    with torch.no_grad():
        out = model(
            input_ids=tokens["input_ids"],
            attention_mask=tokens["attention_mask"],
            pixel_values=hf_clip_reference(images),
        )
    # forward() returns L2-normalised image_embeds/text_embeds.
    return (out.image_embeds * out.text_embeds).sum(-1), out.logits_per_image.diag()


def assert_parity(ours, ref, size, atol_resized, image_spread):
    """Exact at 224 px; within ``atol_resized`` after a resize, a tolerance far below how much the images matter.

    Args:
        image_spread: the reference's score range over the batch's images with one fixed prompt.
    """
    if size == (224, 224):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(ours, ref, rtol=0, atol=atol_resized)
    assert image_spread > 20 * atol_resized, "scores barely depend on the image: the comparison is vacuous"


def assert_gradients(reward, prompts=PROMPTS[:2]):
    images = smooth_images(2, 96, 80).requires_grad_(True)
    scores = reward.score(images, prompts)
    assert scores.dtype == torch.float32 and scores.shape == (2,)
    scores.sum().backward()
    assert torch.isfinite(images.grad).all()
    assert (images.grad.flatten(1).abs().sum(1) > 0).all()


# --- PickScore -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", SIZES)
def test_pickscore_matches_reference(tiny_clip_dir, size):
    images = smooth_images(4, *size)
    cos, logits = clip_reference(tiny_clip_dir, images, PROMPTS)
    ours = rewards.load("pickscore", path=tiny_clip_dir).score(images, PROMPTS)
    ref = torch.exp(torch.tensor(TINY_LOGIT_SCALE)) * cos  # README: logit_scale.exp() * (text @ image.T)
    torch.testing.assert_close(ref, logits)
    same_prompt = clip_reference(tiny_clip_dir, images, PROMPTS[:1] * 4)[1]
    spread = same_prompt.max() - same_prompt.min()
    assert_parity(ours, ref, size, atol_resized=0.005, image_spread=spread)  # measured <= 0.0025


def test_pickscore_gradients_reach_images(tiny_clip_dir):
    assert_gradients(rewards.load("pickscore", path=tiny_clip_dir))


def test_pickscore_bf16_model_gives_float32_scores_close_to_fp32(tiny_clip_dir):
    images = smooth_images(2, 224, 224)
    fp32 = rewards.load("pickscore", path=tiny_clip_dir).score(images, PROMPTS[:2])
    bf16 = rewards.load("pickscore", path=tiny_clip_dir, dtype="bf16").score(images, PROMPTS[:2])
    assert bf16.dtype == torch.float32
    torch.testing.assert_close(bf16, fp32, atol=0.1, rtol=0)  # bf16 keeps ~3 significant digits


def test_pickscore_no_grad_only_when_asked(tiny_clip_dir):
    reward = rewards.load("pickscore", path=tiny_clip_dir)
    images = smooth_images(1, 224, 224).requires_grad_(True)
    assert reward.score(images, PROMPTS[:1]).grad_fn is not None
    with torch.no_grad():
        assert reward.score(images, PROMPTS[:1]).grad_fn is None


def test_weights_load_lazily_once_per_process(tiny_clip_dir, tmp_path, fresh_reward_cache):
    missing = rewards.load("pickscore", path=tmp_path / "not-there")  # constructing reads nothing
    with pytest.raises(OSError, match="PickScore model"):
        missing.score(smooth_images(1, 32, 32), PROMPTS[:1])
    first = rewards.load("pickscore", path=tiny_clip_dir).load_weights()
    second = rewards.load("pickscore", path=str(tiny_clip_dir)).load_weights()
    other_dtype = rewards.load("pickscore", path=tiny_clip_dir, dtype=torch.bfloat16).load_weights()
    assert first._bundle[0] is second._bundle[0]
    assert other_dtype._bundle[0] is not first._bundle[0]
    assert not any(p.requires_grad for p in first._bundle[0].parameters())


def test_device_follows_the_first_batch(tiny_clip_dir, fresh_reward_cache):
    reward = rewards.load("pickscore", path=tiny_clip_dir)
    assert reward.device is None
    reward.score(smooth_images(1, 32, 32), PROMPTS[:1])
    assert reward.device == torch.device("cpu")


# --- CLIP score ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", SIZES)
def test_clip_score_matches_reference(tiny_clip_dir, size):
    images = smooth_images(4, *size)
    cos, _ = clip_reference(tiny_clip_dir, images, PROMPTS)
    ours = rewards.load("clip_score", path=tiny_clip_dir).score(images, PROMPTS)
    same_prompt = 100 * clip_reference(tiny_clip_dir, images, PROMPTS[:1] * 4)[0]
    spread = same_prompt.max() - same_prompt.min()
    # torchmetrics' per-sample 100 * cos; measured <= 0.034 (the x100 scale magnifies the pixel rounding)
    assert_parity(ours, 100 * cos, size, atol_resized=0.07, image_spread=spread)


def test_clip_score_clamp_and_scale_options(tiny_clip_dir):
    images = smooth_images(4, 224, 224)
    cos, _ = clip_reference(tiny_clip_dir, images, PROMPTS)
    assert (cos < 0).any() and (cos > 0).any(), "pick prompts/images with both signs to exercise the clamp"
    hessel = rewards.load("clip_score", path=tiny_clip_dir, scale=2.5, clamp=True).score(images, PROMPTS)
    torch.testing.assert_close(hessel, 2.5 * cos.clamp_min(0), rtol=1e-5, atol=1e-6)


def test_clip_score_gradients_reach_images(tiny_clip_dir):
    assert_gradients(rewards.load("clip_score", path=tiny_clip_dir))


# --- LAION aesthetic -------------------------------------------------------------------------------------------------


def aesthetic_reference(clip_dir, head_file, images):
    """The predictor's ``simple_inference``: L2-normalised CLIP image embedding -> MLP head."""
    clip = hf_load("CLIPModel", clip_dir)
    head = AestheticMLP()
    head.load_state_dict(torch.load(head_file, map_location="cpu", weights_only=True))
    with torch.no_grad():
        embeds = clip.visual_projection(clip.vision_model(pixel_values=hf_clip_reference(images)).pooler_output)
        return head.eval()(embeds / embeds.norm(dim=-1, keepdim=True)).squeeze(-1)


@pytest.mark.parametrize("size", SIZES)
def test_aesthetic_matches_reference(tiny_clip_l_dir, aesthetic_head_file, size):
    images = smooth_images(4, *size)
    ref = aesthetic_reference(tiny_clip_l_dir, aesthetic_head_file, images)
    reward = rewards.load("aesthetic", path=aesthetic_head_file, clip_path=tiny_clip_l_dir)
    assert_parity(reward.score(images), ref, size, atol_resized=4e-3, image_spread=ref.max() - ref.min())  # <= 1.7e-3
    assert reward.needs_prompts is False


def test_aesthetic_loads_from_a_folder_with_filename(tiny_clip_l_dir, aesthetic_head_file):
    reward = rewards.load(
        "aesthetic", path=aesthetic_head_file.parent, filename=aesthetic_head_file.name, clip_path=tiny_clip_l_dir
    )
    images = smooth_images(2, 224, 224)
    torch.testing.assert_close(
        reward.score(images, ["x", "y"]), aesthetic_reference(tiny_clip_l_dir, aesthetic_head_file, images)
    )


def test_aesthetic_refuses_a_head_in_another_layout(tiny_clip_l_dir, tmp_path):
    torch.save({"fc.weight": torch.zeros(1, 768)}, tmp_path / "head.pth")
    reward = rewards.load("aesthetic", path=tmp_path / "head.pth", clip_path=tiny_clip_l_dir)
    with pytest.raises(KeyError, match="layers"):
        reward.score(smooth_images(1, 32, 32))


def test_aesthetic_gradients_reach_images(tiny_clip_l_dir, aesthetic_head_file):
    assert_gradients(rewards.load("aesthetic", path=aesthetic_head_file, clip_path=tiny_clip_l_dir), prompts=None)


# --- HPS v2.0 / v2.1 -------------------------------------------------------------------------------------------------


def hps_reference_scores(config, checkpoint, images, prompts):
    """HPSv2's ``score``: open_clip model + HPS transform, ``diag(image_features @ text_features.T)``."""
    import open_clip

    model = open_clip.create_model(config.stem, pretrained=str(checkpoint), output_dict=True).eval()
    tokenizer = open_clip.get_tokenizer(config.stem)
    with torch.no_grad():
        out = model(hps_reference(images), tokenizer(prompts))
    return (out["image_features"] * out["text_features"]).sum(-1)


@pytest.mark.parametrize("name,filename", [("hpsv2", "HPS_v2_compressed.pt"), ("hpsv2.1", "HPS_v2.1_compressed.pt")])
@pytest.mark.parametrize("size", [(224, 224), (64, 90), (300, 200)])
def test_hps_matches_reference(tiny_hps, name, filename, size):
    config, folder = tiny_hps
    images = smooth_images(4, *size)
    ref = hps_reference_scores(config, folder / filename, images, PROMPTS)
    ours = rewards.load(name, path=folder, model=config).score(images, PROMPTS)
    # The reference resizes float tensors with the same torch op, so parity is float-exact at every size.
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    assert (ref.max() - ref.min()) > 1e-3


def test_hps_versions_load_their_own_checkpoints(tiny_hps):
    config, folder = tiny_hps
    images = smooth_images(2, 224, 224)
    v20 = rewards.load("hpsv2", path=folder, model=config).score(images, PROMPTS[:2])
    v21 = rewards.load("hpsv2.1", path=folder / "HPS_v2.1_compressed.pt", model=config).score(images, PROMPTS[:2])
    assert not torch.allclose(v20, v21)


def test_hps_accepts_module_prefixed_checkpoints(tiny_hps, tmp_path):
    config, folder = tiny_hps
    state = torch.load(folder / "HPS_v2_compressed.pt", weights_only=True)["state_dict"]
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "ddp.pt")
    images = smooth_images(2, 224, 224)
    ours = rewards.load("hpsv2", path=tmp_path / "ddp.pt", model=config).score(images, PROMPTS[:2])
    torch.testing.assert_close(
        ours, hps_reference_scores(config, folder / "HPS_v2_compressed.pt", images, PROMPTS[:2])
    )


def test_hps_gradients_reach_images(tiny_hps):
    config, folder = tiny_hps
    assert_gradients(rewards.load("hpsv2.1", path=folder, model=config))


def test_hps_missing_file_in_folder_is_named(tiny_hps, tmp_path):
    config, _ = tiny_hps
    with pytest.raises(FileNotFoundError, match="HPS_v2.1_compressed.pt"):
        rewards.load("hpsv2.1", path=tmp_path, model=config).score(smooth_images(1, 32, 32), ["x"])


def test_hub_ids_resolve_offline_only_from_the_cache(tiny_hps, tiny_clip_dir):
    """The default locations are hub ids; offline and uncached they fail with a message that says what to pass."""
    config, _ = tiny_hps
    images = smooth_images(1, 32, 32)
    with pytest.raises(OSError, match="'HPS_v2_compressed.pt' from the hub repository 'xswu/HPSv2'.*path="):
        rewards.load("hpsv2", model=config).score(images, ["x"])
    with pytest.raises(OSError, match="PickScore model.*yuvalkirstain/PickScore_v1"):
        rewards.load("pickscore").score(images, ["x"])
    # A local model folder without tokenizer files falls back to the reference's LAION tokenizer repository.
    assert rewards.load("pickscore", path="/nowhere").tokenizer_path == "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
    assert rewards.load("pickscore", path=tiny_clip_dir).tokenizer_path == str(tiny_clip_dir)


def test_hps_registers_an_open_clip_config_file(tiny_hps, tmp_path):
    """``model=<config .json>`` not yet known to open_clip is registered under its file stem by the package."""
    import open_clip

    config, folder = tiny_hps
    copy = tmp_path / "tiny-hps-config-copy.json"
    copy.write_text(config.read_text())
    assert copy.stem not in open_clip.list_models()
    images = smooth_images(2, 224, 224)
    ours = rewards.load("hpsv2", path=folder, model=copy).score(images, PROMPTS[:2])
    torch.testing.assert_close(
        ours, hps_reference_scores(config, folder / "HPS_v2_compressed.pt", images, PROMPTS[:2])
    )


# --- hub revisions ---------------------------------------------------------------------------------------------------


def fake_hub_repo(cache, repo_id, revisions):
    """An offline HF cache holding ``repo_id`` at several revisions: ``{revision: {file name: source path}}``.

    The layout is huggingface_hub's (``models--owner--name/refs/<revision>`` holds a commit hash, the files sit in
    ``snapshots/<hash>/``), so ``hf_hub_download(repo_id, name, revision=...)`` resolves from it with
    ``HF_HUB_OFFLINE=1``.
    """
    import shutil

    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    for number, (revision, files) in enumerate(revisions.items()):
        commit = f"{number + 1:040x}"
        (repo / "refs" / revision).write_text(commit)
        snapshot = repo / "snapshots" / commit
        snapshot.mkdir(parents=True)
        for name, source in files.items():
            shutil.copy(source, snapshot / name)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty HF cache folder that huggingface_hub (and transformers through it) reads instead of the user's."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


def test_revision_picks_the_hub_files_of_that_revision(tiny_hps, hub_cache, fresh_reward_cache):
    config, folder = tiny_hps
    v20, v21 = folder / "HPS_v2_compressed.pt", folder / "HPS_v2.1_compressed.pt"
    # Two revisions of one repository whose HPS_v2_compressed.pt differ: main has the v2.0 weights, "old" the v2.1.
    fake_hub_repo(hub_cache, "owner/hps", {"main": {v20.name: v20}, "old": {v20.name: v21}})
    images = smooth_images(2, 224, 224)
    at_main = rewards.load("hpsv2", path="owner/hps", model=config).score(images, PROMPTS[:2])
    at_old = rewards.load("hpsv2", path="owner/hps", model=config, revision="old").score(images, PROMPTS[:2])
    torch.testing.assert_close(at_main, hps_reference_scores(config, v20, images, PROMPTS[:2]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(at_old, hps_reference_scores(config, v21, images, PROMPTS[:2]), rtol=1e-5, atol=1e-5)
    with pytest.raises(OSError, match="'owner/hps' at revision 'missing'"):
        rewards.load("hpsv2", path="owner/hps", model=config, revision="missing").score(images, PROMPTS[:2])


def test_revision_reaches_from_pretrained_for_hub_ids_only(tiny_clip_dir, hub_cache, fresh_reward_cache):
    files = {p.name: p for p in tiny_clip_dir.iterdir() if p.is_file()}
    fake_hub_repo(hub_cache, "owner/pick", {"v1": files})
    images = smooth_images(2, 224, 224)
    local = rewards.load("pickscore", path=tiny_clip_dir, revision="ignored-for-local-paths").score(
        images, PROMPTS[:2]
    )
    # The repository has no main branch: only revision="v1" finds the model (and its tokenizer, same repository).
    hub = rewards.load("pickscore", path="owner/pick", tokenizer_path="owner/pick", revision="v1")
    torch.testing.assert_close(hub.score(images, PROMPTS[:2]), local)
    with pytest.raises(OSError, match="PickScore model.*owner/pick"):
        rewards.load("pickscore", path="owner/pick", tokenizer_path="owner/pick").score(images, PROMPTS[:2])
