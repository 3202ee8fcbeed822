"""`moe-sft train` YAMLs: every shipped one loads and validates; typos and bad values fail naming the key."""

import json
from pathlib import Path

import pytest
import yaml

from moe_sft.config import ConfigError
from moe_sft.train.config import load_train_config, method_keys, parse_train_config, resolve_path
from moe_sft.train.deepspeed import load_config

ROOT = Path(__file__).resolve().parents[1]
# Train recipes: every YAML under configs/ with a `training:` block (other verbs ship their own YAMLs).
YAMLS = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if "training" in (yaml.safe_load(p.read_text()) or {}))
DS_CONFIGS = sorted((ROOT / "configs" / "deepspeed").glob("*.json"))


def _minimal(**extra):
    data = {
        "model": {"tiny": "qwen3_moe"},
        "data": {"files": ["configs/tiny/data/arith.jsonl"]},
        "training": {"output_dir": "outputs/x"},
    }
    data.update(extra)
    return data


def test_shipped_configs_exist():
    assert len(YAMLS) >= 4 * 8 + 8
    names = {p.relative_to(ROOT / "configs").as_posix() for p in YAMLS}
    for family in ("qwen1.5_moe", "qwen3_moe", "deepseek_v2_lite", "olmoe"):
        for method in ("vanilla", "frozen_router", "densemixer", "esft_token", "esft_gate", "condenser_phase1",
                       "condenser_phase2", "moe_bias_head"):
            assert any(n.startswith(f"{family}/") and n.endswith(f"_{method}.yaml") for n in names), (family, method)
    assert {p.name for p in DS_CONFIGS} >= {"zero2.json", "zero3.json", "zero3_offload.json", "zero3_offload_param.json"}


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_shipped_yaml_validates(path):
    rel = path.relative_to(ROOT).as_posix()
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and (f"moe-sft train {rel}" in first or f"moe_sft.cli train {rel}" in first), (
        f"{rel}: the first line must be a comment giving the command that runs this file, got {first!r}"
    )
    cfg = load_train_config(path)
    assert cfg.training["output_dir"]
    if cfg.deepspeed is not None:
        ds = load_config(resolve_path(cfg, cfg.deepspeed))
        assert ds["zero_optimization"]["stage"] in (2, 3)
    for name in cfg.data.files:
        if name.endswith((".json", ".jsonl")) and cfg.model.tiny is not None:
            assert resolve_path(cfg, name).is_file(), name
    if cfg.then is not None:
        assert resolve_path(cfg, cfg.then).is_file()
        load_train_config(resolve_path(cfg, cfg.then))


@pytest.mark.parametrize("path", DS_CONFIGS, ids=lambda p: p.name)
def test_deepspeed_configs_use_auto_values(path):
    ds = json.loads(path.read_text())
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping"):
        assert ds[key] == "auto", key
    if ds["zero_optimization"]["stage"] == 3:
        assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


@pytest.mark.parametrize(
    "data, key",
    [
        (_minimal(modle={"tiny": "qwen3_moe"}), "modle"),
        (_minimal(data={"files": ["a.jsonl"], "max_lenght": 10}), "data.max_lenght"),
        (_minimal(training={"output_dir": "o", "learning_rat": 1e-5}), "training.learning_rat"),
        (_minimal(model={"tiny": "qwen3_moe", "dtyp": "float32"}), "model.dtyp"),
        (_minimal(condenser={"bais": {"gamma": 1e-3}}), "condenser.bais"),
        (_minimal(esft={"scor": "token"}), "esft.scor"),
    ],
)
def test_typo_key_fails_naming_it(data, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        parse_train_config(data)


@pytest.mark.parametrize(
    "data, match",
    [
        (_minimal(training={"output_dir": "o", "max_steps": "ten"}), r"training\.max_steps"),
        (_minimal(training={"output_dir": "o", "deepspeed": "z.json"}), r"training\.deepspeed"),
        (_minimal(training={"learning_rate": 1e-5}), r"training\.output_dir"),
        (_minimal(model={"tiny": "qwen3_moe", "path": "x"}), "exactly one of"),
        (_minimal(model={"tiny": "qwen3_moe", "dtype": "fp33"}), r"model\.dtype"),
        (_minimal(data={"files": ["a.jsonl"], "format": "csv"}), r"data\.format"),
        (_minimal(deepspeed=3), "deepspeed"),
        ({"model": {"tiny": "qwen3_moe"}, "training": {"output_dir": "o"}}, "data"),
    ],
)
def test_bad_values_fail_naming_the_key(data, match):
    with pytest.raises(ConfigError, match=match):
        parse_train_config(data)


def test_method_blocks_are_the_moesft_fields_and_overrides_apply(tmp_path):
    assert {"condenser", "densemixer", "esft", "frozen_router", "moe_bias_head"} <= set(method_keys())
    path = tmp_path / "c.yaml"
    path.write_text(json.dumps(_minimal(condenser={"bias": {"gamma": 1e-3}})))
    cfg = load_train_config(path, ["training.learning_rate=1e-5", "condenser.bias.gamma=2e-4", "data.packing=true"])
    assert cfg.training["learning_rate"] == 1e-5
    assert cfg.methods.condenser.bias.gamma == 2e-4
    assert cfg.data.packing is True
    with pytest.raises(ConfigError, match=r"training\.learning_rat\b"):
        load_train_config(path, ["training.learning_rat=1e-5"])


def test_esft_with_deepspeed_and_weight_decay_is_refused_before_any_work(tmp_path):
    """DeepSpeed decays its fp32 master weights itself, where ESFT cannot restore frozen slices."""
    from moe_sft.train.trainer import train

    cfg = load_train_config(
        ROOT / "configs/tiny/qwen3_moe_esft_token.yaml",
        [f"training.output_dir={tmp_path / 'out'}", "deepspeed=configs/deepspeed/zero2.json", "training.weight_decay=0.1"],
    )
    with pytest.raises(ConfigError, match="weight_decay: 0"):
        train(cfg)
    assert not (tmp_path / "out").exists()
