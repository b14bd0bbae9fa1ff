"""``uncond_grad=False`` (GRPO's ``train.cfg_uncond_grad: false``, flow_grpo's training form): the guided output is the
same, and its gradient is the closed form with the unconditional branch detached,
``d/dθ [u + g (c - u)] = g dc/dθ``, where ``c`` is the conditional prediction alone."""

import pytest
import torch

from diffalign.adapters import load_adapter


@pytest.mark.parametrize("family", ["sd3", pytest.param("sd15", marks=pytest.mark.slow)])
def test_detached_unconditional_branch_gives_the_closed_form_gradient(family, tiny_pipeline_dir):
    kwargs = {"max_sequence_length": 16} if family == "sd3" else {}
    adapter = load_adapter(tiny_pipeline_dir(family), height=32, width=32, **kwargs)
    params = adapter.add_lora(4, init="gaussian")
    with torch.no_grad():  # a LoRA that acts (B = 0 at init would give zero gradients for the A matrices)
        for p in params:
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    cond = adapter.encode_prompt(["a red circle", "a cat"], with_negative=True)
    latents = adapter.prepare_latents(2, torch.Generator().manual_seed(0))
    t, scale = torch.tensor([500.0, 300.0]), 4.5
    weights = torch.randn(latents.shape, generator=torch.Generator().manual_seed(1))

    def gradient(output):
        return torch.cat([g.flatten() for g in torch.autograd.grad((output * weights).sum(), params)])

    full = adapter.predict(latents, t, cond, scale)
    detached = adapter.predict(latents, t, cond, scale, uncond_grad=False)
    torch.testing.assert_close(detached, full, atol=1e-5, rtol=1e-5)  # the same forward value
    conditional = adapter.predict(latents, t, cond.without_negative(), 1.0)
    expected = scale * gradient(conditional)
    # Float32 summation order differs between the batched and the split calls: compare in norm.
    assert (gradient(detached) - expected).norm() <= 1e-4 * expected.norm()
    assert (gradient(full) - expected).norm() > 1e-2 * expected.norm()  # the default keeps both branches
