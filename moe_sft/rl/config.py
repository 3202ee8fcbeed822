"""The `moe-sft rl` YAML: model, method blocks, prompt data, rewards, GRPO arguments, DeepSpeed.

    model: {path: Qwen/Qwen3-30B-A3B, dtype: bfloat16}     # as in `moe-sft train`
    condenser: {...}                                       # any method blocks, at the top level
    data: {files: [gsm8k_train.jsonl], prompt_template: alpaca}
    rewards:
      - {type: accuracy, benchmark: gsm8k}                 # 1 exactly when `moe-sft eval` says correct
      - {type: format, pattern: "The answer is", weight: 0.1}
      - {type: function, function: my_pkg.rewards:brevity}
    routing_replay: rollout                                # none | old_policy | rollout
    routing_metrics: true
    grpo: {output_dir: ..., num_generations: 8, ...}       # trl.GRPOConfig fields
    deepspeed: configs/deepspeed/zero3.json

Every key is checked before any weight is loaded: unknown keys (at any level, `grpo` included,
against `trl.GRPOConfig`) and ill-typed values are errors that name the key.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from pathlib import Path
from typing import Any, Literal

from ..config import ConfigError, _coerce, apply_overrides, config_class, from_dict, load_yaml
from ..evaluation.extract import RULES
from ..plugins import enabled_methods
from ..train.config import _RESERVED_TRAINING, DataConfig, ModelConfig, TrainConfig, method_keys
from .rewards import import_function

ReplayMode = Literal["none", "old_policy", "rollout"]
# The forking-token mask of "Beyond the 80/20 rule" (arXiv 2506.01939): the policy loss on the
# top 20% highest-entropy completion tokens. TRL's own default (1.0) keeps every token.
DEFAULT_TOP_ENTROPY_QUANTILE = 0.2

_REWARD_FIELDS = {  # reward type -> the fields it reads (besides type and weight)
    "accuracy": ("benchmark", "extraction"),
    "exact_match": (),
    "format": ("pattern",),
    "function": ("function",),
}


@dataclasses.dataclass
class RewardConfig:
    """One reward function; the total reward is the weighted sum (TRL's reward_weights).

    type        accuracy | exact_match | format | function (see moe_sft.rl.rewards)
    benchmark   accuracy: whose answer rule to apply (a `moe-sft eval` benchmark: gsm8k, svamp, ...
                read numbers; aqua letters; boolq, piqa, ... answer words); default gsm8k
    extraction  accuracy: llm_adapters (default) or strict, as `moe-sft eval --extraction`
    pattern     format: a regular expression searched in the completion; default "[Tt]he answer is"
    function    function: import path "package.module:name" of a TRL reward function
    weight      its weight in the sum
    """

    type: Literal["accuracy", "exact_match", "format", "function"] = "accuracy"
    benchmark: str | None = None
    extraction: Literal["llm_adapters", "strict"] | None = None
    pattern: str | None = None
    function: str | None = None
    weight: float = 1.0

    def __post_init__(self):
        used = _REWARD_FIELDS[self.type]
        stray = [f for f in ("benchmark", "extraction", "pattern", "function") if f not in used and getattr(self, f) is not None]
        if stray:
            raise ConfigError(f"rewards: {', '.join(stray)} do(es) not apply to type {self.type}; it reads {', '.join(used) or 'only weight'}")
        if not math.isfinite(self.weight):
            raise ConfigError(f"rewards: weight={self.weight} must be a finite number")
        if self.type == "accuracy":
            self.benchmark = self.benchmark or "gsm8k"
            self.extraction = self.extraction or "llm_adapters"
            if self.benchmark not in RULES:
                raise ConfigError(f"rewards: benchmark {self.benchmark!r} has no answer rule; choose one of {', '.join(RULES)}")
        elif self.type == "format":
            self.pattern = self.pattern if self.pattern is not None else r"[Tt]he answer is"
            try:
                re.compile(self.pattern)
            except re.error as e:
                raise ConfigError(f"rewards: pattern {self.pattern!r} is not a valid regular expression ({e})") from None
        elif self.type == "function":
            if not self.function:
                raise ConfigError("rewards: type function needs `function: package.module:name`")
            import_function(self.function)  # a wrong path fails here, before any model loads


@dataclasses.dataclass
class RLConfig:
    """One `moe-sft rl` run. `methods` is the MoESFTConfig built from the top-level method
    blocks; `grpo` holds `trl.GRPOConfig` fields."""

    model: ModelConfig
    data: DataConfig
    grpo: dict[str, Any]
    rewards: list[RewardConfig]
    methods: Any = dataclasses.field(default_factory=lambda: config_class()())  # a MoESFTConfig
    routing_replay: ReplayMode = "rollout"
    routing_metrics: bool = True
    deepspeed: str | None = None
    source: Path | None = None  # the YAML this was read from (relative paths resolve against it)

    @property
    def output_dir(self) -> Path:
        return Path(self.grpo["output_dir"])

    @property
    def final_dir(self) -> Path:
        return self.output_dir / "final"

    def as_train_config(self) -> TrainConfig:
        """The same run as `moe-sft train` sees one, for the functions shared with it (model and
        tokenizer loading, method preparation, resume and output-folder checks): GRPOConfig
        is a TrainingArguments, so `grpo` is a valid `training` block."""
        return TrainConfig(model=self.model, data=self.data, training=self.grpo, methods=self.methods,
                           deepspeed=self.deepspeed, source=self.source)  # fmt: skip


# Keys of the YAML that are not MoESFTConfig method blocks.
_OWN_KEYS = ("model", "data", "rewards", "grpo", "routing_replay", "routing_metrics", "deepspeed")
_RESERVED_GRPO = {
    **_RESERVED_TRAINING,
    "reward_weights": "set `weight` on each entry of `rewards:`",
    "model_init_kwargs": "the model is loaded from the `model:` block (dtype, attn_implementation, ...)",
}


def _grpo_field_types() -> dict[str, Any]:
    from trl import GRPOConfig

    hints = typing.get_type_hints(GRPOConfig)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(GRPOConfig) if f.init}


def validate_grpo(grpo: dict) -> dict:
    """Check `grpo` keys against trl.GRPOConfig's fields and simple value types; fill in the
    forking-token mask default."""
    if not isinstance(grpo, dict):
        raise ConfigError(f"grpo: expected a mapping of trl.GRPOConfig fields, got {type(grpo).__name__}")
    types_ = _grpo_field_types()
    unknown = sorted(set(grpo) - set(types_))
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {', '.join('grpo.' + k for k in unknown)}: not fields of trl.GRPOConfig (see its "
            "documentation for the valid names)"
        )
    for key, why in _RESERVED_GRPO.items():
        if key in grpo:
            raise ConfigError(f"grpo.{key}: not allowed here; {why}")
    if not grpo.get("output_dir"):
        raise ConfigError("grpo.output_dir is required (checkpoints, logs and the final model go there)")
    out = {k: _coerce(v, types_[k], f"grpo.{k}") for k, v in grpo.items()}
    out.setdefault("top_entropy_quantile", DEFAULT_TOP_ENTROPY_QUANTILE)
    return out


def _check_combination(cfg: RLConfig) -> None:
    """Settings that contradict each other, named with the fix."""
    g = cfg.grpo
    if cfg.routing_replay == "rollout":
        for key in ("use_vllm", "use_transformers_continuous_batching"):
            if g.get(key):
                raise ConfigError(
                    f"routing_replay: rollout records the routing inside transformers' generate, but grpo.{key} generates "
                    "elsewhere; drop grpo." + key + ", or set routing_replay: old_policy (or none)"
                )
    if g.get("beta") and cfg.model.tiny is not None:
        raise ConfigError(
            f"grpo.beta={g['beta']}: TRL loads the KL reference model from the checkpoint's path, and model.tiny has none; "
            "set grpo.beta: 0 or use model.path"
        )
    free = [m.name for m, _ in enabled_methods(cfg.methods) if m.aux_loss_free]
    if free and g.get("router_aux_loss_coef"):
        raise ConfigError(
            f"grpo.router_aux_loss_coef={g['router_aux_loss_coef']} with {', '.join(free)}: the method is auxiliary-loss "
            "free (its router bias balances or sparsifies); drop grpo.router_aux_loss_coef"
        )
    _check_generation_batch(g)
    for key in ("packing", "mask_history"):
        if getattr(cfg.data, key):
            raise ConfigError(f"data.{key}: true has no meaning for RL prompts (nothing is trained on the data itself); drop it")


def _check_generation_batch(grpo: dict) -> None:
    """GRPO's groups: every generation batch holds whole groups of num_generations completions
    of one prompt (TRL checks this when GRPOConfig is built, which is after the model loads)."""
    from trl import GRPOConfig

    from ..train.deepspeed import distributed_world_size

    default = {f.name: f.default for f in dataclasses.fields(GRPOConfig)}
    get = lambda key: grpo.get(key, default[key])  # noqa: E731
    n, per, world = get("num_generations"), get("per_device_train_batch_size"), distributed_world_size()
    if n < 2:
        raise ConfigError(f"grpo.num_generations={n}: GRPO needs at least 2 completions per prompt (advantages are relative to the group)")
    steps = get("steps_per_generation") or get("gradient_accumulation_steps")
    batch = get("generation_batch_size") or per * world * steps
    if batch % n:
        raise ConfigError(
            f"grpo: the generation batch ({batch} completions = per_device_train_batch_size {per} x {world} process(es) x "
            f"{steps} step(s) per generation, or generation_batch_size) must hold whole groups of num_generations={n}; "
            "make it a multiple of num_generations"
        )


def parse_rl_config(data: dict, source: Path | None = None) -> RLConfig:
    """Validate a plain dict (a loaded YAML with overrides applied) into an RLConfig."""
    methods = method_keys()
    unknown = sorted(set(data) - set(methods) - set(_OWN_KEYS))
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {', '.join(unknown)}; valid top-level keys: {', '.join(_OWN_KEYS)} and the method "
            f"blocks {', '.join(methods)}"
        )
    for key in ("model", "data", "grpo", "rewards"):
        if key not in data:
            raise ConfigError(f"missing required top-level key `{key}`")
    if data.get("deepspeed") is not None and not isinstance(data["deepspeed"], str):
        raise ConfigError(f"deepspeed: expected a file path, got {data['deepspeed']!r}")
    rewards = _coerce(data["rewards"], list[RewardConfig], "rewards")
    if not rewards:
        raise ConfigError("rewards: empty; list at least one, e.g. [{type: accuracy, benchmark: gsm8k}]")
    cfg = RLConfig(
        model=_coerce(data["model"], ModelConfig, "model"),
        data=_coerce(data["data"], DataConfig, "data"),
        grpo=validate_grpo(data["grpo"]),
        rewards=rewards,
        methods=from_dict(config_class(), {k: data[k] for k in methods if k in data}),
        routing_replay=_coerce(data.get("routing_replay", "rollout"), ReplayMode, "routing_replay"),
        routing_metrics=_coerce(data.get("routing_metrics", True), bool, "routing_metrics"),
        deepspeed=data.get("deepspeed"),
        source=source,
    )
    _check_combination(cfg)
    return cfg


def load_rl_config(path: str | Path, overrides: list[str] | None = None) -> RLConfig:
    """Read an RL YAML, apply `key=value` overrides (e.g. grpo.learning_rate=1e-6), validate."""
    path = Path(path)
    return parse_rl_config(apply_overrides(load_yaml(path), overrides or []), source=path)
