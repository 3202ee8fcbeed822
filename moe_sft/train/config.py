"""The `moe-sft train` YAML: model, method blocks, data, training arguments, DeepSpeed.

    # moe-sft train configs/tiny/qwen3_moe_condenser.yaml
    model: {path: Qwen/Qwen3-30B-A3B, dtype: bfloat16}
    condenser: {gamma: 1.0e-3}            # any MoESFTConfig field, at the top level
    data: {files: [commonsense_170k.json], max_length: 1024}
    training: {output_dir: out/run, learning_rate: 1.0e-5, bf16: true}   # TrainingArguments fields
    deepspeed: configs/deepspeed/zero3.json

Every key is checked before any weight is loaded: unknown keys (at any level, `training`
included, against `transformers.TrainingArguments`) and ill-typed values are errors that
name the key.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any, Literal

from ..config import ConfigError, _coerce, apply_overrides, config_class, from_dict, load_yaml


@dataclasses.dataclass
class ModelConfig:
    """The model to fine-tune.

    path      local folder or hub id of a supported MoE causal LM (a patched checkpoint
              saved by moe_sft is restored with its own moe_sft config first)
    tiny      instead of `path`: build `moe_sft.testing.tiny_model(tiny)` (a random tiny
              model of that model_type, for CPU demos and tests)
    tokenizer folder or hub id of the tokenizer; default `path` (the tiny character-level
              tokenizer of `moe_sft.testing` for `tiny` models)
    """

    path: str | None = None
    tiny: str | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    attn_implementation: str | None = None
    experts_implementation: str | None = None
    tokenizer: str | None = None
    seed: int = 0  # initialisation seed of a `tiny` model

    def __post_init__(self):
        if (self.path is None) == (self.tiny is None):
            raise ConfigError(
                f"model: give exactly one of `path` (a checkpoint) or `tiny` (a model_type), got path={self.path!r}, "
                f"tiny={self.tiny!r}"
            )
        if self.tiny is not None:
            from ..testing import TINY_CONFIGS

            if self.tiny not in TINY_CONFIGS:
                raise ConfigError(
                    f"model.tiny: {self.tiny!r} is not a tiny model_type; choose one of {', '.join(sorted(TINY_CONFIGS))} "
                    "(or set model.path to a checkpoint)"
                )


@dataclasses.dataclass
class DataConfig:
    """Training data.

    files            local .json (a list of records) / .jsonl files, or hub dataset ids
                     (loaded with `datasets.load_dataset(id, split=split)`)
    format           llm_adapters: {instruction, input, output} records; messages: chat records
                     {messages: [{role, content}, ...]}; auto: decided per record
    prompt_template  how llm_adapters records become text: `alpaca` (LLM-Adapters' prompt, as its
                     evaluation uses) or `chat` (instruction+input as the user turn, output as the
                     assistant turn, through the tokenizer's chat template)
    max_length       longer examples are truncated (the count is reported)
    packing          pack several examples per row (attention stays within each example)
    max_samples      use only the first N records (after concatenating `files`)
    profile_samples  examples (a seeded random sample) for profiling passes run before training
                     (ESFT's expert scores)
    """

    files: list[str]
    split: str = "train"
    format: Literal["auto", "llm_adapters", "messages"] = "auto"
    prompt_template: Literal["alpaca", "chat"] = "alpaca"
    max_length: int = 1024
    packing: bool = False
    max_samples: int | None = None
    profile_samples: int = 256

    def __post_init__(self):
        if not self.files:
            raise ConfigError("data.files is empty; list at least one .json/.jsonl file or hub dataset id")
        if self.max_length < 2:
            raise ConfigError(f"data.max_length={self.max_length} must be at least 2")
        if self.profile_samples < 1:
            raise ConfigError(f"data.profile_samples={self.profile_samples} must be positive")
        if self.max_samples is not None and self.max_samples < 1:
            raise ConfigError(f"data.max_samples={self.max_samples} must be positive (or null for all)")


@dataclasses.dataclass
class TrainConfig:
    """One `moe-sft train` run. `methods` is the MoESFTConfig built from the top-level method
    blocks; `training` holds `transformers.TrainingArguments` fields; `then` names the YAML of
    a next phase, which starts from this run's final model (two-phase recipes)."""

    model: ModelConfig
    data: DataConfig
    training: dict[str, Any]
    methods: Any = dataclasses.field(default_factory=lambda: config_class()())  # a MoESFTConfig
    deepspeed: str | None = None
    then: str | None = None
    source: Path | None = None  # the YAML this was read from (relative paths resolve against it)

    @property
    def output_dir(self) -> Path:
        return Path(self.training["output_dir"])

    @property
    def final_dir(self) -> Path:
        """Where the trained model is saved (loadable with `moe_sft.from_pretrained`)."""
        return self.output_dir / "final"


# Keys of the YAML that are not MoESFTConfig method blocks.
_OWN_KEYS = ("model", "data", "training", "deepspeed", "then")
# TrainingArguments fields that the YAML sets elsewhere or that moe_sft sets itself.
_RESERVED_TRAINING = {
    "deepspeed": "set `deepspeed:` at the top level of the YAML",
    "accelerator_config": "moe_sft sets it (CPU runs need a pre-configured accelerate state)",
    "local_rank": "set by the launcher",
}


def method_keys() -> list[str]:
    """The MoESFTConfig fields (core fields and method blocks), allowed at the top level."""
    return [f.name for f in dataclasses.fields(config_class())]


def _training_field_types() -> dict[str, Any]:
    from transformers import TrainingArguments

    hints = typing.get_type_hints(TrainingArguments)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(TrainingArguments) if f.init}


def validate_training(training: dict) -> dict:
    """Check `training` keys against TrainingArguments' fields and simple value types."""
    if not isinstance(training, dict):
        raise ConfigError(f"training: expected a mapping of TrainingArguments fields, got {type(training).__name__}")
    types_ = _training_field_types()
    unknown = sorted(set(training) - set(types_))
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {', '.join('training.' + k for k in unknown)}: not fields of "
            f"transformers.TrainingArguments (see its documentation for the valid names)"
        )
    for key, why in _RESERVED_TRAINING.items():
        if key in training:
            raise ConfigError(f"training.{key}: not allowed here; {why}")
    if not training.get("output_dir"):
        raise ConfigError("training.output_dir is required (checkpoints, logs and the final model go there)")
    return {k: _coerce(v, types_[k], f"training.{k}") for k, v in training.items()}


def parse_train_config(data: dict, source: Path | None = None) -> TrainConfig:
    """Validate a plain dict (a loaded YAML with overrides applied) into a TrainConfig."""
    methods = method_keys()
    clash = set(methods) & set(_OWN_KEYS)
    if clash:
        raise RuntimeError(f"MoESFTConfig fields {sorted(clash)} clash with train config keys")
    unknown = sorted(set(data) - set(methods) - set(_OWN_KEYS))
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {', '.join(unknown)}; valid top-level keys: {', '.join(_OWN_KEYS)} "
            f"and the method blocks {', '.join(methods)}"
        )
    for key in ("model", "data", "training"):
        if key not in data:
            raise ConfigError(f"missing required top-level key `{key}`")
    for key in ("deepspeed", "then"):
        if data.get(key) is not None and not isinstance(data[key], str):
            raise ConfigError(f"{key}: expected a file path, got {data[key]!r}")
    return TrainConfig(
        model=_coerce(data["model"], ModelConfig, "model"),
        data=_coerce(data["data"], DataConfig, "data"),
        training=validate_training(data["training"]),
        methods=from_dict(config_class(), {k: data[k] for k in methods if k in data}),
        deepspeed=data.get("deepspeed"),
        then=data.get("then"),
        source=source,
    )


def load_train_config(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """Read a train YAML, apply `key=value` overrides (e.g. training.learning_rate=1e-5), validate."""
    path = Path(path)
    return parse_train_config(apply_overrides(load_yaml(path), overrides or []), source=path)


def resolve_path(cfg: TrainConfig, name: str) -> Path:
    """A file named in the YAML: as given (absolute or relative to the working directory),
    else relative to the YAML's folder or one of its parents (so recipes run from anywhere
    inside a checkout)."""
    p = Path(name)
    if p.is_absolute() or p.exists() or cfg.source is None:
        return p
    for base in cfg.source.resolve().parents:
        if (base / p).exists():
            return base / p
    return p
