"""Answer extraction on realistic model outputs, each with its expected answer and verdict under
both extraction modes (LLM-Adapters' published rules, the default, and strict); the shipped
`evaluate` metric loads from its local path with the network blocked and agrees; the
benchmark table, names and data sources."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest

from moe_sft import ConfigError
from moe_sft.evaluation import BENCHMARKS, METRIC_PATH, RULES, DataError, evaluate_model, extract, load_examples, run_eval, score
from moe_sft.evaluation.benchmarks import benchmark, expand, resolve_source, shared_data_dir

SHARED = Path(os.environ.get("MOE_SFT_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data" / "llm-adapters"))

# (benchmark, model output, gold answer, (extracted, verdict) under "llm_adapters", the same under "strict").
# Worked out by hand from LLM-Adapters' published rules (evaluate.py, commonsense_evaluate.py)
# and from the strict rules in moe_sft/evaluation/extract.py's docstring.
CASES = [
    # math, both modes: last number after removing commas, |pred - gold| <= 1e-3
    ("gsm8k", "He needs 24 tiles per sq ft, so 24 * 24 = 576 tiles. The answer is 576.", "576.0", (576.0, True), (576.0, True)),
    ("gsm8k", "She earns $1,234 a month, so the answer is 1,234.", "1234.0", (1234.0, True), (1234.0, True)),
    ("gsm8k", "The house costs $1,000,000 in total.", "1000000", (1000000.0, True), (1000000.0, True)),
    ("svamp", "The answer is 8.0", "8", (8.0, True), (8.0, True)),
    ("svamp", "The answer is 8", "8.0", (8.0, True), (8.0, True)),
    ("svamp", "After rounding, the answer is 8.0004", "8", (8.0004, True), (8.0004, True)),
    ("svamp", "After rounding, the answer is 8.01", "8", (8.01, False), (8.01, False)),
    ("mawps", "The temperature fell from 3 to -15. The answer is -15.", "-15.0", (-15.0, True), (-15.0, True)),
    ("mawps", "The temperature fell by 15 degrees: -15 becomes the answer 15.", "-15.0", (15.0, False), (15.0, False)),
    ("mawps", "The green one is 1.8333 inches longer.", "1.8333333333333335", (1.8333, True), (1.8333, True)),
    ("addsub", "First 3 + 4 = 7, then 7 * 2 = 14. The answer is 14.", "14", (14.0, True), (14.0, True)),
    ("addsub", "First 3 + 4 = 7, then 7 * 2 = 14. The answer is 14.", "7", (14.0, False), (14.0, False)),
    ("multiarith", "The answer is 15. Question: Sam has 3 more books", "15.0", (3.0, False), (3.0, False)),
    ("singleeq", "I cannot work out how many hours he paid for.", "9.0", (None, False), (None, False)),
    ("singleeq", "", "9.0", (None, False), (None, False)),
    ("singleeq", "Half of it: the answer is .5", "0.5", (5.0, False), (5.0, False)),  # ".5" reads as 5 in both
    # AQuA. llm_adapters: the first capital A-E anywhere, inside words too.
    # strict: the last capital A-E standing alone.
    ("aqua", "The answer is (C).", "C", ("C", True), ("C", True)),
    ("aqua", "Because the speed is 5 km/h, the answer is C", "C", ("B", False), ("C", True)),  # "Because"
    ("aqua", "Answer: (B)", "B", ("A", False), ("B", True)),  # "Answer"
    ("aqua", "A train covers 100 m in 10 s, so its speed is 10 m/s. The answer is (D).", "D", ("A", False), ("D", True)),
    ("aqua", "Options A and B are too small; the answer is E.", "A", ("A", True), ("E", False)),
    ("aqua", "Every Cost Divided By Area", "D", ("E", False), (None, False)),  # "Every"
    ("aqua", "The answer is (c)", "C", (None, False), (None, False)),  # lower case is never an option
    # commonsense. llm_adapters: the first case-sensitive substring match of the answer words.
    # strict: the first whole answer word, any case.
    ("boolq", "the correct answer is true", "true", ("true", True), ("true", True)),
    ("boolq", "The correct answer is True.", "true", (None, False), ("true", True)),
    ("boolq", "FALSE", "false", (None, False), ("false", True)),
    ("boolq", "that claim is untrue", "false", ("true", False), (None, False)),  # "untrue"
    ("boolq", "that claim is untrue, so false", "false", ("true", False), ("false", True)),
    ("boolq", "true or false? The correct answer is false", "false", ("true", False), ("true", False)),
    ("piqa", "the correct answer is Solution2", "solution2", (None, False), ("solution2", True)),
    ("piqa", "the correct answer is solution1", "solution2", ("solution1", False), ("solution1", False)),
    ("siqa", "The correct answer is Answer3", "answer3", (None, False), ("answer3", True)),
    ("siqa", "the correct answer is", "answer3", (None, False), (None, False)),
    # LLM-Adapters reads SIQA with ARC's answer1-5 regex; strict knows SIQA has three answers
    ("siqa", "the correct answer is answer4, no, answer2", "answer2", ("answer4", False), ("answer2", True)),
    ("hellaswag", "the correct answer is ending4", "ending4", ("ending4", True), ("ending4", True)),
    ("hellaswag", "ENDING2, because the man keeps running", "ending2", (None, False), ("ending2", True)),
    ("winogrande", "Option2, since Maria is the worse surgeon", "option1", (None, False), ("option2", False)),
    ("winogrande", "the correct answer is option1", "option1", ("option1", True), ("option1", True)),
    ("arc_e", "the correct answer is answer5", "answer5", ("answer5", True), ("answer5", True)),
    ("arc_c", "the correct answer is answer10", "answer1", ("answer1", True), (None, False)),  # "answer1" in "answer10"
    ("obqa", "I think answer2, not answer1", "answer2", ("answer2", True), ("answer2", True)),
]
MODE_COLUMN = {"llm_adapters": 3, "strict": 4}


@pytest.mark.parametrize("mode", list(MODE_COLUMN))
@pytest.mark.parametrize("bench, output, gold, llm_adapters, strict", CASES)
def test_extraction_verdicts(bench, output, gold, llm_adapters, strict, mode):
    extracted, verdict = {"llm_adapters": llm_adapters, "strict": strict}[mode]
    prediction, correct = score(RULES[bench], output, gold, mode)
    assert correct is verdict
    if isinstance(extracted, float):
        assert prediction == pytest.approx(extracted)
    else:
        assert prediction == extracted


def test_default_extraction_is_llm_adapters():
    # "Because" starts with B: only LLM-Adapters' rule reads it as the answer
    assert score(RULES["aqua"], "Because the speed is 5 km/h, the answer is C", "C") == ("B", False)
    assert extract(RULES["boolq"], "that claim is untrue") == "true"


def test_unknown_extraction_mode_is_an_error_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match=r"extraction='loose'; choose one of llm_adapters, strict"):
        score(RULES["gsm8k"], "The answer is 3", "3", "loose")
    # the model and tokenizer are never touched: the options are checked first
    with pytest.raises(ConfigError, match=r"extraction='loose'"):
        evaluate_model(None, None, "siqa", tmp_path / "o", extraction="loose")
    with pytest.raises(ConfigError, match=r"extraction='loose'"):
        run_eval([str(tmp_path / "no-model")], "siqa", tmp_path / "o", extraction="loose")
    assert not (tmp_path / "o").exists()


def test_every_benchmark_has_a_rule_and_cases():
    assert set(RULES) == set(BENCHMARKS)
    assert {c[0] for c in CASES} == set(BENCHMARKS)


def test_metric_loads_offline_and_agrees_with_the_verdicts(monkeypatch):
    """`evaluate.load` of the shipped module touches no network (connections are refused here)."""
    import evaluate

    def refuse(*args, **kwargs):
        raise OSError("network access during evaluate.load")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    metric = evaluate.load(METRIC_PATH)
    for mode, column in MODE_COLUMN.items():
        for bench in BENCHMARKS:
            cases = [c for c in CASES if c[0] == bench]
            kwargs = {} if mode == "llm_adapters" else {"extraction": mode}  # llm_adapters is the default
            res = metric.compute(predictions=[c[1] for c in cases], references=[c[2] for c in cases], benchmark=bench, **kwargs)
            expected = sum(c[column][1] for c in cases)
            assert (res["correct"], res["total"]) == (expected, len(cases))
            assert res["accuracy"] == pytest.approx(expected / len(cases))
    # the modes disagree on the AQuA cases: the keyword is not ignored
    aqua = [c for c in CASES if c[0] == "aqua"]
    assert sum(c[3][1] for c in aqua) != sum(c[4][1] for c in aqua)
    with pytest.raises(ValueError, match="benchmark='nope'"):
        metric.compute(predictions=["1"], references=["1"], benchmark="nope")
    with pytest.raises(ValueError, match="extraction='loose'"):
        metric.compute(predictions=["1"], references=["1"], benchmark="gsm8k", extraction="loose")


def test_metric_is_installed_as_package_data():
    setup = (Path(__file__).resolve().parents[1] / "setup.cfg").read_text()
    assert "moe_sft.evaluation\n" in setup and "metrics/*/*.py" in setup
    assert Path(METRIC_PATH, "llm_adapters_accuracy.py").is_file()


# ---- names, groups and data sources ---------------------------------------------------------


def test_names_aliases_and_groups():
    assert benchmark("ARC-Easy").name == "arc_e" and benchmark("social_i_qa").name == "siqa"
    assert benchmark("OpenBookQA").name == "obqa" and benchmark("GSM8K").name == "gsm8k"
    chosen, from_group = expand("boolq,math")
    assert [b.name for b in chosen] == ["gsm8k", "svamp", "mawps", "aqua", "addsub", "multiarith", "singleeq", "boolq"]
    assert "boolq" not in from_group and "gsm8k" in from_group
    with pytest.raises(ConfigError, match="unknown benchmark 'gsm9k'"):
        expand("gsm9k")


def test_data_sources(tmp_path, monkeypatch):
    gsm8k, hellaswag = BENCHMARKS["gsm8k"], BENCHMARKS["hellaswag"]
    # the shared copy is found by default; HellaSwag is not in it
    monkeypatch.setenv("MOE_SFT_SHARED_DATA", str(SHARED))
    assert shared_data_dir() == SHARED / "dataset"
    assert resolve_source(gsm8k) == str((SHARED / "dataset" / "gsm8k" / "test.json").resolve())
    assert resolve_source(hellaswag) is None
    # an explicit file wins; a folder means <folder>/test.json; a missing file is an error
    own = tmp_path / "hs" / "test.json"
    own.parent.mkdir()
    own.write_text(json.dumps([{"instruction": "Pick. Answer format: ending1/ending2/ending3/ending4", "answer": "ending3"}]))
    assert resolve_source(hellaswag, {"HellaSwag": str(own.parent)}) == str(own.resolve())
    with pytest.raises(DataError, match="no such file"):
        resolve_source(gsm8k, {"gsm8k": str(tmp_path / "nope.json")})
    # anything else is a hub id, read through datasets.load_dataset with the split asked for
    assert resolve_source(hellaswag, {"hellaswag": "someone/hellaswag-llm-adapters"}) == "someone/hellaswag-llm-adapters"
    import datasets

    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split: calls.append((name, split)) or json.loads(own.read_text()))
    examples = load_examples(hellaswag, "someone/hellaswag-llm-adapters", split="validation")
    assert calls == [("someone/hellaswag-llm-adapters", "validation")]
    assert [(e.index, e.answer) for e in examples] == [(0, "ending3")]
