"""Generic Trainer callbacks for `train(cfg, callbacks=...)` / `run_recipe(..., callbacks=...)`.

    StepTimer()    wall time of every optimizer step (median for reports)
"""

from __future__ import annotations

import statistics
import time

from transformers import TrainerCallback


class StepTimer(TrainerCallback):
    """Wall time of each optimizer step (on_step_begin -> on_step_end: forward, backward,
    optimizer step and every callback before this one)."""

    def __init__(self):
        self.times: list[float] = []
        self._t0: float | None = None

    def on_step_begin(self, args, state, control, **kwargs):
        self._t0 = time.perf_counter()
        return control

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._t0)
        return control

    def median(self, skip: int = 1) -> float:
        """Median step time in seconds, leaving out the first `skip` (warm-up) steps when possible."""
        times = self.times[skip:] if len(self.times) > skip else self.times
        if not times:
            raise ValueError("StepTimer recorded no step; call median() after a run of at least one optimizer step")
        return statistics.median(times)
