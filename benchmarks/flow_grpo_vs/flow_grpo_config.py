"""flow_grpo side: an ml_collections config file that starts from flow_grpo's own single-GPU SD3 recipe and sets the
benchmark workload (common.py) on it.

``run_flow_grpo.py`` passes it to flow_grpo's ``scripts/train_sd3.py`` as ``--config=flow_grpo_config.py`` and
names the run's paths and the KL coefficient in environment variables (:data:`ENV`). Nothing of flow_grpo is copied
here: its ``config/grpo.py`` is loaded from the checkout.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import WORKLOAD  # noqa: E402


ENV = {
    "FLOW_GRPO_VS_DIR": "root of the flow_grpo checkout",
    "FLOW_GRPO_VS_MODEL": "the tiny SD3 pipeline folder",
    "FLOW_GRPO_VS_DATASET": "folder with train.txt and test.txt (one prompt a line)",
    "FLOW_GRPO_VS_WORK": "folder for the run's logs (nothing is saved)",
    "FLOW_GRPO_VS_BETA": "KL coefficient train.beta",
}
"""The environment variables :func:`get_config` reads (``run_flow_grpo.py`` sets them)."""

BASE_RECIPE = "general_ocr_sd3_1gpu"
"""flow_grpo's one-GPU SD3.5-M recipe in its ``config/grpo.py``: the starting point, overridden below."""


def _load_recipes(flow_grpo_dir: str):
    path = Path(flow_grpo_dir) / "config" / "grpo.py"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: pass the root of a flow_grpo checkout (--flow-grpo DIR)")
    spec = importlib.util.spec_from_file_location("flow_grpo_recipes", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config():
    """flow_grpo's ``general_ocr_sd3_1gpu`` with the benchmark's workload and the paths of :data:`ENV`."""
    missing = [name for name in ENV if not os.environ.get(name)]
    if missing:
        raise ValueError(f"set {', '.join(missing)} ({'; '.join(ENV[n] for n in missing)}); run_flow_grpo.py does")
    w = WORKLOAD
    config = getattr(_load_recipes(os.environ["FLOW_GRPO_VS_DIR"]), BASE_RECIPE)()
    config.run_name = "flow_grpo_vs"
    config.pretrained.model = os.environ["FLOW_GRPO_VS_MODEL"]
    config.dataset = os.environ["FLOW_GRPO_VS_DATASET"]
    config.logdir = os.path.join(os.environ["FLOW_GRPO_VS_WORK"], "logs")
    config.save_dir = os.path.join(os.environ["FLOW_GRPO_VS_WORK"], "save")
    config.mixed_precision = "no"  # fp32 on both sides
    config.allow_tf32 = False
    config.use_lora = True  # LoRA r=32, alpha=64, gaussian init on the 8 joint-attention projections (in the script)
    config.resolution = w["resolution"]
    config.prompt_fn = "general_ocr"  # prompts from <dataset>/train.txt and test.txt (setup.sh writes them)
    config.reward_fn = {"jpeg_compressibility": 1.0}  # flow_grpo's own reward, -kB / 500: no weights, no server
    config.per_prompt_stat_tracking = True  # group advantages with the global std (sample.global_std)

    sample = config.sample
    sample.num_steps = w["num_steps"]
    sample.eval_num_steps = 2  # evaluation runs once, before epoch 0, outside the timed span
    sample.guidance_scale = w["guidance_scale"]
    sample.noise_level = w["noise_level"]
    sample.train_batch_size = w["sample_batch_size"]
    sample.num_image_per_prompt = w["group_size"]
    sample.num_batches_per_epoch = w["num_batches_per_epoch"]
    sample.test_batch_size = 1
    sample.global_std = True

    train = config.train
    train.batch_size = w["train_batch_size"]
    train.gradient_accumulation_steps = w["gradient_accumulation_steps"]
    train.num_inner_epochs = 1
    train.timestep_fraction = 0.99  # int(10 * 0.99) = 9 trained steps, as the recipe
    train.beta = float(os.environ["FLOW_GRPO_VS_BETA"])
    train.ema = True  # EMAModuleWrapper(decay=0.9, update_step_interval=8), hard-coded in the script
    train.cfg = True
    train.learning_rate = w["lr"]
    train.adam_weight_decay = w["weight_decay"]
    train.clip_range = w["clip_range"]
    train.adv_clip_max = int(w["adv_clip_max"])  # an int field in flow_grpo's base config
    train.max_grad_norm = w["max_grad_norm"]
    train.use_8bit_adam = False
    train.lora_path = None

    # Evaluation happens at epoch 0 only (the script evaluates whenever epoch % eval_freq == 0); no checkpoints.
    config.eval_freq = 10**9
    config.save_freq = 10**9
    if int(sample.num_steps * train.timestep_fraction) != w["trained_steps"]:
        raise ValueError("the trained step count no longer matches common.WORKLOAD['trained_steps']")
    return config
