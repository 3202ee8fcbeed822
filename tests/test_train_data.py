"""SFT data: prompt masking token by token, chat masking, errors naming file and line, truncation,
packing (same per-example loss as unpacked), collation."""

import json

import pytest
import torch

from moe_sft.evaluation.benchmarks import format_prompt
from moe_sft.testing import tiny_model, tiny_tokenizer
from moe_sft.train.config import DataConfig
from moe_sft.train.data import IGNORE_INDEX, DataError, SFTCollator, build_dataset


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _write(path, records, jsonl=True):
    if jsonl:
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        path.write_text(json.dumps(records))
    return path


def _split(tok, row):
    """(prompt text, target text) read back from a row's labels, checking the mask is a prefix."""
    ids, labels = row["input_ids"], row["labels"]
    n_prompt = next(i for i, t in enumerate(labels) if t != IGNORE_INDEX)
    assert all(t == IGNORE_INDEX for t in labels[:n_prompt])
    assert labels[n_prompt:] == ids[n_prompt:]  # every response token is its own label
    return tok.decode(ids[:n_prompt]), tok.decode(ids[n_prompt:])


@pytest.mark.parametrize("inp", ["", "some context"])
def test_llm_adapters_prompt_masked_token_by_token(tmp_path, tok, inp):
    rec = {"instruction": "What is 2 + 3?", "input": inp, "output": "2 + 3 = 5.", "answer": "5"}
    ds = build_dataset(tok, DataConfig(files=[str(_write(tmp_path / "d.jsonl", [rec]))]))
    row = ds[0]
    prompt = format_prompt(rec["instruction"], inp)
    assert ("### Input:" in prompt) == bool(inp)
    # Character-level tokenizer: one token per character, so the boundary is checked per token.
    assert len(row["input_ids"]) == len(prompt) + len(rec["output"]) + 1
    for i, (t, lab) in enumerate(zip(row["input_ids"], row["labels"])):
        if i < len(prompt):
            assert lab == IGNORE_INDEX, (i, prompt[i])
        else:
            assert lab == t, i
    assert row["labels"][-1] == tok.eos_token_id
    p, target = _split(tok, row)
    assert p == prompt and target == rec["output"] + tok.eos_token


def test_chat_messages_mask_everything_but_assistant_turns(tmp_path, tok):
    msgs = [
        {"role": "system", "content": "Add."},
        {"role": "user", "content": "1 + 2?"},
        {"role": "assistant", "content": "3."},
        {"role": "user", "content": "2 + 2?"},
        {"role": "assistant", "content": "4."},
    ]
    ds = build_dataset(tok, DataConfig(files=[str(_write(tmp_path / "c.jsonl", [{"messages": msgs}]))]))
    ids, labels = ds[0]["input_ids"], ds[0]["labels"]
    text = tok.decode(ids)
    # The tiny template renders "<s>role: content</s>\n" per turn; each assistant turn trains on its
    # content and end-of-turn marker, nothing else.
    assert text == "".join(f"<s>{m['role']}: {m['content']}</s>\n" for m in msgs)
    trained = "".join(tok.decode([t]) if lab != IGNORE_INDEX else "|" for t, lab in zip(ids, labels))
    pieces = [p for p in trained.split("|") if p]
    assert pieces == ["3.</s>\n", "4.</s>\n"]


@pytest.mark.parametrize("inp", ["", "a friend"])
def test_llm_adapters_with_chat_template(tmp_path, tok, inp):
    rec = {"instruction": "Say hi", "input": inp, "output": "hi"}
    cfg = DataConfig(files=[str(_write(tmp_path / "d.jsonl", [rec]))], prompt_template="chat")
    ds = build_dataset(tok, cfg)
    p, target = _split(tok, ds[0])
    user = "Say hi\na friend" if inp else "Say hi"  # instruction and input joined by a newline, as LLaMA-Factory does
    assert p == f"<s>user: {user}</s>\n<s>assistant: " and target == "hi</s>\n"


@pytest.mark.parametrize(
    "bad, jsonl, where, what",
    [
        ({"instruction": "x", "input": ""}, True, "line 3", "`output`: required"),
        ({"instruction": 5, "output": "y"}, False, "record 3", "`instruction`: expected a string"),
        # The file's format is decided by its first record (alpaca), so a chat record is a malformed alpaca one.
        ({"messages": [{"role": "user", "content": "hi"}]}, True, "line 3", "`instruction`: required"),
        ({"text": "plain"}, True, "line 3", "`instruction`: required"),
    ],
)
def test_malformed_record_names_file_and_line(tmp_path, tok, bad, jsonl, where, what):
    good = {"instruction": "a", "input": "", "output": "b"}
    path = _write(tmp_path / ("d.jsonl" if jsonl else "d.json"), [good, good, bad, good], jsonl)
    with pytest.raises(DataError, match=rf"{path} {where}: field {what}"):
        build_dataset(tok, DataConfig(files=[str(path)]))
    chat = _write(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(DataError, match=rf"{chat} line 1: field `messages`: no `assistant` message"):
        build_dataset(tok, DataConfig(files=[str(chat)]))


def test_invalid_json_line_is_named(tmp_path, tok):
    path = tmp_path / "d.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": oops}\n')
    with pytest.raises(DataError, match=rf"{path} line 2: not valid JSON"):
        build_dataset(tok, DataConfig(files=[str(path)]))
    with pytest.raises(DataError, match="not found"):
        build_dataset(tok, DataConfig(files=[str(tmp_path / "missing.jsonl")]))


def test_truncation_is_counted_and_empty_targets_dropped(tmp_path, tok):
    short = {"instruction": "a", "input": "", "output": "b"}
    long_out = {"instruction": "a", "input": "", "output": "x" * 200}
    long_prompt = {"instruction": "y" * 400, "input": "", "output": "b"}
    path = _write(tmp_path / "d.jsonl", [short, long_out, long_prompt])
    ds = build_dataset(tok, DataConfig(files=[str(path)], max_length=180))
    assert ds.stats.truncated == 2 and ds.stats.dropped == 1 and len(ds) == 2
    assert max(len(r["input_ids"]) for r in ds.rows) == 180


def test_packing_keeps_examples_apart(tmp_path, tok):
    recs = [
        {"messages": [{"role": "user", "content": f"{i} + {i}?"}, {"role": "assistant", "content": f"{2 * i}."}]}
        for i in range(8)
    ]
    path = _write(tmp_path / "d.jsonl", recs)
    plain = build_dataset(tok, DataConfig(files=[str(path)], max_length=100))
    packed = build_dataset(tok, DataConfig(files=[str(path)], max_length=100, packing=True))
    assert len(packed) < len(plain) and all(len(r["input_ids"]) <= 100 for r in packed.rows)
    model = tiny_model("qwen3_moe", experts_implementation="eager", attn_implementation="sdpa")
    model.config.use_cache = False  # as in training: transformers detects packing only without a KV cache
    collate = SFTCollator(tok.pad_token_id)

    def summed_loss(rows):
        batch = collate(rows)
        with torch.no_grad():
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        return torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        )

    separate = sum(summed_loss([r]) for r in plain.rows)
    together = summed_loss(packed.rows)
    # Attention must not cross example boundaries inside a packed row: same summed loss.
    torch.testing.assert_close(together, separate, rtol=1e-5, atol=1e-4)
    leaky = dict(packed.rows[0])
    leaky["position_ids"] = list(range(len(leaky["input_ids"])))  # one long sequence: context leaks
    assert not torch.allclose(summed_loss([leaky]), summed_loss([packed.rows[0]]))


def test_collator_pads_labels_and_mask(tok):
    rows = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    b = SFTCollator(tok.pad_token_id, pad_to_multiple_of=4)(rows)
    assert b["input_ids"].tolist() == [[5, 6, 7, 0], [8, 0, 0, 0]]
    assert b["labels"].tolist() == [[-100, 6, 7, -100], [8, -100, -100, -100]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]
