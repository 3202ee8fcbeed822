"""`moe-sft ablate`: the grid on a tiny model with --limit'ed benchmarks writes the CSV, the
Markdown table (random as mean ± std over seeds) and the plot, evaluates exactly the masked
selections, and a rerun skips finished cells (only new cells run; other settings are refused)."""

from __future__ import annotations

import csv
import json
import os
import statistics
from pathlib import Path

import pytest
import yaml

import moe_sft.evaluation
from moe_sft.cli import main
from moe_sft.config import ConfigError
from moe_sft.pruning import ExpertProfile, apply_mask, select_experts
from moe_sft.pruning.ablate import load_config
from moe_sft.testing import tiny_model, tiny_tokenizer

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MOE_SFT_SHARED_DATA", REPO.parent / "shared" / "data" / "llm-adapters"))


def write_config(tmp_path: Path, **changes) -> Path:
    cfg = {
        "model": {"tiny": "qwen3_moe", "experts_implementation": "eager"},
        "out": str(tmp_path / "out"),
        "benchmarks": ["boolq"],
        "scoring": "loglik",
        "limit": 3,
        "data_dir": str(SHARED / "dataset"),
        "profile_data": str(REPO / "configs" / "tiny" / "data" / "arith.jsonl"),
        "profile_limit": 16,
        "strategies": ["least_used", "random"],
        "ratios": [0.25],
        "seeds": [0, 1],
        "random_controls": ["least_used"],
        **changes,
    }
    path = tmp_path / "ablate.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_ablate_writes_outputs_evaluates_the_masked_model_and_resumes(tmp_path, monkeypatch, capsys):
    calls = []
    real = moe_sft.evaluation.evaluate_model

    def counting(*args, **kwargs):
        calls.append(kwargs["name"])
        return real(*args, **kwargs)

    monkeypatch.setattr(moe_sft.evaluation, "evaluate_model", counting)
    path = write_config(tmp_path)
    assert main(["ablate", str(path)]) == 0
    cells = ["unpruned", "least_used-r0.25", "random-least_used-r0.25-s0", "random-least_used-r0.25-s1"]
    assert calls == cells
    out = tmp_path / "out"
    assert {"ablation.csv", "ablation.md", "ablation.png", "settings.json", "profile", "cells", "eval"} <= {p.name for p in out.iterdir()}
    assert (out / "ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The selections are the strategies' on the saved profile; random copies least_used's counts.
    profile = ExpertProfile.load(out / "profile")
    record = {c: json.loads((out / "cells" / f"{c}.json").read_text()) for c in cells}
    least = select_experts(profile, "least_used", ratio=0.25)
    assert record["least_used-r0.25"]["pruned"] == {str(k): v for k, v in least.items()}
    for seed in (0, 1):
        rnd = record[f"random-least_used-r0.25-s{seed}"]
        assert rnd["pruned"] == {str(k): v for k, v in select_experts(profile, "random", ratio=0.25, seed=seed).items()}
        assert {k: len(v) for k, v in rnd["pruned"].items()} == {str(k): len(v) for k, v in least.items()}
        assert rnd["fraction_pruned"] == 0.25
    assert record["unpruned"]["pruned"] == {} and record["unpruned"]["fraction_pruned"] == 0.0

    # The least_used cell scored exactly what a fresh model masked with that selection scores.
    direct = tiny_model("qwen3_moe", experts_implementation="eager")
    apply_mask(direct, least)
    real(direct, tiny_tokenizer(), ["boolq"], tmp_path / "direct", data_dir=str(SHARED / "dataset"), limit=3, scoring="loglik")
    grid_scores = [r["scores"] for r in read_jsonl(out / "eval" / "least_used-r0.25" / "boolq.jsonl")]
    assert grid_scores == [r["scores"] for r in read_jsonl(tmp_path / "direct" / "model" / "boolq.jsonl")]
    assert grid_scores != [r["scores"] for r in read_jsonl(out / "eval" / "unpruned" / "boolq.jsonl")]

    # CSV: one row per cell and benchmark, accuracies as the evaluation wrote them.
    rows = list(csv.DictReader((out / "ablation.csv").open()))
    assert [r["cell"] for r in rows] == cells
    for r in rows:
        result = json.loads((out / "eval" / r["cell"] / "boolq.json").read_text())
        assert float(r["accuracy"]) == result["accuracy"] and int(r["total"]) == 3

    # Markdown: random as mean ± sample std over the two seeds.
    accs = [100 * record[f"random-least_used-r0.25-s{s}"]["results"]["boolq"]["accuracy"] for s in (0, 1)]
    table = (out / "ablation.md").read_text()
    row = next(line for line in table.splitlines() if line.startswith("| random (as least_used) | 0.25 |"))
    assert f"| {statistics.fmean(accs):.2f} ± {statistics.stdev(accs):.2f} |" in row and "| 2 |" in row

    # Rerun: every cell is skipped, the outputs are the same.
    before = {name: (out / name).read_text() for name in ("ablation.csv", "ablation.md")}
    calls.clear()
    assert main(["ablate", str(path)]) == 0
    assert calls == []
    assert before == {name: (out / name).read_text() for name in ("ablation.csv", "ablation.md")}
    # A new seed runs only its own cell; other evaluation settings are refused.
    assert main(["ablate", str(path), "seeds=[0, 1, 2]"]) == 0
    assert calls == ["random-least_used-r0.25-s2"]
    capsys.readouterr()
    assert main(["ablate", str(path), "limit=2"]) == 2
    assert "holds an ablation with other settings" in capsys.readouterr().err and calls == ["random-least_used-r0.25-s2"]


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"colour": "red"}, "unknown config key"),
        ({"profile": "somewhere"}, "exactly one of `profile`"),
        ({"ratios": [1.5]}, r"ratios \[1.5\]"),
        ({"strategies": ["least_used", "biggest"]}, "'biggest' is not one of"),
        ({"seeds": []}, "random needs seeds"),
    ],
)
def test_ablate_config_errors(tmp_path, changes, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write_config(tmp_path, **changes))
