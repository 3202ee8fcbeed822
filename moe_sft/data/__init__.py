"""Training data for every consumer: `moe-sft train`, ESFT / pruning profiling, RL prompts.

Formats (alpaca, sharegpt, OpenAI messages, prompt/completion, pre-tokenised), sources (local
files and folders, `save_to_disk` folders, hub ids), LLaMA-Factory's `dataset_info.json`
registry, mixing, prompt templates and statistics. See docs/data.md.

Configured by `moe_sft.train.config.DataConfig` (the `data:` block of a `moe-sft train` YAML).
"""

import importlib

# Public names and the submodule that defines each, imported on first use: the config classes
# validate against `moe_sft.data.formats` without loading torch, datasets or the tokenizer stack.
_EXPORTS = {
    "FORMATS": "formats",
    "Completion": "formats",
    "Conversation": "formats",
    "Text": "formats",
    "Tokens": "formats",
    "Turn": "formats",
    "detect": "formats",
    "parse": "formats",
    "profile_texts": "loader",
    "read_records": "loader",
    "source_specs": "loader",
    "tokenize": "loader",
    "STRATEGIES": "mixing",
    "IGNORE_INDEX": "records",
    "DataError": "records",
    "Record": "records",
    "RLPrompt": "rl",
    "rl_prompts": "rl",
    "SourceSpec": "sources",
    "open_source": "sources",
    "DataStats": "stats",
    "SourceStats": "stats",
    "Encoder": "templates",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'moe_sft.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
