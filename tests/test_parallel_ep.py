"""Expert parallelism on 2 CPU processes (gloo): TP + EP and FSDP2 + EP.

Each layout runs `scripts/ep_gpu_check.py` (the multi-GPU check, here on CPU) once under
torchrun; the worker writes every difference it measured, the assertions are made here.
Compared, for 3 AdamW steps (lr 1e-3) on a tiny Qwen3-MoE:
- patched with every method off vs the unpatched EP model: bit-identical logits, losses,
  gradients and parameters;
- every EP run vs the single-process model fed the same data-parallel batches: logits and
  gradients of the first step and the loss of every step within 1e-5 (absolute), logits and
  gradients of the later steps within 1e-3 (relative), parameters after the steps within lr
  (AdamW moves an element with an eps-sized gradient by a rounding-decided fraction of lr, and
  the later steps inherit it);
- the condenser's router bias and the MoE-Bias head train: bit-identical on both ranks, equal
  to the single-process ones, and saved / loaded back bit-identically.
"""

import os
import sys
from pathlib import Path

import pytest
import torch
from _launch import run_job

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "ep_gpu_check.py"
TOL = 1e-5  # absolute: first-step logits and gradients, every loss, moe_sft tensors
REL = 1e-3  # relative: logits and gradients of the later steps
LR = 1e-3  # also the tolerance of the parameters after the steps


def _run(layout: str, out: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(SCRIPT),
           "--layout", layout, "--lr", str(LR), "--out", str(out)]  # fmt: skip
    proc = run_job(cmd, outputs=(out,), env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return torch.load(out, weights_only=False)


@pytest.fixture(scope="module", params=["tp_ep", "fsdp_ep"])
def measured(request, tmp_path_factory):
    layout = request.param
    seen = _run(layout, tmp_path_factory.mktemp(layout) / "results.pt")
    assert seen["world"] == 2 and seen["failed"] == []
    return layout, {run: res for (lay, run), res in seen["results"].items() if lay == layout}


def _close_to_single_process(res: dict) -> None:
    for key in ("logits0", "grad0", "loss", "extra"):
        assert res[key] <= TOL, (key, res[key])
    for key in ("logits", "grad"):
        assert res[key] <= REL, (key, res[key])
    assert res["param"] <= LR, res["param"]


@pytest.mark.slow
def test_patched_methods_off_equals_unpatched_ep_and_single_process(measured):
    layout, runs = measured
    off = runs["off"]
    assert off["vs_stock"] == dict.fromkeys(off["vs_stock"], 0.0)  # logits, losses, gradients, parameters: every step
    assert set(off["vs_stock"]) == {"logits0", "grad0", "loss", "logits", "grad", "param", "extra"}
    _close_to_single_process(off)


@pytest.mark.slow
def test_condenser_bias_and_moe_bias_head_train_under_ep(measured):
    layout, runs = measured
    res = runs["bias_head"]
    assert any(k.endswith("logit_bias") for k in res["extra_keys"])
    assert "moe_bias_head.bias" in res["extra_keys"]
    assert res["bias_moved"] > 0  # the bias trained ...
    assert res["ranks"] == 0.0  # ... identically on both ranks, as did the head (and all unsharded parameters)
    _close_to_single_process(res)  # `extra`: router biases and head within 1e-5 of the single-process ones
    assert res["save_reload"] == 0.0


@pytest.mark.slow
def test_longtail_condensers_and_frozen_router_under_ep(measured):
    _layout, runs = measured
    res = runs["longtail_frozen"]
    assert any(k.endswith("forced") for k in res["extra_keys"])
    assert res["bias_moved"] > 0 and res["ranks"] == 0.0
    _close_to_single_process(res)


@pytest.mark.slow
def test_lora_on_attention_runs_under_fsdp2_ep_and_is_refused_under_tp(measured):
    layout, runs = measured
    res = runs["lora_attention"]
    if layout == "tp_ep":
        assert "tp_size = 2" in res["refused"] and "tp_size: 1" in res["refused"]
    else:
        assert res["refused"] is None and res["ranks"] == 0.0
        _close_to_single_process(res)


def test_moe_sft_train_with_a_parallel_block_matches_ddp(tmp_path):
    """`moe-sft train` with `parallel: {ep_size: 2}` (FSDP2 + EP on 2 gloo processes) logs the
    same losses as the same job under DDP (as printed, 4 significant digits), and saves a final
    model that restores to the same router biases and MoE-Bias head (atol 1e-6: the two shard
    the reductions differently)."""
    import json

    import moe_sft

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("WORLD_SIZE", None)
    runs = {}
    for name, extra in (("ep", ["parallel.ep_size=2"]), ("ddp", [])):
        out = tmp_path / name
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "moe_sft.cli",
               "train", "configs/tiny/qwen3_moe_moe_bias_head.yaml", f"training.output_dir={out}", "training.max_steps=4",
               "training.save_strategy='no'", "training.logging_steps=1", "condenser.bias.gamma=0.01", *extra]  # fmt: skip
        proc = run_job(cmd, outputs=(out,), cwd=root, env=env, timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]
        losses = [json.loads(line.replace("'", '"'))["loss"] for line in proc.stdout.splitlines()
                  if line.startswith("{'loss'")]  # fmt: skip
        runs[name] = (losses, moe_sft.from_pretrained(out / "final"))
    (ep_losses, ep_model), (ddp_losses, ddp_model) = runs["ep"], runs["ddp"]
    assert len(ep_losses) == 4
    torch.testing.assert_close(torch.tensor([float(x) for x in ep_losses]), torch.tensor([float(x) for x in ddp_losses]), rtol=1e-5, atol=0)
    ep_extra, ddp_extra = (moe_sft.get_handle(m).extra_state_dict() for m in (ep_model, ddp_model))
    assert ep_extra.keys() == ddp_extra.keys()
    for k, v in ddp_extra.items():
        torch.testing.assert_close(ep_extra[k].float(), v.float(), atol=1e-6, rtol=1e-5, msg=k)
