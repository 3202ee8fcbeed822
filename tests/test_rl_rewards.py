"""Rewards: the accuracy reward's verdict is `moe-sft eval`'s verdict on the same output (the
evaluation's extraction cases, both modes, and a real eval run's predictions); exact-match,
format and user rewards; gold answers the rule cannot judge are refused before training."""

from __future__ import annotations

import json

import pytest
import torch
from test_eval_e2e import DATA_DIR, bigram_model
from test_eval_extract import CASES, MODE_COLUMN

from moe_sft import ConfigError
from moe_sft.data import RLPrompt
from moe_sft.evaluation import evaluate_model
from moe_sft.rl import AccuracyReward, ExactMatchReward, FormatReward, RewardConfig, build_rewards
from moe_sft.rl.rewards import check_golds
from moe_sft.testing import tiny_tokenizer


@pytest.mark.parametrize("mode", list(MODE_COLUMN))
def test_accuracy_reward_equals_the_evaluation_verdicts(mode):
    """Every extraction case of tests/test_eval_extract.py, as one batch per benchmark: reward 1
    exactly where the evaluation counts the output correct."""
    by_bench: dict[str, list] = {}
    for case in CASES:
        by_bench.setdefault(case[0], []).append(case)
    for bench, cases in by_bench.items():
        reward = AccuracyReward(bench, mode)
        # Completions as generated (eval strips its outputs, the reward strips them the same way).
        got = reward(completions=[f"  {c[1]}\n" for c in cases], answer=[c[2] for c in cases])
        expected = [float(c[MODE_COLUMN[mode]][1]) for c in cases]
        assert got == expected, (bench, mode)


@pytest.mark.parametrize("bench, folder, mode", [("multiarith", "MultiArith", "llm_adapters"), ("arc_e", "ARC-Easy", "strict")])
def test_accuracy_reward_equals_a_real_eval_run(tmp_path, bench, folder, mode):
    """`moe-sft eval`'s own predictions file: the reward of each recorded output equals its
    recorded verdict, with some of each (the bigram model answers "answer1 3")."""
    torch.set_num_threads(1)
    tok = tiny_tokenizer()
    model = bigram_model("qwen3_moe", tok)
    evaluate_model(model, tok, bench, tmp_path, data={bench: str(DATA_DIR / folder / "test.json")}, limit=40, max_new_tokens=12,
                   extraction=mode)  # fmt: skip
    records = [json.loads(line) for line in (tmp_path / "model" / f"{bench}.jsonl").read_text().splitlines()]
    verdicts = [float(r["correct"]) for r in records]
    assert 0 < sum(verdicts) < len(verdicts), verdicts
    assert AccuracyReward(bench, mode)(completions=[r["output"] for r in records], answer=[r["gold"] for r in records]) == verdicts


def test_exact_match_format_and_names():
    assert ExactMatchReward()(completions=[" 132\n", "13", "1320"], answer=["132", "132", "132"]) == [1.0, 0.0, 0.0]
    assert FormatReward(r"[Tt]he answer is \d+")(completions=["so the answer is 4.", "4", "The answer is x"]) == [1.0, 0.0, 0.0]
    # TRL's chat completions are message lists
    assert ExactMatchReward()(completions=[[{"role": "assistant", "content": "7"}]], answer=["7"]) == [1.0]
    funcs, weights = build_rewards([RewardConfig(type="accuracy"), RewardConfig(type="accuracy", benchmark="aqua"),
                                    RewardConfig(type="format", weight=0.1)])  # fmt: skip
    assert [f.__name__ for f in funcs] == ["accuracy", "accuracy_2", "format"]  # TRL logs rewards/<name>/mean
    assert weights == [1.0, 1.0, 0.1]


def test_golds_the_rule_cannot_judge_are_refused():
    prompts = [RLPrompt("What is 1+1?", "2", "data.jsonl line 1", "data.jsonl"), RLPrompt("Pick one", "C", "data.jsonl line 2", "data.jsonl")]
    check_golds([RewardConfig(type="format")], prompts)  # no accuracy reward: nothing to judge
    with pytest.raises(ConfigError, match=r"data\.jsonl line 2: gold 'C' is not a finite number, which rewards\[0\] \(accuracy"):
        check_golds([RewardConfig(type="accuracy")], prompts)
    with pytest.raises(ConfigError, match=r"data\.jsonl line 1: gold '2' is not one of A/B/C/D/E"):
        check_golds([RewardConfig(type="accuracy", benchmark="aqua")], prompts)
