"""What every part of the loader passes around: a raw record with its provenance, and the error type."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import ConfigError

IGNORE_INDEX = -100  # label of a token the loss ignores (prompt, padding, masked turns)


class DataError(ConfigError):
    """A data source, file or record is malformed; the message names the file, record and field."""


@dataclass
class Record:
    """One raw record, as read from its source.

    where    provenance for error messages: "path/file.jsonl line 7", "file.parquet row 3", ...
    data     the record (a dict after column renaming; anything when read from JSON)
    fmt      its format, decided per source (`auto`: decide from this record alone)
    source   the display name of its source (registry name or path), for statistics
    tags     ShareGPT role/content tags (LLaMA-Factory's `tags` keys), None for the defaults
    renamed  {field the format reads: column it was read from}, to name fields as the user wrote them
    """

    where: str
    data: object
    fmt: str = "auto"
    source: str = ""
    tags: dict[str, str] | None = None
    renamed: dict[str, str] = field(default_factory=dict)

    def field_name(self, name: str) -> str:
        """`name` as the user knows it: "`output`" or "`answer` (read as `output`)"."""
        if name in self.renamed:
            return f"`{self.renamed[name]}` (read as `{name}`)"
        return f"`{name}`"

    def error(self, name: str | None, problem: str) -> DataError:
        """A DataError naming this record and (when given) the field."""
        if name is None:
            return DataError(f"{self.where}: {problem}")
        return DataError(f"{self.where}: field {self.field_name(name)}: {problem}")
