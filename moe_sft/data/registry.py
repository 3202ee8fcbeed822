"""LLaMA-Factory's dataset registry: `dataset: a,b` names entries of `<dataset_dir>/dataset_info.json`.

An entry (LLaMA-Factory's documented format) is read as:
    hf_hub_url | script_url | file_name   where the data is (hub id, local repository folder, or a
                                          file / folder inside dataset_dir)
    formatting                            alpaca (default), sharegpt or openai
    subset, split, folder, num_samples    the hub config name, the split (default train), the
                                          repository sub-folder, a seeded random sample size
    columns                               {role: column}: prompt, query, response, history, system,
                                          tools (alpaca); messages, system, tools (sharegpt); messages, tools (openai)
    tags                                  ShareGPT keys and role names (role_tag, content_tag, user_tag,
                                          assistant_tag, observation_tag, function_tag, system_tag)
As in LLaMA-Factory, only the mapped columns are read (defaults: instruction/input/output for
alpaca, conversations for sharegpt); `system` and `history` only when `columns` names them.
`dataset_dir: ONLINE` reads every name as a hub id.
"""

from __future__ import annotations

import json
from pathlib import Path

from .formats import FORMAT_ALIASES, SHAREGPT_TAGS
from .records import DataError
from .sources import SourceSpec

INFO_FILE = "dataset_info.json"

# LLaMA-Factory's column roles -> the fields moe_sft's formats read, per `formatting`.
_ROLES = {
    "alpaca": {"prompt": "instruction", "query": "input", "response": "output", "history": "history",
               "system": "system", "tools": "tools"},
    "sharegpt": {"messages": "conversations", "system": "system", "tools": "tools"},
    "openai": {"messages": "messages", "tools": "tools"},
}  # fmt: skip
_DEFAULT_COLUMNS = {"alpaca": {"prompt": "instruction", "query": "input", "response": "output"},
                    "sharegpt": {"messages": "conversations"}, "openai": {"messages": "conversations"}}  # fmt: skip
_FORMAT = {**FORMAT_ALIASES, "sharegpt": "sharegpt"}
_UNSUPPORTED_COLUMNS = ("images", "videos", "audios", "chosen", "rejected", "kto_tag")
_KEYS = {"hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name", "file_name", "file_sha1",
         "formatting", "ranking", "subset", "split", "folder", "num_samples", "columns", "tags"}  # fmt: skip


def read_info(dataset_dir: Path) -> dict:
    path = dataset_dir / INFO_FILE
    if not path.is_file():
        raise DataError(f"data.dataset names registry entries, but {path} does not exist; set data.dataset_dir to the "
                        f"folder holding LLaMA-Factory's {INFO_FILE}, or list the data with data.files")  # fmt: skip
    try:
        info = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(info, dict):
        raise DataError(f"{path}: expected an object of {{dataset name: entry}}, got {type(info).__name__}")
    return info


def _mapping(where: str, key: str, value, allowed) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise DataError(f"{where}: `{key}` must be an object of strings, got {value!r}")
    unknown = sorted(set(value) - set(allowed))
    if unknown:
        raise DataError(f"{where}: `{key}` has unknown or unsupported keys {unknown}; supported here: {sorted(allowed)}")
    return value


def _location(where: str, entry: dict, dataset_dir: Path) -> str:
    if entry.get("hf_hub_url"):
        return entry["hf_hub_url"]
    for key, why in (("ms_hub_url", "ModelScope"), ("om_hub_url", "Modelers"), ("cloud_file_name", "cloud storage")):
        if key in entry:
            raise DataError(f"{where}: `{key}` ({why}) is not supported; add `hf_hub_url` or a local `file_name`")
    for key in ("script_url", "file_name"):
        if entry.get(key):
            return str(dataset_dir / entry[key])
    raise DataError(f"{where}: give `file_name` (a file or folder in {dataset_dir}) or `hf_hub_url`")


def entry_spec(name: str, entry, dataset_dir: Path, split: str) -> SourceSpec:
    """The SourceSpec of one dataset_info.json entry (`split` is the default when it sets none)."""
    where = f"{dataset_dir / INFO_FILE} entry {name!r}"
    if not isinstance(entry, dict):
        raise DataError(f"{where}: expected an object, got {entry!r}")
    unknown = sorted(set(entry) - _KEYS)
    if unknown:
        raise DataError(f"{where}: unknown keys {unknown}; LLaMA-Factory's keys are {sorted(_KEYS)}")
    for key in ("hf_hub_url", "script_url", "file_name", "formatting", "subset", "split", "folder"):
        if entry.get(key) is not None and not isinstance(entry[key], str):
            raise DataError(f"{where}: `{key}` must be a string, got {entry[key]!r}")
    if entry.get("ranking"):
        raise DataError(f"{where}: `ranking: true` marks preference data (chosen/rejected), which SFT cannot train on")
    formatting = entry.get("formatting", "alpaca")
    if formatting not in _FORMAT:
        raise DataError(f"{where}: formatting {formatting!r} is not one of {sorted(_FORMAT)}")
    columns = _mapping(where, "columns", entry.get("columns"), [*_ROLES[formatting], *_UNSUPPORTED_COLUMNS])
    bad = sorted(set(columns) & set(_UNSUPPORTED_COLUMNS))
    if bad:
        raise DataError(f"{where}: columns {bad} (multimodal or preference data) are not supported for SFT")
    tags = _mapping(where, "tags", entry.get("tags"), SHAREGPT_TAGS if formatting == "sharegpt" else ())
    roles = {**_DEFAULT_COLUMNS[formatting], **columns}
    rename = {column: _ROLES[formatting][role] for role, column in roles.items()}
    num = entry.get("num_samples")
    if num is not None and (isinstance(num, bool) or not isinstance(num, int) or num < 1):
        raise DataError(f"{where}: `num_samples` must be a positive integer, got {num!r}")
    return SourceSpec(
        name=name,
        path=_location(where, entry, dataset_dir),
        fmt=_FORMAT[formatting],
        subset=entry.get("subset"),
        split=entry.get("split") or split,
        data_dir=entry.get("folder"),
        columns=rename,
        keep=set(rename.values()),
        tags=tags or None,
        num_samples=num,
    )


def registry_specs(names: list[str], dataset_dir: str, split: str, resolve=Path) -> list[SourceSpec]:
    """SourceSpecs for `data.dataset` names, read from `<dataset_dir>/dataset_info.json`."""
    if not names:
        return []
    if dataset_dir == "ONLINE":
        return [SourceSpec(name=n, path=n, split=split) for n in names]
    folder = resolve(dataset_dir)
    info = read_info(folder)
    missing = [n for n in names if n not in info]
    if missing:
        raise DataError(f"data.dataset: {missing} not in {folder / INFO_FILE} (it defines {sorted(info)})")
    return [entry_spec(n, info[n], folder, split) for n in names]
