"""`moe-sft` from the command line, and how the package installs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import moe_sft
from moe_sft.checkpoint import TENSORS_NAME
from moe_sft.testing import tiny_batch, tiny_model

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _moe_sft(*args, cwd):
    exe = Path(sys.executable).with_name("moe-sft")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, cwd=cwd, env=ENV, timeout=300)


def test_help_lists_verbs(tmp_path):
    res = _moe_sft("--help", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "patch" in res.stdout and "usage: moe-sft" in res.stdout
    res = _moe_sft("patch", "--help", cwd=tmp_path)
    assert res.returncode == 0 and "--model" in res.stdout and "--out" in res.stdout


def test_patch_command_writes_a_restorable_checkpoint(tmp_path):
    stock = tiny_model("qwen2_moe")
    stock.save_pretrained(tmp_path / "stock")
    cfg = tmp_path / "methods.yaml"
    cfg.write_text("# every method off except an expert mask\nrouting:\n  disabled_experts: {2: [0]}\n")
    res = _moe_sft(
        "patch", "--model", str(tmp_path / "stock"), "--config", str(cfg), "--out", str(tmp_path / "out"),
        "--dtype", "float32", "routing.disabled_experts={2: [0, 5]}", cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr
    out = tmp_path / "out"
    assert json.loads((out / "moe_sft_config.json").read_text())["routing"]["disabled_experts"] == {"2": [0, 5]}
    assert (out / TENSORS_NAME).is_file()

    model = moe_sft.from_pretrained(out)
    handle = moe_sft.get_handle(model)
    assert handle.layers[-1].controls.disabled.nonzero().flatten().tolist() == [0, 5]
    ref = moe_sft.patch_model(stock, handle.config)
    batch = tiny_batch(stock)
    assert torch.equal(model(**batch).logits, stock(**batch).logits)
    ref.revert()


@pytest.mark.parametrize(
    "config_text, override, message",
    [
        ("condensr: {}\n", None, "unknown config key(s) condensr"),
        ("track_usage: maybe\n", None, "track_usage: expected true/false"),
        ("{}\n", "routing.disabled_experts=[1]", "routing.disabled_experts: expected a mapping"),
    ],
)
def test_patch_command_rejects_bad_config_before_any_work(tmp_path, config_text, override, message):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(config_text)
    args = ["patch", "--model", str(tmp_path / "does-not-exist"), "--config", str(cfg), "--out", str(tmp_path / "out")]
    res = _moe_sft(*args, *([override] if override else []), cwd=tmp_path)
    assert res.returncode == 2
    assert message in res.stderr
    assert not (tmp_path / "out").exists()


def test_patches_install_inside_the_package_only(tmp_path):
    """`patches/` is importable as moe_sft.patches, and no top-level `patches` module exists
    for users (run outside the repository so the checkout is not on sys.path)."""
    code = (
        "import importlib.util, moe_sft.patches as p, moe_sft;"
        "print(importlib.util.find_spec('patches') is None, p.__name__, sorted(moe_sft.supported_model_types()))"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=ENV)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("True moe_sft.patches")
    for family in ("qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3", "olmoe", "mixtral"):
        assert family in res.stdout


def test_import_patches_nothing():
    """Importing moe_sft (and its adapters) leaves transformers' classes untouched."""
    from transformers.models.qwen3_moe import modeling_qwen3_moe as m

    before = m.Qwen3MoeSparseMoeBlock.forward
    moe_sft.supported_model_types()
    assert m.Qwen3MoeSparseMoeBlock.forward is before
    model = tiny_model("qwen3_moe")
    assert type(model.model.layers[0].mlp) is m.Qwen3MoeSparseMoeBlock


def test_setup_cfg_lists_every_subpackage():
    """Packages are listed explicitly (patches/ is mapped to moe_sft.patches), so a new
    subpackage missing from setup.cfg would be left out of non-editable installs."""
    import configparser

    root = Path(__file__).resolve().parents[1]
    cfg = configparser.ConfigParser()
    cfg.read(root / "setup.cfg")
    listed = set(cfg["options"]["packages"].split())
    found = {".".join(p.parent.relative_to(root).parts) for p in (root / "moe_sft").rglob("__init__.py")}
    found.add("moe_sft.patches")
    assert found == listed


def test_deepspeed_launcher_rank_argument_is_accepted():
    """`deepspeed --module moe_sft.cli train ...` runs `moe_sft.cli --local_rank=N train ...`."""
    from moe_sft.cli import build_parser

    args = build_parser().parse_args(["--local_rank=1", "train", "recipe.yaml", "training.max_steps=4"])
    assert args.verb == "train" and args.config == "recipe.yaml" and args.overrides == ["training.max_steps=4"]


def _init_gloo(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)


def test_a_process_group_the_verb_started_is_destroyed_when_it_ends(tmp_path, monkeypatch):
    # Left to interpreter exit, gloo's threads can abort a finished torchrun job (SIGABRT).
    import torch.distributed as dist

    from moe_sft import cli
    from moe_sft.commands import profile

    def verb(args):
        _init_gloo(tmp_path)  # as the Trainer does under a launcher
        assert dist.is_initialized()
        return 0

    monkeypatch.setattr(profile, "run", verb)
    assert cli.main(["profile", "--model", "m", "--data", "d", "--out", str(tmp_path / "o")]) == 0
    assert not dist.is_initialized()


def test_a_process_group_started_before_the_verb_is_kept(tmp_path, monkeypatch):
    import torch.distributed as dist

    from moe_sft import cli
    from moe_sft.commands import profile

    monkeypatch.setattr(profile, "run", lambda args: 0)
    _init_gloo(tmp_path)
    try:
        assert cli.main(["profile", "--model", "m", "--data", "d", "--out", str(tmp_path / "o")]) == 0
        assert dist.is_initialized()  # the caller's group: not the verb's to destroy
    finally:
        dist.destroy_process_group()
