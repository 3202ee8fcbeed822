"""The CLI's last line: Ctrl-C prints what was kept and how to go on (exit 130, no traceback);
every moe_sft error class ends in one `moe-sft VERB: error: ...` line (exit 2); a DeepSpeed
config in a plain process (no launcher) runs as a world of one."""

from __future__ import annotations

import importlib
import inspect
import json
import os
import pkgutil
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import moe_sft
from moe_sft import cli
from moe_sft.testing import tiny_model, tiny_tokenizer

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
for _key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
    ENV.pop(_key, None)

# Arguments that parse for each verb, and what its interrupted line must say.
ARGV = {
    "demo": (["demo", "--out", "d"], r"demo --out d"),
    "patch": (["patch", "--model", "m", "--out", "o"], r"nothing was written to o"),
    "train": (["train", "r.yaml"], r"checkpoint-N .*moe-sft train r\.yaml .*--resume"),
    "rl": (["rl", "g.yaml"], r"checkpoint-N .*grpo\.output_dir.*moe-sft rl g\.yaml .*--resume"),
    "eval": (["eval", "--model", "m", "--out", "o"], r"finished examples in o; rerun with the same --out"),
    "profile": (["profile", "--model", "m", "--data", "x.jsonl", "--out", "o"], r"nothing was written to o"),
    "prune": (["prune", "--model", "m", "--profile", "p", "--strategy", "least_used", "--out", "o"], r"nothing was written to o"),
    "ablate": (["ablate", "a.yaml"], r"finished cells .*moe-sft ablate a\.yaml"),
}

# A command run through moe_sft.cli.main that stops at a known point: the first call of the
# function named by argv[1] (module:attribute) prints READY and waits to be interrupted.
STOP_AT = """
import importlib, sys, time
from moe_sft.cli import main
module, name = sys.argv[1].split(":")
owner = importlib.import_module(module)
*path, attr = name.split(".")
for part in path:
    owner = getattr(owner, part)
def stop(*args, **kwargs):
    print("READY", flush=True)
    time.sleep(600)
setattr(owner, attr, stop)
sys.exit(main(sys.argv[2:]))
"""


def test_every_verb_has_an_interrupt_line():
    assert set(cli.ON_INTERRUPT) == set(cli.VERBS) == set(ARGV)


@pytest.mark.parametrize("verb", cli.VERBS)
def test_ctrl_c_prints_one_line_and_exits_130(verb, monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(importlib.import_module(f"moe_sft.commands.{verb}"), "run", interrupted)
    argv, says = ARGV[verb]
    assert cli.main(argv) == cli.EXIT_INTERRUPTED == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"moe-sft {verb}: interrupted; "), err
    assert re.search(says, err[0]), err[0]


def _interrupt(stop_at: str, argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    child = subprocess.Popen([sys.executable, "-c", STOP_AT, stop_at, *argv], cwd=cwd, env=ENV, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    for line in child.stdout:
        if line.startswith("READY"):
            break
    child.send_signal(signal.SIGINT)
    out, err = child.communicate(timeout=120)
    return subprocess.CompletedProcess(child.args, child.returncode, out, err)


def test_sigint_during_patch_save_exits_130_with_one_line_and_leaves_nothing(tmp_path):
    stock = tmp_path / "stock"
    tiny_model("qwen3_moe").save_pretrained(stock)
    tiny_tokenizer().save_pretrained(stock)
    res = _interrupt("transformers:PreTrainedTokenizerBase.save_pretrained",
                     ["patch", "--model", str(stock), "--out", str(tmp_path / "out")], tmp_path)  # fmt: skip
    assert res.returncode == 130, res.stderr
    assert "Traceback" not in res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last == f"moe-sft patch: interrupted; nothing was written to {tmp_path / 'out'}; rerun the same command"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stock"]  # no output, no temporary


def test_sigint_during_training_says_how_to_resume(tmp_path):
    recipe = REPO / "configs" / "tiny" / "qwen3_moe_vanilla.yaml"
    res = _interrupt("transformers:Trainer.train", ["train", str(recipe), f"training.output_dir={tmp_path / 'run'}"], tmp_path)
    assert res.returncode == 130, res.stderr
    assert "Traceback" not in res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("moe-sft train: interrupted; kept the checkpoint-N folders") and f"train {recipe} ... --resume" in last


def _moe_sft_error_classes() -> list[type]:
    found = set()
    for info in pkgutil.walk_packages(moe_sft.__path__, "moe_sft."):
        module = importlib.import_module(info.name)
        classes = (c for _, c in inspect.getmembers(module, inspect.isclass) if issubclass(c, Exception))
        found |= {c for c in classes if c.__module__.startswith("moe_sft")}
    return sorted(found, key=lambda c: f"{c.__module__}.{c.__qualname__}")


def test_every_moe_sft_error_class_is_a_user_error_with_exit_2(monkeypatch, capsys):
    classes = _moe_sft_error_classes()
    assert {"ConfigError", "PatchError", "CheckpointError", "DataError"} <= {c.__name__ for c in classes}
    for error in classes:
        def fails(args, error=error):
            raise error("bad value 'x'\nsecond line")

        monkeypatch.setattr(importlib.import_module("moe_sft.commands.patch"), "run", fails)
        assert cli.main(["patch", "--model", "m", "--out", "o"]) == 2, error
        assert capsys.readouterr().err.strip().splitlines() == ["moe-sft patch: error: bad value 'x' second line"], error


def test_a_bug_is_not_hidden_as_a_user_error(monkeypatch):
    def bug(args):
        raise TypeError("a bug")

    monkeypatch.setattr(importlib.import_module("moe_sft.commands.patch"), "run", bug)
    with pytest.raises(TypeError, match="a bug"):
        cli.main(["patch", "--model", "m", "--out", "o"])


def test_deepspeed_in_a_plain_process_becomes_a_world_of_one(tmp_path):
    """No launcher: `prepare` gives the process a one-rank rendezvous on this host, so the
    Trainer's DeepSpeed setup finds a process group (on CPU, prepare creates it)."""
    code = (
        "import json, os, torch, torch.distributed as dist; from pathlib import Path;"
        "from moe_sft.train.deepspeed import load_config, prepare;"
        f"prepare(load_config(Path({str(REPO / 'configs/deepspeed/zero2.json')!r})), {{}});"
        "print(json.dumps({k: os.environ[k] for k in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT')}"
        " | {'group': dist.get_world_size() if dist.is_initialized() else None, 'gpu': torch.cuda.is_available()}))"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert (got["RANK"], got["LOCAL_RANK"], got["WORLD_SIZE"], got["MASTER_ADDR"]) == ("0", "0", "1", "127.0.0.1")
    assert got["MASTER_PORT"].isdigit()
    assert got["group"] == (None if got["gpu"] else 1)
