"""`moe-sft train` with a `lora:` block trains PEFT adapters on the frozen base and saves the
adapter (not a full model) as its final output."""

from pathlib import Path

import torch
from safetensors.torch import load_file

from moe_sft.methods.lora import load_adapter
from moe_sft.testing import tiny_batch, tiny_model
from moe_sft.train.config import load_train_config
from moe_sft.train.trainer import train

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs/tiny/qwen3_moe_vanilla.yaml"


def test_lora_block_trains_adapters_only(tmp_path):
    cfg = load_train_config(RECIPE, [f"training.output_dir={tmp_path}", "training.max_steps=3",
                                     "training.save_steps=3", "lora={}"])
    final = train(cfg)
    files = {p.name for p in final.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "moe_sft_config.json"} <= files
    assert "model.safetensors" not in files  # a full-model save would mean the base trained too
    checkpoint = {p.name for p in (tmp_path / "checkpoint-3").iterdir()}
    assert "adapter_model.safetensors" in checkpoint and "model.safetensors" not in checkpoint

    adapter = load_file(final / "adapter_model.safetensors")
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b)  # B starts at 0: it trained

    base = tiny_model("qwen3_moe", experts_implementation="eager")  # the recipe's seed-0 base
    batch = tiny_batch(base)
    with torch.no_grad():
        base_logits = base(**batch).logits
    peft_model = load_adapter(tiny_model("qwen3_moe", experts_implementation="eager"), final)
    with torch.no_grad():
        assert not torch.allclose(peft_model(**batch).logits, base_logits)
