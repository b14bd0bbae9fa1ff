"""Train the shapes base model (``diffalign/shapes/assets/base_model``) from scratch on rendered scenes.

Recipe (all on CPU; sizes in :class:`diffalign.shapes.model.BaseArch`):

1. Render ``--images`` train-split scenes (``render_dataset(split="train")``, kinds weighted by ``--kinds``: single
   objects and counts more often than bindings and relations). Held-out compositions are never rendered.
2. Train the tiny ``AutoencoderKL`` (32x32x3 -> 16x16x4) for ``--vae-steps``: L1 + MSE reconstruction of a
   posterior sample, plus a small KL term. Its ``shift_factor``/``scaling_factor`` are then set from the latent
   statistics so that scaled latents have zero mean and unit variance.
3. Cache the scaled latents (posterior means) of every image, and the text conditioning of every caption through
   the frozen, randomly initialised text encoders (only the transformer and the VAE are trained).
4. Train the ``SD3Transformer2DModel`` with rectified flow as diffusers' SD3 script does: ``x_s = (1 - s) x0 + s e``
   with ``s`` logit-normal(0, 1), target ``e - x0``, MSE; the caption is replaced by ``""`` with probability
   ``--cfg-dropout`` so that classifier-free guidance works; AdamW with warm-up, an EMA of the weights (exported).
   Attention over the T5 slot's 256 identical zero tokens is computed as one token with a ``log 256`` logit bias
   (exact; :class:`diffalign.shapes.model.RepeatedContextAttnProcessor`).

Checkpoints (``--ckpt``, atomic): the VAE after step 2, then the transformer, its EMA, the optimiser, the step and
the RNG state every ``--ckpt-every`` steps; ``--resume`` continues from them and gives the same run as an
uninterrupted one (the data and caches are re-derived from the seed). The EMA pipeline is exported to ``--out``
with ``save_pretrained`` at every checkpoint and at the end.

Training stages: ``--init-from`` starts a later stage from an earlier stage's checkpoint folder (its transformer,
EMA, VAE and latent scaling; new scenes from ``--kinds``/``--split``, a new optimiser and schedule); the exported
``diffalign_train.json`` lists the ``earlier_stages``. The frozen text encoders are drawn from ``--text-seed``
(default ``--seed``); the transformer re-adapts within a few hundred steps when a stage draws new ones.

The shipped model (single-object strict 0.988, held-out compositional strict 0.314; ~1 h on one CPU thread)::

    # 1. everything but the compositions of HELDOUT_COMBOS (schedule of 10,000 steps, stopped at 8,000)
    python scripts/shapes/train_base.py --out runs/s1/model --ckpt runs/s1 --seed 0 --split pretrain \
        --steps 10000 --stop-at 8000
    # 2. relation-heavy, same split (schedule of 6,000 steps, stopped at 3,000)
    python scripts/shapes/train_base.py --out runs/s2/model --ckpt runs/s2 --init-from runs/s1 --seed 1 \
        --split pretrain --kinds single:1,count:1,binding:2,relation:5 --lr 5e-4 --warmup 100 --steps 6000 \
        --stop-at 3000
    # 3. relation-heavy on the training split (half the compositions of HELDOUT_COMBOS join in)
    python scripts/shapes/train_base.py --out runs/s3/model --ckpt runs/s3 --init-from runs/s2 --seed 2 \
        --kinds single:1,count:1,binding:2,relation:5 --lr 5e-4 --warmup 100 --steps 8000
    python scripts/shapes/train_base.py --out runs/s3/model --eval --write-eval   # accuracies

Relations stay near chance (given both objects right, the relation holds in ~50% of samples for each of the four
relations, and the first denoising steps place the objects independently of the relation words), as spatial
relations are the hardest GenEval category for real models too: that is where alignment has most to gain.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from diffalign.shapes.model import (
    T5_TOKENS,
    BaseArch,
    EvalProtocol,
    arch_dict,
    build_base_pipeline,
    earlier_stages,
    evaluate_base_model,
    log,
    one_t5_token_quietly,
    save_base_pipeline,
    use_repeated_context,
    warmup_cosine_lr,
    write_eval,
)
from diffalign.shapes.scenes import SPLITS, render_dataset


DEFAULT_KINDS = "single:3,count:2,binding:2,relation:2"


def parse_kinds(text: str) -> list[str]:
    """``"single:3,count:1"`` -> ``["single"] * 3 + ["count"]`` (render_dataset draws kinds uniformly)."""
    kinds: list[str] = []
    for item in text.split(","):
        name, _, weight = item.partition(":")
        kinds += [name.strip()] * int(weight or 1)
    return kinds


def atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------------- VAE


def train_vae(vae, images: Tensor, args: argparse.Namespace, generator: torch.Generator) -> None:
    """Fit the autoencoder to ``images`` [N, 3, H, W] in [0, 1] (the VAE works in [-1, 1])."""
    vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    for step in range(args.vae_steps):
        idx = torch.randint(len(images), (args.vae_batch,), generator=generator)
        x = images[idx] * 2 - 1
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        recon = vae.decode(z).sample
        rec = F.l1_loss(recon, x) + F.mse_loss(recon, x)
        kl = posterior.kl().mean() / posterior.mean[0].numel()
        loss = rec + args.vae_kl * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % args.log_every == 0 or step == args.vae_steps - 1:
            log(f"vae step {step}/{args.vae_steps} rec {rec.item():.4f} kl {kl.item():.3f}")
    vae.eval().requires_grad_(False)


@torch.no_grad()
def encode_images(vae, images: Tensor, batch: int = 256) -> Tensor:
    """Posterior means of ``images`` [N, 3, H, W] in [0, 1], unscaled."""
    return torch.cat(
        [vae.encode(images[i : i + batch] * 2 - 1).latent_dist.mean for i in range(0, len(images), batch)]
    )


def set_latent_scaling(vae, latents: Tensor) -> None:
    """Set ``shift_factor``/``scaling_factor`` so that ``(z - shift) * scale`` has zero mean and unit std."""
    vae.register_to_config(shift_factor=latents.mean().item(), scaling_factor=1.0 / latents.std().item())


@torch.no_grad()
def vae_verifier_accuracy(vae, images: Tensor, captions: list[str]) -> float:
    """Strict verifier accuracy of the VAE's reconstructions of rendered scenes (should be ~1)."""
    import diffalign.shapes  # noqa: F401
    import rewards

    recon = vae.decode(encode_images(vae, images)).sample
    _, strict = rewards.load("shapes").evaluate(((recon + 1) / 2).clamp(0, 1), captions)
    return strict.float().mean().item()


# ------------------------------------------------------------------------------------------------------ text


@torch.no_grad()
def encode_captions(pipe, captions: list[str]) -> tuple[Tensor, Tensor]:
    """Training conditioning of each caption: CLIP tokens + one stand-in T5 zero token ``[U, L, D]``, pooled."""
    with one_t5_token_quietly(pipe):
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompt=captions, prompt_2=None, prompt_3=None, do_classifier_free_guidance=False, max_sequence_length=1
        )
    return embeds, pooled


# ---------------------------------------------------------------------------------------------- transformer


def sample_sigmas(batch: int, generator: torch.Generator) -> Tensor:
    """Logit-normal(0, 1) noise levels, as diffusers' SD3 training script (``weighting_scheme="logit_normal"``)."""
    return torch.sigmoid(torch.randn(batch, generator=generator))


def flow_loss(transformer, x0: Tensor, embeds: Tensor, pooled: Tensor, generator: torch.Generator) -> Tensor:
    """Rectified-flow loss: predict ``noise - x0`` at ``x_s = (1 - s) x0 + s noise``."""
    noise = torch.randn(x0.shape, generator=generator)
    sigma = sample_sigmas(len(x0), generator)
    s = sigma.view(-1, 1, 1, 1)
    pred = transformer(
        hidden_states=(1 - s) * x0 + s * noise,
        timestep=sigma * 1000,
        encoder_hidden_states=embeds,
        pooled_projections=pooled,
        return_dict=False,
    )[0]
    return F.mse_loss(pred, noise - x0)


@torch.no_grad()
def update_ema(ema, model, step: int, decay: float) -> None:
    rate = min(decay, (1 + step) / (10 + step))
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1 - rate)


def lr_at(step: int, args: argparse.Namespace) -> float:
    """Linear warm-up, then cosine decay to 0.1 x ``--lr`` at ``--steps``."""
    return warmup_cosine_lr(step, args.lr, args.warmup, args.steps, floor=0.1)


# ------------------------------------------------------------------------------------------------ checkpoints


def save_state(ckpt: Path, step: int, transformer, ema, opt, generator: torch.Generator) -> None:
    state = {
        "step": step,
        "transformer": transformer.state_dict(),
        "ema": ema.state_dict(),
        "optimizer": opt.state_dict(),
        "generator": generator.get_state(),
        "torch_rng": torch.get_rng_state(),
    }
    atomic_save(state, ckpt / "state.pt")


def export(pipe, out: Path, recipe: dict[str, Any], ckpt: Path) -> None:
    """Write the pipeline (holding the EMA transformer) and the training recipe to ``out``, and the recipe beside
    the checkpoint too (a later stage started ``--init-from`` it lists it among its ``earlier_stages``)."""
    save_base_pipeline(pipe, out)
    text = json.dumps(recipe, indent=2) + "\n"
    (out / "diffalign_train.json").write_text(text)
    (ckpt / "recipe.json").write_text(text)


# ------------------------------------------------------------------------------------------------------ main


def prepare(args: argparse.Namespace, arch: BaseArch, ckpt: Path) -> tuple[Any, dict[str, Any]]:
    """Build the pipeline, train (or reload) the VAE, and build (or reload) the latent and caption caches."""
    pipe = build_base_pipeline(arch, seed=args.seed, tokenizer_dir=ckpt / "tokenizer", text_seed=args.text_seed)
    cache_path = ckpt / "cache.pt"
    if cache_path.is_file():
        pipe.vae.load_state_dict(torch.load(ckpt / "vae.pt", weights_only=True))
        cache = torch.load(cache_path, weights_only=True)
        pipe.vae.register_to_config(**cache["vae_scaling"])
        pipe.vae.eval().requires_grad_(False)
        log(f"loaded the trained VAE and the cached latents of {len(cache['latents'])} scenes")
        return pipe, cache
    kinds = parse_kinds(args.kinds)
    images, captions = render_dataset(args.images, random.Random(args.seed), kinds, arch.image_size, args.split)
    log(f"rendered {len(images)} scenes of the {args.split!r} split")
    if args.init_from:
        # A later stage keeps the earlier stage's VAE and latent scaling: its transformer was trained on them.
        init = Path(args.init_from)
        pipe.vae.load_state_dict(torch.load(init / "vae.pt", weights_only=True))
        pipe.vae.register_to_config(**torch.load(init / "cache.pt", weights_only=True)["vae_scaling"])
        pipe.vae.eval().requires_grad_(False)
        log(f"took the VAE and its latent scaling from {init}")
    else:
        train_vae(pipe.vae, images, args, torch.Generator().manual_seed(args.seed + 1))
    atomic_save(pipe.vae.state_dict(), ckpt / "vae.pt")
    raw = encode_images(pipe.vae, images)
    if not args.init_from:
        set_latent_scaling(pipe.vae, raw)
    check_images, check_captions = render_dataset(
        args.vae_check, random.Random(args.seed + 7), kinds, arch.image_size, args.split
    )
    vae_acc = vae_verifier_accuracy(pipe.vae, check_images, check_captions)
    log(f"VAE reconstructions of fresh scenes: verifier strict accuracy {vae_acc:.3f}")
    unique = sorted(set(captions)) + [""]
    index = {caption: i for i, caption in enumerate(unique)}
    embeds, pooled = encode_captions(pipe, unique)
    config = pipe.vae.config
    cache = {
        "latents": (raw - config.shift_factor) * config.scaling_factor,
        "caption_ids": torch.tensor([index[c] for c in captions]),
        "captions": unique,
        "embeds": embeds,
        "pooled": pooled,
        "vae_scaling": {"shift_factor": config.shift_factor, "scaling_factor": config.scaling_factor},
        "vae_reconstruction_strict": vae_acc,
    }
    atomic_save(cache, cache_path)
    return pipe, cache


def train(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    arch = BaseArch(
        num_layers=args.layers, num_heads=args.heads, head_dim=args.head_dim, vae_channels=args.vae_channels
    )
    out, ckpt = Path(args.out), Path(args.ckpt or f"{args.out}.ckpt")
    ckpt.mkdir(parents=True, exist_ok=True)
    if not args.resume and (ckpt / "state.pt").exists():
        raise SystemExit(f"{ckpt} holds a checkpoint: pass --resume to continue it, or another --ckpt")
    # Before any work: a wrong --init-from fails here.
    stages = earlier_stages(args.init_from, "recipe.json", "a checkpoint folder written by this script")
    torch.manual_seed(args.seed)
    pipe, cache = prepare(args, arch, ckpt)
    latents, caption_ids, embeds, pooled = (cache[k] for k in ("latents", "caption_ids", "embeds", "pooled"))
    ema = pipe.transformer.eval().requires_grad_(False)  # the pipeline holds the EMA, which is what is exported
    transformer = copy.deepcopy(ema).train().requires_grad_(True)
    use_repeated_context(transformer, T5_TOKENS)
    opt = torch.optim.AdamW(transformer.parameters(), lr=args.lr, weight_decay=0.01)
    generator = torch.Generator().manual_seed(args.seed + 2)
    step = 0
    if args.init_from and not (args.resume and (ckpt / "state.pt").is_file()):
        init = torch.load(Path(args.init_from) / "state.pt", weights_only=True)
        transformer.load_state_dict(init["transformer"])
        ema.load_state_dict(init["ema"])
        log(f"started from the transformer and EMA of {args.init_from} (step {init['step']}); new optimiser")
    if args.resume and (ckpt / "state.pt").is_file():
        state = torch.load(ckpt / "state.pt", weights_only=True)
        transformer.load_state_dict(state["transformer"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        step = state["step"]
        log(f"resumed at step {step}")
    recipe = {
        "arch": arch_dict(arch),
        "args": vars(args),
        "vae_reconstruction_strict": cache["vae_reconstruction_strict"],
        "earlier_stages": stages,
    }
    empty = len(embeds) - 1
    started, running = time.time(), None
    last = min(args.steps, args.stop_at or args.steps)
    while step < last:
        idx = torch.randint(len(latents), (args.batch,), generator=generator)
        ids = caption_ids[idx].clone()
        ids[torch.rand(args.batch, generator=generator) < args.cfg_dropout] = empty
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        loss = flow_loss(transformer, latents[idx], embeds[ids], pooled[ids], generator)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        opt.step()
        update_ema(ema, transformer, step, args.ema)
        step += 1
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % args.log_every == 0:
            rate = (time.time() - started) / args.log_every
            started = time.time()
            log(f"step {step}/{args.steps} loss {running:.4f} lr {lr_at(step, args):.2e} {rate:.2f} s/step")
        if step % args.ckpt_every == 0 or step == last:
            save_state(ckpt, step, transformer, ema, opt, generator)
            export(pipe, out, recipe | {"step": step}, ckpt)
            log(f"checkpoint + export at step {step}")
    export(pipe, out, recipe | {"step": step}, ckpt)
    if args.eval_after:
        evaluate(args)


def evaluate(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    protocol = EvalProtocol(
        num_steps=args.eval_steps,
        guidance_scale=args.guidance,
        single_images_per_prompt=args.eval_single,
        heldout_images_per_prompt=args.eval_heldout,
        seed=args.eval_seed,
    )
    started = time.time()
    results = evaluate_base_model(args.out, protocol)
    log(f"eval ({time.time() - started:.0f} s): {json.dumps(results)}")
    if args.write_eval:
        train_info = Path(args.out) / "diffalign_train.json"
        step = json.loads(train_info.read_text()).get("step") if train_info.is_file() else None
        extra = {
            "trained_steps": step,
            "eval_seconds": round(time.time() - started),
            "notes": (
                "strict verifier accuracy of ODE (Euler) samples through diffalign.samplers.rollout, one seed per "
                "image (seed + i, prompt-major); single: every single-object prompt x single_images_per_prompt; "
                "heldout: every prompt of heldout_prompts() x heldout_images_per_prompt; the adapter's default "
                "max_sequence_length (256 zero T5 tokens). Reproduce: python scripts/shapes/train_base.py "
                "--out <folder> --eval"
            ),
        }
        write_eval(args.out, results, extra)
        log(f"wrote {Path(args.out) / 'diffalign_eval.json'}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="diffusers folder to export (and to evaluate with --eval)")
    p.add_argument("--ckpt", default=None, help="checkpoint folder (default: <out>.ckpt)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoints in --ckpt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--text-seed",
        type=int,
        default=None,
        help="seed of the frozen random text encoders (default: --seed); a later stage keeps the earlier stage's "
        "text features by passing its seed",
    )
    p.add_argument("--threads", type=int, default=1, help="1 is fastest on a busy shared CPU")
    p.add_argument("--images", type=int, default=20_000, help="rendered training scenes")
    p.add_argument("--kinds", default=DEFAULT_KINDS, help="prompt kinds and their weights")
    p.add_argument("--split", default="train", choices=SPLITS, help="prompt pool of the rendered scenes")
    p.add_argument(
        "--init-from",
        default=None,
        help="a later training stage: start from this checkpoint folder's transformer, EMA and VAE (new data from "
        "--kinds, new optimiser and schedule)",
    )
    p.add_argument("--vae-channels", type=lambda s: tuple(int(c) for c in s.split(",")), default=(16, 32))
    p.add_argument("--vae-steps", type=int, default=1000)
    p.add_argument("--vae-batch", type=int, default=32)
    p.add_argument("--vae-lr", type=float, default=2e-3)
    p.add_argument("--vae-kl", type=float, default=1e-3)
    p.add_argument("--vae-check", type=int, default=256, help="fresh scenes for the reconstruction accuracy check")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--steps", type=int, default=8000, help="length of the learning-rate schedule")
    p.add_argument("--stop-at", type=int, default=None, help="end this stage at this step (default: --steps)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--ema", type=float, default=0.998)
    p.add_argument("--cfg-dropout", type=float, default=0.1)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--ckpt-every", type=int, default=500)
    p.add_argument("--eval", action="store_true", help="only evaluate the folder --out")
    p.add_argument("--eval-after", action="store_true", help="evaluate --out when training ends")
    p.add_argument("--write-eval", action="store_true", help="write diffalign_eval.json into --out")
    p.add_argument("--eval-steps", type=int, default=EvalProtocol.num_steps)
    p.add_argument("--guidance", type=float, default=EvalProtocol.guidance_scale)
    p.add_argument("--eval-single", type=int, default=EvalProtocol.single_images_per_prompt)
    p.add_argument("--eval-heldout", type=int, default=EvalProtocol.heldout_images_per_prompt)
    p.add_argument("--eval-seed", type=int, default=EvalProtocol.seed)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.eval:
        evaluate(args)
    else:
        train(args)


if __name__ == "__main__":
    main()
