"""The benchmark table, the prompt template and loading + validating benchmark data.

Data is LLM-Adapters' format: a JSON list (or JSONL) of records with `instruction`, optional
`input`, and `answer`, the gold label. `output` is a model-written rationale and is never used.
A benchmark's data comes from, in order: an explicit source (`--data name=PATH_OR_HUB_ID`),
`--data-dir DIR` (`DIR/<folder>/test.json`, LLM-Adapters' layout), or the shared copy beside
the repository (`../shared/data/llm-adapters/dataset`, or `$MOE_SFT_SHARED_DATA/dataset`)
when it exists.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..config import ConfigError
from .extract import RULES, Rule, parse_gold

logger = logging.getLogger(__name__)


class DataError(ConfigError):
    """A benchmark file is missing or malformed; the message names the file and the record."""


@dataclass(frozen=True)
class Benchmark:
    name: str  # command-line key, also the key of extract.RULES
    title: str  # table header
    group: Literal["math", "commonsense"]
    folder: str  # LLM-Adapters' dataset/<folder>/test.json
    max_new_tokens: int  # LLM-Adapters' generation budget: 256 for math, 32 for commonsense

    @property
    def rule(self) -> Rule:
        return RULES[self.name]


def _table(*rows: tuple) -> dict[str, Benchmark]:
    return {row[0]: Benchmark(*row) for row in rows}


# In the order of the papers' tables.
BENCHMARKS: dict[str, Benchmark] = _table(
    ("gsm8k", "GSM8K", "math", "gsm8k", 256),
    ("svamp", "SVAMP", "math", "SVAMP", 256),
    ("mawps", "MAWPS", "math", "mawps", 256),
    ("aqua", "AQuA", "math", "AQuA", 256),
    ("addsub", "AddSub", "math", "AddSub", 256),
    ("multiarith", "MultiArith", "math", "MultiArith", 256),
    ("singleeq", "SingleEq", "math", "SingleEq", 256),
    ("boolq", "BoolQ", "commonsense", "boolq", 32),
    ("piqa", "PIQA", "commonsense", "piqa", 32),
    ("siqa", "SIQA", "commonsense", "social_i_qa", 32),
    ("hellaswag", "HellaSwag", "commonsense", "hellaswag", 32),
    ("winogrande", "WinoGrande", "commonsense", "winogrande", 32),
    ("arc_e", "ARC-e", "commonsense", "ARC-Easy", 32),
    ("arc_c", "ARC-c", "commonsense", "ARC-Challenge", 32),
    ("obqa", "OBQA", "commonsense", "openbookqa", 32),
)
GROUPS = ("math", "commonsense")

# Alpaca-style template used by LLM-Adapters for training and evaluation (without the
# indentation their triple-quoted strings put in front of every line).
PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)


def format_prompt(instruction: str, input: str = "") -> str:
    if input:
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return PROMPT.format(instruction=instruction)


@dataclass(frozen=True)
class Example:
    index: int  # position in the data file
    instruction: str
    input: str
    answer: str  # gold label as written in the file

    @property
    def prompt(self) -> str:
        return format_prompt(self.instruction, self.input)


def _aliases() -> dict[str, str]:
    names = {}
    for b in BENCHMARKS.values():
        for alias in (b.name, b.folder, b.title):
            names[alias.lower().replace("-", "_")] = b.name
    return names


def benchmark(name: str) -> Benchmark:
    key = _aliases().get(name.strip().lower().replace("-", "_"))
    if key is None:
        raise ConfigError(
            f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)} or the groups {' / '.join(GROUPS)}"
        )
    return BENCHMARKS[key]


def expand(spec: str | list[str]) -> tuple[list[Benchmark], set[str]]:
    """Benchmarks named by `spec` ("gsm8k,boolq", "math", "math,commonsense" or a list), in
    table order, and the names that came from a group (those may be skipped for lack of data)."""
    items = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    if not items:
        raise ConfigError("no benchmarks given; name some (gsm8k,boolq,...) or a group: math, commonsense")
    chosen: dict[str, bool] = {}  # name -> named explicitly
    for item in items:
        if item.lower() in GROUPS:
            for b in BENCHMARKS.values():
                if b.group == item.lower():
                    chosen.setdefault(b.name, False)
        else:
            chosen[benchmark(item).name] = True
    ordered = [b for b in BENCHMARKS.values() if b.name in chosen]
    return ordered, {name for name, explicit in chosen.items() if not explicit}


def shared_data_dir() -> Path | None:
    """The shared LLM-Adapters copy (`dataset/` folder) if present: `$MOE_SFT_SHARED_DATA` or
    `<repo>/../shared/data/llm-adapters`. A convenience for this project's checkout only."""
    root = os.environ.get("MOE_SFT_SHARED_DATA")
    base = Path(root) if root else Path(__file__).resolve().parents[3] / "shared" / "data" / "llm-adapters"
    return base / "dataset" if (base / "dataset").is_dir() else None


# "org/name" or "name": anything else that is not an existing file is a mistyped path
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def resolve_source(bench: Benchmark, data: dict[str, str] | None = None, data_dir: str | None = None) -> str | None:
    """Where `bench`'s data comes from: a local file path or a hub id; None when nothing is given
    and the shared copy lacks it."""
    for key, spec in (data or {}).items():
        if benchmark(key).name == bench.name:
            path = Path(spec).expanduser()
            if path.is_dir():
                path = path / "test.json"
            if path.is_file():
                return str(path.resolve())
            if spec.endswith((".json", ".jsonl")) or not _HUB_ID.match(spec):
                raise DataError(f"--data {key}={spec}: no such file (nor a hub dataset id)")
            return spec  # a hub id for `datasets.load_dataset`
    for base in ([Path(data_dir).expanduser()] if data_dir else []) + [shared_data_dir()]:
        if base is not None and (base / bench.folder / "test.json").is_file():
            return str((base / bench.folder / "test.json").resolve())
    if data_dir:
        raise DataError(
            f"{bench.name}: {Path(data_dir) / bench.folder / 'test.json'} does not exist; "
            f"pass --data {bench.name}=PATH_OR_HUB_ID or a --data-dir that has it"
        )
    return None


def _read_records(source: str, split: str) -> list:
    path = Path(source)
    if path.is_file():
        text = path.read_text(encoding="utf-8")
        try:
            if path.suffix == ".jsonl":
                return [json.loads(line) for line in text.splitlines() if line.strip()]
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{source}: not valid JSON ({e})") from None
    import datasets

    logger.info("loading %s (split %s) with datasets.load_dataset", source, split)
    return list(datasets.load_dataset(source, split=split))


def load_examples(bench: Benchmark, source: str, *, split: str = "test") -> list[Example]:
    """Read and validate `bench`'s records from `source` (file or hub id). Every problem is a
    `DataError` naming the file and the record index, raised before any generation."""
    records = _read_records(source, split)
    if not isinstance(records, list):
        raise DataError(
            f"{source}: the top level is a {type(records).__name__}, expected a list of records "
            '{"instruction": ..., "input": ..., "answer": ...} (LLM-Adapters format)'
        )
    if not records:
        raise DataError(f"{source}: no records")
    examples = []
    for i, rec in enumerate(records):
        where = f"{source}: record {i}"
        if not isinstance(rec, dict):
            raise DataError(f"{where} is a {type(rec).__name__}, expected a mapping with 'instruction' and 'answer'")
        for key in ("instruction", "answer"):
            if rec.get(key) in (None, ""):
                raise DataError(
                    f"{where} has no {key!r} (keys: {sorted(rec)}); {bench.name} needs 'instruction' and the gold "
                    "label in 'answer' ('output' is a rationale, never the gold)"
                )
        try:
            parse_gold(bench.rule, rec["answer"])
        except ValueError as e:
            raise DataError(f"{where}: {e} (benchmark {bench.name})") from None
        examples.append(Example(i, str(rec["instruction"]), str(rec.get("input") or ""), str(rec["answer"])))
    return examples
