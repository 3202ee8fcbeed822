"""Data statistics, computed while tokenizing and logged before training."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from .records import IGNORE_INDEX

logger = logging.getLogger(__name__)


@dataclass
class SourceStats:
    records: int = 0
    examples: int = 0
    tokens: int = 0
    target_tokens: int = 0


@dataclass
class DataStats:
    """Counts over every record used. `target_tokens` counts labelled positions after the
    first (the first label never enters the shifted loss); `longest` is in tokens before
    truncation."""

    records: int = 0
    examples: int = 0
    truncated: int = 0
    dropped: int = 0  # nothing left to train on after truncation
    tokens: int = 0
    target_tokens: int = 0
    rows: int = 0  # training rows (fewer than examples when packing)
    longest: int = 0
    longest_where: str = ""
    per_source: dict[str, SourceStats] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def masked_share(self) -> float:
        """Share of the kept tokens that carry no label (prompts, masked turns)."""
        return 1.0 - self.target_tokens / self.tokens if self.tokens else 0.0

    def add(self, source: str, where: str, ids: list[int], labels: list[int], max_length: int):
        """Count one encoded record; return it truncated to max_length, or None when no
        trained token is left (dropped)."""
        src = self.per_source.setdefault(source, SourceStats())
        self.records += 1
        src.records += 1
        if len(ids) > self.longest:
            self.longest, self.longest_where = len(ids), where
        if len(ids) > max_length:
            self.truncated += 1
            ids, labels = ids[:max_length], labels[:max_length]
        target = sum(t != IGNORE_INDEX for t in labels[1:])
        if target == 0:
            self.dropped += 1
            return None
        self.examples += 1
        self.tokens += len(ids)
        self.target_tokens += target
        src.examples += 1
        src.tokens += len(ids)
        src.target_tokens += target
        return ids, labels

    def summary(self, max_length: int) -> str:
        return (
            f"{self.records} records -> {self.examples} examples in {self.rows} rows, {self.tokens} tokens "
            f"({self.target_tokens} with labels, {100 * self.masked_share:.1f}% masked); {self.truncated} truncated to "
            f"max_length={max_length} (longest {self.longest} tokens: {self.longest_where or '-'}), {self.dropped} "
            "dropped (no response token left after truncation)"
        )

    def log(self, max_length: int) -> None:
        for name, s in self.per_source.items():
            logger.info("data: source %s: %d records, %d examples, %d tokens (%d with labels)", name, s.records,
                        s.examples, s.tokens, s.target_tokens)  # fmt: skip
        if self.truncated:
            logger.warning("data: %d of %d examples were longer than max_length=%d and were truncated (longest: %d "
                           "tokens, %s)", self.truncated, self.records, max_length, self.longest, self.longest_where)  # fmt: skip
        logger.info("data: %s", self.summary(max_length))
