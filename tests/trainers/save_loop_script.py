"""Save checkpoints in a loop until killed: every step is saved twice (the second save replaces the first, as the
final save of a run replaces a periodic one) and ``keep_last: 2`` prunes behind it.

Used by test_checkpoint_faults.py, which SIGKILLs it at random times. Prints ``ready`` once the first checkpoint is
complete. Usage: python save_loop_script.py PIPELINE_DIR OUT_DIR
"""

import sys

from diffalign.config import TrainerConfig, load_config
from diffalign.trainers.common import TrainingRun


def main() -> None:
    folder, out = sys.argv[1], sys.argv[2]
    raw = {
        "model": {"path": folder, "lora": {"rank": 2}},
        "output_dir": out,
        "max_steps": 10,  # the config of test_checkpoint_faults.make_run, which resumes from these checkpoints
        "logging": {"log_with": "none"},
        "optim": {"lr": 1e-2},
        "ema": {"enabled": True, "decay": 0.5},
        "checkpoint": {"keep_last": 2},
    }
    run = TrainingRun(load_config(TrainerConfig, raw))
    step = 0
    while True:
        step += 1
        loss = sum((p.float() ** 2).sum() for p in run.params) + sum(p.sum() for p in run.params)
        run.backward(loss)
        run.optimizer_step()
        run.save(step, {"saved": step})
        run.save(step, {"saved": step})
        if step == 1:
            print("ready", flush=True)


if __name__ == "__main__":
    main()
