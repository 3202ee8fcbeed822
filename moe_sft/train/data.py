"""SFT data: read records, render prompts, tokenize with the prompt masked, pack, collate.

Records come from local .json (a list) / .jsonl files or hub datasets, in one of two formats:
  llm_adapters  {"instruction", "input" (may be empty), "output"}: the target is `output`
  messages      {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
Only response tokens carry labels; prompt tokens get -100 (ignored by the loss). Every record
is checked before training; a malformed one raises DataError naming the file and line/record.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from ..config import ConfigError
from ..evaluation.benchmarks import format_prompt as alpaca_prompt  # one prompt for training and evaluation
from .config import DataConfig

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100

class DataError(ConfigError):
    """A data file or record is malformed; the message names the file and line or record."""


@dataclass
class Record:
    where: str  # "path/to/file.jsonl line 7", "file.json record 3", "hub org/name (train) record 5"
    data: dict


# ---- reading -------------------------------------------------------------------------------
def _read_json_file(path: Path) -> Iterator[Record]:
    if path.suffix == ".jsonl":
        with path.open() as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path} line {lineno}: not valid JSON ({e.msg})") from None
                yield Record(f"{path} line {lineno}", rec)
        return
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path} line {e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: a .json data file must hold a list of records, found {type(data).__name__}")
    for i, rec in enumerate(data, 1):
        yield Record(f"{path} record {i}", rec)


def _read_hub(name: str, split: str) -> Iterator[Record]:
    import datasets

    ds = datasets.load_dataset(name, split=split)
    for i, rec in enumerate(ds, 1):
        yield Record(f"hub dataset {name} ({split}) record {i}", dict(rec))


def read_records(cfg: DataConfig, resolve=lambda name: Path(name)) -> list[Record]:
    """All records of `cfg.files` in order (the first `max_samples` if set)."""
    out: list[Record] = []
    for name in cfg.files:
        path = resolve(name)
        if path.is_file():
            source = _read_json_file(path)
        elif path.suffix in (".json", ".jsonl") or path.exists():
            raise DataError(f"data file {name!r} not found (looked at {path}); give a .json/.jsonl file or a hub dataset id")
        else:
            source = _read_hub(name, cfg.split)
        for rec in source:
            out.append(rec)
            if cfg.max_samples is not None and len(out) >= cfg.max_samples:
                return out
    if not out:
        raise DataError(f"data.files {cfg.files} hold no records")
    return out


def _record_format(rec: Record, fmt: str) -> str:
    d = rec.data
    if not isinstance(d, dict):
        raise DataError(f"{rec.where}: a record must be a JSON object, got {type(d).__name__}")
    if fmt == "auto":
        if "messages" in d:
            fmt = "messages"
        elif "instruction" in d:
            fmt = "llm_adapters"
        else:
            raise DataError(
                f"{rec.where}: cannot tell the format (keys {sorted(d)}); expected `instruction`/`input`/`output` "
                "(llm_adapters) or `messages` (chat)"
            )
    if fmt == "llm_adapters":
        for key in ("instruction", "output"):
            if not isinstance(d.get(key), str):
                raise DataError(f"{rec.where}: llm_adapters record needs a string `{key}`, got {d.get(key)!r}")
        if not d["instruction"].strip():
            raise DataError(f"{rec.where}: empty `instruction`")
        if not isinstance(d.get("input", ""), (str, type(None))):
            raise DataError(f"{rec.where}: `input` must be a string, got {d['input']!r}")
    else:
        msgs = d.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise DataError(f"{rec.where}: `messages` must be a non-empty list of {{role, content}} objects")
        for j, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise DataError(f"{rec.where}: messages[{j}] must be an object with string `role` and `content`, got {m!r}")
        if not any(m["role"] == "assistant" for m in msgs):
            raise DataError(f"{rec.where}: no `assistant` message, so nothing to train on")
    return fmt


# ---- tokenizing with the prompt masked --------------------------------------------------------
def _encode_alpaca(tokenizer, d: dict) -> tuple[list[int], list[int]]:
    # Prompt and response are tokenized separately so the boundary is exact; the response
    # ends with EOS so the model learns to stop.
    prompt = tokenizer(alpaca_prompt(d["instruction"], d.get("input") or ""), add_special_tokens=True)["input_ids"]
    response = tokenizer(d["output"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompt + response, [IGNORE_INDEX] * len(prompt) + response


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _encode_chat(tokenizer, messages: list[dict], where: str) -> tuple[list[int], list[int]]:
    """Render with the chat template; label the characters each assistant turn adds after the
    generation prompt (its content and end-of-turn marker), then map characters to tokens."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError(f"{where}: chat records need a tokenizer with a chat template; {type(tokenizer).__name__} has none")
    text = _render(tokenizer, messages, False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], True)
        upto = _render(tokenizer, messages[: i + 1], False)
        if not (text.startswith(before) and text.startswith(upto) and len(upto) >= len(before)):
            raise DataError(
                f"{where}: the tokenizer's chat template does not render conversations prefix by prefix, so the "
                "assistant turns cannot be located; use an llm_adapters record or a prefix-stable template"
            )
        spans.append((len(before), len(upto)))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    labels = [
        tok if any(a <= start < b for a, b in spans) else IGNORE_INDEX
        for tok, (start, _end) in zip(ids, enc["offset_mapping"])
    ]
    return ids, labels


def encode_record(tokenizer, rec: Record, cfg: DataConfig) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one record; labels are -100 on prompt tokens."""
    fmt = _record_format(rec, cfg.format)
    d = rec.data
    if fmt == "messages":
        return _encode_chat(tokenizer, d["messages"], rec.where)
    if cfg.prompt_template == "chat":
        user = d["instruction"] + (f"\n\n{d['input']}" if d.get("input") else "")
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": d["output"]}]
        return _encode_chat(tokenizer, messages, rec.where)
    return _encode_alpaca(tokenizer, d)


# ---- dataset ----------------------------------------------------------------------------------
@dataclass
class DataStats:
    records: int = 0
    examples: int = 0
    truncated: int = 0
    dropped: int = 0  # nothing left to train on after truncation
    tokens: int = 0
    target_tokens: int = 0
    rows: int = 0  # training rows (fewer than examples when packing)
    notes: list[str] = field(default_factory=list)

    def summary(self, max_length: int) -> str:
        return (
            f"{self.records} records -> {self.examples} examples in {self.rows} rows, {self.tokens} tokens "
            f"({self.target_tokens} with labels); {self.truncated} truncated to max_length={max_length}, "
            f"{self.dropped} dropped (no response token left after truncation)"
        )


class SFTDataset(torch.utils.data.Dataset):
    """Tokenized rows: dicts of `input_ids`, `labels` and, when packed, `position_ids`.
    `examples` keeps the unpacked (input_ids, labels) pairs (for profiling passes)."""

    def __init__(self, rows: list[dict], stats: DataStats, examples: list[tuple[list[int], list[int]]], pad_id: int):
        self.rows = rows
        self.stats = stats
        self.examples = examples
        self.pad_id = pad_id

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]


def _pack(examples: list[tuple[list[int], list[int]]], max_length: int) -> list[dict]:
    """Concatenate consecutive examples into rows of at most max_length tokens. Position ids
    restart at 0 for every example, which transformers reads as separate sequences (a
    block-diagonal causal mask), so no example attends to another."""
    rows, ids, labels, pos = [], [], [], []
    for x, y in examples:
        if ids and len(ids) + len(x) > max_length:
            rows.append({"input_ids": ids, "labels": labels, "position_ids": pos})
            ids, labels, pos = [], [], []
        ids, labels, pos = ids + x, labels + y, pos + list(range(len(x)))
    if ids:
        rows.append({"input_ids": ids, "labels": labels, "position_ids": pos})
    return rows


def build_dataset(tokenizer, cfg: DataConfig, resolve=lambda name: Path(name)) -> SFTDataset:
    """Read, validate and tokenize every record (raising on the first malformed one)."""
    from tqdm.auto import tqdm

    records = read_records(cfg, resolve)
    stats = DataStats(records=len(records))
    examples = []
    for rec in tqdm(records, desc="tokenizing", unit="rec", mininterval=2.0, disable=len(records) < 1000):
        ids, labels = encode_record(tokenizer, rec, cfg)
        if len(ids) > cfg.max_length:
            stats.truncated += 1
            ids, labels = ids[: cfg.max_length], labels[: cfg.max_length]
        if all(t == IGNORE_INDEX for t in labels[1:]):  # the first label never enters the shifted loss
            stats.dropped += 1
            continue
        examples.append((ids, labels))
        stats.tokens += len(ids)
        stats.target_tokens += sum(t != IGNORE_INDEX for t in labels[1:])
    if not examples:
        raise DataError(f"no trainable example in {cfg.files}: {stats.summary(cfg.max_length)}")
    stats.examples = len(examples)
    if cfg.packing:
        rows = _pack(examples, cfg.max_length)
    else:
        rows = [{"input_ids": x, "labels": y} for x, y in examples]
    stats.rows = len(rows)
    if stats.truncated:
        logger.warning("data: %d of %d examples were longer than max_length=%d and were truncated", stats.truncated, stats.records, cfg.max_length)
    logger.info("data: %s", stats.summary(cfg.max_length))
    return SFTDataset(rows, stats, examples, tokenizer.pad_token_id)


@dataclass
class SFTCollator:
    """Right-pad a list of rows into a batch: input_ids with pad_id, labels with -100.
    Packed rows carry position_ids and no attention mask (the positions delimit examples)."""

    pad_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, rows: list[dict]) -> dict:
        n = max(len(r["input_ids"]) for r in rows)
        if self.pad_to_multiple_of:
            n = -(-n // self.pad_to_multiple_of) * self.pad_to_multiple_of
        packed = "position_ids" in rows[0]
        ids = torch.full((len(rows), n), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), n), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(rows), n), dtype=torch.long)
        pos = torch.zeros((len(rows), n), dtype=torch.long)
        for i, r in enumerate(rows):
            m = len(r["input_ids"])
            ids[i, :m] = torch.tensor(r["input_ids"])
            labels[i, :m] = torch.tensor(r["labels"])
            mask[i, :m] = 1
            if packed:
                pos[i, :m] = torch.tensor(r["position_ids"])
                pos[i, m:] = torch.arange(n - m)  # padding forms its own (unlabelled) sequence
        if packed:
            return {"input_ids": ids, "labels": labels, "position_ids": pos}
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}
