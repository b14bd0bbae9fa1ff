"""Early stopping on the periodic evaluation, with the best evaluation's weights kept (docs/configuration.md#eval).

Over-optimisation is this field's commonest failure: the trained reward keeps rising while what it stands for
falls. A judge the run does not train on (the evaluation reward, at fixed prompts and seeds) sees it; this
bookkeeping follows that judge's score, says when it has not improved for ``patience`` evaluations, and remembers
which evaluation was best, so that the run can end with those weights (as ``transformers``' ``EarlyStoppingCallback``
with ``load_best_model_at_end`` does).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass
class EarlyStopping:
    """The best evaluation so far and the count of evaluations since (pure bookkeeping, no weights).

    Attributes:
        patience: evaluations without improvement that end the run (>= 1).
        min_delta: an improvement must exceed the best score by more than this.
        best_value: the best score so far (higher is better); None before the first evaluation.
        best_step: the step of that evaluation.
        evals_since_best: evaluations since the best one.
    """

    patience: int
    min_delta: float = 0.0
    best_value: float | None = None
    best_step: int | None = None
    evals_since_best: int = 0

    def update(self, step: int, value: float) -> bool:
        """Record the evaluation of ``step``; True when it is the new best.

        Raises:
            ValueError: ``value`` is not finite (a judge returning NaN would otherwise never improve, silently).
        """
        if not math.isfinite(value):
            raise ValueError(f"early stopping: the evaluation score at step {step} is {value}, not a finite number")
        if self.best_value is None or value > self.best_value + self.min_delta:
            self.best_value, self.best_step, self.evals_since_best = value, step, 0
            return True
        self.evals_since_best += 1
        return False

    @property
    def should_stop(self) -> bool:
        """Whether ``patience`` evaluations in a row have not improved on the best."""
        return self.evals_since_best >= self.patience

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint stores to resume the bookkeeping exactly (JSON)."""
        return {"best_value": self.best_value, "best_step": self.best_step, "evals_since_best": self.evals_since_best}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_value = state["best_value"]
        self.best_step = state["best_step"]
        self.evals_since_best = int(state["evals_since_best"])
