"""What every trainer shares at its surface: evaluation defaults (a reward passed directly: test_grpo.py)."""

from types import SimpleNamespace

from diffalign.adapters import load_adapter
from diffalign.config import EvalConfig
from diffalign.eval.evaluator import Evaluator


def test_evaluation_defaults_follow_the_sampler_or_else_the_family(tiny_pipeline_dir, tmp_path):
    adapter = load_adapter(tiny_pipeline_dir("sd3"))
    evaluation = EvalConfig(every=1, prompts=["a red circle"])
    reward = object()
    # An offline trainer (no sampling group, e.g. Diffusion-DPO): the family's steps and CFG, not 1.0.
    offline = Evaluator.from_config(SimpleNamespace(eval=evaluation), adapter, reward, tmp_path)
    assert (offline.num_steps, offline.guidance_scale) == (adapter.default_num_steps, adapter.default_guidance_scale)
    assert offline.guidance_scale == 4.5 and offline.num_steps == 28
    # A sampling trainer: its training sampler's settings.
    sampling = SimpleNamespace(num_steps=7, guidance_scale=3.0)
    online = Evaluator.from_config(SimpleNamespace(eval=evaluation, sampling=sampling), adapter, reward, tmp_path)
    assert (online.num_steps, online.guidance_scale) == (7, 3.0)
    # Set values win.
    explicit = EvalConfig(every=1, prompts=["a red circle"], num_steps=5, guidance_scale=1.5)
    chosen = Evaluator.from_config(SimpleNamespace(eval=explicit, sampling=sampling), adapter, reward, tmp_path)
    assert (chosen.num_steps, chosen.guidance_scale) == (5, 1.5)
