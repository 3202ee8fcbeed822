"""Fault injection for `moe-sft train --resume`: a newest checkpoint cut short (no
trainer_state.json) is skipped with a warning naming both folders, and the run continues from
the newest complete one to exactly the straight run's result, expert-load totals included
(they travel in the checkpoint's trainer_state.json, written with it)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
STEPS = ["then=null", "training.max_steps=6", "training.save_steps=3", "training.logging_steps=1", "training.report_to=none"]


def _train(out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "moe_sft.cli", "train", "configs/tiny/qwen3_moe_condenser_phase1.yaml", f"training.output_dir={out}", *STEPS, *extra]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def test_resume_skips_a_cut_checkpoint_and_continues_exactly(tmp_path):
    straight = tmp_path / "straight"
    _train(straight)
    resumed = tmp_path / "resumed"
    for name in ("checkpoint-3", "checkpoint-6"):
        shutil.copytree(straight / name, resumed / name)
    (resumed / "checkpoint-6" / "trainer_state.json").unlink()  # the run was killed while saving step 6

    proc = _train(resumed, "--resume")
    warning = [line for line in proc.stderr.splitlines() if "--resume" in line and "cut short" in line]
    assert warning and "checkpoint-6" in warning[0] and "checkpoint-3" in warning[0], proc.stderr[-3000:]

    for name in ("model.safetensors", "moe_sft_tensors.safetensors"):
        a, b = load_file(straight / "final" / name), load_file(resumed / "final" / name)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)
    totals = [json.loads((d / "expert_load.json").read_text()) for d in (straight, resumed)]
    assert totals[0]["counts"] == totals[1]["counts"] and sum(totals[0]["counts"][0]) > 0
