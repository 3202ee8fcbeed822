"""`moe-sft rl` recipes end to end on one CPU process: a few GRPO steps with every method off and
with each method block (the shipped tiny recipes, plus densemixer and LoRA), each final output
restored by its loader; ESFT's experts come from rollouts of the training prompts; the MoE-Bias
head alone on a frozen base leaves the small adapter; resume is exact."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import moe_sft
from moe_sft.cli import main
from moe_sft.rl import load_rl_config, train_rl

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["grpo.max_steps=2", "grpo.per_device_train_batch_size=4", "grpo.num_generations=2", "grpo.max_completion_length=8",
         "grpo.save_steps=1000"]  # fmt: skip
LOGGED = ("loss", "reward", "reward_std", "routing/mismatch", "routing/mismatch_replayed", "ratio/rollout_std",
          "entropy_mask/kept_fraction", "entropy_mask/kept_entropy", "expert_load/mean_entropy")  # fmt: skip


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def recipe(name: str, out: Path, *extra: str):
    return load_rl_config(ROOT / "configs" / "tiny" / f"{name}.yaml", [*SMALL, f"grpo.output_dir={out}", *extra])


@pytest.mark.parametrize(
    "name, extra, block",
    [
        ("qwen3_moe_grpo", (), None),
        ("qwen3_moe_grpo", ("routing_replay=none",), None),
        ("qwen3_moe_grpo", ("routing_replay=old_policy",), None),
        ("qwen3_moe_grpo_condenser", (), "condenser"),
        ("qwen3_moe_grpo_frozen_router", (), "frozen_router"),
        ("qwen3_moe_grpo", ("densemixer={}",), "densemixer"),
    ],
)
def test_recipe_trains_and_saves_a_patched_checkpoint(tmp_path, name, extra, block):
    result = train_rl(recipe(name, tmp_path, *extra))
    steps = [h for h in result.log_history if "loss" in h]
    assert len(steps) == 2
    for key in LOGGED:
        assert all(torch.isfinite(torch.tensor(float(h[key]))) for h in steps), key
    assert all(h["routing/mismatch_replayed"] == 0 for h in steps) or "routing_replay=none" in extra
    model = moe_sft.from_pretrained(result.final_dir)
    handle = moe_sft.get_handle(model)
    assert (getattr(handle.config, block) is not None) if block else handle.config.method_blocks() == {}
    assert (tmp_path / "expert_load.json").is_file()
    handle.revert()


def test_esft_selects_experts_from_rollouts_of_the_training_prompts(tmp_path):
    result = train_rl(recipe("qwen3_moe_grpo_esft", tmp_path, "data.profile_samples=6"))
    selection = json.loads((tmp_path / "esft_selection.json").read_text())
    assert selection["samples"] == 6  # six prompts, one sampled completion each
    model = moe_sft.from_pretrained(result.final_dir)
    assert moe_sft.get_handle(model).config.esft.selection_file == str(tmp_path / "esft_selection.json")


def test_moe_bias_head_alone_on_a_frozen_base_saves_the_small_adapter(tmp_path):
    from moe_sft.methods.moe_bias_head import ADAPTER_WEIGHTS_NAME, load_moe_bias_adapter
    from moe_sft.testing import tiny_model

    # groups of 4 completions of 12 tokens: some differ in reward (digits written), so the head gets a gradient
    result = train_rl(recipe("qwen3_moe_grpo_moe_bias_head", tmp_path, "grpo.num_generations=4", "grpo.max_completion_length=12"))
    assert any(h.get("frac_reward_zero_std", 1) < 1 for h in result.log_history)
    assert sorted(p.name for p in result.final_dir.iterdir()) == ["moe_bias_head.safetensors", "moe_bias_head_config.json"]
    assert (result.final_dir / ADAPTER_WEIGHTS_NAME).stat().st_size < 100_000  # the head only
    head = load_moe_bias_adapter(tiny_model("qwen3_moe"), result.final_dir)
    assert head.bias.abs().sum() > 0  # zero-initialised, trained by GRPO


def test_lora_recipe_saves_the_adapter(tmp_path):
    from moe_sft.methods.lora import load_adapter
    from moe_sft.testing import tiny_model

    result = train_rl(recipe("qwen3_moe_grpo", tmp_path, "lora={r: 4, alpha: 8}"))
    peft_model = load_adapter(tiny_model("qwen3_moe", experts_implementation="eager"), result.final_dir)
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in peft_model.named_parameters())


def test_resume_is_exact(tmp_path):
    steps = ["grpo.max_steps=4", "grpo.save_steps=2", "grpo.logging_steps=1"]
    straight = train_rl(recipe("qwen3_moe_grpo_condenser", tmp_path / "straight", *steps))
    shutil.copytree(tmp_path / "straight" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    # through the CLI: `moe-sft rl CONFIG key=value ... --resume`
    args = ["rl", str(ROOT / "configs/tiny/qwen3_moe_grpo_condenser.yaml"), *SMALL, *steps, f"grpo.output_dir={tmp_path / 'resumed'}"]
    assert main([*args, "--resume"]) == 0
    resumed = json.loads((tmp_path / "resumed" / "checkpoint-4" / "trainer_state.json").read_text())["log_history"]
    keys = ("loss", "reward", "grad_norm", "routing/mismatch", "ratio/rollout_mean", "entropy_mask/kept_entropy")
    pick = lambda history: [[h[k] for k in keys] for h in history if "loss" in h]  # noqa: E731
    assert pick(resumed)[-2:] == pick(straight.log_history)[-2:] and len(pick(resumed)) == 4
    for name in ("model.safetensors", "moe_sft_tensors.safetensors"):
        a, b = load_file(tmp_path / "straight" / "final" / name), load_file(tmp_path / "resumed" / "final" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    biases = load_file(tmp_path / "resumed" / "final" / "moe_sft_tensors.safetensors")
    assert any(k.endswith("logit_bias") and v.abs().sum() > 0 for k, v in biases.items())
