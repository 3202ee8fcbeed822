"""Sources: save_to_disk folders, Parquet folders split by file name, CSV, a dataset repository with
subsets and column renames loaded through `datasets` offline, hub errors, and LLaMA-Factory's
dataset_info.json registry giving the same examples as the files named directly."""

import json
from pathlib import Path

import datasets
import huggingface_hub
import pytest

from moe_sft.data import read_records
from moe_sft.testing import tiny_tokenizer
from moe_sft.train.config import DataConfig
from moe_sft.train.data import DataError, build_dataset

ROOT = Path(__file__).resolve().parents[1]
CHATML = ROOT / "configs" / "tiny" / "data" / "chatml.jinja"


@pytest.fixture(autouse=True)
def _offline(tmp_path, monkeypatch):
    """No network in these tests, and `datasets`' cache inside the test folder."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer(chat_template=CHATML.read_text())


def alpaca(n, tag="r"):
    return [{"instruction": f"{tag} {i}?", "input": "", "output": f"{tag} answer {i}"} for i in range(n)]


def _jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _instructions(cfg):
    return [r.data["instruction"] for r in read_records(cfg)]


def test_save_to_disk_folders_load(tmp_path):
    datasets.Dataset.from_list(alpaca(5)).save_to_disk(tmp_path / "one")
    assert _instructions(DataConfig(files=[str(tmp_path / "one")])) == [f"r {i}?" for i in range(5)]
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(alpaca(3, "tr")), "test": datasets.Dataset.from_list(alpaca(2, "te"))})
    dd.save_to_disk(tmp_path / "dict")
    assert _instructions(DataConfig(files=[str(tmp_path / "dict")], split="test")) == ["te 0?", "te 1?"]
    with pytest.raises(DataError, match=r"dict: saved dataset has splits \['test', 'train'\], not 'dev'"):
        read_records(DataConfig(files=[str(tmp_path / "dict")], split="dev"))


def test_parquet_folder_split_by_file_names(tmp_path):
    recs = alpaca(9)
    folder = tmp_path / "pq" / "data"
    folder.mkdir(parents=True)
    datasets.Dataset.from_list(recs[:4]).to_parquet(folder / "train-00000-of-00002.parquet")
    datasets.Dataset.from_list(recs[4:7]).to_parquet(folder / "train-00001-of-00002.parquet")
    datasets.Dataset.from_list(recs[7:]).to_parquet(folder / "test-00000-of-00001.parquet")
    assert _instructions(DataConfig(files=[str(tmp_path / "pq")])) == [r["instruction"] for r in recs[:7]]
    assert _instructions(DataConfig(files=[str(tmp_path / "pq")], split="test")) == ["r 7?", "r 8?"]
    records = read_records(DataConfig(files=[str(tmp_path / "pq")], max_samples=6))
    assert records[5].where == f"{folder / 'train-00001-of-00002.parquet'} row 2"


def test_folder_of_json_files_and_csv(tmp_path):
    _jsonl(tmp_path / "mix" / "a.jsonl", alpaca(2, "a"))
    (tmp_path / "mix" / "b.json").write_text(json.dumps(alpaca(2, "b")))
    (tmp_path / "mix" / "notes.md").write_text("not data")
    assert _instructions(DataConfig(files=[str(tmp_path / "mix")])) == ["a 0?", "a 1?", "b 0?", "b 1?"]
    datasets.Dataset.from_list(alpaca(3, "c")).to_csv(tmp_path / "c.csv")
    assert _instructions(DataConfig(files=[str(tmp_path / "c.csv")])) == ["c 0?", "c 1?", "c 2?"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: no .* data files for split 'train'"):
        read_records(DataConfig(files=[str(tmp_path / "empty")]))


def _repo(tmp_path) -> Path:
    """A dataset repository as on the hub: two subsets (configs) in its README card, GSM8K-style columns."""
    repo = tmp_path / "org__math"
    _jsonl(repo / "easy" / "train.jsonl", [{"question": f"{i}+{i}?", "answer": f"#### {2 * i}"} for i in range(3)])
    _jsonl(repo / "hard" / "train.jsonl", [{"question": f"{i}*{i}?", "answer": f"#### {i * i}"} for i in range(4)])
    (repo / "README.md").write_text(
        "---\nconfigs:\n"
        "- config_name: easy\n  data_files:\n  - split: train\n    path: easy/train.jsonl\n"
        "- config_name: hard\n  data_files:\n  - split: train\n    path: hard/train.jsonl\n---\n# math\n"
    )
    return repo


def test_dataset_repository_with_subset_and_columns_offline(tmp_path, tok):
    repo = _repo(tmp_path)
    src = DataConfig.Source(path=str(repo), subset="hard", columns={"question": "instruction", "answer": "output"})
    ds = build_dataset(tok, DataConfig(sources=[src], prompt_template="chat"))
    texts = [tok.decode(x) for x, _ in ds.examples]
    assert texts == [f"<|im_start|>user\n{i}*{i}?<|im_end|>\n<|im_start|>assistant\n#### {i * i}<|im_end|>\n" for i in range(4)]
    assert ds.stats.per_source[str(repo)].records == 4
    with pytest.raises(DataError, match=r"BuilderConfig 'medium' not found.*check the source's `subset`"):
        read_records(DataConfig(sources=[DataConfig.Source(path=str(repo), subset="medium")]))
    with pytest.raises(DataError, match=r"`columns` maps \['query'\], which the data does not have"):
        read_records(DataConfig(sources=[DataConfig.Source(path=str(repo), subset="easy", columns={"query": "instruction"})]))
    streamed = read_records(DataConfig(sources=[DataConfig.Source(path=str(repo), subset="hard", streaming=True, max_samples=2)]),
                            detect_formats=False)
    assert [r.data["question"] for r in streamed] == ["0*0?", "1*1?"]


def test_unknown_hub_id_offline_names_id_offline_mode_and_local_copy():
    with pytest.raises(DataError) as err:
        read_records(DataConfig(files=["some-org/no-such-dataset"]))
    msg = str(err.value)
    for part in ("'some-org/no-such-dataset'", "HF_HUB_OFFLINE=1 is set", "save_to_disk(DIR)", "give DIR as the path"):
        assert part in msg, part
    with pytest.raises(DataError, match=r"hub dataset 'org/online-name'.*HF_HUB_OFFLINE=1 is set"):
        read_records(DataConfig(dataset="org/online-name", dataset_dir="ONLINE"))  # registry names as hub ids
    with pytest.raises(DataError, match=r"data file 'missing\.parquet' not found"):
        read_records(DataConfig(files=["missing.parquet"]))


# ---- LLaMA-Factory registry ---------------------------------------------------------------------
def _lf_folder(tmp_path) -> tuple[Path, list, list]:
    """A LLaMA-Factory data folder: an alpaca entry and a ShareGPT entry, both with renamed
    columns (and the ShareGPT one with other tags), plus the same records in standard form."""
    std_alpaca = [
        {"instruction": "Add", "input": "1 2", "output": "3", "system": "Sums.", "history": [["0 0?", "0"]]},
        {"instruction": "Sub", "input": "", "output": "-1", "system": "Sums.", "history": []},
    ]
    std_sharegpt = [{"conversations": [{"from": "system", "value": "Chat."}, {"from": "human", "value": "hi"},
                                       {"from": "gpt", "value": "hello"}, {"from": "human", "value": "bye"},
                                       {"from": "gpt", "value": "ciao"}]}]  # fmt: skip
    lf = tmp_path / "lf_data"
    lf.mkdir()
    mine = [{"q": r["instruction"], "ctx": r["input"], "a": r["output"], "sys": r["system"], "past": r["history"],
             "output": "an unmapped column, ignored"} for r in std_alpaca]  # fmt: skip
    (lf / "mine.json").write_text(json.dumps(mine))
    roles = {"system": "sys", "human": "me", "gpt": "bot"}
    chat = [{"dialog": [{"who": roles[m["from"]], "say": m["value"]} for m in r["conversations"]]} for r in std_sharegpt]
    _jsonl(lf / "chat.jsonl", chat)
    info = {
        "my_alpaca": {"file_name": "mine.json", "file_sha1": "not checked",
                      "columns": {"prompt": "q", "query": "ctx", "response": "a", "system": "sys", "history": "past"}},
        "my_chat": {"file_name": "chat.jsonl", "formatting": "sharegpt", "columns": {"messages": "dialog"},
                    "tags": {"role_tag": "who", "content_tag": "say", "user_tag": "me", "assistant_tag": "bot",
                             "system_tag": "sys"}},
    }  # fmt: skip
    (lf / "dataset_info.json").write_text(json.dumps(info, indent=2))
    return lf, std_alpaca, std_sharegpt


@pytest.mark.parametrize("template", ["alpaca", str(CHATML)])
def test_dataset_info_registry_loads_the_same_examples_as_the_files(tmp_path, tok, template):
    lf, std_alpaca, std_sharegpt = _lf_folder(tmp_path)
    direct = [str(_jsonl(tmp_path / "std" / "a.jsonl", std_alpaca)), str(_jsonl(tmp_path / "std" / "s.jsonl", std_sharegpt))]
    via_registry = build_dataset(tok, DataConfig(dataset="my_alpaca, my_chat", dataset_dir=str(lf), prompt_template=template))
    via_files = build_dataset(tok, DataConfig(files=direct, prompt_template=template))
    assert via_registry.examples == via_files.examples and len(via_files.examples) == 3
    assert {k: s.records for k, s in via_registry.stats.per_source.items()} == {"my_alpaca": 2, "my_chat": 1}
    # The renamed system and history columns are used, the unmapped `output` column is not.
    first = tok.decode(via_registry.examples[0][0])
    assert first.startswith("Sums.\n\n### Instruction:\n0 0?") if template == "alpaca" else "system\nSums." in first
    assert "unmapped" not in first


def test_registry_entries_without_mapped_system_ignore_it_as_llamafactory_does(tmp_path, tok):
    lf = tmp_path / "lf"
    _jsonl(lf / "d.jsonl", [{"instruction": "a", "input": "", "output": "b", "system": "IGNORED"}])
    (lf / "dataset_info.json").write_text(json.dumps({"d": {"file_name": "d.jsonl"}, "s": {"file_name": "d.jsonl", "columns": {"system": "system"}}}))
    plain, with_system = (build_dataset(tok, DataConfig(dataset=n, dataset_dir=str(lf), prompt_template="chat")) for n in ("d", "s"))
    assert "IGNORED" not in tok.decode(plain.examples[0][0]) and "IGNORED" in tok.decode(with_system.examples[0][0])


def test_registry_subset_from_a_local_repository_and_errors(tmp_path):
    repo = _repo(tmp_path)
    lf = tmp_path / "lf"
    lf.mkdir()
    info = {
        "hard": {"script_url": str(repo), "subset": "hard", "num_samples": 6, "columns": {"prompt": "question", "response": "answer"}},
        "ranked": {"file_name": "x.json", "ranking": True},
        "typo": {"file_nme": "x.json"},
        "ms": {"ms_hub_url": "org/x"},
    }  # fmt: skip
    (lf / "dataset_info.json").write_text(json.dumps(info))
    records = read_records(DataConfig(dataset="hard", dataset_dir=str(lf), seed=1))
    assert len(records) == 6 and {r.data["instruction"] for r in records} == {f"{i}*{i}?" for i in range(4)}
    assert all(set(r.data) == {"instruction", "output"} for r in records)
    again = read_records(DataConfig(dataset="hard", dataset_dir=str(lf), seed=1))
    assert [r.data for r in again] == [r.data for r in records]  # the num_samples sample is seeded
    for name, msg in [("ranked", "preference data"), ("typo", r"unknown keys \['file_nme'\]"), ("ms", "ModelScope"),
                      ("nope", r"\['nope'\] not in .*dataset_info\.json \(it defines")]:  # fmt: skip
        with pytest.raises(DataError, match=msg):
            read_records(DataConfig(dataset=name, dataset_dir=str(lf)))
    with pytest.raises(DataError, match=r"does not exist; set data\.dataset_dir"):
        read_records(DataConfig(dataset="x", dataset_dir=str(tmp_path / "nowhere")))
