"""`moe-sft demo --quick` end to end, and the honesty of its corpus, tokenizer and metric."""

import json
import math
import random
import string
from collections import Counter

import pytest
import torch
import yaml

from moe_sft.cli import main
from moe_sft.demo import corpus
from moe_sft.demo.run import METHODS, exact_match
from moe_sft.train import load_train_config
from moe_sft.train.data import IGNORE_INDEX, Record, encode_record
from moe_sft.train.config import DataConfig

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    return out


def _numbers(x):
    if isinstance(x, dict):
        for v in x.values():
            yield from _numbers(v)
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _numbers(v)
    elif isinstance(x, (int, float)) and not isinstance(x, bool):
        yield x


def test_quick_run_writes_table_and_plots(quick):
    report = json.loads((quick / "results.json").read_text())
    assert list(report["methods"]) == list(METHODS)
    methods = [r["method"] for r in report["table"]]
    assert methods[1:] == list(METHODS) and methods[0].startswith("pre-trained")
    for row in report["table"][1:]:
        for key in ("target_acc", "rare_acc", "other_acc", "usage_entropy", "median_step_ms"):
            assert math.isfinite(row[key]), (row["method"], key)
        assert 0 <= row["target_acc"] <= 1 and 0 <= row["usage_entropy"] <= 1 and row["median_step_ms"] > 0
        assert row["steps"] == report["settings"]["finetune_steps"]  # every method trains as long
    assert all(math.isfinite(v) for v in _numbers(report))
    md = (quick / "results.md").read_text()
    for method in METHODS:
        assert f"| {method} |" in md
    for name in ("least used", "random", "most used"):
        assert f"| {name}" in md
    assert len(report["pruning"]["accuracy"]["random"]) == len(report["settings"]["prune_seeds"])
    for png in ("methods.png", "skills.png", "pruning.png", "profile/usage_heatmap.png", "finetune/vanilla/expert_load.png"):
        assert (quick / png).read_bytes()[:8] == PNG, png
    assert json.loads((quick / "demo.json").read_text())["status"] == "done"


def test_methods_ran_through_train_recipes(quick):
    # Every method's YAML is a valid `moe-sft train` config and produced a patched checkpoint
    # with that method's blocks; the condenser ran phase 1 then phase 2 (`then:`).
    for method, blocks in METHODS.items():
        name = "condenser_phase1" if method == "condenser" else method
        cfg = load_train_config(quick / "configs" / f"{name}.yaml")
        assert cfg.model.path == str(quick / "pretrained")
        saved = json.loads((quick / "finetune" / method / "final" / "moe_sft_config.json").read_text())
        for key in blocks:
            assert saved.get(key) is not None, (method, key, saved)
    phase2 = json.loads((quick / "finetune" / "condenser" / "final" / "moe_sft_config.json").read_text())
    assert phase2["condenser"]["condensers"]["num"] == 1
    assert (quick / "finetune" / "condenser_phase1" / "final" / "moe_sft_config.json").is_file()
    assert yaml.safe_load((quick / "configs" / "condenser_phase1.yaml").read_text())["then"].endswith("condenser_phase2.yaml")
    # the pre-trained base is a stock checkpoint (no moe_sft files), loadable by transformers alone
    assert not (quick / "pretrained" / "moe_sft_config.json").exists()


def test_held_out_questions_never_trained_on(quick):
    report = json.loads((quick / "results.json").read_text())
    s = report["settings"]
    evalset = corpus.eval_set(s["eval_per_skill"], seed=s["seed"] + 100)
    held = {q for pairs in evalset.values() for q, _ in pairs}
    for f in (quick / "data").glob("*.jsonl"):
        questions = {json.loads(line)["messages"][0]["content"] for line in f.read_text().splitlines()}
        assert questions and not questions & held, f


def test_skill_frequencies_are_zipf_long_tailed():
    w = corpus.skill_weights()
    assert list(w) == list(corpus.SKILL_NAMES) and sum(w.values()) == pytest.approx(1)
    for i, name in enumerate(corpus.SKILL_NAMES):  # p_i proportional to (i+1)^-s
        assert w[name] / w["copy"] == pytest.approx((i + 1) ** -corpus.ZIPF_S)
    counts = Counter(corpus.skill_of(q) for q, _ in corpus.sample(20000, seed=3))
    for name in corpus.SKILL_NAMES:
        assert counts[name] / 20000 == pytest.approx(w[name], abs=0.01), name
    freqs = [counts[n] for n in corpus.SKILL_NAMES]
    assert freqs == sorted(freqs, reverse=True) and freqs[0] > 10 * freqs[-1]  # most frequent first, a long tail


def _independent_answer(question: str) -> str:
    """A second, separate computation of each skill's answer."""
    code, args = question.split(" ", 1)
    if code in "ADX":
        a, op, b = args[:2], args[2], args[3:]
        return str(eval(f"{int(a)}{op}{int(b)}"))  # noqa: S307 - digits and one operator
    if code == "C":
        return args
    if code == "R":
        return "".join(reversed(args))
    if code == "M":
        return str(max(int(c) for c in args))
    if code == "S":
        return "".join(str(d) for d in sorted(int(c) for c in args))
    if code == "N":
        return args.translate(str.maketrans(string.ascii_lowercase, string.ascii_lowercase[1:] + "a"))
    if code == "K":
        return str(sum(1 for _ in args))
    raise AssertionError(question)


@pytest.mark.parametrize("skill", corpus.SKILL_NAMES)
def test_answers_are_correct(skill):
    rng = random.Random(7)
    for _ in range(50):
        q, a = corpus.example(skill, rng)
        assert corpus.skill_of(q) == skill
        assert a == _independent_answer(q) == corpus.solve(q), q
    pairs = corpus.eval_set(20, seed=1)[skill]
    assert len({q for q, _ in pairs}) == 20 and all(a == _independent_answer(q) for q, a in pairs)


def test_tokenizer_round_trips_every_character():
    tok = corpus.tokenizer()
    unk = tok.unk_token_id
    for c in corpus.CHARS:
        ids = tok(c, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and ids[0] != unk and tok.decode(ids) == c, c
    assert len(tok) == 4 + len(corpus.CHARS)
    for q, a in corpus.sample(200, seed=5):
        text = f"{q}={a}"
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert len(ids) == len(text) and unk not in ids and tok.decode(ids) == text


def test_chat_record_labels_only_the_answer():
    tok = corpus.tokenizer()
    ids, labels = encode_record(tok, Record("r", corpus.to_record("A 47+85", "132")), DataConfig(files=["x"], format="messages"))
    assert tok.decode(ids) == "<s>A 47+85=132</s>"
    assert [t for t in labels if t != IGNORE_INDEX] == tok("132", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


def test_exact_match_equals_greedy_generation(quick):
    from transformers import AutoModelForCausalLM

    tok = corpus.tokenizer()
    model = AutoModelForCausalLM.from_pretrained(quick / "finetune" / "vanilla" / "final").eval()
    pairs = [p for name in corpus.SKILL_NAMES for p in corpus.eval_set(4, seed=11)[name]]
    # include, for each question, the model's own greedy output as a gold answer, so both
    # verdicts occur whatever the model learned
    greedy = []
    for q, _ in pairs:
        ids = tok(f"<s>{q}=", add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.pad_token_id)  # fmt: skip
        new = out[0, ids.shape[1] :].tolist()
        greedy.append(tok.decode(new[:-1]) if new and new[-1] == tok.eos_token_id else None)
    golds = [(q, a) for q, a in pairs] + [(q, g) for (q, _), g in zip(pairs, greedy) if g]
    verdicts = exact_match(model, tok, golds)
    expected = [g == a for g, (_, a) in zip(greedy, pairs)] + [True] * sum(1 for g in greedy if g)
    assert verdicts == expected
    assert any(verdicts) and not all(verdicts)


def test_demo_refuses_a_foreign_folder(tmp_path):
    (tmp_path / "mine.txt").write_text("keep")
    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 2
    assert (tmp_path / "mine.txt").read_text() == "keep"
