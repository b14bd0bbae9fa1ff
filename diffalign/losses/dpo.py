"""Diffusion-DPO loss (Wallace et al. 2023, "Diffusion Model Alignment Using Direct Preference Optimization").

The loss as the reference implementations compute it (docs/methods/dpo.md#diffusion-dpo-loss): the winner ``w``
and the loser ``l`` of a pair are noised with the *same* noise and timestep; the policy and the frozen reference each
predict the regression target (epsilon, v or flow velocity ``eps - x0``), and with per-sample errors
``mse = mean_{C,H,W}((pred - target)^2)``:

    inside = -0.5 * beta * ((mse_w - ref_mse_w) - (mse_l - ref_mse_l))
    loss   = mean_B(-logsigmoid(inside))

This is the paper's Eq. 14 with ``T * omega(lambda_t)`` folded into ``beta`` and the per-pixel *mean* (not sum)
of the squared error. **Scale of beta**: it multiplies differences of per-element mean squared errors, which
are tiny (~1e-3), hence the large values (5000 for SD1.5/SDXL, ~100 for flow models) that surprise users of LLM
DPO (beta ~0.1). Two conventions for beta exist in the references:

- ``-0.5 * beta`` (this module, SalesforceAIResearch/DiffusionDPO ``train.py``, flow_grpo ``train_sd3_dpo.py``);
- ``-beta`` with no 0.5 (diffusers ``examples/research_projects/diffusion_dpo``: ``logits = ref_diff - model_diff``,
  ``loss = -logsigmoid(beta_dpo * logits)``). diffusers' SD default 2500 is therefore the same strength as
  Salesforce's 5000; to reuse a diffusers beta here, double it.

The loss does not depend on the prediction type: the caller passes the family's target (``adapter.training_target``).
"""

import torch
import torch.nn.functional as F
from torch import Tensor


__all__ = [
    "anchored_dpo_loss_from_mse",
    "diffusion_dpo_loss",
    "diffusion_sft_loss",
    "dpo_loss_from_mse",
    "per_sample_mse",
    "smoothed_pair_beta",
]


def per_sample_mse(pred: Tensor, target: Tensor) -> Tensor:
    """Squared error reduced by the mean over the non-batch dims, in fp32.

    Args:
        pred: ``[B, ...]`` model prediction (any float dtype).
        target: ``[B, ...]`` regression target, same shape.

    Returns:
        ``[B]`` fp32 tensor ``mean_{dims}((pred - target)^2)``.
    """
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    err = (pred.float() - target.float()) ** 2
    return err.mean(dim=tuple(range(1, err.ndim)))


def smoothed_pair_beta(
    beta: float, score_w: Tensor, score_l: Tensor, temperature: float, scale: float = 10.0
) -> Tensor:
    """SmPO's per-pair temperature (Lu et al. 2025, "Smoothed Preference Optimization via ReNoise Inversion";
    docs/methods/dpo.md#smoothed-preferences): ``[B]`` ``beta * scale * (2 p - 1)``.

    ``p = sigmoid((score_w - score_l) / temperature)`` is the reward model's probability that the winner is preferred
    (the "preference likelihood averaging" of the paper with ``gamma = 1``): the smoothed DPO objective is the plain
    one with ``beta`` scaled by ``2 p - 1``, so near-ties train weakly and clear pairs strongly. SmPO's code min-max
    normalises PickScore's raw cosine by its range (0.1666, i.e. 16.66 on diffalign's ``100 x cos`` PickScore) before
    a softmax over the two images, which is this sigmoid with that range as the temperature, and multiplies by 10.

    Args:
        beta: the DPO temperature (``-0.5 * beta`` convention).
        score_w: ``[B]`` reward of the winners; score_l: ``[B]`` of the losers (a loser scored higher gives
            ``2 p - 1 < 0``: the caller relabels such pairs first, as SmPO's preprocessing does).
        temperature: the score difference that makes ``p = sigmoid(1)``.
        scale: the constant factor (SmPO: 10).
    """
    p = torch.sigmoid((score_w.float() - score_l.float()) / temperature)
    return beta * scale * (2 * p - 1)


def dpo_loss_from_mse(
    mse_w: Tensor, mse_l: Tensor, ref_mse_w: Tensor, ref_mse_l: Tensor, beta: float | Tensor
) -> tuple[Tensor, dict[str, Tensor]]:
    """Diffusion-DPO loss from per-sample errors (Wallace et al. 2023, Eq. 14; docs/methods/dpo.md#diffusion-dpo-loss).

    Args:
        mse_w: ``[B]`` policy error on the preferred (winner) samples; carries gradients.
        mse_l: ``[B]`` policy error on the rejected (loser) samples; carries gradients.
        ref_mse_w: ``[B]`` reference error on the winners (detached here).
        ref_mse_l: ``[B]`` reference error on the losers (detached here).
        beta: DPO temperature in the ``-0.5 * beta`` convention (per family: ``default_dpo_beta``); or ``[B]``, one
            per pair (:func:`smoothed_pair_beta`).

    Returns:
        ``(loss, metrics)``: the scalar loss ``mean(-logsigmoid(inside))`` and detached 0-d tensors

        - ``loss``;
        - ``implicit_acc``: fraction of pairs with ``inside > 0``, ties (``inside == 0``) counted 0.5 as in the
          diffusers research project. SalesforceAIResearch/DiffusionDPO counts ties as 0; the two differ only
          on exact ties, e.g. at step 0 of a LoRA run where policy == reference (0.5 here, 0 there);
        - ``reward_margin``: ``mean(inside)``, the implicit reward of the winner minus that of the loser
          (``r = -0.5 * beta * (mse - ref_mse)``), as TRL's ``rewards/margins``;
        - ``mse_w``, ``mse_l``, ``ref_mse_w``, ``ref_mse_l``: batch means of the errors.
    """
    ref_mse_w, ref_mse_l = ref_mse_w.detach(), ref_mse_l.detach()
    inside = -0.5 * beta * ((mse_w - ref_mse_w) - (mse_l - ref_mse_l))
    loss = -F.logsigmoid(inside).mean()
    with torch.no_grad():
        acc = (inside > 0).float().mean() + 0.5 * (inside == 0).float().mean()
        metrics = {
            "loss": loss.detach(),
            "implicit_acc": acc,
            "reward_margin": inside.mean(),
            "mse_w": mse_w.mean(),
            "mse_l": mse_l.mean(),
            "ref_mse_w": ref_mse_w.mean(),
            "ref_mse_l": ref_mse_l.mean(),
        }
    return loss, metrics


def anchored_dpo_loss_from_mse(
    mse_w: Tensor,
    mse_r: Tensor,
    ref_mse_w: Tensor,
    ref_mse_r: Tensor,
    beta: float,
    anchor: str = "sign",
) -> tuple[Tensor, dict[str, Tensor]]:
    """SePPO's anchored loss (Zhang, Lan et al. 2024, "SePPO: Semi-Policy Preference Optimization for Diffusion
    Alignment"; docs/methods/self-play.md#seppo): Diffusion-DPO of a winning image against a *reference sample*
    ``r`` (an image the reference model generated), whose role is decided per pair by the winner, the anchor.

    With ``delta(x) = mse(x) - ref_mse(x)``, the sign ``s = sign(ref_mse_w - mse_w)`` is ``+1`` when the policy fits
    the winner better than the reference does (the reference sample is then likely a loser: plain DPO) and ``-1`` when
    the reference fits it better (the reference sample is then likely a winner too, and its term is flipped so
    that the policy is pulled toward both)::

        inside = -0.5 * beta * (delta(w) - s * delta(r))

    ``anchor="indicator"`` uses ``s = 1[ref_mse_w > mse_w]`` instead (the paper's ablation): the reference sample's
    term is dropped rather than flipped. ``s`` carries no gradient.

    Args:
        mse_w, mse_r: ``[B]`` policy errors on the winners and the reference samples (with gradients).
        ref_mse_w, ref_mse_r: ``[B]`` the reference model's errors on them.
        beta: DPO temperature, ``-0.5 * beta`` convention.
        anchor: ``"sign"`` (SePPO's anchor-based adaptive flipper) or ``"indicator"``.

    Returns:
        ``(loss, metrics)`` as :func:`dpo_loss_from_mse`, plus ``flipped``: the share of pairs with ``s < 1``.
    """
    if anchor not in ("sign", "indicator"):
        raise ValueError(f"anchor must be 'sign' or 'indicator', got {anchor!r}")
    with torch.no_grad():
        gap = ref_mse_w.detach() - mse_w.detach()
        s = torch.sign(gap) if anchor == "sign" else (gap > 0).to(gap.dtype)
    loss, metrics = dpo_loss_from_mse(mse_w, s * mse_r, ref_mse_w, s * ref_mse_r, beta)
    metrics.update(mse_l=mse_r.detach().mean(), ref_mse_l=ref_mse_r.detach().mean(), flipped=(s < 1).float().mean())
    return loss, metrics


def diffusion_dpo_loss(
    model_pred_w: Tensor,
    model_pred_l: Tensor,
    ref_pred_w: Tensor,
    ref_pred_l: Tensor,
    target_w: Tensor,
    target_l: Tensor,
    beta: float | Tensor,
    sft_weight: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Diffusion-DPO loss from model outputs, with an optional SFT term on the winner.

    The pair must share noise and timestep (the caller's job, docs/methods/dpo.md#shared-noise-and-timestep);
    predictions of any dtype are compared in fp32.

    Args:
        model_pred_w: ``[B, ...]`` policy prediction on the noised winners.
        model_pred_l: ``[B, ...]`` policy prediction on the noised losers.
        ref_pred_w: ``[B, ...]`` reference prediction on the winners (no gradient needed; detached).
        ref_pred_l: ``[B, ...]`` reference prediction on the losers.
        target_w: ``[B, ...]`` regression target of the winners (epsilon, v or ``eps - x0``).
        target_l: ``[B, ...]`` regression target of the losers.
        beta: DPO temperature, ``-0.5 * beta`` convention (per family: ``default_dpo_beta``); or ``[B]`` per pair.
        sft_weight: ``lambda`` of an added ``lambda * mean(mse_w)`` (the plain denoising loss on the preferred
            image). 0 (default) is the pure DPO loss of every reference. SalesforceAIResearch/DiffusionDPO's
            ``--train_method sft`` is a *separate* method, SFT alone on the preferred images
            (:func:`diffusion_sft_loss`), not this mixture.

    Returns:
        ``(loss, metrics)`` as :func:`dpo_loss_from_mse`, plus ``dpo_loss`` and ``sft_loss`` (detached).
    """
    mse_w = per_sample_mse(model_pred_w, target_w)
    mse_l = per_sample_mse(model_pred_l, target_l)
    with torch.no_grad():
        ref_mse_w = per_sample_mse(ref_pred_w, target_w)
        ref_mse_l = per_sample_mse(ref_pred_l, target_l)
    dpo, metrics = dpo_loss_from_mse(mse_w, mse_l, ref_mse_w, ref_mse_l, beta)
    sft = mse_w.mean()
    loss = dpo + sft_weight * sft if sft_weight else dpo
    metrics.update(loss=loss.detach(), dpo_loss=dpo.detach(), sft_loss=sft.detach())
    return loss, metrics


def diffusion_sft_loss(model_pred: Tensor, target: Tensor) -> Tensor:
    """Plain denoising loss on the preferred images (DiffusionDPO ``--train_method sft``, docs/methods/dpo.md#sft).

    Args:
        model_pred: ``[B, ...]`` policy prediction on the noised preferred images.
        target: ``[B, ...]`` regression target.

    Returns:
        Scalar fp32 ``mean((pred - target)^2)`` over all elements (``F.mse_loss``, as the reference).
    """
    return per_sample_mse(model_pred, target).mean()
