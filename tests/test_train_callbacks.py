"""The generic Trainer callbacks of moe_sft.train.callbacks, through `train(cfg, callbacks=...)`."""

import math
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import TrainerControl

from moe_sft import ConfigError
from moe_sft.train import parse_train_config, train
from moe_sft.train.callbacks import StepTimer, TimeBudget

DATA = Path(__file__).resolve().parents[1] / "configs" / "tiny" / "data" / "arith.jsonl"


def _cfg(out, max_steps):
    return parse_train_config({
        "model": {"tiny": "qwen3_moe"},
        "data": {"files": [str(DATA)], "max_length": 256, "max_samples": 16},
        "training": {"output_dir": str(out), "max_steps": max_steps, "per_device_train_batch_size": 2,
                     "learning_rate": 1e-3, "save_strategy": "no", "report_to": "none", "seed": 0,
                     "disable_tqdm": True},
    })  # fmt: skip


def test_time_budget_stops_training_and_timer_counts_steps(tmp_path):
    torch.set_num_threads(1)
    budget, timer = TimeBudget(1e-9), StepTimer()  # the budget is spent by the end of step 1
    final = train(_cfg(tmp_path / "run", max_steps=50), callbacks=(budget, timer))
    assert (final / "config.json").is_file()
    assert budget.steps == 1 and budget.stopped_early
    assert len(timer.times) == 1 and timer.median() > 0


def test_without_budget_max_steps_decides(tmp_path):
    budget, timer = TimeBudget(3600), StepTimer()
    train(_cfg(tmp_path / "run", max_steps=3), callbacks=(budget, timer))
    assert budget.steps == 3 and not budget.stopped_early
    assert len(timer.times) == 3


def test_cosine_factor_over_time():
    b = TimeBudget(10.0, anneal="cosine")
    assert b.factor(0.0) == 1.0
    assert b.factor(5.0) == pytest.approx(0.5)
    assert b.factor(2.5) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert b.factor(10.0) == pytest.approx(0.0) and b.factor(30.0) == pytest.approx(0.0)
    assert TimeBudget(10.0).factor(5.0) == 1.0


def test_cosine_scales_the_scheduler_lr_once_per_step():
    b = TimeBudget(100.0, anneal="cosine")
    opt = SimpleNamespace(param_groups=[{"lr": 2.0}, {"lr": 1.0}])
    control = TrainerControl()
    b.on_step_begin(None, None, control, optimizer=opt)  # first step: factor 1 (a few ns have passed)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([2.0, 1.0], rel=1e-6)
    opt.param_groups = [{"lr": 2.0}, {"lr": 1.0}]  # what the Trainer's scheduler sets after each step
    b.start = time.perf_counter() - 50.0  # half the budget has passed
    b.on_step_begin(None, None, control, optimizer=opt)
    lrs = [g["lr"] for g in opt.param_groups]
    assert lrs[0] == pytest.approx(1.0, rel=1e-3) and lrs[1] == pytest.approx(0.5, rel=1e-3)
    b.on_step_end(None, None, control)
    assert not control.should_training_stop
    b.start = time.perf_counter() - 101.0
    b.on_step_end(None, None, control)
    assert control.should_training_stop


@pytest.mark.parametrize("kwargs", [{"seconds": 0}, {"seconds": -1}, {"seconds": 1, "anneal": "linear"}])
def test_bad_budget_is_refused(kwargs):
    with pytest.raises(ConfigError):
        TimeBudget(**kwargs)
