"""RL for native MoE models: `moe-sft rl` (TRL's GRPO with verifiable rewards), the forking-token
mask, routing replay. See docs/rl.md.

    from moe_sft.rl import MoEGRPOTrainer            # TRL's GRPOTrainer + routing replay + MoE metrics
    from moe_sft.rl import run_rl, train_rl          # the `moe-sft rl` recipe (YAML path / RLConfig)
    from moe_sft.rl import parse_rl_config           # a plain dict (e.g. written by the demo) -> RLConfig

- `config`: the YAML (RLConfig, RewardConfig; unknown keys are errors)
- `rewards`: accuracy (the evaluation's extraction), exact_match, format, user functions
- `replay`: recording routed experts (generate's KV-cache path, scoring forwards) and replaying them
- `trainer`: MoEGRPOTrainer
- `recipe`: the job (train_rl / run_rl) and its RLResult
"""

import importlib

# Public names and the submodule that defines each, imported on first use (trl is heavy).
_EXPORTS = {
    "RLConfig": "config",
    "RewardConfig": "config",
    "load_rl_config": "config",
    "parse_rl_config": "config",
    "AccuracyReward": "rewards",
    "ExactMatchReward": "rewards",
    "FormatReward": "rewards",
    "build_rewards": "rewards",
    "GenerationRecorder": "replay",
    "RoutingCapture": "replay",
    "MoEGRPOTrainer": "trainer",
    "RLResult": "recipe",
    "run_rl": "recipe",
    "train_rl": "recipe",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'moe_sft.rl' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
