"""2-process GRPO jobs on CPU through torchrun: ZeRO-2 and ZeRO-3 runs of the condenser recipe
with rollout routing replay finish with identical router biases on both ranks (the bias is
all-reduced once per optimizer step) and the final checkpoint holds them."""

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from _launch import run_job
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs/tiny/qwen3_moe_grpo_condenser.yaml"
STEPS = 3

# Each rank writes its own router biases when training ends.
DUMP = """
import sys, torch
from pathlib import Path
from transformers import TrainerCallback
import moe_sft
from moe_sft.rl import load_rl_config, train_rl

class Dump(TrainerCallback):
    def on_train_end(self, args, state, control, model=None, **kwargs):
        handle = moe_sft.find_handle(model)
        rank = torch.distributed.get_rank()
        torch.save({m.name: m.controls.logit_bias.detach().cpu() for m in handle.layers}, Path(args.output_dir) / f"bias_rank{rank}.pt")

train_rl(load_rl_config(sys.argv[1], sys.argv[2:]), callbacks=(Dump(),))
"""


def _env():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("WORLD_SIZE", None)
    return env


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_two_process_grpo_keeps_the_router_bias_identical_on_both_ranks(tmp_path, stage):
    script = tmp_path / "dump.py"
    script.write_text(DUMP)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), str(RECIPE),
           f"grpo.output_dir={out}", f"grpo.max_steps={STEPS}", f"grpo.save_steps={STEPS}", "grpo.per_device_train_batch_size=2",
           "grpo.num_generations=2", "grpo.max_completion_length=6", "grpo.logging_steps=1",
           f"deepspeed=configs/deepspeed/zero{stage}.json"]  # fmt: skip
    proc = run_job(cmd, outputs=(out,), cwd=ROOT, env=_env(), timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]

    ranks = [torch.load(out / f"bias_rank{r}.pt") for r in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys() and len(ranks[0]) == 2
    for name in ranks[0]:
        assert torch.equal(ranks[0][name], ranks[1][name]), name
        assert ranks[0][name].abs().max().item() == pytest.approx(STEPS * 1e-2), name  # one +-gamma update per step
    final = load_file(out / "final" / "moe_sft_tensors.safetensors")
    for name, bias in ranks[0].items():
        assert torch.equal(final[f"{name}.moe_sft.logit_bias"], bias)

    history = json.loads((out / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())["log_history"]
    logged = [h for h in history if "loss" in h]
    assert len(logged) == STEPS and all(h["routing/mismatch_replayed"] == 0 for h in logged)
