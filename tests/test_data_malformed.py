"""Malformed input in every format and source: a DataError naming the file, the record and the field,
raised before any model loads; generated malformed records and files never escape as another error."""

import json
import re
from pathlib import Path

import datasets
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moe_sft.config import ConfigError
from moe_sft.data.registry import entry_spec
from moe_sft.testing import tiny_tokenizer
from moe_sft.train.config import DataConfig, parse_train_config
from moe_sft.train.data import DataError, build_dataset

ROOT = Path(__file__).resolve().parents[1]
CHATML = ROOT / "configs" / "tiny" / "data" / "chatml.jinja"
GOOD = {
    "llm_adapters": {"instruction": "a", "output": "b"},
    "sharegpt": {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]},
    "messages": {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
    "prompt_completion": {"prompt": "a", "completion": "b"},
    "tokenized": {"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
}


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer(chat_template=CHATML.read_text())


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")


def sg(*pairs):
    return {"conversations": [{"from": f, "value": v} for f, v in pairs]}


CASES = [  # (format of the file, the bad record, the field the error must name, what it says)
    ("llm_adapters", {"instruction": "x"}, "`output`", "required, but missing"),
    ("llm_adapters", {"instruction": 5, "output": "y"}, "`instruction`", "expected a string, got int"),
    ("llm_adapters", {"instruction": "", "input": "", "output": "y"}, "`instruction`", "no prompt"),
    ("llm_adapters", {"instruction": "x", "output": "y", "system": ["s"]}, "`system`", "expected a string or null"),
    ("llm_adapters", {"instruction": "x", "output": "y", "history": [["q"]]}, "`history[0]`", r"\[user, assistant\] pair"),
    ("llm_adapters", {"instruction": "x", "output": "y", "history": "q"}, "`history`", "expected a list"),
    ("llm_adapters", {"instruction": "x", "output": "y", "tools": "{oops"}, "`tools`", "not valid JSON"),
    ("sharegpt", sg(("gpt", "x")), "`conversations[0].from`", "'gpt' here; message 0 must be one of"),
    ("sharegpt", sg(("human", "x"), ("gpt", "y"), ("human", "z")), "`conversations`", "must end with an assistant-side"),
    ("sharegpt", sg(("human", "x"), ("bot", "y")), "`conversations[1].from`", "'bot' here"),
    ("sharegpt", sg(("human", 3), ("gpt", "y")), "`conversations[0].value`", "expected a string"),
    ("sharegpt", sg(("human", "x"), ("function_call", "not json")), "`conversations[1].value`", "must be JSON"),
    ("sharegpt", {"conversations": []}, "`conversations`", "non-empty list"),
    ("messages", {"messages": [{"role": "bot", "content": "x"}]}, "`messages[0].role`", "expected one of system"),
    ("messages", {"messages": [{"role": "user", "content": "hi"}]}, "`messages`", "no `assistant` message"),
    ("messages", {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "tool_calls": [{"name": "f"}]}]},
     "`messages[1].tool_calls[0]`", "expected"),
    ("messages", {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": None}]},
     "`messages[1].content`", "required, but missing"),
    ("prompt_completion", {"prompt": "a", "completion": 4}, "`completion`", "expected a string"),
    ("tokenized", {"input_ids": [5, 6], "labels": [5]}, "`labels`", "1 labels for 2 input_ids"),
    ("tokenized", {"input_ids": [5, 6], "labels": [5, 7]}, "`labels[1]`", "7 differs from input_ids"),
    ("tokenized", {"input_ids": [5, 100000]}, "`input_ids[1]`", "not a token id"),
    ("tokenized", {"input_ids": [5, True]}, "`input_ids[1]`", "not a token id"),
]  # fmt: skip


@pytest.mark.parametrize("fmt, bad, field, what", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
@pytest.mark.parametrize("container", ["jsonl", "json"])
def test_malformed_record_names_file_record_and_field(tmp_path, tok, fmt, bad, field, what, container):
    recs = [GOOD[fmt], GOOD[fmt], bad, GOOD[fmt]]
    path = tmp_path / f"d.{container}"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs) if container == "jsonl" else json.dumps(recs))
    where = "line 3" if container == "jsonl" else "record 3"
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))} {where}: field {re.escape(field)}: .*{what}"):
        build_dataset(tok, DataConfig(files=[str(path)], prompt_template=str(CHATML)))


def test_malformed_parquet_row_and_renamed_column_are_named(tmp_path, tok):
    path = tmp_path / "d.parquet"
    datasets.Dataset.from_list([{"q": "a", "answer": "b"}, {"q": "c", "answer": None}]).to_parquet(path)
    src = DataConfig.Source(path=str(path), columns={"q": "instruction", "answer": "output"})
    with pytest.raises(DataError, match=rf"^{path} row 2: field `answer` \(read as `output`\): required, but missing"):
        build_dataset(tok, DataConfig(sources=[src]))


@pytest.mark.parametrize(
    "content, where",
    [
        (b'{"instruction": "a", "output": "b"}\n{"instruction": oops}\n', "line 2: not valid JSON"),
        (b'{"instruction": "a", "output": "b"}\n{"instruction": "\xff"}\n', "line 2: not UTF-8 text"),
        (b'{"instruction": "a", "output": "b"}\n{"instruction": "\\ud800", "output": "b"}\n',
         r"line 2: field `instruction`: not valid UTF-8 text \(a lone surrogate"),
        (b'{"instruction": "a", "output": "b"}\n[1, 2]\n', "line 2: a record must be an object"),
        (b'{"text": "plain"}\n', "line 1: field `text`: a `text` record"),
        (b'{"question": "plain"}\n', r"line 1: cannot tell the format \(keys \['question'\]\)"),
    ],
)
def test_malformed_jsonl_files(tmp_path, tok, content, where):
    path = tmp_path / "d.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError, match=rf"^{path} {where}"):
        build_dataset(tok, DataConfig(files=[str(path)]))


def test_json_file_must_hold_a_list(tmp_path, tok):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"data": [GOOD["llm_adapters"]]}, indent=1))
    with pytest.raises(DataError, match=rf"^{path}: a \.json data file must hold a list"):
        build_dataset(tok, DataConfig(files=[str(path)]))
    path.write_text("".join(json.dumps(GOOD["llm_adapters"]) + "\n" for _ in range(2)))  # JSON Lines under .json is read
    assert len(build_dataset(tok, DataConfig(files=[str(path)]))) == 2


def test_malformed_data_fails_before_any_model_loads(tmp_path, monkeypatch):
    from moe_sft.train import trainer

    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(GOOD["llm_adapters"]) + "\n" + json.dumps({"instruction": "x"}) + "\n")

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(trainer, "load_model", no_model)
    cfg = parse_train_config({"model": {"tiny": "qwen3_moe"}, "data": {"files": [str(path)]},
                              "training": {"output_dir": str(tmp_path / "out")}})  # fmt: skip
    with pytest.raises(DataError, match=rf"{path} line 2: field `output`"):
        trainer.train(cfg)


# ---- generated input ---------------------------------------------------------------------------------
KEYS = ["instruction", "input", "output", "system", "history", "tools", "conversations", "messages", "from",
        "value", "role", "content", "tool_calls", "function", "name", "arguments", "prompt", "completion",
        "input_ids", "labels", "text"]  # fmt: skip
ROLES = ["human", "gpt", "system", "function_call", "observation", "user", "assistant", "tool"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-200, 200), st.floats(allow_nan=False), st.text(max_size=8),
                    st.sampled_from(ROLES))  # fmt: skip
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(KEYS), inner, max_size=4),
                      max_leaves=12)  # fmt: skip
message = st.dictionaries(st.sampled_from(["from", "value", "role", "content", "tool_calls", "name"]),
                         st.one_of(st.sampled_from(ROLES), values), max_size=4)  # fmt: skip
conversations = st.builds(lambda key, msgs, extra: {key: msgs, **extra}, st.sampled_from(["conversations", "messages"]),
                          st.lists(message, max_size=5), st.dictionaries(st.sampled_from(KEYS), values, max_size=2))  # fmt: skip
records = st.one_of(
    conversations,
    st.dictionaries(st.sampled_from(KEYS), values, max_size=6),
    st.builds(lambda fmt, extra: {**GOOD[fmt], **extra}, st.sampled_from(sorted(GOOD)),
              st.dictionaries(st.sampled_from(KEYS), values, max_size=2)),  # a good record, partly overwritten
    values,
)
lines = st.one_of(records.map(json.dumps), st.text(max_size=20))  # some lines are not JSON at all


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(lines=st.lists(lines, min_size=1, max_size=5), fmt=st.sampled_from(["auto", "llm_adapters", "sharegpt", "messages", "prompt_completion", "tokenized", "text"]),
       template=st.sampled_from(["alpaca", "chat"]), mask_history=st.booleans())  # fmt: skip
def test_generated_jsonl_files_succeed_or_raise_data_errors(tmp_path, tok, lines, fmt, template, mask_history):
    path = tmp_path / "gen.jsonl"
    path.write_text("\n".join(lines) + "\n")
    try:
        ds = build_dataset(tok, DataConfig(files=[str(path)], format=fmt, prompt_template=template, mask_history=mask_history))
    except DataError as e:
        assert str(path) in str(e)
        return
    for ids, labels in ds.examples:
        assert len(ids) == len(labels) and all(lab in (t, -100) for t, lab in zip(ids, labels))


entries = st.dictionaries(
    st.sampled_from(["file_name", "hf_hub_url", "formatting", "columns", "tags", "ranking", "subset", "split",
                     "num_samples", "folder", "script_url", "ms_hub_url", "bogus"]),
    st.one_of(values, st.sampled_from(["alpaca", "sharegpt", "openai", "d.jsonl"]),
              st.dictionaries(st.sampled_from(["prompt", "response", "messages", "role_tag", "images", "x"]), st.text(max_size=5))),
    max_size=5,
)  # fmt: skip


@settings(max_examples=60, deadline=None)
@given(entry=st.one_of(entries, values))
def test_generated_registry_entries_give_a_spec_or_a_data_error(entry):
    try:
        spec = entry_spec("gen", entry, Path("/nonexistent"), "train")
    except (DataError, ConfigError):
        return
    assert spec.name == "gen" and isinstance(spec.path, str) and spec.fmt in ("llm_adapters", "sharegpt", "messages")
