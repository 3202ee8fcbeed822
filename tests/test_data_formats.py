"""Every record format, label mask checked token by token against the chat template's own rendering.

The tokenizer is character-level and the ChatML-style test template (configs/tiny/data/chatml.jinja)
has no special tokens, so token i is character i of the rendered text: the expected mask is built
here, piece by piece, independently of the loader."""

import json
from pathlib import Path

import pytest

from moe_sft.evaluation.benchmarks import format_prompt
from moe_sft.testing import tiny_tokenizer
from moe_sft.train.config import DataConfig
from moe_sft.train.data import IGNORE_INDEX, DataError, build_dataset

ROOT = Path(__file__).resolve().parents[1]
CHATML = ROOT / "configs" / "tiny" / "data" / "chatml.jinja"


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer(chat_template=CHATML.read_text())


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def reference(messages, tools=None, trained=None):
    """(text, per-character trained flags) of the ChatML rendering: an assistant turn trains on
    its content, tool calls and end-of-turn marker; `trained` lists which assistant turns train."""
    pieces = [(f"<tools>{json.dumps(tools)}</tools>\n", False)] if tools else []
    assistants = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    trained = assistants if trained is None else trained
    for i, m in enumerate(messages):
        calls = "".join(f"<call>{c['function']['name']} {json.dumps(c['function']['arguments'])}</call>"
                        for c in m.get("tool_calls") or [])  # fmt: skip
        pieces += [(f"<|im_start|>{m['role']}\n", False), (f"{m['content']}{calls}<|im_end|>\n", i in trained)]
    text = "".join(p for p, _ in pieces)
    return text, [flag for p, flag in pieces for _ in p]


def check_mask(tok, example, messages, tools=None, trained=None):
    ids, labels = example
    text, flags = reference(messages, tools, trained)
    # The template's own rendering is the reference text, and one token per character.
    assert tok.apply_chat_template(messages, tools=tools, tokenize=False) == text
    assert tok.decode(ids) == text and len(ids) == len(text)
    for i, (t, lab, flag) in enumerate(zip(ids, labels, flags)):
        assert lab == (t if flag else IGNORE_INDEX), (i, text[max(0, i - 10) : i + 10])


def test_jinja_fixture_renders_as_the_reference(tok):
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False) == reference(msgs)[0]
    gen = tok.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
    assert gen == reference(msgs[:1])[0] + "<|im_start|>assistant\n"


SHAREGPT = {
    "conversations": [
        {"from": "system", "value": "Be brief."},
        {"from": "human", "value": "hi"},
        {"from": "gpt", "value": "hello"},
        {"from": "human", "value": "weather in Oslo?"},
        {"from": "function_call", "value": json.dumps({"name": "weather", "arguments": {"city": "Oslo"}})},
        {"from": "observation", "value": "sunny, 21 C"},
        {"from": "gpt", "value": "Sunny and 21 C."},
    ],
    "tools": json.dumps([{"name": "weather", "parameters": {"city": "string"}}]),
}
SHAREGPT_AS_MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "hello"},
    {"role": "user", "content": "weather in Oslo?"},
    {"role": "assistant", "content": "",
     "tool_calls": [{"type": "function", "function": {"name": "weather", "arguments": {"city": "Oslo"}}}]},
    {"role": "tool", "content": "sunny, 21 C"},
    {"role": "assistant", "content": "Sunny and 21 C."},
]  # fmt: skip
TOOLS = [{"name": "weather", "parameters": {"city": "string"}}]


@pytest.mark.parametrize("mask_history", [False, True])
def test_sharegpt_multi_turn_with_function_calls(tmp_path, tok, mask_history):
    path = _write(tmp_path / "sg.jsonl", [SHAREGPT])
    ds = build_dataset(tok, DataConfig(files=[str(path)], mask_history=mask_history))
    trained = [6] if mask_history else None  # mask_history: the last assistant turn only
    check_mask(tok, ds.examples[0], SHAREGPT_AS_MESSAGES, TOOLS, trained)


def test_sharegpt_tags_map_other_keys_and_roles(tmp_path, tok):
    tags = {"role_tag": "speaker", "content_tag": "text", "user_tag": "me", "assistant_tag": "bot", "system_tag": "sys"}
    names = {"system": "sys", "human": "me", "gpt": "bot"}
    rec = {"dialog": [{"speaker": names[m["from"]], "text": m["value"]} for m in SHAREGPT["conversations"][:3]]}
    path = _write(tmp_path / "sg.jsonl", [rec])
    src = {"path": str(path), "format": "sharegpt", "columns": {"dialog": "conversations"}, "tags": tags}
    ds = build_dataset(tok, DataConfig(sources=[DataConfig.Source(**src)]))
    check_mask(tok, ds.examples[0], SHAREGPT_AS_MESSAGES[:3])


@pytest.mark.parametrize("mask_history", [False, True])
def test_openai_messages_keep_tool_call_turns(tmp_path, tok, mask_history):
    msgs = [
        {"role": "system", "content": "Tools."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": None,
         "tool_calls": [{"type": "function", "function": {"name": "calc", "arguments": {"expr": "2+2"}}}]},
        {"role": "tool", "content": "4"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "thanks"},
        {"role": "assistant", "content": "You are welcome."},
    ]  # fmt: skip
    path = _write(tmp_path / "m.jsonl", [{"messages": msgs, "tools": TOOLS}])
    ds = build_dataset(tok, DataConfig(files=[str(path)], mask_history=mask_history))
    rendered = [dict(m, content=m["content"] or "") for m in msgs]
    check_mask(tok, ds.examples[0], rendered, TOOLS, [6] if mask_history else None)


def test_alpaca_system_and_history_through_chat_template(tmp_path, tok):
    rec = {"instruction": "Add", "input": "1 2", "output": "3", "system": "Sums.", "history": [["0 0?", "0"], ["1 1?", "2"]]}
    path = _write(tmp_path / "a.jsonl", [rec])
    ds = build_dataset(tok, DataConfig(files=[str(path)], prompt_template="chat"))
    msgs = [
        {"role": "system", "content": "Sums."},
        {"role": "user", "content": "0 0?"}, {"role": "assistant", "content": "0"},
        {"role": "user", "content": "1 1?"}, {"role": "assistant", "content": "2"},
        {"role": "user", "content": "Add\n1 2"}, {"role": "assistant", "content": "3"},
    ]  # fmt: skip
    check_mask(tok, ds.examples[0], msgs)


def test_jinja_file_template_replaces_the_tokenizers(tmp_path):
    plain = tiny_tokenizer()  # its own template is "<s>role: content</s>"; the file's is ChatML
    rec = {"instruction": "Say hi", "output": "hi"}
    path = _write(tmp_path / "a.jsonl", [rec])
    ds = build_dataset(plain, DataConfig(files=[str(path)], prompt_template=str(CHATML)))
    msgs = [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}]
    chatml = tiny_tokenizer(chat_template=CHATML.read_text())
    check_mask(chatml, ds.examples[0], msgs)
    with pytest.raises(DataError, match=r"missing\.jinja.*not found"):
        build_dataset(plain, DataConfig(files=[str(path)], prompt_template=str(tmp_path / "missing.jinja")))


def test_alpaca_prompt_with_system_and_history(tmp_path, tok):
    """The LLM-Adapters prompt extended as LLaMA-Factory's alpaca template: system replaces the
    preamble, history turns are earlier Instruction/Response blocks, each response ends with EOS."""
    rec = {"instruction": "Add", "input": "1 2", "output": "3", "system": "Sums.", "history": [["0 0?", "0"]]}
    ds = build_dataset(tok, DataConfig(files=[str(_write(tmp_path / "a.jsonl", [rec]))]))
    ids, labels = ds.examples[0]
    segments = [
        ("Sums.\n\n### Instruction:\n0 0?\n\n### Response:\n", False), ("0", True), ("</s>", True),
        ("\n\n### Instruction:\nAdd\n\n### Input:\n1 2\n\n### Response:\n", False), ("3", True), ("</s>", True),
    ]  # fmt: skip
    expected = []
    for text, trained in segments:
        part = [tok.eos_token_id] if text == "</s>" else tok(text, add_special_tokens=False)["input_ids"]
        expected += [(t, t if trained else IGNORE_INDEX) for t in part]
    assert list(zip(ids, labels)) == expected
    # Without system and history it is exactly the evaluation's prompt.
    single = {"instruction": "Add", "input": "1 2", "output": "3"}
    ids, labels = build_dataset(tok, DataConfig(files=[str(_write(tmp_path / "b.jsonl", [single]))])).examples[0]
    n = len(format_prompt("Add", "1 2"))
    assert tok.decode(ids[:n]) == format_prompt("Add", "1 2") and labels[:n] == [IGNORE_INDEX] * n
    assert labels[n:] == ids[n:] == tok("3", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


def test_alpaca_prompt_mask_history_trains_last_response_only(tmp_path, tok):
    rec = {"instruction": "Add", "output": "3", "history": [["0 0?", "0"]]}
    ds = build_dataset(tok, DataConfig(files=[str(_write(tmp_path / "a.jsonl", [rec]))], mask_history=True))
    ids, labels = ds.examples[0]
    trained = [t for t, lab in zip(ids, labels) if lab != IGNORE_INDEX]
    assert trained == tok("3", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert tok.decode(ids).count("</s>") == 2  # the masked response still ends with EOS


def test_prompt_completion_is_plain_text(tmp_path, tok):
    rec = {"prompt": "Q: 2+2=", "completion": " 4"}
    ds = build_dataset(tok, DataConfig(files=[str(_write(tmp_path / "pc.jsonl", [rec]))], prompt_template="chat"))
    ids, labels = ds.examples[0]
    assert tok.decode(ids) == "Q: 2+2= 4</s>"
    n = len(rec["prompt"])
    assert labels[:n] == [IGNORE_INDEX] * n and labels[n:] == ids[n:] and len(ids) == n + 3


def test_pretokenized_records_pass_through(tmp_path, tok):
    recs = [{"input_ids": [10, 11, 12, 13], "labels": [-100, -100, 12, 13]}, {"input_ids": [20, 21, 22]}]
    ds = build_dataset(tok, DataConfig(files=[str(_write(tmp_path / "t.jsonl", recs))]))
    assert ds.examples == [([10, 11, 12, 13], [-100, -100, 12, 13]), ([20, 21, 22], [20, 21, 22])]
    assert ds.stats.tokens == 7 and ds.stats.target_tokens == 2 + 2


def test_format_override_and_auto_detection_per_file(tmp_path, tok):
    # `conversations` would be detected as sharegpt; the override reads the file as messages-style
    # via a column rename, and a file's format is decided once, from its first record.
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    path = _write(tmp_path / "c.jsonl", [{"conversations": msgs}])
    src = DataConfig.Source(path=str(path), format="messages", columns={"conversations": "messages"})
    check_mask(tok, build_dataset(tok, DataConfig(sources=[src])).examples[0], msgs)
    mixed = _write(tmp_path / "mixed.jsonl", [{"instruction": "a", "output": "b"}, {"messages": msgs}])
    with pytest.raises(DataError, match=r"mixed\.jsonl line 2: field `instruction`: required.*read as llm_adapters"):
        build_dataset(tok, DataConfig(files=[str(mixed)]))


@pytest.mark.parametrize("alias, name", [("alpaca", "llm_adapters"), ("openai", "messages")])
def test_llama_factory_format_names_are_accepted(tmp_path, tok, alias, name):
    # LLaMA-Factory calls the formats alpaca and openai; they resolve to ours on construction (so the
    # saved config holds one name) and read the same examples.
    recs = {"alpaca": [{"instruction": "a", "input": "b", "output": "c"}],
            "openai": [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}]}[alias]
    path = str(_write(tmp_path / "r.jsonl", recs))
    block, src = DataConfig(files=[path], format=alias), DataConfig.Source(path=path, format=alias)
    assert block.format == src.format == name
    want = build_dataset(tok, DataConfig(files=[path], format=name)).examples
    assert build_dataset(tok, block).examples == build_dataset(tok, DataConfig(sources=[src])).examples == want


def test_base_model_without_chat_template_is_told_what_to_choose(tmp_path):
    base = tiny_tokenizer(chat_template=None)
    chat = _write(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}])
    with pytest.raises(DataError, match=r"c\.jsonl line 1: .*has none \(a base model\?\).*Jinja chat template file"):
        build_dataset(base, DataConfig(files=[str(chat)]))
    alpaca = _write(tmp_path / "a.jsonl", [{"instruction": "a", "output": "b"}])
    with pytest.raises(DataError, match=r"prompt_template is `chat`.*has none.*prompt_template: alpaca"):
        build_dataset(base, DataConfig(files=[str(alpaca)], prompt_template="chat"))
    assert len(build_dataset(base, DataConfig(files=[str(alpaca)]))) == 1  # the Alpaca prompt needs no template
    ok = build_dataset(base, DataConfig(files=[str(chat)], prompt_template=str(CHATML)))
    assert ok.examples[0][0] == tiny_tokenizer()(reference(json.loads(chat.read_text())["messages"])[0])["input_ids"]


def test_prefix_unstable_template_is_refused(tmp_path):
    # Renders the number of messages first, so every prefix differs from the full conversation.
    tok = tiny_tokenizer(chat_template="{{ messages | length }}{% for m in messages %}{{ m['content'] }}{% endfor %}")
    path = _write(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}])
    with pytest.raises(DataError, match="prefix by prefix"):
        build_dataset(tok, DataConfig(files=[str(path)]))
