"""The `parallel:` block: sizes, the checks made before any weight loads, the DistributedConfig,
and patching of the module classes FSDP2 swaps in (single process; the 2-process runs are in
tests/test_parallel_ep.py)."""

import pytest
import torch
from transformers import AutoConfig

import moe_sft
from moe_sft.config import ConfigError, MoESFTConfig, from_dict
from moe_sft.testing import tiny_batch, tiny_config, tiny_model
from moe_sft.train.parallel import ParallelConfig, check_job, check_methods, check_model, distributed_config

QWEN3 = tiny_config("qwen3_moe")  # 8 experts, 4 attention heads, 2 KV heads
TRAINING = {"output_dir": "out", "save_only_model": True}


@pytest.mark.parametrize(
    "block, pieces",
    [
        ({}, ["parallel.ep_size is required"]),
        ({"ep_size": 1}, ["ep_size = 1", "ep_size >= 2"]),
        ({"ep_size": 0}, ["parallel.ep_size = 0", ">= 1"]),
        ({"ep_size": 3, "tp_size": 2}, ["ep_size = 3 is not a multiple of parallel.tp_size = 2", "ep_size = 4"]),
        ({"ep_size": 4, "fsdp_size": 2}, ["ep_size = 4 does not divide fsdp_size * tp_size = 2 * 1 = 2", "leave fsdp_size out"]),
        ({"ep_size": 2, "pp_size": 2}, ["unknown config key(s) parallel.pp_size", "ep_size, fsdp_size, tp_size"]),
        ({"ep_size": "2"}, ["parallel.ep_size: expected an integer"]),
    ],
)
def test_parallel_block_errors_name_the_values_and_the_fix(block, pieces):
    with pytest.raises(ConfigError) as err:
        from_dict(ParallelConfig, block, prefix="parallel.")
    for piece in pieces:
        assert piece in str(err.value)


def test_world_size_fills_in_fsdp_size_and_must_match_the_mesh():
    assert ParallelConfig(ep_size=8).resolve(16).fsdp_size == 16  # 2 nodes x 8: the same YAML as 1 node
    assert ParallelConfig(ep_size=2, tp_size=2).resolve(8).fsdp_size == 4
    with pytest.raises(ConfigError, match=r"fsdp_size \* tp_size = 2 \* 1 = 2 ranks, but the launch has 4; set fsdp_size = 4"):
        ParallelConfig(ep_size=2, fsdp_size=2).resolve(4)
    with pytest.raises(ConfigError, match="tp_size = 2 does not divide the world size 3"):
        ParallelConfig(ep_size=2, tp_size=2).resolve(3)
    with pytest.raises(ConfigError, match=r"ep_size = 4 does not divide fsdp_size \* tp_size = 2 \* 1"):
        ParallelConfig(ep_size=4).resolve(2)


def test_model_checks_read_the_config_only():
    check_model(ParallelConfig(ep_size=4, tp_size=2).resolve(4), QWEN3)
    with pytest.raises(ConfigError, match=r"ep_size = 2 does not divide the 7 routed experts .* use one of \[7\]"):
        check_model(ParallelConfig(ep_size=2).resolve(2), tiny_config("qwen3_moe", num_experts=7))
    with pytest.raises(ConfigError, match="tp_size = 4 does not divide num_key_value_heads = 2"):
        check_model(ParallelConfig(ep_size=4, tp_size=4).resolve(4), QWEN3)
    llama = AutoConfig.for_model("llama", num_hidden_layers=1)
    with pytest.raises(ConfigError, match="no expert-parallel plan .* 'llama'"):
        check_model(ParallelConfig(ep_size=2).resolve(2), llama)


REFUSED = {
    "densemixer": ({"densemixer": {}}, 1, "evaluates every expert on every token"),
    "esft": ({"esft": {"selection_file": "sel.json"}}, 1, "freezes expert slices"),
    "condenser_new": ({"condenser": {"condensers": {"source": "new"}}}, 1, "source: new initialises"),
    "lora_experts": ({"lora": {}}, 1, "lora on the fused experts or the router"),
    "lora_router": ({"lora": {"experts": False, "router": True}}, 1, "lora on the fused experts or the router"),
    "lora_attention_tp": ({"lora": {"experts": False}}, 2, "PEFT's LoRA layers do not handle tensor-parallel"),
}
ALLOWED = {
    "off": {},
    "bias": {"condenser": {}},
    "longtail": {"condenser": {"condensers": {"num": 2, "experts": {0: [0, 1], 1: [0, 1]}}}},
    "head_frozen": {"moe_bias_head": {}, "frozen_router": {}, "track_usage": True},
    "disabled": {"routing": {"disabled_experts": {0: [7]}}},
}


@pytest.mark.parametrize("name", REFUSED)
def test_methods_that_read_every_expert_are_refused_with_the_alternative(name):
    blocks, tp, piece = REFUSED[name]
    with pytest.raises(ConfigError) as err:
        check_methods(MoESFTConfig.from_dict(blocks), ParallelConfig(ep_size=2, tp_size=tp).resolve(2), QWEN3)
    assert piece in str(err.value) and f"ep_size=2, tp_size={tp}" in str(err.value)
    assert "tp_size: 1" in str(err.value) or "deepspeed: configs/deepspeed/zero3.json" in str(err.value)


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("name", ALLOWED)
def test_methods_verified_under_ep_pass(name, tp):
    check_methods(MoESFTConfig.from_dict(ALLOWED[name]), ParallelConfig(ep_size=2, tp_size=tp).resolve(2), QWEN3)


def test_moe_bias_head_turned_on_by_the_environment_counts(monkeypatch):
    monkeypatch.setenv("MOE_BIAS_ENABLED", "1")
    tied = tiny_config("qwen3_moe", tie_word_embeddings=True)
    with pytest.raises(ConfigError, match="ties it to the tensor-parallel input embedding"):
        check_methods(MoESFTConfig(), ParallelConfig(ep_size=2, tp_size=2).resolve(2), tied)
    dc = distributed_config(ParallelConfig(ep_size=2, tp_size=2).resolve(2), MoESFTConfig(), QWEN3)
    assert dc.tp_plan == {"lm_head": "replicate"}


def test_distributed_config_is_transformers_own():
    dc = distributed_config(ParallelConfig(ep_size=4).resolve(8), MoESFTConfig(), QWEN3)
    assert (dc.ep_size, dc.tp_size, dc.fsdp_size, dc.efsdp_size, dc.tp_plan) == (4, 1, 8, 2, None)
    head = MoESFTConfig.from_dict({"moe_bias_head": {}})
    assert distributed_config(ParallelConfig(ep_size=2).resolve(2), head, QWEN3).tp_plan is None  # no TP: nothing to keep whole
    assert distributed_config(ParallelConfig(ep_size=2, tp_size=2).resolve(2), head, QWEN3).tp_plan == {"lm_head": "replicate"}


@pytest.mark.parametrize(
    "kwargs, piece",
    [
        ({"deepspeed": "zero3.json"}, "parallel: and deepspeed: zero3.json cannot be combined"),
        ({"resuming": True}, "--resume with parallel"),
        ({"training": {"output_dir": "out"}}, "training.save_only_model: true"),
        ({"world": 3}, "does not divide"),
    ],
)
def test_job_checks(kwargs, piece):
    job = {"deepspeed": None, "training": TRAINING, "resuming": False, "world": 2, **kwargs}
    with pytest.raises(ConfigError, match=piece.replace("*", r"\*")):
        check_job(ParallelConfig(ep_size=2), QWEN3, MoESFTConfig(), **job)


def test_tensor_parallel_jobs_need_gpus(monkeypatch):
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="tp_size = 2 on a machine without GPUs.*use tp_size: 1"):
        check_job(ParallelConfig(ep_size=2, tp_size=2), QWEN3, MoESFTConfig(), deepspeed=None, training=TRAINING, resuming=False, world=2)
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: True)
    check_job(ParallelConfig(ep_size=2, tp_size=2), QWEN3, MoESFTConfig(), deepspeed=None, training=TRAINING, resuming=False, world=2)


def test_job_check_resolves_the_world_size():
    training = {"output_dir": "out", "save_strategy": "no"}
    p = check_job(ParallelConfig(ep_size=2), QWEN3, MoESFTConfig(), deepspeed=None, training=training, resuming=False, world=4)
    assert p == ParallelConfig(ep_size=2, tp_size=1, fsdp_size=4)


def test_patching_accepts_the_experts_subclass_fsdp2_swaps_in():
    """fully_shard replaces a module's class with a subclass named FSDP<class> (FSDPModule
    first); patching must accept it and compute exactly as with the stock class."""
    from torch.distributed.fsdp import FSDPModule

    model = tiny_model("qwen3_moe")
    batch = tiny_batch(model)
    want = model(**batch).logits
    for layer in model.model.layers:
        experts = layer.mlp.experts
        experts.__class__ = type(f"FSDP{type(experts).__name__}", (FSDPModule, type(experts)), {})
    handle = moe_sft.patch_model(model)
    assert type(model.model.layers[0].mlp.experts).__name__ == "FSDPQwen3MoeExperts"
    assert torch.equal(model(**batch).logits, want)
    handle.revert()
