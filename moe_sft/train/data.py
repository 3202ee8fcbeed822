"""SFT data for `moe-sft train`: the shared loader's examples as training rows, packing, collation.

Reading, formats, templates, mixing and statistics live in `moe_sft.data` (docs/data.md); this
module turns its (input_ids, labels) examples into rows for the Trainer. Only response tokens
carry labels; every record is checked before training, and a malformed one raises DataError
naming the file, record and field.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..data.loader import read_records, tokenize
from ..data.records import IGNORE_INDEX, DataError, Record
from ..data.stats import DataStats
from ..data.templates import Encoder
from .config import DataConfig

__all__ = ["IGNORE_INDEX", "DataError", "DataStats", "Record", "SFTCollator", "SFTDataset", "build_dataset",
           "encode_record", "read_records"]  # fmt: skip


def encode_record(tokenizer, rec: Record, cfg: DataConfig) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one record; a record without a format of its own takes cfg.format."""
    if rec.fmt == "auto":
        rec = Record(rec.where, rec.data, fmt=cfg.format, source=rec.source, tags=rec.tags, renamed=rec.renamed)
    return Encoder(tokenizer, cfg.prompt_template, cfg.mask_history).encode(rec)


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
    """Read, validate and tokenize every record (raising on the first malformed one), log the
    statistics, and pack when asked."""
    examples, stats = tokenize(tokenizer, cfg, resolve)
    if cfg.packing:
        rows = _pack(examples, cfg.max_length)
    else:
        rows = [{"input_ids": x, "labels": y} for x, y in examples]
    stats.rows = len(rows)
    stats.log(cfg.max_length)
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
