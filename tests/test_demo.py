"""`moe-sft demo --quick` end to end: its report, its reproducibility (same seed, CPU load), the
pruning-after-fine-tuning step it reports, its RL arms, and the honesty of its corpus, tokenizer,
metric and reward."""

import dataclasses
import json
import math
import os
import random
import resource
import string
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml

from moe_sft.cli import main
from moe_sft.demo import corpus
from moe_sft.demo import evaluate as ev
from moe_sft.demo.report import claim
from moe_sft.demo.run import METHODS, QUICK, RL_METHODS, Arm, arm_yaml, texts
from moe_sft.demo.stats import exceeds_noise, mean_std
from moe_sft.train import load_train_config
from moe_sft.train.config import DataConfig
from moe_sft.train.data import IGNORE_INDEX, Record, encode_record

PNG = b"\x89PNG\r\n\x1a\n"
UNTIMED = ("timing", "machine")  # the only sections allowed to differ between runs


def _quick(out, *extra):
    assert main(["demo", "--quick", "--out", str(out), *extra]) == 0
    return json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    _quick(out)
    return out


@pytest.fixture(scope="module")
def report(quick):
    return json.loads((quick / "results.json").read_text())


def _numbers(report):
    return {k: v for k, v in report.items() if k not in UNTIMED}


def _walk(x):
    if isinstance(x, dict):
        for v in x.values():
            yield from _walk(v)
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _walk(v)
    elif isinstance(x, (int, float)) and not isinstance(x, bool):
        yield x


# ---- the report ------------------------------------------------------------------------------
def test_quick_run_writes_report_and_plots(quick, report):
    names, rl_names = [a.name for a in METHODS], [a.name for a in RL_METHODS]
    s = report["settings"]
    assert s["methods"] == names and [a["name"] for a in s["rl_methods"]] == rl_names
    assert list(report["methods"]) == list(report["summary"]) == names + rl_names and list(report["rl"]) == rl_names
    assert s["finetune_seeds"] == [0, 1] and all(a["seeds"] == [0] for a in s["rl_methods"])  # --quick: 1 GRPO seed
    seeds = {**{a: s["finetune_seeds"] for a in names}, **{a["name"]: a["seeds"] for a in s["rl_methods"]}}
    for arm, runs in report["methods"].items():
        assert [r["seed"] for r in runs] == seeds[arm], arm
        for r in runs:
            assert r["steps"] == s["finetune_steps"], arm  # every arm trains as long, phases included
            assert 0 <= r["usage_entropy"] <= 1 and set(r["accuracy"]) == set(corpus.SKILL_NAMES)
            assert len(r["random"]) == s["prune_seeds"]
        for key in ("target", "rare", "other", "all", "tail_rare", "random_rare", "tail_all", "random_all"):
            m = report["summary"][arm][key]
            assert m["n"] == len(seeds[arm]) and 0 <= m["mean"] <= 1 and m["std"] >= 0, (arm, key)
    assert report["pretrain"]["steps"] == s["pretrain_steps"]
    assert all(math.isfinite(v) for v in _walk(report))
    assert report["claim"]["subject"] == "condenser" and report["claim"]["tail_loss_rare"]["verdict"]
    md = (quick / "results.md").read_text()
    for arm in names:
        assert md.count(f"| {arm} |") == 2, arm  # fine-tuning table and pruning table
    for arm in rl_names:
        assert md.count(f"| {arm} |") == 3, arm  # and the RL table
    for text in ("Noise rule", "load average", "optimizer steps", "Wall time", "Claim:", report["machine"]["cpu"],
                 "## 4. RL on `mul`", "| vanilla (SFT) |", "grpo − grpo_no_mask", "grpo − grpo_no_replay"):  # fmt: skip
        assert text in md, text
    for png in ("methods.png", "pruning.png", "routing.png", "skills.png", "profile/usage_heatmap.png",
                "finetune/vanilla/seed0/expert_load.png", "finetune/grpo/seed0/expert_load.png"):  # fmt: skip
        assert (quick / png).read_bytes()[:8] == PNG, png
    assert json.loads((quick / "demo.json").read_text())["status"] == "done"


def test_seeds_change_the_fine_tuning(report):
    # The reproducibility tests below compare real numbers: the seeds do change them.
    for arm in ("vanilla", "densemixer"):
        a, b = report["methods"][arm]
        assert a["usage_entropy"] != b["usage_entropy"], arm


def test_arms_ran_through_train_recipes(quick, report):
    # Every arm's YAMLs are valid `moe-sft train` configs, chained by `then:`, and produced a
    # patched checkpoint with that arm's blocks; the condenser ran phase 1, then phase 2.
    for arm in METHODS:
        for seed in report["settings"]["finetune_seeds"]:
            cfg = load_train_config(quick / "configs" / arm.name / f"seed{seed}.yaml")
            assert cfg.model.path == str(quick / "pretrained") and cfg.training["seed"] == seed
            saved = json.loads((quick / "finetune" / arm.name / f"seed{seed}" / "final" / "moe_sft_config.json").read_text())
            for key in arm.phases[-1]:
                assert saved.get(key) is not None, (arm.name, key, saved)
    phase2 = json.loads((quick / "finetune" / "condenser" / "seed0" / "final" / "moe_sft_config.json").read_text())
    assert phase2["condenser"]["condensers"]["num"] == 1
    assert (quick / "finetune" / "condenser" / "seed0_phase1" / "final" / "moe_sft_config.json").is_file()
    first = yaml.safe_load((quick / "configs" / "condenser" / "seed0.yaml").read_text())
    assert first["then"].endswith("condenser/seed0_phase2.yaml")
    # the pre-trained base is a stock checkpoint (no moe_sft files), loadable by transformers alone
    assert not (quick / "pretrained" / "moe_sft_config.json").exists()


def test_rl_arms_ran_through_rl_recipes(quick, report):
    # Every RL arm and seed is a valid `moe-sft rl` YAML: GRPO from the pre-trained base with every
    # method off, exact-match reward, the arm's mask and replay, as many updates as the SFT arms,
    # fp32; its prompts are the SFT arms' questions rendered as the evaluation feeds them.
    from moe_sft.data import rl_prompts
    from moe_sft.rl import load_rl_config

    s = report["settings"]
    sft = [json.loads(line)["messages"] for line in (quick / "data" / "finetune_mul.jsonl").read_text().splitlines()]
    tok = corpus.tokenizer()
    for arm in RL_METHODS:
        for seed in next(a["seeds"] for a in s["rl_methods"] if a["name"] == arm.name):
            cfg = load_rl_config(quick / "configs" / arm.name / f"seed{seed}.yaml")
            assert cfg.model.path == str(quick / "pretrained") and cfg.routing_replay == arm.routing_replay
            assert [r.type for r in cfg.rewards] == ["exact_match"] and cfg.grpo["bf16"] is False
            g = cfg.grpo
            assert g["max_steps"] == s["finetune_steps"] and g["top_entropy_quantile"] == arm.top_entropy_quantile
            assert g["per_device_train_batch_size"] == s["finetune_batch_size"] and g["learning_rate"] == s["finetune_lr"]
            assert g["num_generations"] == s["rl_generations"] == 8
            assert g["seed"] == seed and g["router_aux_loss_coef"] == 0.0  # no aux loss, as the SFT arms
            assert g["max_completion_length"] == s["rl_max_completion_length"] == 4  # "891" + EOS
            assert (quick / "finetune" / arm.name / f"seed{seed}" / "final" / "moe_sft_config.json").is_file()
            assert report["methods"][arm.name][0]["steps"] == s["finetune_steps"]
    prompts = rl_prompts(tok, cfg.data)
    assert [(p.prompt, p.answer) for p in prompts] == [(f"<s>{u['content']}=", a["content"]) for u, a in sft]


def test_rl_metrics_come_from_the_run_log(report):
    # The RL table's numbers are the logged ones: rollout replay leaves no mismatch in the experts
    # the training forward used; without replay the forward uses its router's own picks; the
    # forking-token mask keeps its top 20% of tokens (ties included) and is off at rho 1.
    for arm in RL_METHODS:
        for run in report["methods"][arm.name]:
            rl, log = run["rl"], run["rl"]["log"]
            steps = report["settings"]["finetune_steps"]
            assert [e["step"] for e in log] == list(range(1, steps + 1))  # logging_steps 1 in --quick
            assert rl["reward_first"] == log[0]["reward"] and rl["reward_last"] == log[-1]["reward"]
            for key in ("routing/mismatch", "routing/mismatch_replayed", "routing/mismatch_tokens"):
                assert all(0 <= e[key] <= 1 for e in log), key
            assert rl["mismatch"] == pytest.approx(sum(e["routing/mismatch"] for e in log) / len(log))
            if arm.routing_replay == "rollout":
                assert all(e["routing/mismatch_replayed"] == 0 for e in log)
            else:
                assert all(e["routing/mismatch_replayed"] == e["routing/mismatch"] for e in log)
            if arm.top_entropy_quantile < 1:
                assert all(0.2 <= e["entropy_mask/kept_fraction"] < 0.5 for e in log)
            else:
                assert rl["kept_fraction"] is None and not any("entropy_mask/kept_fraction" in e for e in log)
        assert report["rl"][arm.name]["mismatch"]["mean"] == pytest.approx(
            sum(r["rl"]["mismatch"] for r in report["methods"][arm.name]) / len(report["methods"][arm.name]))


def test_an_arm_is_data(tmp_path):
    # A new arm is one METHODS entry: a three-phase arm gets three chained YAMLs whose steps add up.
    arm = Arm("three", ({"condenser": {}}, {}, {"moe_bias_head": {}}))
    s = dataclasses.replace(QUICK, finetune_steps=10)
    first = arm_yaml(arm, str(tmp_path / "base"), str(tmp_path / "d.jsonl"), tmp_path, s, seed=5)
    chain, path = [], first
    while path is not None:
        data = yaml.safe_load(path.read_text())
        chain.append(data)
        path = Path(data["then"]) if "then" in data else None
    assert [c["training"]["max_steps"] for c in chain] == [4, 3, 3]
    assert [c["training"]["seed"] for c in chain] == [5, 5, 5]
    assert "condenser" in chain[0] and "moe_bias_head" in chain[2]
    assert chain[1]["model"]["path"] == chain[0]["training"]["output_dir"] + "/final"
    assert chain[2]["training"]["output_dir"].endswith("three/seed5")


def test_long_tail_masked_is_the_fine_tuned_models_own(quick, report):
    # The pruning-after-fine-tuning step masks the least-used experts of a profile of that
    # fine-tuned model (moe_sft.pruning), never an always-active condenser, and the random
    # control masks as many experts per layer.
    from moe_sft import from_pretrained
    from moe_sft.pruning import select_experts

    s = report["settings"]
    profile_texts = texts(corpus.sample(s["profile_texts"], s["seed"] + 1))
    tok = corpus.tokenizer()
    for arm in ("vanilla", "condenser"):
        run = report["methods"][arm][1]
        model = from_pretrained(quick / "finetune" / arm / "seed1" / "final")
        keep = ev.always_active(model)
        assert bool(keep) == (arm == "condenser")
        prof = ev.profile(model, tok, profile_texts)
        expect = select_experts(prof, "least_used", ratio=s["prune_ratio"], exclude=keep)
        assert run["tail"]["experts"] == {str(k): v for k, v in expect.items()}
        for layer, ids in run["tail"]["experts"].items():
            assert not set(ids) & set(keep.get(int(layer), []))
            for r in run["random"]:
                assert len(r["experts"][layer]) == len(ids) and not set(r["experts"][layer]) & set(keep.get(int(layer), []))


# ---- reproducibility -------------------------------------------------------------------------
def test_same_seed_gives_identical_numbers(tmp_path, report):
    again = _quick(tmp_path / "again")
    assert _numbers(again) == _numbers(report)


def test_same_numbers_under_cpu_load(tmp_path, report):
    # one busy-loop process per core competes with the demo for the whole run
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_utime
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 1)]
    try:
        loaded = _quick(tmp_path / "loaded", "--threads", "1")
    finally:
        for p in busy:
            p.kill()
            p.wait()
    burnt = resource.getrusage(resource.RUSAGE_CHILDREN).ru_utime - before  # CPU seconds the busy loops took
    assert burnt > 2 * len(busy), burnt  # the load was there
    assert _numbers(loaded) == _numbers(report)


# ---- statistics and the claim's verdict -----------------------------------------------------
def test_mean_std_and_noise_rule():
    m = mean_std([0.1, 0.2, 0.3])
    assert m["mean"] == pytest.approx(0.2) and m["std"] == pytest.approx(0.1) and m["n"] == 3
    assert mean_std([0.4]) == {"mean": 0.4, "std": 0.0, "n": 1}
    a, b = mean_std([0.50, 0.52, 0.48]), mean_std([0.40, 0.42, 0.38])
    # |0.10| against 2 * sqrt(0.02^2/3 + 0.02^2/3) = 0.0327
    assert exceeds_noise(a, b) is True
    assert exceeds_noise(a, mean_std([0.47, 0.52, 0.50])) is False
    assert exceeds_noise(a, mean_std([0.1])) is None  # one seed: no noise estimate


def _summary(**tail_loss_rare):
    return {arm: {"tail_loss_rare": mean_std(v), "tail_loss_all": mean_std([0.0, 0.0, 0.0])} for arm, v in tail_loss_rare.items()}


@pytest.mark.parametrize("condenser, verdict", [
    ([0.01, 0.02, 0.00], "supported"),  # loses less than both, beyond the noise
    ([0.30, 0.31, 0.29], "contradicted"),  # loses more than both
    ([0.10, 0.30, 0.15], "within noise"),
    ([0.01], "no noise estimate"),
])  # fmt: skip
def test_claim_verdict(condenser, verdict):
    c = claim(_summary(condenser=condenser, densemixer=[0.2, 0.21, 0.19], esft=[0.15, 0.16, 0.14], vanilla=[0.5, 0.5, 0.5]))
    assert c["rivals"] == ["densemixer", "esft"]
    assert c["tail_loss_rare"]["verdict"] == verdict
    assert c["tail_loss_all"]["verdict"] in ("within noise", "no noise estimate")  # equal losses
    assert claim(_summary(vanilla=[0.1, 0.2])) is None  # no condenser arm: no claim to test


# ---- corpus, tokenizer, metric ---------------------------------------------------------------
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
    model = AutoModelForCausalLM.from_pretrained(quick / "finetune" / "vanilla" / "seed0" / "final").eval()
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
    verdicts = ev.exact_match(model, tok, golds)
    expected = [g == a for g, (_, a) in zip(greedy, pairs)] + [True] * sum(1 for g in greedy if g)
    assert verdicts == expected
    assert any(verdicts) and not all(verdicts)


def test_reward_is_the_evaluations_verdict(quick, report):
    # A GRPO reward of 1 is exactly what the demo's evaluation counts correct: greedy completions
    # (as long as the RL arms' completions may be), decoded as TRL decodes them, scored by the
    # exact_match reward, against `exact_match` on the same questions and golds. Questions whose
    # answer fits that length (as every `mul` answer does).
    from transformers import AutoModelForCausalLM

    from moe_sft.rl import ExactMatchReward

    tok = corpus.tokenizer()
    limit = report["settings"]["rl_max_completion_length"]
    model = AutoModelForCausalLM.from_pretrained(quick / "finetune" / "vanilla" / "seed0" / "final").eval()
    pairs = [(q, a) for name in corpus.SKILL_NAMES for q, a in corpus.eval_set(8, seed=11)[name] if len(a) < limit]
    completions, golds = [], []
    for q, a in pairs:
        ids = tok(f"<s>{q}=", add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=limit, do_sample=False, eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.pad_token_id)  # fmt: skip
        new = out[0, ids.shape[1] :].tolist()
        text = tok.decode(new, skip_special_tokens=True)
        completions.append(text)
        golds.append((q, a))
        if new[-1] == tok.eos_token_id:  # the model's own answer as a gold too, so both verdicts occur
            completions.append(text)
            golds.append((q, text))
    rewards = ExactMatchReward()(completions=completions, answer=[a for _, a in golds])
    verdicts = ev.exact_match(model, tok, golds)
    assert [r == 1.0 for r in rewards] == verdicts
    assert any(verdicts) and not all(verdicts)
    assert any(corpus.skill_of(q) == "mul" for q, _ in golds)


def test_demo_refuses_a_foreign_folder(tmp_path):
    (tmp_path / "mine.txt").write_text("keep")
    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 2
    assert (tmp_path / "mine.txt").read_text() == "keep"
