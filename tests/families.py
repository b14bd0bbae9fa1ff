"""Test parameters over the model families shared by several test files."""

import pytest

from diffalign.testing import FAMILIES


FAMILIES_SD3_FAST = [f if f == "sd3" else pytest.param(f, marks=pytest.mark.slow) for f in FAMILIES]
"""Every family, all but SD3 marked slow: a battery that would take the fast suite past its time limit."""

FIRST_FIVE = ("sd15", "sd2v", "sdxl", "sd3", "flux")
"""The families of the first release, whose batteries stay in the fast suite."""

FAMILIES_FIRST_FIVE_FAST = [f if f in FIRST_FIVE else pytest.param(f, marks=pytest.mark.slow) for f in FAMILIES]
"""Every family, the later ones (FLUX.1 Kontext, FLUX.2, Qwen-Image, Z-Image, SANA) marked slow: the shared battery
runs on them in `.ci/run`'s slow suite, while their own test files (ragged text, editing, FLUX.2's latents, SANA's
schedulers) stay fast, so the fast suite keeps under its time limit as families are added."""


def pipeline_guidance(family: str, guidance_scale: float, size: int = 32) -> dict:
    """The pipeline-call arguments that guide as the adapter's ``guidance_scale`` does: Qwen-Image guides with
    ``true_cfg_scale`` and a negative prompt (the adapter's default, ``" "``), the others with ``guidance_scale``."""
    if family == "flux_kontext":  # Kontext generates at the max_area's size (1024^2 by default), not at height x width
        return {"guidance_scale": guidance_scale, "max_area": size * size}
    if family == "sana":  # resolution binning would resize the 32 px test images to a 512 px aspect bin
        return {"guidance_scale": guidance_scale, "use_resolution_binning": False}
    if family == "zimage":  # the pipeline's scale g is text + g (text - uncond): g = s - 1
        return {"guidance_scale": max(guidance_scale - 1, 0.0)}
    if family == "qwenimage":
        return {"true_cfg_scale": guidance_scale, "negative_prompt": " "} if guidance_scale > 1 else {}
    return {"guidance_scale": guidance_scale}
