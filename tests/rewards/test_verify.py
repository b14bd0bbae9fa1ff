"""``verify=True``: SHA-256 of the weight files checked before loading (docs/rewards.md#verifying-weights).

Runs on the tiny scorers of conftest.py; digests of the good files are computed here with ``hashlib`` directly, so the
package's streaming hash is compared with an independent one.
"""

import hashlib

import pytest
import torch
from rewards_testing import smooth_images

import rewards
import rewards.model as model_module
from rewards.aesthetic import AESTHETIC_HEAD_SHA256
from rewards.model import WeightsHashError, file_sha256


WRONG = "0" * 64


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(autouse=True)
def _forget_verified(monkeypatch):
    """Each test starts with no file remembered as verified."""
    monkeypatch.setattr(model_module, "_VERIFIED", set())


def load_hps(tiny_hps, **options):
    config, folder = tiny_hps
    return rewards.load("hpsv2", path=folder, model=config, **options)


def test_streamed_hash_equals_hashlib_whatever_the_chunk_size(tmp_path, monkeypatch):
    path = tmp_path / "blob.bin"
    path.write_bytes(bytes(range(256)) * 41 + b"tail")
    monkeypatch.setattr(model_module, "_HASH_CHUNK", 7)  # many chunks, the last one partial
    assert file_sha256(path) == digest(path)


def test_good_hash_passes_and_the_reward_scores(tiny_hps, fresh_reward_cache):
    checkpoint = tiny_hps[1] / "HPS_v2_compressed.pt"
    reward = load_hps(tiny_hps, verify=True, sha256=digest(checkpoint).upper()).load_weights()
    scores = reward.score(smooth_images(2, 64, 64), ["a", "b"])
    assert scores.shape == (2,) and torch.isfinite(scores).all()


def test_bad_hash_raises_naming_file_expected_actual_and_fix(tiny_hps, fresh_reward_cache):
    checkpoint = tiny_hps[1] / "HPS_v2.1_compressed.pt"
    reward = rewards.load("hpsv2.1", path=tiny_hps[1], model=tiny_hps[0], verify=True, sha256=WRONG)
    with pytest.raises(WeightsHashError) as err:
        reward.load_weights()
    message = str(err.value)
    assert str(checkpoint) in message and WRONG in message and digest(checkpoint) in message
    assert "download it again" in message and f"sha256='{digest(checkpoint)}'" in message


def test_verification_happens_even_when_the_model_is_already_cached(tiny_hps, fresh_reward_cache):
    load_hps(tiny_hps).load_weights()  # cached unverified
    with pytest.raises(WeightsHashError):
        load_hps(tiny_hps, verify=True, sha256=WRONG).load_weights()


def test_no_verify_means_no_hashing(tiny_hps, tiny_clip_dir, fresh_reward_cache, monkeypatch):
    def refuse(path):
        raise AssertionError(f"hashed {path} without verify=True")

    monkeypatch.setattr(model_module, "file_sha256", refuse)
    load_hps(tiny_hps).load_weights()
    rewards.load("pickscore", path=tiny_clip_dir).load_weights()


def test_an_unchanged_file_is_hashed_once_per_process(tiny_hps, fresh_reward_cache, monkeypatch):
    calls = []
    monkeypatch.setattr(model_module, "file_sha256", lambda path: calls.append(path) or digest(path))
    good = digest(tiny_hps[1] / "HPS_v2_compressed.pt")
    load_hps(tiny_hps, verify=True, sha256=good).load_weights()
    rewards.clear_cache()
    load_hps(tiny_hps, verify=True, sha256=good).load_weights()
    assert len(calls) == 1


@pytest.mark.parametrize("name", ["hpsv2", "hpsv2.1", "imagereward", "pickscore", "hpsv3", "mps"])
def test_unknown_published_hash_refused_without_user_sha256(name):
    with pytest.raises(ValueError, match=r"no published SHA-256 is known.*sha256="):
        rewards.load(name, path="/nowhere/weights", verify=True)


def test_sha256_without_verify_and_malformed_sha256_are_refused(tiny_hps):
    with pytest.raises(ValueError, match="only checked with verify=True"):
        load_hps(tiny_hps, sha256=WRONG)
    with pytest.raises(ValueError, match="not a SHA-256 digest"):
        load_hps(tiny_hps, verify=True, sha256="abc123")


def test_aesthetic_checks_the_published_head_digest_by_file_name(tiny_clip_l_dir, aesthetic_head_file):
    """The tiny head is named like the original file, so its published digest is the one compared (and differs)."""
    backbone = digest(tiny_clip_l_dir / "model.safetensors")
    reward = rewards.load(
        "aesthetic", path=aesthetic_head_file, clip_path=tiny_clip_l_dir, verify=True, clip_sha256=backbone
    )
    with pytest.raises(WeightsHashError, match=AESTHETIC_HEAD_SHA256[aesthetic_head_file.name]):
        reward.load_weights()


def test_aesthetic_user_digests_for_head_and_backbone(tiny_clip_l_dir, aesthetic_head_file, fresh_reward_cache):
    head, backbone = digest(aesthetic_head_file), digest(tiny_clip_l_dir / "model.safetensors")
    options = dict(path=aesthetic_head_file, clip_path=tiny_clip_l_dir, verify=True, sha256=head)
    with pytest.raises(ValueError, match="clip_sha256="):
        rewards.load("aesthetic", **options)  # the backbone's digest is unknown
    with pytest.raises(WeightsHashError, match="clip_sha256="):
        rewards.load("aesthetic", clip_sha256=WRONG, **options).load_weights()
    rewards.load("aesthetic", clip_sha256=backbone, **options).load_weights()


def test_pickscore_verifies_the_folder_weights_file(tiny_clip_dir, fresh_reward_cache):
    weights = tiny_clip_dir / "model.safetensors"
    rewards.load("pickscore", path=tiny_clip_dir, verify=True, sha256=digest(weights)).load_weights()
    with pytest.raises(WeightsHashError, match="model.safetensors"):
        rewards.load("pickscore", path=tiny_clip_dir, verify=True, sha256=WRONG).load_weights()
