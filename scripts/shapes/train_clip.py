"""Train the shapes CLIP (``diffalign/shapes/assets/clip``): a tiny ``transformers.CLIPModel`` of the shapes world.

The shipped folder (``config.json``, ``model.safetensors`` and the real CLIP tokenizer) loads with
``rewards.load("clip_score", path=folder)`` and ``rewards.load("pickscore", path=folder)``, so both rewards run on
real trained weights offline and give a differentiable reward (gradients reach the pixels).

Model: a ViT with 32-pixel patches on 224x224 inputs (7x7 = 49 tokens; the rewards upsample 32x32 images to 224
with ``rewards.preprocess.clip_preprocess``, which training uses too) and a causal text transformer over CLIP's
49,408-token vocabulary with 77 positions, both projected to a shared space.

Training: symmetric InfoNCE (CLIP's loss) between train-split scenes (``sample_scene(split="train")``, rendered at
32x32, lightly blurred or noised at random so that generated images are in distribution) and their captions, with
hard negatives on both sides, as NegCLIP does: each image also ranks one *corrupted* caption (:func:`corrupt_caption`:
a colour, shape or count changed, or two objects' colours swapped) and, for relation scenes, the *flipped* caption
(:func:`flip_relation`); half of the scenes are followed in the batch by a scene of their :func:`contrast_caption`
(``--pair-fraction``), so each caption also ranks an image that differs from its own in that one thing. 30% of the
scenes are relation scenes. AdamW with warm-up and cosine decay. Checkpoints (model, optimiser, step, RNG) every
``--ckpt-every`` steps; ``--resume`` continues.

Two settings let the vision tower see *where* things are (without them a supervised probe of object centres on it,
fresh or trained, stayed at chance for 400-1,500 steps, while a 3-layer CNN learnt it in 50): the position
embeddings start at std 0.3 instead of CLIP's 0.02 (``--position-init-std``), and the patch embedding, whose units
sum 3,072 inputs, learns at 0.02 x the lr (``--patch-lr-scale``, see :func:`make_optimizer`). With both the probe
learns within 300 steps, and the relation accuracy leaves 0.5 after 1,250-1,750 steps of CLIP training.

The shipped CLIP (2,500 steps, ``python scripts/shapes/train_clip.py --out ... --steps 2500``, 18 minutes on one
thread of a shared 2-core machine) prefers a scene's caption to a corrupted one on 1.000 / 0.980 of fresh train /
held-out scenes and to the flipped relation on 0.945 / 0.805 (``--eval``); to the colour-swapped caption of
two-object scenes on 0.975 / 0.965.
The CLIP shipped before (no pairs, no flips, CLIP's init, 4,500 steps) scored 0.945 / 0.825 against the same
corruptions, 0.57 / 0.57 against flips (blind to relations: its text tower mapped a caption and its flip to cosine
0.999) and 0.86 / 0.40 against colour swaps, which on the base model's images of "a blue circle and a green square"
(mostly drawn green circle, blue square) rewarded the wrong binding. Reward backprop on it over-optimised after
~100 steps; on the shipped one the verifier rises for the whole 10-minute run (:mod:`diffalign.shapes.learn`).

Tried and not shipped: ``--split all`` (held-out compositions too, 2,500 steps): 1.000 / 0.960 against corruptions /
flips on held-out scenes, but reward backprop on it gained less in 10 minutes (+0.063 against +0.133 aligned
strict, one run each); fine-tuning the old CLIP with flipped negatives and a position probe (the saddle did not
break in 750 steps, see the init above).

Usage::

    python scripts/shapes/train_clip.py --out diffalign/shapes/assets/clip --steps 2500
    python scripts/shapes/train_clip.py --out diffalign/shapes/assets/clip --eval   # ranking accuracies
    python scripts/shapes/train_clip.py --out runs/clip_all --init-from diffalign/shapes/assets/clip \
        --split all --steps 1000 --lr 3e-4 --warmup 50   # a later stage
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from diffalign.shapes.model import earlier_stages, log, warmup_cosine_lr
from diffalign.shapes.scenes import (
    COLOURS,
    MAX_OBJECTS,
    PROMPT_KINDS,
    SHAPES,
    CaptionError,
    Constraints,
    Relation,
    is_heldout,
    make_caption,
    parse_caption,
    render,
    sample_scene,
)
from rewards.preprocess import clip_preprocess, normalize, resize


def build_clip(args: argparse.Namespace):
    """A randomly initialised tiny ``CLIPModel`` (seeded by ``args.seed``)."""
    from transformers import CLIPConfig, CLIPModel

    from diffalign.tokenizer import CLIP_VOCAB_SIZE

    text = dict(
        vocab_size=CLIP_VOCAB_SIZE,
        hidden_size=args.text_hidden,
        intermediate_size=args.text_hidden * 4,
        num_hidden_layers=args.text_layers,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
        projection_dim=args.projection_dim,
    )
    vision = dict(
        hidden_size=args.vision_hidden,
        intermediate_size=args.vision_hidden * 4,
        num_hidden_layers=args.vision_layers,
        num_attention_heads=4,
        image_size=224,
        patch_size=32,
        projection_dim=args.projection_dim,
    )
    torch.manual_seed(args.seed)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=args.projection_dim))
    # CLIP's 0.02 init makes each position embedding ~100x smaller than the content of a 3,072-input patch, so
    # after the pre-encoder LayerNorm the tokens carry almost no position and the tower cannot say where anything
    # is (a supervised probe of object centres stayed at chance for 1,500 steps); a larger init can.
    torch.nn.init.normal_(model.vision_model.embeddings.position_embedding.weight, std=args.position_init_std)
    return model


def make_optimizer(model, args: argparse.Namespace) -> torch.optim.AdamW:
    """AdamW; the patch embedding learns at ``--patch-lr-scale`` x the lr (each group's ``lr_scale``).

    Adam moves every weight by about the lr each step, so a unit of the patch embedding, which sums 3,072 inputs
    (a 32x32x3 patch), moves ~3,000x the lr: at the lr of the rest it swamps the position embeddings.
    """
    patch = model.vision_model.embeddings.patch_embedding.weight
    rest = [param for param in model.parameters() if param is not patch]
    groups = [{"params": rest, "lr_scale": 1.0}, {"params": [patch], "lr_scale": args.patch_lr_scale}]
    return torch.optim.AdamW(groups, lr=args.lr, weight_decay=0.05)


# ------------------------------------------------------------------------------------------------------ data


def corrupt_caption(caption: str, rng: random.Random) -> str:
    """The caption with one thing changed, a hard negative: one object's colour or shape, one object's count (by
    one, at most ``MAX_OBJECTS`` objects in all), or the colours of two objects swapped (the same words bound the
    other way: "a blue circle and a green square" -> "a green circle and a blue square"). A valid caption of the
    grammar, never the same."""
    constraints = parse_caption(caption)
    for _ in range(100):
        try:
            corrupted = make_caption(parse_caption(make_caption(_corrupt_once(constraints, rng))))
        except CaptionError:  # two phrases became equal, or a relation got a count; draw again
            continue
        if corrupted != caption:
            return corrupted
    raise RuntimeError(f"could not corrupt {caption!r}")  # pragma: no cover


def _corrupt_once(constraints: Constraints, rng: random.Random) -> Constraints:
    """One random change of :func:`corrupt_caption` (it may leave the caption as it was, or make it invalid)."""
    objects = list(constraints.objects)
    i = rng.randrange(len(objects))
    spec = objects[i]
    changes = ["colour", "shape", "count"]
    j = rng.choice([k for k in range(len(objects)) if k != i] or [i])
    if objects[j].colour != spec.colour and objects[j].shape != spec.shape:
        changes.append("swap")
    change = rng.choice(changes)
    if change == "colour":
        objects[i] = replace(spec, colour=rng.choice([c for c in COLOURS if c != spec.colour]))
    elif change == "shape":
        objects[i] = replace(spec, shape=rng.choice([s for s in SHAPES if s != spec.shape]))
    elif change == "count":
        counts = [n for n in (spec.count - 1, spec.count + 1) if n >= 1]
        count = rng.choice([n for n in counts if constraints.num_objects - spec.count + n <= MAX_OBJECTS] or [1])
        objects[i] = replace(spec, count=count)
    else:
        objects[i], objects[j] = replace(spec, colour=objects[j].colour), replace(objects[j], colour=spec.colour)
    return Constraints(tuple(objects), constraints.relations)


OPPOSITE_RELATION = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def flip_relation(caption: str) -> str | None:
    """The caption with its relation reversed ("a red circle above a blue square" -> "... below ..."), which the
    scene of ``caption`` contradicts; ``None`` for captions without a relation."""
    constraints = parse_caption(caption)
    if not constraints.relations:
        return None
    (rel,) = constraints.relations
    flipped = Relation(rel.subject, OPPOSITE_RELATION[rel.relation], rel.reference)
    return make_caption(Constraints(constraints.objects, (flipped,)))


def contrast_caption(caption: str, rng: random.Random, split: str = "all") -> str | None:
    """A caption of a scene that ``caption``'s scene is confused with: the flipped relation of a relation caption,
    otherwise :func:`corrupt_caption`; ``None`` if the contrast falls outside ``split`` (a held-out composition
    must not be drawn when training on the train split)."""
    contrast = flip_relation(caption) or corrupt_caption(caption, rng)
    in_split = split == "all" or is_heldout(parse_caption(contrast)) == (split == "heldout")
    return contrast if in_split else None


def degrade(images: Tensor, generator: torch.Generator) -> Tensor:
    """Random light blur and pixel noise, per image, so that imperfect generated images stay in distribution."""
    blurred = F.avg_pool2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    mix = torch.rand(len(images), 1, 1, 1, generator=generator) * 0.6
    noise = torch.randn(images.shape, generator=generator) * torch.rand(len(images), 1, 1, 1, generator=generator)
    return ((1 - mix) * images + mix * blurred + 0.05 * noise).clamp(0, 1)


def sample_batch(
    batch: int,
    rng: random.Random,
    split: str = "train",
    size: int = 32,
    relation_fraction: float = 0.0,
    pair_fraction: float = 0.0,
) -> tuple[Tensor, list[str]]:
    """``batch`` fresh scenes and their captions: each a relation scene with probability ``relation_fraction``,
    otherwise of a prompt kind the split has, uniform over kinds. With probability ``pair_fraction`` a scene is
    followed by a scene of its :func:`contrast_caption` (the same objects the other way round, the colours
    swapped, ...), a hard negative for both towers; the batch then holds more than ``batch`` scenes."""
    kinds = PROMPT_KINDS[1:] if split == "heldout" else PROMPT_KINDS  # single objects are all train prompts

    def kind() -> str:  # no extra draw at fraction 0, so the first stage's batches stay as they were
        return "relation" if relation_fraction > 0 and rng.random() < relation_fraction else rng.choice(kinds)

    scenes = []
    for _ in range(batch):
        scenes.append(sample_scene(kind(), rng, split))
        paired = pair_fraction > 0 and rng.random() < pair_fraction  # no draw at 0, as kind()
        contrast = contrast_caption(scenes[-1][1], rng, split) if paired else None
        if contrast is not None:
            scenes.append(sample_scene(contrast, rng))
    return torch.stack([render(scene, size) for scene, _ in scenes]), [caption for _, caption in scenes]


# ---------------------------------------------------------------------------------------------------- model I/O


@functools.lru_cache(maxsize=4)
def _upsample_matrix(size: int, target: int = 224) -> Tensor:
    """``[target, size]`` matrix of the rewards' bicubic resize along one axis (it is separable and linear)."""
    # Unit images along the height; a width of 4 kept as is (a width of 1 is a degenerate case for bicubic).
    basis = torch.eye(size).view(size, 1, size, 1).expand(size, 1, size, 4).contiguous()
    return resize(basis, target, 4)[:, 0, :, 0].T.contiguous()


def fast_clip_preprocess(images: Tensor) -> Tensor:
    """``rewards.preprocess.clip_preprocess`` of square images up to 224 as two matrix products (same values)."""
    if images.shape[-1] >= 224:
        return clip_preprocess(images)
    matrix = _upsample_matrix(images.shape[-1])
    return normalize(torch.einsum("ih,bchw,jw->bcij", matrix, images, matrix))


def embed_images(model, images: Tensor, fast: bool = False) -> Tensor:
    """L2-normalised image embeddings ``[B, D]`` of images in [0, 1], preprocessed as the rewards do."""
    pixels = fast_clip_preprocess(images) if fast else clip_preprocess(images)
    pooled = model.vision_model(pixel_values=pixels).pooler_output
    return F.normalize(model.visual_projection(pooled), dim=-1)


def embed_texts(model, tokenizer, captions: list[str]) -> Tensor:
    """L2-normalised text embeddings ``[B, D]``, tokenised as the rewards do."""
    tokens = tokenizer(captions, padding=True, truncation=True, max_length=77, return_tensors="pt")
    pooled = model.text_model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).pooler_output
    return F.normalize(model.text_projection(pooled), dim=-1)


def contrastive_loss(model, tokenizer, images: Tensor, captions: list[str], negatives: list[str]) -> Tensor:
    """CLIP's symmetric InfoNCE; image-to-text also ranks each image's corrupted caption (hard negatives).

    Duplicate captions in a batch are merged, so an image is never pushed away from its own caption.
    """
    unique = list(dict.fromkeys(captions + negatives))
    target = torch.tensor([unique.index(c) for c in captions])
    image_emb, text_emb = embed_images(model, images, fast=True), embed_texts(model, tokenizer, unique)
    logits = model.logit_scale.exp().clamp(max=100) * image_emb @ text_emb.T  # [B, U]
    image_to_text = F.cross_entropy(logits, target)
    # Text to image over the true captions only: each caption against the images in the batch that carry it.
    positives = (target[None, :] == torch.arange(len(unique))[:, None]).float()  # [U, B]
    rows = positives.sum(1) > 0
    text_logits = logits.T[rows]
    text_to_image = -(text_logits.log_softmax(1) * positives[rows]).sum(1).div(positives[rows].sum(1)).mean()
    return (image_to_text + text_to_image) / 2


@torch.no_grad()
def ranking_accuracy(model, tokenizer, num_scenes: int, seed: int, split: str = "all") -> float:
    """Fraction of fresh scenes whose true caption scores above a corrupted one (colour or shape changed)."""
    rng = random.Random(seed)
    images, captions = sample_batch(num_scenes, rng, split)
    corrupted = [corrupt_caption(c, rng) for c in captions]
    return _prefers(model, tokenizer, images, captions, corrupted)


@torch.no_grad()
def relation_accuracy(model, tokenizer, num_scenes: int, seed: int, split: str = "all") -> float:
    """Fraction of fresh relation scenes whose true caption scores above its flipped one (:func:`flip_relation`)."""
    rng = random.Random(seed)
    scenes = [sample_scene("relation", rng, split) for _ in range(num_scenes)]
    images = torch.stack([render(scene) for scene, _ in scenes])
    captions = [caption for _, caption in scenes]
    return _prefers(model, tokenizer, images, captions, [flip_relation(c) for c in captions])


def _prefers(model, tokenizer, images: Tensor, captions: list[str], wrong_captions: list[str]) -> float:
    """Fraction of images that score their caption above the wrong one."""
    image_emb = embed_images(model, images)
    true = (image_emb * embed_texts(model, tokenizer, captions)).sum(-1)
    wrong = (image_emb * embed_texts(model, tokenizer, wrong_captions)).sum(-1)
    return (true > wrong).float().mean().item()


# ------------------------------------------------------------------------------------------------------ train


def lr_at(step: int, args: argparse.Namespace) -> float:
    """Linear warm-up, then cosine decay to 0.05 x ``--lr`` at ``--steps``."""
    return warmup_cosine_lr(step, args.lr, args.warmup, args.steps, floor=0.05)


def save_checkpoint(ckpt: Path, step: int, model, opt, rng: random.Random, generator: torch.Generator) -> None:
    state = {
        "step": step,
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "rng": rng.getstate(),
        "generator": generator.get_state(),
    }
    tmp = ckpt / "state.pt.tmp"
    torch.save(state, tmp)
    os.replace(tmp, ckpt / "state.pt")


def export(model, tokenizer, out: Path, info: dict[str, Any]) -> None:
    """Save the model and the tokenizer (as ``vocab.json`` + ``merges.txt``: 1.5 MB, not a 3.6 MB tokenizer.json)."""
    from diffalign.tokenizer import write_clip_tokenizer_files

    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "tokenizer.json").unlink(missing_ok=True)
    write_clip_tokenizer_files(out)
    (out / "diffalign_clip.json").write_text(json.dumps(info, indent=2) + "\n")


def train(args: argparse.Namespace) -> None:
    from transformers import CLIPModel

    from diffalign.tokenizer import build_clip_tokenizer

    torch.set_num_threads(args.threads)
    out, ckpt = Path(args.out), Path(args.ckpt or f"{args.out}.ckpt")
    ckpt.mkdir(parents=True, exist_ok=True)
    if not args.resume and (ckpt / "state.pt").exists():
        raise SystemExit(f"{ckpt} holds a checkpoint: pass --resume to continue it, or another --ckpt")
    tokenizer = build_clip_tokenizer(ckpt / "tokenizer")
    # Before any work: a wrong --init-from fails here.
    stages = earlier_stages(args.init_from, "diffalign_clip.json", "a CLIP folder exported by this script")
    model = (CLIPModel.from_pretrained(args.init_from) if args.init_from else build_clip(args)).train()
    opt = make_optimizer(model, args)
    rng, generator, step = random.Random(args.seed), torch.Generator().manual_seed(args.seed), 0
    if args.resume and (ckpt / "state.pt").is_file():
        state = torch.load(ckpt / "state.pt", weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        rng.setstate(state["rng"])
        generator.set_state(state["generator"])
        step = state["step"]
        log(f"resumed at step {step}")
    running, started = None, time.time()
    while step < args.steps:
        images, captions = sample_batch(
            args.batch, rng, args.split, relation_fraction=args.relation_fraction, pair_fraction=args.pair_fraction
        )
        negatives = [corrupt_caption(c, rng) for c in captions]
        if args.flip_negatives:
            negatives += [flipped for flipped in map(flip_relation, captions) if flipped is not None]
        for group in opt.param_groups:
            group["lr"] = group["lr_scale"] * lr_at(step, args)
        loss = contrastive_loss(model, tokenizer, degrade(images, generator), captions, negatives)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        if step % args.log_every == 0:
            rate, started = (time.time() - started) / args.log_every, time.time()
            scale = model.logit_scale.exp().item()
            log(f"step {step}/{args.steps} loss {running:.3f} scale {scale:.1f} {rate:.2f} s/step")
        if step % args.ckpt_every == 0 or step == args.steps:
            save_checkpoint(ckpt, step, model, opt, rng, generator)
            model.eval()
            acc = ranking_accuracy(model, tokenizer, args.eval_scenes, seed=10_000 + args.seed)
            rel = relation_accuracy(model, tokenizer, args.eval_scenes, seed=10_000 + args.seed)
            model.train()
            info = {
                "step": step,
                "ranking_accuracy": acc,
                "relation_accuracy": rel,
                "args": vars(args),
                "earlier_stages": stages,
            }
            export(model, tokenizer, out, info)
            log(
                f"checkpoint + export at step {step}: true caption > corrupted on {acc:.3f}, > flipped relation on "
                f"{rel:.3f} of fresh scenes"
            )


def evaluate(args: argparse.Namespace) -> None:
    from transformers import AutoTokenizer, CLIPModel

    torch.set_num_threads(args.threads)
    model, tokenizer = CLIPModel.from_pretrained(args.out).eval(), AutoTokenizer.from_pretrained(args.out)
    for split in ("train", "heldout", "all"):
        acc = ranking_accuracy(model, tokenizer, args.eval_scenes, seed=20_000 + args.seed, split=split)
        rel = relation_accuracy(model, tokenizer, args.eval_scenes, seed=20_000 + args.seed, split=split)
        log(
            f"{split} split: true caption > corrupted on {acc:.3f}, > flipped relation on {rel:.3f} of "
            f"{args.eval_scenes} fresh scenes"
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="folder to export the CLIPModel and tokenizer to")
    p.add_argument("--ckpt", default=None, help="checkpoint folder (default: <out>.ckpt)")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--text-hidden", type=int, default=32)
    p.add_argument("--text-layers", type=int, default=2)
    p.add_argument("--vision-hidden", type=int, default=64)
    p.add_argument("--vision-layers", type=int, default=3)
    p.add_argument("--projection-dim", type=int, default=64)
    p.add_argument(
        "--init-from",
        default=None,
        help="start from this exported CLIP folder (a later stage; the size options are then unused)",
    )
    p.add_argument(
        "--split", default="train", choices=["train", "all"], help="scenes to train on (all: with held-out ones)"
    )
    p.add_argument("--position-init-std", type=float, default=0.3, help="init std of the vision position embeddings")
    p.add_argument("--patch-lr-scale", type=float, default=0.02, help="lr multiplier of the patch embedding")
    p.add_argument("--relation-fraction", type=float, default=0.3, help="share of relation scenes per batch")
    p.add_argument(
        "--pair-fraction", type=float, default=0.5, help="share of scenes followed by a scene of a contrast caption"
    )
    p.add_argument(
        "--flip-negatives",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="flipped relations as extra hard negative captions",
    )
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--ckpt-every", type=int, default=250)
    p.add_argument("--eval-scenes", type=int, default=200)
    p.add_argument("--eval", action="store_true", help="only report the ranking accuracy of --out")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.eval:
        evaluate(args)
    else:
        train(args)


if __name__ == "__main__":
    main()
