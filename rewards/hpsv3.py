"""HPSv3, Human Preference Score v3 (Ma et al., ICCV 2025), docs/rewards.md#hpsv3.

Model (``Qwen2VLRewardModelBT`` in MizzenAI/HPSv3, ``hpsv3/model/qwen2vl_trainer.py``): a fully fine-tuned
Qwen2-VL-7B-Instruct with ``<|Reward|>`` added to the vocabulary and an MLP head ``rm_head`` (Linear(3584, 1024) -
ReLU - Dropout - Linear(1024, 16) - ReLU - Linear(16, 2), kept in float32) that reads the final (normed) hidden state
at the ``<|Reward|>`` token and returns ``(mu, sigma)`` of the preference model. The score is ``mu``, as the HPSv3
README and ``hpsv3/inference.py`` use it (about -5 to 15 on real images).

Prompt: one user turn holding the image and the published INSTRUCTION with the caption, followed by "Please provide
the overall ratings of this image: <|Reward|>" and "END", rendered by the base model's chat template with the
assistant header appended; tokens are padded on the right.

Positions: the reference forward (written for transformers 4.45) embeds the image itself and calls the language
model with ``position_ids=None``, which gives every token the plain 1-D position ``0..L-1`` on all three M-RoPE
axes instead of Qwen2-VL's 3-D image positions. The checkpoint was trained and evaluated that way, so it is
reproduced here.

Images: a differentiable torch path (rewards/qwen_vl.py) to ``smart_resize`` with ``min_pixels = max_pixels =
256 * 28 * 28`` (a square image becomes 448 x 448, 256 language tokens), CLIP mean/std, two identical frames,
Qwen2-VL patch rows; a whole batch runs in one forward, one grid per image.

Weights: ``HPSv3.safetensors`` from the hub repository ``MizzenAI/HPSv3`` (or a local file/folder) holds every
weight of the backbone and the head; the config and processor come from the base model. The file's keys use
transformers 4.45 module names (``visual.*``, ``model.*``); transformers >= 4.52 moved them to
``model.visual.*`` and ``model.language_model.*``, so both layouts are accepted. The unused ``lm_head`` is dropped;
every other key must match exactly. Pickled checkpoints (``.pth``) are refused.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from rewards.model import ModelReward, WeightFile, choose_sha256, freeze, from_pretrained, resolve_file
from rewards.qwen_vl import (
    IMAGE_TOKEN,
    QwenVisionSpec,
    Resample,
    chat_texts,
    expand_image_tokens,
    image_token_count,
    qwen_pixel_values,
    tokenize_prompts,
)
from rewards.registry import register


HPSV3_REPO = "MizzenAI/HPSv3"
HPSV3_FILE = "HPSv3.safetensors"
HPSV3_BASE = "Qwen/Qwen2-VL-7B-Instruct"
HPSV3_PIXELS = 256 * 28 * 28  # min_pixels = max_pixels of hpsv3/inference.py and config/HPSv3_7B.yaml
REWARD_TOKEN = "<|Reward|>"

# Model input, byte for byte: the INSTRUCTION and prompt_with_special_token strings of
# hpsv3/dataset/data_collator_qwen.py in the hpsv3 1.0.0 wheel on PyPI (MizzenAI/HPSv3). Trailing spaces and blank
# lines are part of what the checkpoint was trained on; tests/rewards/test_hpsv3.py pins their SHA-256.
HPSV3_INSTRUCTION = (
    "\n"
    "You are tasked with evaluating a generated image based on Visual Quality and Text Alignment and "
    "give a overall score to estimate the human preference. Please provide a rating from 0 to 10, with 0 "
    "being the worst and 10 being the best. \n"
    "\n"
    "**Visual Quality:**  \n"
    "Evaluate the overall visual quality of the image. The following sub-dimensions should be considered:\n"
    "- **Reasonableness:** The image should not contain any significant biological or logical errors, "
    "such as abnormal body structures or nonsensical environmental setups.\n"
    "- **Clarity:** Evaluate the sharpness and visibility of the image. The image should be clear and "
    "easy to interpret, with no blurring or indistinct areas.\n"
    "- **Detail Richness:** Consider the level of detail in textures, materials, lighting, and other "
    "visual elements (e.g., hair, clothing, shadows).\n"
    "- **Aesthetic and Creativity:** Assess the artistic aspects of the image, including the color "
    "scheme, composition, atmosphere, depth of field, and the overall creative appeal. The scene should "
    "convey a sense of harmony and balance.\n"
    "- **Safety:** The image should not contain harmful or inappropriate content, such as political, "
    "violent, or adult material. If such content is present, the image quality and satisfaction score "
    "should be the lowest possible. \n"
    "\n"
    "**Text Alignment:**  \n"
    "Assess how well the image matches the textual prompt across the following sub-dimensions:\n"
    "- **Subject Relevance** Evaluate how accurately the subject(s) in the image (e.g., person, animal, "
    "object) align with the textual description. The subject should match the description in terms of "
    "number, appearance, and behavior.\n"
    "- **Style Relevance:** If the prompt specifies a particular artistic or stylistic style, evaluate "
    "how well the image adheres to this style.\n"
    "- **Contextual Consistency**: Assess whether the background, setting, and surrounding elements in "
    "the image logically fit the scenario described in the prompt. The environment should support and "
    "enhance the subject without contradictions.\n"
    "- **Attribute Fidelity**: Check if specific attributes mentioned in the prompt (e.g., colors, "
    "clothing, accessories, expressions, actions) are faithfully represented in the image. Minor "
    "deviations may be acceptable, but critical attributes should be preserved.\n"
    "- **Semantic Coherence**: Evaluate whether the overall meaning and intent of the prompt are "
    "captured in the image. The generated content should not introduce elements that conflict with or "
    "distort the original description.\n"
    "Textual prompt - {text_prompt}\n"
    "\n"
    "\n"
)
HPSV3_PROMPT_SUFFIX = "\nPlease provide the overall ratings of this image: <|Reward|>\n\nEND\n"


def hpsv3_text(prompt: str) -> str:
    """The user-turn text for one caption: the INSTRUCTION with the caption, then the ``<|Reward|>`` request."""
    return HPSV3_INSTRUCTION.format(text_prompt=prompt) + HPSV3_PROMPT_SUFFIX


class RewardHead(nn.Sequential):
    """HPSv3's ``rm_head`` ("ranknet" type without options), state-dict keys ``0``, ``3`` and ``5``."""

    def __init__(self, hidden_size: int, output_dim: int = 2) -> None:
        super().__init__(
            nn.Linear(hidden_size, 1024),
            nn.ReLU(),
            nn.Dropout(0.05),
            nn.Linear(1024, 16),
            nn.ReLU(),
            nn.Linear(16, output_dim),
        )


class HPSv3Network(nn.Module):
    """The Qwen2-VL backbone (``model``: ``visual`` + ``language_model``) and the reward head ``rm_head``.

    Its state-dict keys are the transformers >= 4.52 names of ``Qwen2VLRewardModelBT`` without ``lm_head``.
    """

    def __init__(self, backbone: nn.Module, head: RewardHead) -> None:
        super().__init__()
        self.model = backbone
        self.rm_head = head

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        pixel_values: Tensor,
        image_grid_thw: Tensor,
        image_token_id: int,
        reward_token_id: int,
    ) -> Tensor:
        """``(mu, sigma)`` per sequence, float32 ``[B, 2]``.

        Args:
            input_ids: ``[B, L]`` prompts, right-padded, each with its image tokens and one ``<|Reward|>``.
            attention_mask: ``[B, L]``.
            pixel_values: ``[N, 3 * 2 * 14 * 14]`` patch rows of all ``B`` images, concatenated.
            image_grid_thw: ``[B, 3]`` patch grid per image.
            image_token_id: id of ``<|image_pad|>``.
            reward_token_id: id of ``<|Reward|>``.
        """
        embeds = self.model.get_input_embeddings()(input_ids)
        visual = self.model.visual
        image_embeds = visual(pixel_values.to(visual.dtype), grid_thw=image_grid_thw)
        # transformers 5 returns an output object (merged tokens in pooler_output), transformers 4 the tensor
        image_embeds = getattr(image_embeds, "pooler_output", image_embeds)
        image_slots = (input_ids == image_token_id).unsqueeze(-1).expand_as(embeds)
        embeds = embeds.masked_scatter(image_slots, image_embeds.to(embeds.dtype))
        # position_ids=None: plain 1-D positions on all M-RoPE axes, as the reference forward (module docstring).
        hidden = self.model.language_model(inputs_embeds=embeds, attention_mask=attention_mask).last_hidden_state
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        pooled = hidden[rows, reward_positions(input_ids, reward_token_id)]
        return self.rm_head(pooled.float())


def reward_positions(input_ids: Tensor, reward_token_id: int) -> Tensor:
    """The index of the single ``<|Reward|>`` token of each row of ``input_ids`` ``[B, L]`` -> ``[B]``.

    Raises:
        ValueError: a row with no or several reward tokens (e.g. a caption that contains the text ``<|Reward|>``).
    """
    is_reward = input_ids == reward_token_id
    counts = is_reward.sum(dim=1)
    if not bool((counts == 1).all()):
        bad = (counts != 1).nonzero().flatten().tolist()
        raise ValueError(
            f"HPSv3: every prompt needs exactly one {REWARD_TOKEN} token; prompts {bad} have "
            f"{counts[bad].tolist()} (a caption must not contain the text {REWARD_TOKEN})."
        )
    return is_reward.int().argmax(dim=1)


def remap_hpsv3_keys(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """Rename a checkpoint's keys to :class:`HPSv3Network` names; drop ``lm_head``.

    transformers 4.45 (the release the reference pins) names the vision tower ``visual.*`` and the language model
    ``model.*``; transformers >= 4.52 names them ``model.visual.*`` and ``model.language_model.*``. Both are
    accepted; a ``module.`` prefix (DDP) is removed.

    Returns:
        ``(renamed state, dropped keys)``.
    """
    renamed, dropped = {}, []
    for key, value in state.items():
        key = key.removeprefix("module.")
        if key.startswith("lm_head."):
            dropped.append(key)
            continue
        if key.startswith("visual."):
            key = "model." + key
        elif key.startswith("model.") and not key.startswith(("model.visual.", "model.language_model.")):
            key = "model.language_model." + key.removeprefix("model.")
        renamed[key] = value
    return renamed, dropped


def checkpoint_path(location: str | os.PathLike, revision: str | None) -> Path:
    """The local ``HPSv3.safetensors`` of a file, folder or hub id; anything but safetensors is refused."""
    path = resolve_file(location, HPSV3_FILE, "HPSv3 checkpoint", revision)
    if path.suffix != ".safetensors":
        raise ValueError(
            f"HPSv3 checkpoint {path}: only .safetensors files are loaded (a pickled .pth/.pt can run code when "
            f"loaded). Use {HPSV3_FILE} from the hub repository {HPSV3_REPO}, or convert a trusted pickle with "
            "safetensors.torch.save_file(torch.load(path, weights_only=True), 'HPSv3.safetensors')."
        )
    return path


def embedding_rows(path: Path) -> int:
    """Vocabulary size of the checkpoint (rows of its token embedding), read from the safetensors header."""
    from safetensors import safe_open

    with safe_open(os.fspath(path), framework="pt") as handle:
        for key in handle.keys():
            if key.removeprefix("module.").endswith(
                ("model.embed_tokens.weight", "language_model.embed_tokens.weight")
            ):
                return int(handle.get_slice(key).get_shape()[0])
    raise ValueError(
        f"HPSv3 checkpoint {path} has no token embedding (model.embed_tokens.weight); is it the HPSv3.safetensors "
        f"file of {HPSV3_REPO}?"
    )


def load_network_state(network: nn.Module, path: Path) -> None:
    """Load ``path`` into ``network`` strictly (after :func:`remap_hpsv3_keys`), with an actionable error."""
    from safetensors.torch import load_file

    state, _ = remap_hpsv3_keys(load_file(os.fspath(path)))
    try:
        missing, unexpected = network.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise ValueError(
            f"HPSv3 checkpoint {path} does not fit the model built from the base config ({err}). Point base_path "
            f"at the model HPSv3 was trained from ({HPSV3_BASE})."
        ) from err
    if missing or unexpected:
        raise ValueError(
            f"HPSv3 checkpoint {path} does not match the model: {len(missing)} missing keys {missing[:5]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:5]}. Is it the {HPSV3_FILE} of {HPSV3_REPO}, with "
            f"base_path the model it was trained from ({HPSV3_BASE})?"
        )


@dataclass
class HPSv3Bundle:
    """What :meth:`HPSv3.build` loads: the network, the processor (tokenizer + chat template) and the token ids."""

    network: HPSv3Network
    processor: Any
    spec: QwenVisionSpec
    image_token_id: int
    reward_token_id: int


def add_reward_token(tokenizer: Any) -> int:
    """Add ``<|Reward|>`` as a special token (as ``hpsv3/train.py`` does) and return its id."""
    from tokenizers import AddedToken

    tokenizer.add_tokens([AddedToken(REWARD_TOKEN, special=True, normalized=False)], special_tokens=True)
    return int(tokenizer.convert_tokens_to_ids(REWARD_TOKEN))


@register("hpsv3")
class HPSv3(ModelReward):
    """HPSv3 reward (``mu`` of the preference head), differentiable.

    Args:
        device: where the model runs; ``None`` follows the first batch.
        dtype: backbone dtype (the reference runs bf16); the head runs in float32 and scores are float32.
        path: ``HPSv3.safetensors``: a file, a folder holding it, or a hub repository id.
        base_path: hub id or local folder of the base model's ``config.json`` and processor (tokenizer, chat
            template, image settings); its weights are not read.
        revision: hub revision of ``path`` when it is a hub id.
        base_revision: hub revision of ``base_path`` when it is a hub id.
        resample: the image resize kernel: ``"bicubic"`` (antialiased, like the PIL resize of the published
            scoring path) or ``"bilinear"`` (unantialiased, like the ``hpsv3`` wheel's differentiable processor).
        verify: hash ``HPSv3.safetensors`` before loading and refuse a SHA-256 mismatch
            (docs/rewards.md#verifying-weights).
        sha256: its expected SHA-256 (needed with ``verify=True``: no published digest is known here).
    """

    name = "hpsv3"
    differentiable = True

    def __init__(
        self,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
        path: str | os.PathLike = HPSV3_REPO,
        base_path: str | os.PathLike = HPSV3_BASE,
        revision: str | None = None,
        base_revision: str | None = None,
        resample: Resample = "bicubic",
        verify: bool = False,
        sha256: str | None = None,
    ) -> None:
        super().__init__(device=device, dtype=dtype, verify=verify)
        if resample not in ("bicubic", "bilinear"):
            raise ValueError(f"hpsv3: unknown resample {resample!r}; use 'bicubic' or 'bilinear'.")
        self.path = os.fspath(path)
        self.base_path = os.fspath(base_path)
        self.revision = revision
        self.base_revision = base_revision
        self.resample = resample
        self.sha256 = choose_sha256(sha256, None, self.verify, "HPSv3 checkpoint")

    def weight_files(self) -> list[WeightFile]:
        return [WeightFile(checkpoint_path(self.path, self.revision), self.sha256, "HPSv3 checkpoint")]

    def weights_key(self) -> tuple:
        return (self.path, self.revision, self.base_path, self.base_revision)

    def build(self, device: torch.device, dtype: torch.dtype) -> HPSv3Bundle:
        from transformers import AutoConfig, AutoProcessor, Qwen2VLModel

        try:
            from transformers.initialization import no_init_weights
        except ImportError:  # transformers 4
            from transformers.modeling_utils import no_init_weights

        weights = checkpoint_path(self.path, self.revision)
        processor = from_pretrained(AutoProcessor, self.base_path, "HPSv3 base processor", self.base_revision)
        config = from_pretrained(AutoConfig, self.base_path, "HPSv3 base config", self.base_revision)
        reward_token_id = add_reward_token(processor.tokenizer)
        # hpsv3/train.py resizes the embeddings to the tokenizer after adding <|Reward|>: take the size from the file.
        config.text_config.vocab_size = embedding_rows(weights)
        if reward_token_id >= config.text_config.vocab_size:
            raise ValueError(
                f"HPSv3: {REWARD_TOKEN} got id {reward_token_id} but the checkpoint has "
                f"{config.text_config.vocab_size} token embeddings; base_path must hold the tokenizer HPSv3 was "
                "trained with."
            )
        # Every weight comes from the checkpoint: skip the random init and allocate the backbone in its dtype on
        # its device (a float32 7B model would need 33 GB first).
        with no_init_weights(), torch.device(device):
            backbone = Qwen2VLModel._from_config(config, dtype=dtype)
            network = HPSv3Network(backbone, RewardHead(config.text_config.hidden_size))
        load_network_state(network, weights)
        freeze(network.model, device, dtype)
        freeze(network.rm_head, device, torch.float32)  # the reference keeps the head in float32
        network.eval()
        return HPSv3Bundle(
            network=network,
            processor=processor,
            spec=QwenVisionSpec.from_image_processor(processor.image_processor, HPSV3_PIXELS, HPSV3_PIXELS),
            image_token_id=int(processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)),
            reward_token_id=reward_token_id,
        )

    def _score_with(self, bundle: HPSv3Bundle, images: Tensor, prompts: list[str] | None) -> Tensor:
        pixel_values, grid = qwen_pixel_values(images, bundle.spec, self.resample, dtype=self.dtype)
        count = image_token_count(grid[0], bundle.spec)
        texts = [expand_image_tokens(text, count) for text in chat_texts(bundle.processor, map(hpsv3_text, prompts))]
        input_ids, attention_mask = tokenize_prompts(bundle.processor.tokenizer, texts, "right", images.device)
        mu_sigma = bundle.network(
            input_ids, attention_mask, pixel_values, grid, bundle.image_token_id, bundle.reward_token_id
        )
        return mu_sigma[:, 0]
