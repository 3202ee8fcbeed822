"""Real `moe-sft train` jobs: a 2-process ZeRO-3 run with the condenser through torchrun, ZeRO-2 /
ZeRO-3 / DDP giving the same losses, exact resume, the two-phase condenser recipe in one command,
and ESFT's profiling pass wired before patching."""

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from _launch import run_job
from safetensors.torch import load_file

import moe_sft

ROOT = Path(__file__).resolve().parents[1]
RECIPE = "configs/tiny/qwen3_moe_condenser_phase1.yaml"
STEPS = 16  # ZeRO-3 reference run; checkpoints at STEPS/2 and STEPS
COMPARE_STEPS = 4  # ZeRO-2 and DDP runs compared with its first steps
# Same start, same data order, fp32: the logged losses of ZeRO-2, ZeRO-3 and DDP agree to float
# rounding of differently bucketed gradient reductions.
LOSS_RTOL = 1e-5


def _env():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("WORLD_SIZE", None)
    return env


def _train(out: Path, *extra: str, nproc: int = 2, recipe: str = RECIPE, resume: bool = False):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "moe_sft.cli"]
    if nproc == 1:
        cmd = [sys.executable, "-m", "moe_sft.cli"]
    cmd += ["train", recipe, f"training.output_dir={out}", "training.logging_steps=1", "training.report_to=none", *extra]
    if resume:
        cmd.append("--resume")
    proc = run_job(cmd, outputs=(out,), cwd=ROOT, env=_env(), timeout=600)  # not retried when out holds a run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def _losses(checkpoint: Path) -> list[float]:
    history = json.loads((checkpoint / "trainer_state.json").read_text())["log_history"]
    return [h["loss"] for h in history if "loss" in h]


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("zero3")
    _train(out, "then=null", f"training.max_steps={STEPS}", f"training.save_steps={STEPS // 2}", "deepspeed=configs/deepspeed/zero3.json")
    return out


def test_zero3_condenser_job(zero3_run):
    losses = _losses(zero3_run / f"checkpoint-{STEPS}")
    assert len(losses) == STEPS and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-4:]) / 4 < 0.7 * losses[0], losses  # learnable data: the loss falls

    # Each rank's own module state (DeepSpeed writes one per rank): router biases identical, and moved.
    step_dir = zero3_run / f"checkpoint-{STEPS}" / f"global_step{STEPS}"
    ranks = [torch.load(step_dir / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt", weights_only=False)["module"] for r in (0, 1)]
    bias_keys = [k for k in ranks[0] if k.endswith("moe_sft.logit_bias")]
    assert len(bias_keys) == 2
    for k in bias_keys:
        assert torch.equal(ranks[0][k], ranks[1][k]), k
        assert ranks[0][k].abs().sum() > 0, k

    # The final model: a patched checkpoint restored by moe_sft.from_pretrained with rank 0's biases.
    final = zero3_run / "final"
    model = moe_sft.from_pretrained(final)
    handle = moe_sft.get_handle(model)
    assert handle.config.condenser is not None
    for m in handle.layers:
        key = f"{m.name}.moe_sft.logit_bias"
        assert torch.equal(m.controls.logit_bias.cpu(), ranks[0][key]), key
    weights = load_file(final / "model.safetensors")
    assert all(v.numel() > 0 for v in weights.values())  # gathered, not ZeRO-3 partitions
    handle.revert()

    # Expert-load logging: metrics in the logs, heatmap and JSON at the end.
    history = json.loads((zero3_run / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())["log_history"]
    logged = history[0]
    for key in ("expert_load/layer_0/entropy", "expert_load/layer_0/active", "expert_load/layer_1/max_share",
                "expert_load/layer_1/min_share", "expert_load/layer_0/bias_min", "expert_load/layer_0/bias_max"):
        assert key in logged, key
    summary = json.loads((zero3_run / "expert_load.json").read_text())
    assert summary["layers"] == [0, 1] and len(summary["counts"][0]) == 8
    tokens_per_layer = sum(summary["counts"][0])
    assert tokens_per_layer > 0 and tokens_per_layer == sum(summary["counts"][1])
    assert (zero3_run / "expert_load.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resume_is_exact(zero3_run, tmp_path):
    half = f"checkpoint-{STEPS // 2}"
    shutil.copytree(zero3_run / half, tmp_path / half)
    _train(tmp_path, "then=null", f"training.max_steps={STEPS}", f"training.save_steps={STEPS // 2}",
           "deepspeed=configs/deepspeed/zero3.json", resume=True)
    assert _losses(tmp_path / f"checkpoint-{STEPS}") == _losses(zero3_run / f"checkpoint-{STEPS}")
    for name in ("model.safetensors", "moe_sft_tensors.safetensors"):
        straight, resumed = load_file(zero3_run / "final" / name), load_file(tmp_path / "final" / name)
        assert straight.keys() == resumed.keys()
        for k in straight:
            assert torch.equal(straight[k], resumed[k]), (name, k)


def test_resume_is_exact_without_deepspeed(tmp_path):
    """One process, no DeepSpeed: the Trainer's own checkpoints (model.safetensors) must hold the
    fused experts in a layout its resume reads back (transformers 5 would otherwise save qwen3_moe
    experts per expert and resume without them)."""
    steps = ["then=null", "training.max_steps=6", "training.save_steps=3"]
    _train(tmp_path / "straight", *steps, nproc=1)
    shutil.copytree(tmp_path / "straight" / "checkpoint-3", tmp_path / "resumed" / "checkpoint-3")
    _train(tmp_path / "resumed", *steps, nproc=1, resume=True)
    assert _losses(tmp_path / "resumed" / "checkpoint-6") == _losses(tmp_path / "straight" / "checkpoint-6")
    for name in ("model.safetensors", "moe_sft_tensors.safetensors"):
        straight, resumed = load_file(tmp_path / "straight" / "final" / name), load_file(tmp_path / "resumed" / "final" / name)
        assert straight.keys() == resumed.keys()
        for k in straight:
            assert torch.equal(straight[k], resumed[k]), (name, k)


@pytest.mark.parametrize("backend", ["zero2", "ddp"])
def test_same_losses_as_zero3(zero3_run, tmp_path, backend):
    extra = ["deepspeed=configs/deepspeed/zero2.json"] if backend == "zero2" else []
    _train(tmp_path, "then=null", f"training.max_steps={COMPARE_STEPS}", f"training.save_steps={COMPARE_STEPS}", *extra)
    reference = _losses(zero3_run / f"checkpoint-{STEPS}")[:COMPARE_STEPS]
    torch.testing.assert_close(torch.tensor(_losses(tmp_path / f"checkpoint-{COMPARE_STEPS}")), torch.tensor(reference),
                               rtol=LOSS_RTOL, atol=0)


def test_two_phase_condenser_recipe_in_one_command(tmp_path):
    # Phase 2's own YAML writes to its output_dir; point both phases into tmp_path.
    phase2 = tmp_path / "phase2.yaml"
    text = (ROOT / "configs/tiny/qwen3_moe_condenser_phase2.yaml").read_text()
    phase2.write_text(text.replace("outputs/tiny/qwen3_moe_condenser_phase2", str(tmp_path / "p2")).replace(
        "max_steps: 20", "max_steps: 4").replace("configs/tiny/data", str(ROOT / "configs/tiny/data")))
    _train(tmp_path / "p1", f"then={phase2}", "training.max_steps=6", "training.save_steps=6", nproc=1)
    p1 = moe_sft.from_pretrained(tmp_path / "p1" / "final")
    h1 = moe_sft.get_handle(p1)
    assert h1.config.condenser.condensers is None
    bias1 = {m.layer_idx: m.controls.logit_bias.clone() for m in h1.layers}
    h1.revert()
    p2 = moe_sft.from_pretrained(tmp_path / "p2" / "final")
    h2 = moe_sft.get_handle(p2)
    chosen = h2.config.condenser.condensers.experts
    assert h2.config.condenser.bias.gamma == 5e-5
    for i, b in bias1.items():
        # Phase 2 started from phase 1: its condensers are phase 1's lowest-bias experts.
        lowest = set(torch.argsort(b, stable=True)[:2].tolist())
        assert set(chosen[i]) == lowest or b.sort().values[1] == b.sort().values[2], (i, chosen[i], b)
    h2.revert()


def test_esft_profiles_the_training_data_before_patching(tmp_path):
    from moe_sft.train.config import load_train_config
    from moe_sft.train.data import build_dataset
    from moe_sft.train.trainer import load_model, load_tokenizer

    cfg = load_train_config(ROOT / "configs/tiny/qwen3_moe_esft_token.yaml", [f"training.output_dir={tmp_path}", "data.profile_samples=16"])
    dataset = build_dataset(load_tokenizer(cfg), cfg.data, lambda n: ROOT / n)
    model, handle = load_model(cfg, dataset)
    selection = json.loads((tmp_path / "esft_selection.json").read_text())
    assert selection["samples"] == 16
    assert handle.config.esft.selection_file == str(tmp_path / "esft_selection.json")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".experts." in n for n in trainable)
    handle.revert()
