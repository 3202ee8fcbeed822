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
from .parallel import ParallelConfig


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
    """Training data (docs/data.md has every key with its LLaMA-Factory equivalent).

    files            data to read, each one dataset: local .json (a list, or JSON Lines) / .jsonl /
                     .parquet / .csv files, folders of them, `save_to_disk` folders, or hub dataset ids
    sources          datasets with their own options (DataConfig.Source: subset, split, revision,
                     columns, tags, streaming, max_samples, ...), read after `files`
    dataset          LLaMA-Factory registry names ("alpaca_en_demo,identity" or a list), entries of
                     `<dataset_dir>/dataset_info.json`, read after `sources`
    dataset_dir      the folder of that dataset_info.json (`ONLINE`: the names are hub ids)
    split            split of hub / folder datasets (default of every source)
    format           auto (decided per source from its first record), llm_adapters (Alpaca records:
                     instruction/input/output, system, history; `alpaca` is the same), sharegpt
                     (conversations), messages (OpenAI chat; `openai` is the same), prompt_completion,
                     tokenized (input_ids/labels), text (profiling only)
    prompt_template  alpaca: alpaca records through LLM-Adapters' prompt (as its evaluation uses), chat
                     records through the tokenizer's chat template; chat: every record through the
                     tokenizer's chat template; or the path of a Jinja chat template file (.jinja)
    mask_history     train on the last assistant turn only (default: every assistant turn)
    max_length       longer examples are truncated (the count and the longest are reported)
    packing          pack several examples per row (attention stays within each example)
    max_samples      use only the first N records of each dataset
    mix_strategy     concat, or interleave_under / interleave_over / interleave_once (sampling by
                     `interleave_probs`: stop at the first exhausted dataset / repeat until all are
                     used / each record at most once)
    interleave_probs one probability per dataset (a list, or "0.7,0.3"), summing to 1
    seed             seed of interleaving and `num_samples` sampling
    streaming        stream hub datasets instead of downloading them whole (read up to max_samples)
    profile_samples  examples (a seeded random sample) for profiling passes run before training
                     (ESFT's expert scores)
    """

    # alpaca / openai: LLaMA-Factory's names of llm_adapters / messages, resolved on construction
    Format = Literal["auto", "llm_adapters", "sharegpt", "messages", "prompt_completion", "tokenized", "text", "alpaca",
                     "openai"]  # fmt: skip

    @dataclasses.dataclass
    class Source:
        """One dataset with its own options; unset ones follow the data block's.

        path         local file / folder / save_to_disk folder, or hub dataset id
        subset       hub config name (`load_dataset(path, subset)`)
        data_dir     sub-folder of the dataset repository (LLaMA-Factory's `folder`)
        columns      rename {column in the data: field the format reads}, e.g. {question: instruction}
        tags         ShareGPT keys and role names, LLaMA-Factory's `tags` (role_tag, content_tag,
                     user_tag, assistant_tag, observation_tag, function_tag, system_tag)
        num_samples  a seeded random sample of this many records (repeated when larger)
        """

        path: str
        format: DataConfig.Format | None = None  # default: the data block's
        subset: str | None = None
        split: str | None = None
        revision: str | None = None
        data_dir: str | None = None
        columns: dict[str, str] | None = None
        tags: dict[str, str] | None = None
        streaming: bool | None = None
        max_samples: int | None = None
        num_samples: int | None = None

        def __post_init__(self):
            from ..data.formats import FORMAT_ALIASES, SHAREGPT_TAGS

            self.format = FORMAT_ALIASES.get(self.format, self.format)
            if not self.path:
                raise ConfigError("data.sources[].path is empty; give a file, folder or hub dataset id")
            unknown = sorted(set(self.tags or {}) - set(SHAREGPT_TAGS))
            if unknown:
                raise ConfigError(f"data.sources[{self.path!r}].tags: unknown keys {unknown}; valid: {', '.join(SHAREGPT_TAGS)}")
            for key in ("max_samples", "num_samples"):
                if getattr(self, key) is not None and getattr(self, key) < 1:
                    raise ConfigError(f"data.sources[{self.path!r}].{key}={getattr(self, key)} must be positive (or null)")

    files: list[str] = dataclasses.field(default_factory=list)
    split: str = "train"
    format: DataConfig.Format = "auto"
    prompt_template: str = "alpaca"
    max_length: int = 1024
    packing: bool = False
    max_samples: int | None = None
    profile_samples: int = 256
    sources: list[DataConfig.Source] = dataclasses.field(default_factory=list)
    dataset: str | list[str] | None = None
    dataset_dir: str = "data"
    mix_strategy: Literal["concat", "interleave_under", "interleave_over", "interleave_once"] = "concat"
    interleave_probs: str | list[float] | None = None
    seed: int = 42
    mask_history: bool = False
    streaming: bool = False

    def __post_init__(self):
        from ..data.formats import FORMAT_ALIASES

        self.format = FORMAT_ALIASES.get(self.format, self.format)
        self.dataset = self._names(self.dataset)
        n = len(self.files) + len(self.sources) + len(self.dataset)
        if n == 0:
            raise ConfigError("data: no data; list files (data.files), sources (data.sources) or LLaMA-Factory "
                              "registry names (data.dataset with data.dataset_dir)")  # fmt: skip
        if self.max_length < 2:
            raise ConfigError(f"data.max_length={self.max_length} must be at least 2")
        if self.profile_samples < 1:
            raise ConfigError(f"data.profile_samples={self.profile_samples} must be positive")
        if self.max_samples is not None and self.max_samples < 1:
            raise ConfigError(f"data.max_samples={self.max_samples} must be positive (or null for all)")
        if self.prompt_template not in ("alpaca", "chat") and not self.prompt_template.endswith((".jinja", ".j2")):
            raise ConfigError(f"data.prompt_template={self.prompt_template!r}: give `alpaca`, `chat` or the path of a "
                              "Jinja chat template file ending in .jinja")  # fmt: skip
        self.interleave_probs = self._probs(self.interleave_probs, self.mix_strategy, n)

    @staticmethod
    def _names(value) -> list[str]:
        """data.dataset as a list of names: "a,b" (LLaMA-Factory's form) or a list."""
        if value is None:
            return []
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
            raise ConfigError(f"data.dataset: expected names as \"a,b\" or a list of strings, got {value!r}")
        return [x.strip() for x in items if x.strip()]

    @staticmethod
    def _probs(value, strategy: str, n: int) -> list[float] | None:
        """data.interleave_probs as floats: one per dataset, summing to 1, only when interleaving."""
        if value is None:
            return None
        items = value.split(",") if isinstance(value, str) else value
        try:
            probs = [float(x) for x in items]
        except (TypeError, ValueError):
            raise ConfigError(f"data.interleave_probs: expected numbers (a list or \"0.7,0.3\"), got {value!r}") from None
        if strategy == "concat":
            raise ConfigError(f"data.interleave_probs={probs} needs interleaving; set data.mix_strategy: interleave_under "
                              "(or interleave_over / interleave_once)")  # fmt: skip
        if len(probs) != n or not all(p >= 0 for p in probs) or not abs(sum(probs) - 1) <= 1e-6:  # NaN fails too
            raise ConfigError(f"data.interleave_probs={probs}: give {n} non-negative probabilities (one per dataset, in the "
                              f"order files, sources, dataset) that sum to 1 (they sum to {sum(probs):g})")  # fmt: skip
        return probs


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
    parallel: ParallelConfig | None = None  # expert / tensor / FSDP2 parallelism (moe_sft.train.parallel)
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
_OWN_KEYS = ("model", "data", "training", "deepspeed", "parallel", "then")
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
    for k, v in training.items():
        accepts = typing.get_args(types_[k]) or (types_[k],)
        if isinstance(v, bool) and bool not in accepts and any(a is str or isinstance(a, type) and issubclass(a, str) for a in accepts):
            # YAML 1.1 reads the words no/yes/off/on as booleans; these fields take words.
            raise ConfigError(f"training.{k}: got {str(v).lower()} (YAML reads no/yes/off/on as booleans); quote the word, e.g. {k}: 'no'")
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
        parallel=_coerce(data.get("parallel"), ParallelConfig | None, "parallel"),
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
