"""Atomic saves leave nothing behind and honour the umask: a `kill -9` during `moe-sft patch`
leaves a temporary that the next run of the same output removes, while a live concurrent
writer's temporary (or another host's) is never touched; outputs get 0644 / 0755 under umask
022 and 0640 / 0750 under 027, as stock transformers' saves do."""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import moe_sft
from moe_sft.cli import main
from moe_sft.io import atomic_directory, atomic_file, atomic_write_text, remove_orphans
from moe_sft.testing import tiny_model, tiny_tokenizer

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
HOST = socket.gethostname()
TOKEN = "0123456789abcdef"

# `moe-sft patch` whose save stops for good once the weights are in its temporary folder.
HANGING_PATCH = """
import sys, time
import transformers
from moe_sft.cli import main
real = transformers.PreTrainedTokenizerBase.save_pretrained
def hang(self, save_directory, *args, **kwargs):
    out = real(self, save_directory, *args, **kwargs)
    print("SAVING", save_directory, flush=True)
    time.sleep(600)
    return out
transformers.PreTrainedTokenizerBase.save_pretrained = hang
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def stock(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("stock") / "qwen3_moe"
    tiny_model("qwen3_moe").save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return str(path)


def start_hanging_patch(stock: str, out: Path) -> tuple[subprocess.Popen, Path]:
    """A `moe-sft patch` child stopped inside its save; returns it and its temporary folder."""
    child = subprocess.Popen([sys.executable, "-c", HANGING_PATCH, "patch", "--model", stock, "--out", str(out)],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=ENV)  # fmt: skip
    for line in child.stdout:  # other libraries print to stdout too
        if line.startswith("SAVING "):
            return child, Path(line.split(" ", 1)[1].strip())
    raise AssertionError(f"the child ended before its save (exit {child.wait()})")


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_kill_9_during_patch_save_is_cleaned_by_the_next_run_never_while_the_writer_lives(tmp_path, stock):
    out = tmp_path / "out"
    child, tmp = start_hanging_patch(stock, out)
    try:
        assert tmp.parent == tmp_path and tmp.name.startswith(".out.") and (tmp / "config.json").is_file()
        # While the writer lives, its temporary is kept, even by a concurrent run of the same output.
        assert remove_orphans(out) == []
        assert main(["patch", "--model", stock, "--out", str(out)]) == 0
        assert tmp.is_dir() and (out / "config.json").is_file()
    finally:
        child.kill()  # SIGKILL: no cleanup can run
        child.wait()
    assert tmp.is_dir(), "kill -9 should leave the temporary behind (the case this test is about)"

    assert main(["patch", "--model", stock, "--out", str(out), "--overwrite"]) == 0
    assert not tmp.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    moe_sft.from_pretrained(out)


def test_only_provable_orphans_are_removed(tmp_path):
    out = tmp_path / "model"
    dead, alive = dead_pid(), os.getpid()
    names = {
        f".model.{dead}@{HOST}.{TOKEN}.tmp": False,  # removed: this host, process gone
        f".model.{dead}@{HOST}.{TOKEN[::-1]}.old": False,  # removed: a replaced output's old copy
        f".model.{alive}@{HOST}.{TOKEN}.tmp": True,  # a live writer
        f".model.{dead}@another-host.{TOKEN}.tmp": True,  # cannot be checked from here
        f".model.x.{dead}@{HOST}.{TOKEN}.tmp": True,  # another output's (model.x)
        f".modelx.{dead}@{HOST}.{TOKEN}.tmp": True,
        ".model.abc123.tmp": True,  # no owner recorded
        f".model.{10**30}@{HOST}.{TOKEN}.tmp": True,  # not a pid
        ".model.backup": True,
    }
    for i, name in enumerate(names):
        (tmp_path / name).mkdir() if i % 2 == 0 else (tmp_path / name).write_text("x")
    with atomic_directory(out) as tmp:
        (tmp / "weights").write_text("w")
    kept = {p.name for p in tmp_path.iterdir()} - {"model"}
    assert kept == {name for name, keep in names.items() if keep}


def test_atomic_write_text_removes_its_orphaned_temporary_files(tmp_path):
    orphan = tmp_path / f".results.md.{dead_pid()}@{HOST}.{TOKEN}.tmp"
    orphan.write_text("half")
    atomic_write_text(tmp_path / "results.md", "done\n")
    assert [p.name for p in tmp_path.iterdir()] == ["results.md"]


def test_a_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError), atomic_file(tmp_path / "plot.png") as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("plotting failed")
    with pytest.raises(RuntimeError), atomic_directory(tmp_path / "final") as tmp:
        (tmp / "a").write_text("half")
        raise RuntimeError("save failed")
    assert list(tmp_path.iterdir()) == []


@contextlib.contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


@pytest.mark.parametrize("mask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750), (0o002, 0o664, 0o775)])
def test_atomic_outputs_honour_the_umask(tmp_path, mask, file_mode, dir_mode):
    with umask(mask):
        atomic_write_text(tmp_path / "results.md", "x\n")
        with atomic_file(tmp_path / "plot.png") as tmp:
            tmp.write_bytes(b"png")
        with atomic_directory(tmp_path / "profile") as tmp:
            (tmp / "profile.json").write_text("{}")
        moe_sft.save_pretrained(tiny_model("qwen3_moe"), tmp_path / "final")
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) >= 5
    assert {str(p.relative_to(tmp_path)): mode(p) for p in files} == {str(p.relative_to(tmp_path)): file_mode for p in files}
    assert {mode(p) for p in (tmp_path / "profile", tmp_path / "final")} == {dir_mode}
