"""The loader every data consumer shares: sources -> mixed records -> encoded examples.

    records = read_records(cfg, resolve)                  # validated provenance, nothing tokenized
    examples, stats = tokenize(tokenizer, cfg, resolve)   # (input_ids, labels) pairs for SFT
    texts = profile_texts(tokenizer, cfg, resolve)        # full texts, for profiling passes

`cfg` is a `moe_sft.train.config.DataConfig` (the `data:` block of `moe-sft train`).
"""

from __future__ import annotations

import logging
from pathlib import Path

from .formats import detect
from .mixing import mix, select_rows
from .records import DataError, Record
from .registry import registry_specs
from .sources import SourceSpec, open_source
from .stats import DataStats
from .templates import Encoder

logger = logging.getLogger(__name__)


def source_specs(cfg, resolve=Path) -> list[SourceSpec]:
    """Every dataset of `cfg` in order: data.files, then data.sources, then data.dataset names."""
    specs = [SourceSpec(name=f, path=f, fmt=cfg.format, split=cfg.split, streaming=cfg.streaming,
                        max_samples=cfg.max_samples) for f in cfg.files]  # fmt: skip
    for s in cfg.sources:
        specs.append(
            SourceSpec(
                name=s.path, path=s.path, fmt=s.format or cfg.format, subset=s.subset, split=s.split or cfg.split,
                revision=s.revision, data_dir=s.data_dir, columns=dict(s.columns or {}), tags=s.tags,
                streaming=cfg.streaming if s.streaming is None else s.streaming,
                max_samples=s.max_samples if s.max_samples is not None else cfg.max_samples, num_samples=s.num_samples,
            )
        )  # fmt: skip
    for spec in registry_specs(cfg.dataset, cfg.dataset_dir, cfg.split, resolve):
        spec.max_samples = cfg.max_samples
        spec.streaming = cfg.streaming
        specs.append(spec)
    return specs


def _finish(rec: Record, spec: SourceSpec, fmt: str) -> Record:
    """Rename the source's columns (and keep only the mapped ones for registry entries)."""
    data = rec.data
    renamed = {}
    if isinstance(data, dict) and (spec.columns or spec.keep is not None):
        data = {k: v for k, v in data.items() if k not in spec.columns.values() or k in spec.columns}
        for old, new in spec.columns.items():
            if old in data:
                data[new] = data.pop(old)
                renamed[new] = old
        if spec.keep is not None:
            data = {k: v for k, v in data.items() if k in spec.keep}
    return Record(rec.where, data, fmt=fmt, source=spec.name, tags=spec.tags, renamed=renamed)


def _check_columns(table, spec: SourceSpec) -> None:
    """Columns of a typed (Arrow) source are known up front: a mapping from a missing one is an error."""
    names = getattr(getattr(table, "ds", None), "column_names", None)
    missing = sorted(set(spec.columns) - set(names)) if names is not None else []
    if missing and spec.keep is None:
        raise DataError(f"{spec.name}: `columns` maps {missing}, which the data does not have (its columns: {names})")


def read_records(cfg, resolve=Path, detect_formats: bool = True) -> list[Record]:
    """Every record the run uses, in training order, with its format decided per source
    (`auto`: from the source's first record; left `auto` without `detect_formats`, for readers
    with their own record kinds). Nothing is tokenized yet."""
    specs = source_specs(cfg, resolve)
    tables, rows = [], []
    for spec in specs:
        table = open_source(spec, resolve)
        if len(table) == 0:
            raise DataError(f"{spec.name}: holds no records")
        _check_columns(table, spec)
        tables.append(table)
        rows.append(select_rows(len(table), spec.max_samples, spec.num_samples, cfg.seed))
    order = mix([len(r) for r in rows], cfg.mix_strategy, cfg.interleave_probs, cfg.seed)
    wanted: list[list[int]] = [[] for _ in specs]  # positions in rows[k], in training order
    for k, i in order:
        wanted[k].append(i)
    fetched = {}
    for k, (spec, table) in enumerate(zip(specs, tables)):
        records = table.fetch([rows[k][i] for i in wanted[k]])
        fmt = spec.fmt
        if fmt == "auto" and records and detect_formats:
            fmt = detect(_finish(records[0], spec, "auto"))
        fetched[k] = iter([_finish(r, spec, fmt) for r in records])
    return [next(fetched[k]) for k, _ in order]


def tokenize(tokenizer, cfg, resolve=Path) -> tuple[list[tuple[list[int], list[int]]], DataStats]:
    """Read, validate and encode every record (raising on the first malformed one): the kept
    (input_ids, labels) pairs, truncated to cfg.max_length, and the statistics."""
    from tqdm.auto import tqdm

    records = read_records(cfg, resolve)
    encoder = Encoder(tokenizer, cfg.prompt_template, cfg.mask_history, resolve)
    stats = DataStats()
    examples = []
    for rec in tqdm(records, desc="tokenizing", unit="rec", mininterval=2.0, disable=len(records) < 1000):
        ids, labels = encoder.encode(rec)
        kept = stats.add(rec.source, rec.where, ids, labels, cfg.max_length)
        if kept is not None:
            examples.append(kept)
    if not examples:
        raise DataError(f"no trainable example in {', '.join(stats.per_source)}: {stats.summary(cfg.max_length)}")
    return examples, stats


def profile_texts(tokenizer, cfg, resolve=Path) -> list[str]:
    """The full text of every record, rendered as training renders it (plain `text` records as they are)."""
    encoder = Encoder(tokenizer, cfg.prompt_template, cfg.mask_history, resolve)
    return [encoder.text(rec) for rec in read_records(cfg, resolve)]
