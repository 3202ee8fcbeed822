"""The generic Trainer callbacks of moe_sft.train.callbacks, through `train(cfg, callbacks=...)`."""

from pathlib import Path

import pytest
import torch

from moe_sft.train import parse_train_config, train
from moe_sft.train.callbacks import StepTimer

DATA = Path(__file__).resolve().parents[1] / "configs" / "tiny" / "data" / "arith.jsonl"


def _cfg(out, max_steps, accumulation=1):
    return parse_train_config({
        "model": {"tiny": "qwen3_moe"},
        "data": {"files": [str(DATA)], "max_length": 256, "max_samples": 16},
        "training": {"output_dir": str(out), "max_steps": max_steps, "per_device_train_batch_size": 2,
                     "gradient_accumulation_steps": accumulation, "learning_rate": 1e-3, "save_strategy": "no",
                     "report_to": "none", "seed": 0, "disable_tqdm": True, "dataloader_pin_memory": False},
    })  # fmt: skip


def test_step_timer_times_every_optimizer_step(tmp_path):
    torch.set_num_threads(1)
    timer = StepTimer()
    final = train(_cfg(tmp_path / "run", max_steps=3, accumulation=2), callbacks=(timer,))
    assert (final / "config.json").is_file()
    assert len(timer.times) == 3  # optimizer steps, not micro-batches
    assert all(t > 0 for t in timer.times) and timer.median() > 0


def test_median_skips_warm_up_steps():
    timer = StepTimer()
    timer.times = [10.0, 1.0, 2.0, 3.0]
    assert timer.median() == 2.0  # the first (warm-up) step left out
    assert timer.median(skip=0) == 2.5
    timer.times = [7.0]
    assert timer.median() == 7.0  # too few steps to skip any
    timer.times = []
    with pytest.raises(ValueError, match="no step"):
        timer.median()
