"""Data sources: where records come from, read into tables that fetch records by row.

A source's path is, in this order:
    a file        .json (a list of records, or JSON Lines) / .jsonl, read here so a bad line is
                  named exactly; .parquet / .csv / .arrow / .txt through `datasets`
    a folder      written by `Dataset.save_to_disk` (state.json or dataset_dict.json): `load_from_disk`;
                  a dataset repository (a README.md dataset card, or `subset` / `data_dir` given):
                  `load_dataset(folder, subset, ...)`, as for a hub id;
                  otherwise a folder of data files, split into train/test/... by `datasets`' file
                  naming rules, each file read as above
    a hub id      `datasets.load_dataset(id, name=subset, split=split, revision=revision,
                  data_dir=data_dir, streaming=streaming)`
Records are only fetched for the rows the mixing keeps.
"""

from __future__ import annotations

import bisect
import itertools
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from .records import DataError, Record

logger = logging.getLogger(__name__)

JSON_EXTS = (".json", ".jsonl")
DATASETS_BUILDERS = {".parquet": "parquet", ".csv": "csv", ".arrow": "arrow", ".txt": "text"}
DATA_EXTS = JSON_EXTS + tuple(DATASETS_BUILDERS)
# What `datasets` and the hub raise for a missing, unreachable or unreadable dataset.
_LOAD_ERRORS: tuple[type[BaseException], ...] = (OSError, ValueError)


@dataclass
class SourceSpec:
    """One dataset to read, fully resolved (from data.files, data.sources or the registry).

    columns  rename {column in the data: field the format reads}
    keep     after renaming, keep only these fields (a registry entry reads only its mapped columns)
    """

    name: str
    path: str
    fmt: str = "auto"
    subset: str | None = None
    split: str = "train"
    revision: str | None = None
    data_dir: str | None = None
    columns: dict[str, str] = field(default_factory=dict)
    keep: set[str] | None = None
    tags: dict[str, str] | None = None
    streaming: bool = False
    max_samples: int | None = None
    num_samples: int | None = None


# ---- tables ----------------------------------------------------------------------------------
class ListTable:
    """Records already in memory (JSON files, streamed records)."""

    def __init__(self, records: list[Record]):
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def fetch(self, rows: list[int]) -> list[Record]:
        return [self.records[r] for r in rows]


class ArrowTable:
    """A `datasets.Dataset`; rows are fetched lazily with `select` (one pass for many rows)."""

    def __init__(self, ds, label: str):
        self.ds, self.label = ds, label

    def __len__(self) -> int:
        return len(self.ds)

    def fetch(self, rows: list[int]) -> list[Record]:
        return [Record(f"{self.label} row {r + 1}", dict(x)) for r, x in zip(rows, self.ds.select(rows))]


class ConcatTable:
    """Several tables (the files of a folder) one after another."""

    def __init__(self, parts: list):
        self.parts = parts
        self.starts = list(itertools.accumulate((len(p) for p in parts), initial=0))

    def __len__(self) -> int:
        return self.starts[-1]

    def fetch(self, rows: list[int]) -> list[Record]:
        # One fetch per part (an Arrow `select` is costly per call), then back into `rows` order.
        by_part: dict[int, list[int]] = {}
        for j, r in enumerate(rows):
            by_part.setdefault(bisect.bisect_right(self.starts, r) - 1, []).append(j)
        out: list[Record | None] = [None] * len(rows)
        for k, positions in by_part.items():
            for j, rec in zip(positions, self.parts[k].fetch([rows[j] - self.starts[k] for j in positions])):
                out[j] = rec
        return out


# ---- local files ---------------------------------------------------------------------------------
def _decode(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path} line {line}: not UTF-8 text ({e.reason})") from None


def _read_jsonl(path: Path, text: str) -> ListTable:
    records = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(Record(f"{path} line {lineno}", json.loads(line)))
        except json.JSONDecodeError as e:
            raise DataError(f"{path} line {lineno}: not valid JSON ({e.msg})") from None
        except RecursionError:
            raise DataError(f"{path} line {lineno}: JSON nested too deeply") from None
    return ListTable(records)


def read_json(path: Path) -> ListTable:
    """A .jsonl file, or a .json file holding a list of records (or, as `datasets` also
    accepts, JSON Lines under a .json name)."""
    text = _decode(path)
    if path.suffix.lower() == ".jsonl":
        return _read_jsonl(path, text)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data" and text.lstrip().startswith("{"):
            return _read_jsonl(path, text)
        raise DataError(f"{path} line {e.lineno}: not valid JSON ({e.msg})") from None
    except RecursionError:
        raise DataError(f"{path}: JSON nested too deeply") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: a .json data file must hold a list of records (or one record per line), found "
                        f"{type(data).__name__}")  # fmt: skip
    return ListTable([Record(f"{path} record {i}", rec) for i, rec in enumerate(data, 1)])


def read_file(path: Path):
    """One local data file as a table."""
    ext = path.suffix.lower()
    if ext in JSON_EXTS:
        return read_json(path)
    if ext not in DATASETS_BUILDERS:
        raise DataError(f"{path}: unsupported file type {ext or '(none)'!r}; data files are {', '.join(DATA_EXTS)}")
    import datasets

    try:
        ds = datasets.load_dataset(DATASETS_BUILDERS[ext], data_files=[str(path)], split="train")
    except (*_LOAD_ERRORS, datasets.exceptions.DatasetsError) as e:
        raise DataError(f"{path}: could not be read as {DATASETS_BUILDERS[ext]} ({type(e).__name__}: {e})") from None
    return ArrowTable(ds, str(path))


def _read_folder(folder: Path, spec: SourceSpec):
    """A folder of data files: `datasets` decides which files belong to which split (names like
    train-*.parquet, test.jsonl, data/train/...; everything is `train` otherwise)."""
    from datasets.data_files import DataFilesDict, get_data_patterns
    from datasets.exceptions import DatasetsError

    try:
        splits = DataFilesDict.from_patterns(get_data_patterns(str(folder)), base_path=str(folder))
    except (DatasetsError, FileNotFoundError):
        splits = {}
    files = [Path(f) for f in splits.get(spec.split, [])]
    data = sorted(f for f in files if f.suffix.lower() in DATA_EXTS)
    if not data:
        found = {str(k): len(v) for k, v in splits.items()}
        raise DataError(f"{folder}: no {'/'.join(DATA_EXTS)} data files for split {spec.split!r} in this folder "
                        f"(files per split: {found or 'none'}); give another split, a file, or a hub id")  # fmt: skip
    skipped = sorted(set(files) - set(data))
    if skipped:
        logger.info("data: %s: skipping %d files that are not data files: %s", folder, len(skipped), [f.name for f in skipped])
    return ConcatTable([read_file(f) for f in data])


def _read_disk(folder: Path, spec: SourceSpec):
    import datasets

    try:
        ds = datasets.load_from_disk(str(folder))
    except (*_LOAD_ERRORS, datasets.exceptions.DatasetsError) as e:
        raise DataError(f"{folder}: could not be read with datasets.load_from_disk ({type(e).__name__}: {e})") from None
    if isinstance(ds, datasets.DatasetDict):
        if spec.split not in ds:
            raise DataError(f"{folder}: saved dataset has splits {sorted(ds)}, not {spec.split!r}; set the source's `split`")
        ds = ds[spec.split]
    return ArrowTable(ds, f"{folder} ({spec.split})")


# ---- dataset repositories and the hub ---------------------------------------------------------------
def _has_card(folder: Path) -> bool:
    """A dataset repository's README.md starts with its YAML card (configs, splits)."""
    readme = folder / "README.md"
    return readme.is_file() and readme.read_text(errors="replace").startswith("---")


def _hub_error(spec: SourceSpec, e: BaseException) -> DataError:
    from huggingface_hub import constants

    state = (
        "HF_HUB_OFFLINE=1 is set, so only datasets already in the local cache load"
        if constants.HF_HUB_OFFLINE
        else "the hub could not be reached, or has no such dataset (check the id; gated or private datasets need "
        "`hf auth login`; on a machine without network set HF_HUB_OFFLINE=1 to use the local cache without waiting)"
    )
    return DataError(
        f"hub dataset {spec.path!r}: could not be loaded ({type(e).__name__}: {e}); {state}. To use a local copy, "
        f"download it where there is network (`datasets.load_dataset({spec.path!r}"
        f"{', ' + repr(spec.subset) if spec.subset else ''}).save_to_disk(DIR)`, or `hf download --repo-type dataset "
        f"{spec.path} --local-dir DIR`) and give DIR as the path (data.files or data.sources[].path); a local "
        ".json/.jsonl/.parquet file works too"
    )


def _read_repo(path: str, spec: SourceSpec, local: bool):
    import datasets

    kwargs = dict(name=spec.subset, split=spec.split, revision=spec.revision, data_dir=spec.data_dir, streaming=spec.streaming)
    label = f"{'dataset folder' if local else 'hub dataset'} {path} ({spec.subset or 'default'}, {spec.split})"
    try:
        ds = datasets.load_dataset(path, **kwargs)
        if spec.streaming:  # read only what is used: the first max_samples records
            limit = spec.max_samples
            return ListTable([Record(f"{label} record {i}", dict(r)) for i, r in enumerate(itertools.islice(ds, limit), 1)])
    except ValueError as e:  # the dataset was found; a subset or split was not
        raise DataError(f"{label}: {e}; check the source's `subset` and `split`") from None
    except (OSError, datasets.exceptions.DatasetsError) as e:
        if local:
            raise DataError(f"{label}: could not be loaded with datasets.load_dataset ({type(e).__name__}: {e})") from None
        raise _hub_error(spec, e) from None
    return ArrowTable(ds, label)


def open_source(spec: SourceSpec, resolve=Path):
    """The table of one source (see the module docstring for how the path is read)."""
    path = resolve(spec.path)
    if path.is_file():
        return read_file(path)
    if path.is_dir():
        if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
            return _read_disk(path, spec)
        if spec.subset or spec.data_dir or _has_card(path):
            return _read_repo(str(path), spec, local=True)
        return _read_folder(path, spec)
    if Path(spec.path).suffix.lower() in DATA_EXTS or spec.path.startswith((".", "/", "~")):
        raise DataError(
            f"data file {spec.path!r} not found (looked at {path}); give a {'/'.join(DATA_EXTS)} file, a folder of "
            "them, a `save_to_disk` folder or a hub dataset id"
        )
    return _read_repo(spec.path, spec, local=False)
