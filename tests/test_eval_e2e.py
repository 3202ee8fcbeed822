"""`moe-sft eval` end to end: batched generation equals batch size 1 on every core family, the
CLI on saved tiny checkpoints (patched and stock) over the shared LLM-Adapters data writes all
outputs and its table equals the per-example verdicts, resume, settings checks, the extraction
mode option, malformed data, log-likelihood scoring and MoE-Bias adapters."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch

import moe_sft
from moe_sft import MoEBiasHeadConfig, MoESFTConfig, RoutingConfig
from moe_sft.cli import main
from moe_sft.evaluation import format_prompt, generate, loglik_choose, prepare_tokenizer
from moe_sft.testing import CORE_FAMILIES, tiny_model, tiny_tokenizer

SHARED = Path(os.environ.get("MOE_SFT_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data" / "llm-adapters"))
DATA_DIR = SHARED / "dataset"

# A "bigram" model: every layer adds nothing, so the next token depends on the current one only.
# Every prompt ends with "### Response:\n", after which the model writes "answer1 3" and stops:
# correct exactly where the gold is answer1 (SIQA, ARC) or the number 3 (MultiArith).
CHAIN = "\nanswer1 3"


@pytest.fixture(autouse=True)
def one_thread():
    # Generation is hundreds of tiny ops per token: a second thread only adds synchronisation
    # (10x slower on a loaded 2-core machine). Restored afterwards for the other test files.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def bigram_model(model_type: str, tokenizer, chain: str = CHAIN):
    model = tiny_model(model_type, max_position_embeddings=4096)
    ids = [tokenizer.convert_tokens_to_ids(c) for c in chain] + [tokenizer.eos_token_id]
    assert len(set(ids)) == len(ids), "each character of the chain needs a single successor"
    with torch.no_grad():
        for name, p in model.model.layers.named_parameters():
            if "norm" not in name:
                p.zero_()  # attention and experts output 0: the residual stream is the embedding
        emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
        head.zero_()
        for k, (cur, nxt) in enumerate(zip(ids, ids[1:])):
            emb[cur] = 0.0
            emb[cur, k] = 1.0  # the final RMSNorm maps it to 8 * e_k
            head[nxt, k] = 10.0  # logit 80 for the successor, 0 for every other token
    return model


def gold_counts(folder: str, limit: int, correct) -> int:
    records = json.loads((DATA_DIR / folder / "test.json").read_text())[:limit]
    return sum(bool(correct(r["answer"])) for r in records)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A patched bigram qwen2_moe checkpoint and a stock random olmoe checkpoint, with tokenizers."""
    root = tmp_path_factory.mktemp("ckpt")
    tok = tiny_tokenizer()
    bigram = bigram_model("qwen2_moe", tok)
    moe_sft.patch_model(bigram, MoESFTConfig(routing=RoutingConfig(disabled_experts={0: [1]})))
    moe_sft.save_pretrained(bigram, root / "bigram", tokenizer=tok)
    stock = tiny_model("olmoe", max_position_embeddings=4096)
    stock.save_pretrained(root / "stock")
    tok.save_pretrained(root / "stock")
    return root / "bigram", root / "stock"


def run_cli(*args) -> int:
    return main(["eval", *map(str, args)])


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def table_cells(md: str) -> dict[str, list[str]]:
    rows = [line.strip("|").split("|") for line in md.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in rows[0]]
    return {"header": header, **{r[0].strip(): [c.strip() for c in r] for r in rows[1:]}}


# ---- 2. batched generation == batch size 1 --------------------------------------------------


@pytest.mark.parametrize("family", CORE_FAMILIES)
def test_batched_generation_equals_batch_size_one(family):
    # DeepSeek's MLA has as many key/value heads as query heads (real configs say so); the tiny
    # configs' num_key_value_heads=2 breaks any forward with a padding mask in transformers.
    mla = {"num_key_value_heads": 4} if family.startswith("deepseek") else {}
    model = tiny_model(family, max_position_embeddings=4096, **mla)
    tok = prepare_tokenizer(tiny_tokenizer())
    records = json.loads((DATA_DIR / "SVAMP" / "test.json").read_text())[:5]
    # very different lengths, so the short prompts get long left padding in the batch
    prompts = [format_prompt(r["instruction"][: 40 + 60 * i]) for i, r in enumerate(records)]
    assert len({len(p) for p in prompts}) == len(prompts)

    def run(batch_size, num_beams=1):
        out = {}
        for idx, texts in generate(model, tok, prompts, batch_size=batch_size, max_new_tokens=6, num_beams=num_beams):
            out.update(zip(idx, texts))
        return [out[i] for i in range(len(prompts))]

    single = run(1)
    assert single == run(5) == run(3)
    assert len(set(single)) > 1  # the prompts matter: not a constant output
    if family == "qwen3_moe":
        assert run(1, num_beams=2) == run(5, num_beams=2)
    choices = [("answer1", "answer2", "answer3")] * len(prompts)
    one = {i[0]: r[0] for i, r in loglik_choose(model, tok, prompts, choices, batch_size=1)}
    many = {i: r for idx, res in loglik_choose(model, tok, prompts, choices, batch_size=4) for i, r in zip(idx, res)}
    for i in range(len(prompts)):
        assert one[i][0] == many[i][0]
        for c in choices[i]:
            assert one[i][1][c] == pytest.approx(many[i][1][c], abs=1e-4)


# ---- 3. the CLI end to end --------------------------------------------------------------------


def test_eval_cli_end_to_end(checkpoints, tmp_path, capsys):
    bigram, stock = checkpoints
    out = tmp_path / "eval"
    rc = run_cli("--model", bigram, "--model", stock, "--benchmarks", "gsm8k,multiarith,siqa,arc_e", "--data-dir", DATA_DIR,
                 "--limit", 8, "--batch-size", 3, "--max-new-tokens", 16, "--dtype", "float32", "--out", out)  # fmt: skip
    assert rc == 0
    printed = capsys.readouterr().out
    md = (out / "results.md").read_text()
    assert md in printed + "\n"
    cells = table_cells(md)
    assert cells["header"][2:] == ["bigram", "stock"]
    expected = {  # from the data alone: the bigram model always answers "answer1 3"
        "gsm8k": gold_counts("gsm8k", 8, lambda a: abs(float(a) - 3) <= 1e-3),
        "multiarith": gold_counts("MultiArith", 8, lambda a: abs(float(a) - 3) <= 1e-3),
        "siqa": gold_counts("social_i_qa", 8, lambda a: a == "answer1"),
        "arc_e": gold_counts("ARC-Easy", 8, lambda a: a == "answer1"),
    }
    assert expected["multiarith"] > 0 and expected["siqa"] > 0 and expected["arc_e"] > 0
    titles = {"gsm8k": "GSM8K", "multiarith": "MultiArith", "siqa": "SIQA", "arc_e": "ARC-e"}
    summary = json.loads((out / "results.json").read_text())["models"]
    for col, model in ((2, "bigram"), (3, "stock")):
        for bench, title in titles.items():
            recs = read_jsonl(out / model / f"{bench}.jsonl")
            assert sorted(r["index"] for r in recs) == list(range(8))
            verdicts = sum(r["correct"] for r in recs)
            result = json.loads((out / model / f"{bench}.json").read_text())
            assert result["status"] == "done" and result["total"] == 8
            assert result["correct"] == verdicts == summary[model][bench]["correct"]
            assert cells[title][col] == f"{100 * verdicts / 8:.2f} ({verdicts}/8)"
            assert cells[title][1] == "generate/greedy"
            if model == "bigram":
                assert verdicts == expected[bench]
                assert {r["output"] for r in recs} == {"answer1 3"}
        math_avg = (summary[model]["gsm8k"]["accuracy"] + summary[model]["multiarith"]["accuracy"]) / 2
        assert cells["**math average**"][col] == f"{100 * math_avg:.2f}"
    assert "LLM-Adapters" in md


# ---- resume ----------------------------------------------------------------------------------


def test_rerun_resumes_from_written_predictions(checkpoints, tmp_path):
    bigram, _ = checkpoints
    out = tmp_path / "eval"
    args = ("--model", bigram, "--benchmarks", "siqa", "--data-dir", DATA_DIR, "--batch-size", 2, "--out", out)
    assert run_cli(*args, "--limit", 4) == 0
    jsonl = out / "bigram" / "siqa.jsonl"
    recs = read_jsonl(jsonl)
    assert len(recs) == 4
    # Mark one finished prediction (a rerun must keep it, not regenerate it) and tear the last
    # line as an interrupted write would (a rerun must drop and redo it).
    kept = next(r for r in recs if r["gold"] != "answer1")
    kept.update(output="the correct answer is " + kept["gold"], prediction=kept["gold"], correct=True)
    torn = recs[-1]
    lines = [json.dumps(r) for r in recs if r is not torn]
    jsonl.write_text("\n".join(lines) + "\n" + json.dumps(torn)[:25])
    assert run_cli(*args, "--limit", 8) == 0
    recs = read_jsonl(jsonl)
    assert sorted(r["index"] for r in recs) == list(range(8))
    by_index = {r["index"]: r for r in recs}
    assert by_index[kept["index"]]["output"] == kept["output"]
    assert by_index[torn["index"]]["output"] == "answer1 3"
    expected = gold_counts("social_i_qa", 8, lambda a: a == "answer1") + 1
    assert json.loads((out / "bigram" / "siqa.json").read_text())["correct"] == expected
    assert f"({expected}/8)" in (out / "results.md").read_text()
    # a finished run rerun as is generates nothing and gives the same table
    before, table = jsonl.read_text(), (out / "results.md").read_text()
    assert run_cli(*args, "--limit", 8) == 0
    assert jsonl.read_text() == before and (out / "results.md").read_text() == table


def test_rerun_with_other_settings_is_refused(checkpoints, tmp_path, capsys):
    bigram, _ = checkpoints
    out = tmp_path / "eval"
    args = ("--model", bigram, "--benchmarks", "siqa", "--data-dir", DATA_DIR, "--limit", 2, "--out", out)
    assert run_cli(*args) == 0
    before = (out / "bigram" / "siqa.jsonl").read_text()
    capsys.readouterr()
    assert run_cli(*args, "--num-beams", 2) == 2
    err = capsys.readouterr().err
    assert "other settings" in err and "generate/beam2" in err
    assert (out / "bigram" / "siqa.jsonl").read_text() == before


def test_extraction_option_reaches_scores_and_settings(tmp_path, capsys):
    """A bigram model that answers "By C" on AQuA: LLM-Adapters' rule (the default) reads B from
    "By", --extraction strict reads the standalone C. Counts come from the data alone."""
    tok = tiny_tokenizer()
    model = bigram_model("qwen2_moe", tok, chain="\nBy C")
    model.save_pretrained(tmp_path / "byc")
    tok.save_pretrained(tmp_path / "byc")
    args = ("--model", tmp_path / "byc", "--benchmarks", "aqua", "--data-dir", DATA_DIR, "--limit", 8, "--max-new-tokens", 8)
    expected = {"llm_adapters": ("B", gold_counts("AQuA", 8, lambda a: a == "B")), "strict": ("C", gold_counts("AQuA", 8, lambda a: a == "C"))}
    assert expected["llm_adapters"][1] != expected["strict"][1]
    for mode, (letter, correct) in expected.items():
        out = tmp_path / mode
        assert run_cli(*args, "--out", out, *(("--extraction", mode) if mode == "strict" else ())) == 0
        recs = read_jsonl(out / "byc" / "aqua.jsonl")
        assert {r["output"] for r in recs} == {"By C"} and {r["prediction"] for r in recs} == {letter}
        result = json.loads((out / "byc" / "aqua.json").read_text())
        assert result["settings"]["extraction"] == mode and result["correct"] == correct
        md = (out / "results.md").read_text()
        assert table_cells(md)["AQuA"][1] == ("generate/greedy" if mode == "llm_adapters" else "generate/greedy/strict")
        assert ("NOT LLM-Adapters' extraction" in md) is (mode == "strict")
    # resuming the strict run with the default extraction is refused, nothing is rewritten
    before = (tmp_path / "strict" / "byc" / "aqua.jsonl").read_text()
    capsys.readouterr()
    assert run_cli(*args, "--out", tmp_path / "strict") == 2
    err = capsys.readouterr().err
    assert "other settings" in err and "'extraction': ('strict', 'llm_adapters')" in err
    assert (tmp_path / "strict" / "byc" / "aqua.jsonl").read_text() == before
    # an unknown mode stops at the command line, before any data or model is read
    with pytest.raises(SystemExit) as exit_info:
        run_cli(*args, "--out", tmp_path / "loose", "--extraction", "loose")
    assert exit_info.value.code == 2 and "invalid choice: 'loose'" in capsys.readouterr().err
    assert not (tmp_path / "loose").exists()


# ---- 4. malformed data -----------------------------------------------------------------------

GOOD = {"instruction": "How many?", "input": "", "output": "The answer is 2.", "answer": "2"}


@pytest.mark.parametrize(
    "content, message",
    [
        ([GOOD, {"instruction": "No gold", "output": "The answer is 3."}], r"record 1 has no 'answer'"),
        ({"data": [GOOD]}, r"top level is a dict, expected a list"),
        ([GOOD, GOOD, "just a string"], r"record 2 is a str, expected a mapping"),
        ([GOOD, {**GOOD, "answer": "three"}], r"record 1: gold 'three' is not"),
        ([{**GOOD, "instruction": ""}], r"record 0 has no 'instruction'"),
    ],
)
def test_malformed_data_is_a_clear_error_before_any_work(checkpoints, tmp_path, capsys, content, message):
    bigram, _ = checkpoints
    bad = tmp_path / "broken.json"
    bad.write_text(json.dumps(content))
    out = tmp_path / "eval"
    # boolq is valid and comes first: nothing may be generated for it either
    rc = run_cli("--model", bigram, "--benchmarks", "boolq,gsm8k", "--data-dir", DATA_DIR, "--data", f"gsm8k={bad}", "--limit", 2, "--out", out)
    assert rc == 2
    err = capsys.readouterr().err
    assert str(bad) in err and re.search(message, err), err
    assert not out.exists()


def test_missing_data_names_the_fix(checkpoints, tmp_path, capsys):
    bigram, _ = checkpoints
    rc = run_cli("--model", bigram, "--benchmarks", "hellaswag", "--data-dir", tmp_path, "--out", tmp_path / "o")
    assert rc == 2
    err = capsys.readouterr().err
    assert "hellaswag" in err and "--data" in err


# ---- log-likelihood scoring and MoE-Bias adapters -------------------------------------------


def test_loglik_scoring_is_labelled_and_scores_choices(checkpoints, tmp_path):
    bigram, _ = checkpoints
    out = tmp_path / "eval"
    rc = run_cli("--model", bigram, "--benchmarks", "siqa,multiarith", "--data-dir", DATA_DIR, "--limit", 8,
                 "--scoring", "loglik", "--max-new-tokens", 16, "--out", out)  # fmt: skip
    assert rc == 0
    recs = read_jsonl(out / "bigram" / "siqa.jsonl")
    # after "...answe r" the bigram model puts all its mass on "1": answer1 wins every time
    assert all(r["output"] == "answer1" and set(r["scores"]) == {"answer1", "answer2", "answer3"} for r in recs)
    assert all(r["scores"]["answer1"] > r["scores"]["answer2"] for r in recs)
    assert sum(r["correct"] for r in recs) == gold_counts("social_i_qa", 8, lambda a: a == "answer1")
    md = (out / "results.md").read_text()
    cells = table_cells(md)
    assert cells["SIQA"][1] == "loglik" and cells["MultiArith"][1] == "generate/greedy"  # math always generates
    assert "NOT LLM-Adapters' protocol" in md


def test_moe_bias_adapter_is_applied(checkpoints, tmp_path):
    bigram, _ = checkpoints
    tok = tiny_tokenizer()
    model = moe_sft.from_pretrained(bigram)
    moe_sft.get_handle(model).revert()
    moe_sft.patch_model(model, MoESFTConfig(moe_bias_head=MoEBiasHeadConfig(num_experts=2, top_k=1)))
    with torch.no_grad():
        moe_sft.get_moe_bias_layer(model).bias[:, tok.eos_token_id] = 1e3  # stop at once
    moe_sft.save_moe_bias_adapter(model, tmp_path / "adapter")
    out = tmp_path / "eval"
    args = ("--model", bigram, "--benchmarks", "siqa", "--data-dir", DATA_DIR, "--limit", 3)
    assert run_cli(*args, "--out", out) == 0
    assert run_cli(*args, "--adapter", tmp_path / "adapter", "--out", tmp_path / "with_adapter") == 0
    assert {r["output"] for r in read_jsonl(out / "bigram" / "siqa.jsonl")} == {"answer1 3"}
    assert {r["output"] for r in read_jsonl(tmp_path / "with_adapter" / "bigram" / "siqa.jsonl")} == {""}


@pytest.mark.parametrize("option, message", [(("--batch-size", 0), "batch_size=0"), (("--num-beams", 0), "num_beams=0")])
def test_bad_options_fail_before_loading_any_model(tmp_path, capsys, option, message):
    # the model path does not exist: the option must be refused before anything tries to load it
    rc = run_cli("--model", tmp_path / "no-model", "--benchmarks", "siqa", "--data-dir", DATA_DIR, *option, "--out", tmp_path / "o")
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
