"""Generic Trainer callbacks for `train(cfg, callbacks=...)` / `run_recipe(..., callbacks=...)`.

    TimeBudget(120, anneal="cosine")   stop after 120 s of training; lr follows a cosine over time
    StepTimer()                        wall time of every optimizer step (median for reports)

A wall-time budget suits noisy shared machines, where a step count says little about how long
a run takes; the cosine over the *elapsed fraction of the budget* gives a schedule that ends
near zero whenever the budget runs out, whatever the step rate turned out to be.
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Literal

from transformers import TrainerCallback

from ..config import ConfigError


class TimeBudget(TrainerCallback):
    """Stop training once `seconds` of wall time have passed since the first step began.

    anneal "none":   the Trainer's own lr schedule is used as is.
    anneal "cosine": before every optimizer step each param group's lr (as the Trainer's
                     scheduler set it) is multiplied by 0.5 * (1 + cos(pi * min(1, t / seconds))),
                     t = elapsed time; use it with `lr_scheduler_type: constant` and a large
                     `max_steps` for a pure time-based cosine schedule.
    `stopped_early` says whether the budget, not max_steps/epochs, ended the run; `steps` counts
    optimizer steps taken.
    """

    def __init__(self, seconds: float, anneal: Literal["none", "cosine"] = "none"):
        if not seconds > 0:
            raise ConfigError(f"TimeBudget(seconds={seconds}): the budget must be positive")
        if anneal not in ("none", "cosine"):
            raise ConfigError(f"TimeBudget(anneal={anneal!r}): choose 'none' or 'cosine'")
        self.seconds, self.anneal = float(seconds), anneal
        self.start: float | None = None
        self.steps = 0
        self.stopped_early = False

    def factor(self, elapsed: float) -> float:
        """The lr multiplier after `elapsed` seconds."""
        if self.anneal == "none":
            return 1.0
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, elapsed / self.seconds)))

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        if self.start is None:
            self.start = time.perf_counter()
        if self.anneal != "none" and optimizer is not None:
            # The scheduler sets group["lr"] afresh after every optimizer step, so scaling it
            # here never compounds.
            f = self.factor(time.perf_counter() - self.start)
            for group in optimizer.param_groups:
                group["lr"] = group["lr"] * f
        return control

    def on_step_end(self, args, state, control, **kwargs):
        self.steps += 1
        if time.perf_counter() - self.start >= self.seconds:
            self.stopped_early = not control.should_training_stop
            control.should_training_stop = True
        return control


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
            raise ValueError("StepTimer recorded no step")
        return statistics.median(times)
