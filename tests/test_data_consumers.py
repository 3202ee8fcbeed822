"""The other consumers of the loader: math RL prompts (prompt + gold answer), the pruning profile's
texts, and the statistics kept on the SFT dataset."""

import json
import logging
from pathlib import Path

import pytest

from moe_sft.data import DataError, rl_prompts
from moe_sft.evaluation.benchmarks import format_prompt
from moe_sft.pruning.profile import read_texts
from moe_sft.testing import tiny_tokenizer
from moe_sft.train.config import DataConfig
from moe_sft.train.data import IGNORE_INDEX, build_dataset

ROOT = Path(__file__).resolve().parents[1]
CHATML = ROOT / "configs" / "tiny" / "data" / "chatml.jinja"


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer(chat_template=CHATML.read_text())


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_rl_prompts_from_llm_adapters_and_gsm8k_records(tmp_path, tok):
    adapters = _jsonl(tmp_path / "la.jsonl", [{"instruction": "What is 6 + 6?", "input": "", "output": "...", "answer": "12"},
                                              {"instruction": "Half of x", "input": "x = 9", "answer": 4.5}])  # fmt: skip
    gsm = _jsonl(tmp_path / "gsm.jsonl", [{"question": "Tom has 1,000 apples and buys 234.", "answer": "1000 + 234 = 1234\n#### 1,234"}])
    prompts = rl_prompts(tok, DataConfig(files=[adapters, gsm]))
    assert [(p.prompt, p.answer) for p in prompts] == [
        (format_prompt("What is 6 + 6?"), "12"),
        (format_prompt("Half of x", "x = 9"), "4.5"),
        (format_prompt("Tom has 1,000 apples and buys 234."), "1234"),
    ]
    assert prompts[2].where == f"{gsm} line 1" and prompts[2].source == gsm
    chat = rl_prompts(tok, DataConfig(files=[gsm], prompt_template="chat"))
    user = [{"role": "user", "content": "Tom has 1,000 apples and buys 234."}]
    assert chat[0].prompt == tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    assert chat[0].prompt.endswith("<|im_start|>assistant\n")


def test_rl_prompts_with_renamed_columns_and_errors(tmp_path, tok):
    other = _jsonl(tmp_path / "o.jsonl", [{"problem": "1+1?", "solution": "2"}])
    src = DataConfig.Source(path=other, columns={"problem": "instruction", "solution": "answer"})
    assert [(p.prompt, p.answer) for p in rl_prompts(tok, DataConfig(sources=[src]))] == [(format_prompt("1+1?"), "2")]
    for rec, msg in [({"question": "q", "answer": "no marker"}, "must end with `#### <final answer>`"),
                     ({"instruction": "q"}, r"field `answer`: RL prompts need a gold `answer`"),
                     ({"problem": "q", "answer": "1"}, r"need `instruction` \+ `answer`")]:  # fmt: skip
        path = _jsonl(tmp_path / "bad.jsonl", [rec])
        with pytest.raises(DataError, match=rf"{path} line 1: .*{msg}"):
            rl_prompts(tok, DataConfig(files=[path]))


def test_profile_texts_render_as_training_does(tmp_path, tok):
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    path = _jsonl(tmp_path / "mix.jsonl", [{"instruction": "Add", "input": "1 2", "output": "3"}])
    chat = _jsonl(tmp_path / "chat.jsonl", [{"messages": msgs}])
    text = _jsonl(tmp_path / "text.jsonl", [{"text": "plain words"}, {"text": "more"}])
    prompt_only = _jsonl(tmp_path / "test.jsonl", [{"instruction": "Add", "input": "", "answer": "3"}])
    assert read_texts(path, tok) == [format_prompt("Add", "1 2") + "3</s>"]
    assert read_texts(chat, tok) == [tok.apply_chat_template(msgs, tokenize=False)]
    assert read_texts(text, tok, limit=1) == ["plain words"]
    assert read_texts(prompt_only, tok) == [format_prompt("Add")]  # evaluation files have no `output`
    sg = _jsonl(tmp_path / "sg.jsonl", [{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}])
    assert read_texts(sg, tok) == read_texts(chat, tok)


def test_statistics_per_source_truncation_and_masked_share(tmp_path, tok, caplog):
    a = _jsonl(tmp_path / "a.jsonl", [{"instruction": "a", "output": "b"}, {"instruction": "y" * 300, "output": "z"}])
    b = _jsonl(tmp_path / "b.jsonl", [{"prompt": "p", "completion": "c" * 250}])
    with caplog.at_level(logging.INFO, logger="moe_sft.data.stats"):
        ds = build_dataset(tok, DataConfig(files=[a, b], max_length=200))
    s = ds.stats
    prompt_a = len(format_prompt("a"))
    full_long = len(format_prompt("y" * 300)) + 1 + 1
    assert (s.records, s.examples, s.dropped, s.truncated) == (3, 2, 1, 2)
    assert s.longest == full_long and s.longest_where == f"{a} line 2"
    assert s.tokens == (prompt_a + 2) + 200 and s.tokens == sum(len(x) for x, _ in ds.examples)
    assert s.target_tokens == 2 + 199 == sum(lab != IGNORE_INDEX for _, y in ds.examples for lab in y[1:])
    assert s.masked_share == pytest.approx(1 - 201 / s.tokens)
    assert {k: (v.records, v.examples) for k, v in s.per_source.items()} == {a: (2, 1), b: (1, 1)}
    logged = caplog.text
    assert f"source {a}: 2 records, 1 examples" in logged and f"longest: {full_long} tokens, {a} line 2" in logged
    assert f"{100 * s.masked_share:.1f}% masked" in logged
