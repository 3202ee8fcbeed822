"""The `moe-sft rl` YAML: every shipped recipe parses and starts with the command that runs it;
unknown keys, ill-typed values and contradictory settings are errors naming the key and the
fix, raised before any model loads; the CLI reports them in one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from moe_sft import ConfigError
from moe_sft.cli import main
from moe_sft.rl import RewardConfig, load_rl_config, parse_rl_config
from moe_sft.rl.config import DEFAULT_TOP_ENTROPY_QUANTILE

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(ROOT.glob("configs/*/*grpo*.yaml"))


def base(**changes) -> dict:
    data = {
        "model": {"tiny": "qwen3_moe"},
        "data": {"files": ["configs/tiny/data/arith.jsonl"], "prompt_template": "chat"},
        "rewards": [{"type": "accuracy"}],
        "grpo": {"output_dir": "out", "per_device_train_batch_size": 4, "num_generations": 4},
    }
    data.update(changes)
    return data


def test_shipped_recipes_parse_and_name_their_command():
    assert len(RECIPES) >= 8, RECIPES  # tiny ones and one per real family at least
    families = {p.parent.name for p in RECIPES}
    assert {"tiny", "qwen3_moe", "qwen1.5_moe", "deepseek_v2_lite", "olmoe"} <= families
    for path in RECIPES:
        first = path.read_text().splitlines()[0]
        assert first.startswith("# moe-sft rl ") or (first.startswith("# ") and "-m moe_sft.cli rl " in first), (path, first)
        assert str(path.relative_to(ROOT)) in first, (path, first)
        cfg = load_rl_config(path)
        assert cfg.rewards and cfg.grpo["output_dir"].startswith("outputs/")
        assert cfg.grpo["top_entropy_quantile"] == 0.2, path  # the paper's rho, stated in every recipe


def test_defaults():
    cfg = parse_rl_config(base())
    assert cfg.routing_replay == "rollout" and cfg.routing_metrics
    assert cfg.grpo["top_entropy_quantile"] == DEFAULT_TOP_ENTROPY_QUANTILE == 0.2
    assert (cfg.rewards[0].benchmark, cfg.rewards[0].extraction) == ("gsm8k", "llm_adapters")
    assert RewardConfig(type="format").pattern == "[Tt]he answer is"
    view = cfg.as_train_config()  # what the shared `moe-sft train` functions see
    assert view.output_dir == cfg.output_dir and view.training is cfg.grpo and view.methods is cfg.methods


@pytest.mark.parametrize(
    "changes, says",
    [
        ({"trainer": {}}, r"unknown config key\(s\) trainer; valid top-level keys"),
        ({"grpo": {"output_dir": "o", "num_generation": 4}}, r"grpo\.num_generation: not fields of trl\.GRPOConfig"),
        ({"grpo": {"num_generations": 4}}, r"grpo\.output_dir is required"),
        ({"grpo": {"output_dir": "o", "reward_weights": [1.0]}}, r"grpo\.reward_weights: not allowed here; set `weight` on each"),
        ({"grpo": {"output_dir": "o", "deepspeed": "x.json"}}, r"grpo\.deepspeed: not allowed here"),
        ({"grpo": {"output_dir": "o", "num_generations": "four"}}, r"grpo\.num_generations: expected an integer"),
        ({"grpo": {"output_dir": "o", "per_device_train_batch_size": 3, "num_generations": 2}}, r"whole groups of num_generations=2"),
        ({"grpo": {"output_dir": "o", "per_device_train_batch_size": 4, "num_generations": 1}}, r"at least 2 completions per prompt"),
        ({"grpo": {"output_dir": "o", "per_device_train_batch_size": 4, "num_generations": 4, "use_vllm": True}},
         r"routing_replay: rollout records the routing inside transformers' generate.*routing_replay: old_policy"),
        ({"grpo": {"output_dir": "o", "per_device_train_batch_size": 4, "num_generations": 4, "beta": 0.04}}, r"grpo\.beta=0\.04: .*model\.tiny"),
        ({"condenser": {}, "grpo": {"output_dir": "o", "per_device_train_batch_size": 4, "num_generations": 4, "router_aux_loss_coef": 0.01}},
         r"router_aux_loss_coef=0\.01 with condenser: the method is auxiliary-loss free"),
        ({"routing_replay": "r3"}, r"routing_replay: 'r3' is not one of 'none', 'old_policy', 'rollout'"),
        ({"rewards": []}, r"rewards: empty"),
        ({"rewards": [{"type": "accuracy", "pattern": "x"}]}, r"pattern do\(es\) not apply to type accuracy"),
        ({"rewards": [{"type": "accuracy", "benchmark": "mmlu"}]}, r"benchmark 'mmlu' has no answer rule"),
        ({"rewards": [{"type": "accuracy", "extraction": "loose"}]}, r"extraction: 'loose' is not one of"),
        ({"rewards": [{"type": "format", "pattern": "("}]}, r"pattern '\(' is not a valid regular expression"),
        ({"rewards": [{"type": "function"}]}, r"type function needs `function: package\.module:name`"),
        ({"rewards": [{"type": "function", "function": "moe_sft.rl.rewards"}]}, r"is not an import path; write it as package\.module:function"),
        ({"rewards": [{"type": "function", "function": "no_such_pkg.mod:f"}]}, r"cannot import module 'no_such_pkg\.mod'"),
        ({"rewards": [{"type": "function", "function": "moe_sft.rl.rewards:nope"}]}, r"has no attribute 'nope'"),
        ({"rewards": [{"type": "function", "function": "moe_sft.rl.config:DEFAULT_TOP_ENTROPY_QUANTILE"}]}, r"is a float, not a callable"),
        ({"rewards": [{"type": "bleu"}]}, r"rewards\[0\]\.type: 'bleu' is not one of"),
        ({"data": {"files": ["x.jsonl"], "packing": True}}, r"data\.packing: true has no meaning for RL prompts"),
        ({"model": {"tiny": "qwen3_moe", "size": 1}}, r"unknown config key\(s\) model\.size"),
    ],
)
def test_bad_configs_are_refused_naming_the_key(changes, says):
    with pytest.raises(ConfigError, match=says):
        parse_rl_config(base(**changes))


def test_function_reward_by_import_path(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text("def brevity(completions, **kw):\n    return [-len(c) / 100 for c in completions]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = parse_rl_config(base(rewards=[{"type": "function", "function": "my_rewards:brevity", "weight": 0.5}]))
    from moe_sft.rl import build_rewards

    funcs, weights = build_rewards(cfg.rewards)
    assert funcs[0](completions=["abcd", "ab"]) == [-0.04, -0.02] and weights == [0.5]


def test_cli_reports_a_bad_recipe_in_one_line_before_loading(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(base(grpo={"output_dir": str(tmp_path / "o"), "max_step": 2})))
    assert main(["rl", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("moe-sft rl: error: unknown config key(s) grpo.max_step"), err
    assert not (tmp_path / "o").exists()


def test_cli_help_lists_rl(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert " rl " in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["rl", "--help"])
    out = capsys.readouterr().out
    assert "--resume" in out and "--overwrite" in out and "key=value" in out
