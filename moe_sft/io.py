"""Atomic file and directory writes: readers never see a half-written output.

An output is written as a sibling temporary, `.NAME.PID@HOST.TOKEN.tmp`, then renamed into
place. Outputs get the modes of a plain `open` / `mkdir` (0666 / 0777 less the umask, as
stock transformers' own files), also where a writer made a file private (safetensors' weights),
so colleagues on a shared machine can read them. The
writer's pid and host in the name make a temporary left by a killed process provably orphaned:
the next write of the same output removes those of this host whose process is gone, and keeps
any other (a live concurrent writer's, or another host's, which cannot be checked from here).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import shutil
import socket
import stat
from pathlib import Path

logger = logging.getLogger(__name__)

_HOST = socket.gethostname()
# After ".NAME.": writer pid, "@", host, a random token, then .tmp (being written) or .old (being replaced).
_TEMP = re.compile(r"(?P<pid>\d+)@(?P<host>.+)\.[0-9a-f]{16}\.(tmp|old)")


def _temp_path(path: Path, kind: str = "tmp") -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}@{_HOST}.{secrets.token_hex(8)}.{kind}")


def _process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError):  # another user's live process; not a pid we wrote
        return False
    return False


def remove_orphans(path: str | Path) -> list[Path]:
    """Remove the temporaries of `path` whose writer ran on this host and no longer exists;
    return them. A pid that is running again (reused) keeps its temporary: never a live one."""
    path = Path(path)
    prefix = f".{path.name}."
    removed = []
    if not path.parent.is_dir():
        return removed
    for entry in path.parent.iterdir():
        m = _TEMP.fullmatch(entry.name[len(prefix) :]) if entry.name.startswith(prefix) else None
        if m is None or m["host"] != _HOST or not _process_gone(int(m["pid"])):
            continue
        logger.warning("moe_sft: removing %s, left by process %s (no longer running) while writing %s", entry, m["pid"], path)
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
        removed.append(entry)
    return removed


def _apply_umask_modes(root: Path, dir_mode: int) -> None:
    """Give everything under `root` the mode a plain open / mkdir gives under the umask
    (`dir_mode` is the fresh `root`'s): some writers create private files (safetensors 0.8
    writes 0600 weights), which colleagues could not read. Executable bits are kept."""
    for p in root.rglob("*"):
        if p.is_symlink():
            continue
        current = stat.S_IMODE(p.stat().st_mode)
        wanted = dir_mode if p.is_dir() else dir_mode & (0o777 if current & 0o111 else 0o666)
        if current != wanted:
            os.chmod(p, wanted)


@contextlib.contextmanager
def atomic_file(path: str | Path):
    """Yield a temporary sibling file path to write (any writer, e.g. `fig.savefig(tmp,
    format="png")`); on success it replaces `path`, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_orphans(path)
    tmp = _temp_path(path)
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # the umask applies
    mode = stat.S_IMODE(tmp.stat().st_mode)
    try:
        yield tmp
        os.chmod(tmp, mode)  # a writer may have replaced the file by a private one
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write `text` to `path` through a temporary file in the same folder and a rename."""
    with atomic_file(path) as tmp:
        tmp.write_text(text)
    return Path(path)


@contextlib.contextmanager
def atomic_directory(path: str | Path, *, overwrite: bool = False):
    """Yield a temporary sibling folder; on success it replaces `path`, on error it is removed.

    `overwrite=False` refuses an existing non-empty `path` before any work is done.
    """
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())) and not overwrite:
        raise FileExistsError(f"output folder {str(path)!r} exists and is not empty; pass an empty or new folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_orphans(path)
    tmp = _temp_path(path)
    tmp.mkdir()  # the umask applies
    try:
        yield tmp
        _apply_umask_modes(tmp, stat.S_IMODE(tmp.stat().st_mode))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        old = _temp_path(path, "old")
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)
