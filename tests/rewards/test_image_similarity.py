"""The edit reward image_similarity: CLIP image-to-image cosine with the source named in metadata, as flow_grpo's."""

import pytest
import torch
from PIL import Image

import rewards
from rewards import RewardInputError


def _save(image: torch.Tensor, path) -> str:
    Image.fromarray((image.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()).save(path)
    return str(path)


def _images(seed: int, count: int = 2, size: int = 224) -> torch.Tensor:
    pixels = torch.rand(count, 3, size, size, generator=torch.Generator().manual_seed(seed))
    return (pixels * 255).round() / 255  # exactly representable in a PNG


def test_cosine_of_clip_image_features_with_each_source(tiny_clip_dir, tmp_path):
    from transformers import CLIPModel

    reward = rewards.load("image_similarity", path=str(tiny_clip_dir), scale=2.0)
    sources, edits = _images(0), _images(1)
    metadata = [{"image": _save(s, tmp_path / f"{i}.png")} for i, s in enumerate(sources)]
    scores = reward.score(edits, None, metadata=metadata)

    # Reference: transformers' image features of the CLIP-normalised pixels (224 px images need no resize or crop).
    model = CLIPModel.from_pretrained(tiny_clip_dir).eval()
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    with torch.no_grad():
        edit = torch.nn.functional.normalize(
            model.get_image_features(pixel_values=(edits - mean) / std).pooler_output, dim=-1
        )
        source = torch.nn.functional.normalize(
            model.get_image_features(pixel_values=(sources - mean) / std).pooler_output, dim=-1
        )
    torch.testing.assert_close(scores, 2.0 * (edit * source).sum(-1), atol=1e-5, rtol=1e-5)
    # An edit that returns its source unchanged scores the full scale.
    torch.testing.assert_close(
        reward.score(sources, None, metadata=metadata), torch.full((2,), 2.0), atol=1e-5, rtol=0
    )


def test_the_gradient_reaches_the_edit_and_a_missing_source_is_named(tiny_clip_dir, tmp_path):
    reward = rewards.load("image_similarity", path=str(tiny_clip_dir))
    edits = _images(2, count=1, size=64).requires_grad_(True)
    metadata = [{"image": _save(_images(3, count=1, size=96)[0], tmp_path / "source.png")}]  # any source size
    reward.score(edits, None, metadata=metadata).sum().backward()
    assert edits.grad is not None and edits.grad.abs().sum() > 0
    with pytest.raises(RewardInputError, match=r"metadata\['image'\]"):
        reward.score(edits.detach(), None, metadata=[{"prompt": "make it red"}])
