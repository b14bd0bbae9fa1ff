"""What the unconditional (CFG) branch costs in a GRPO training forward and backward, and what its gradient is.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/flow_grpo_vs/cfg_branch.py --model /tmp/flow_grpo_vs/tiny-sd3

Three ways to compute the guided velocity ``u + g (c - u)`` of ``B`` rows with the LoRA (r32/alpha64) trained:

- ``joint``: diffalign today (``DiffusionAdapter._predict``): one call on ``2B`` rows, the gradient flows through
  both branches, ``(1 - g) du + g dc``;
- ``detached``: flow_grpo's ``compute_log_prob``: the same ``2B``-row call with ``u`` detached, so the gradient is
  ``g dc`` only, but the backward still runs over all ``2B`` rows (zeros for the unconditional half);
- ``split``: the same gradient as ``detached``, with ``u`` from a separate no-grad call of ``B`` rows and ``c`` from a
  ``B``-row call with grad: the backward covers ``B`` rows.

Prints the median seconds of a forward + backward of each (alternating, ``--repeats`` each) for the row counts of
the benchmark's re-scoring calls (8 samples x 2 steps with ``timestep_chunk: auto``; x 9 with 0) and checks that
``split`` gives ``detached``'s gradient and that ``joint``'s differs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import WORKLOAD, set_threads  # noqa: E402


def guided(adapter, latents, timesteps, cond, scale: float, mode: str):
    """``u + g (c - u)`` ``[B, ...]`` with the gradient path of ``mode`` (see the module docstring)."""
    import torch

    if mode == "split":
        with torch.no_grad():
            uncond = adapter._forward(latents, timesteps, cond.negative, cond)
        text = adapter._forward(latents, timesteps, cond.embeds, cond)
    else:
        both = adapter._forward(torch.cat([latents, latents]), timesteps.repeat(2), cond.guided_inputs(), cond)
        uncond, text = both.chunk(2)
        uncond = uncond.detach() if mode == "detached" else uncond
    return uncond + scale * (text - uncond)


def forward_backward(adapter, params, inputs, mode: str) -> tuple[float, list]:
    """Seconds of one forward + backward of ``mode`` on ``inputs = (latents, timesteps, cond, weights)`` and the
    LoRA gradients it left."""
    import torch

    latents, timesteps, cond, weights = inputs
    for p in params:
        p.grad = None
    began = time.perf_counter()
    (guided(adapter, latents, timesteps, cond, WORKLOAD["guidance_scale"], mode) * weights).mean().backward()
    seconds = time.perf_counter() - began
    return seconds, [torch.clone(p.grad) for p in params]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--rows", type=int, nargs="+", default=[16, 72], help="conditional rows B per call")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    set_threads(args.threads)

    import torch

    from diffalign.adapters import load_adapter

    w = WORKLOAD
    size = w["resolution"]
    adapter = load_adapter(args.model, height=size, width=size, max_sequence_length=w["max_sequence_length"])
    params = adapter.add_lora(rank=w["lora_rank"], alpha=w["lora_alpha"])
    with torch.no_grad():  # B = 0 at init would zero A's gradient: give the LoRA a trained-looking state
        for p in params:
            p.normal_(0.0, 0.02)
    one = adapter.encode_prompt(["a red circle"], negative_prompt="", with_negative=True)
    schedule = adapter.set_timesteps(w["num_steps"])
    for rows in args.rows:
        generator = torch.Generator().manual_seed(rows)
        latents = torch.randn(rows, adapter.denoiser.config.in_channels, size // 2, size // 2, generator=generator)
        timesteps = schedule.timesteps[torch.randint(0, 9, (rows,), generator=generator)]
        weights = torch.randn(latents.shape, generator=generator)
        cond = one.repeat_interleave(rows)

        times: dict[str, list[float]] = {"joint": [], "detached": [], "split": []}
        grads = {}
        for _ in range(args.repeats):
            for mode in times:
                seconds, grads[mode] = forward_backward(adapter, params, (latents, timesteps, cond, weights), mode)
                times[mode].append(seconds)
        same = all(torch.allclose(a, b, rtol=1e-4, atol=1e-7) for a, b in zip(grads["split"], grads["detached"]))
        differs = any(not torch.allclose(a, b, rtol=1e-3) for a, b in zip(grads["joint"], grads["detached"]))
        medians = {mode: statistics.median(values) for mode, values in times.items()}
        print(  # noqa: T201
            f"B={rows} (x2 rows with CFG): "
            + ", ".join(f"{mode} {seconds * 1000:.0f} ms" for mode, seconds in medians.items())
            + f"; split/detached {medians['split'] / medians['detached']:.2f}"
            + f"; split grad == detached grad: {same}; joint grad differs: {differs}",
            flush=True,
        )


if __name__ == "__main__":
    main()
