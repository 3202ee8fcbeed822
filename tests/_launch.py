"""`run_job`: subprocess.run for the tests' multi-process launches (torchrun, 2 CPU ranks, gloo).

A rank of a finished job occasionally aborts while the interpreter shuts down ("terminate called
without an active exception", SIGABRT; in two of five clean-clone CI runs in one session, in ZeRO-3
jobs, once after an explicit destroy_process_group). It comes from torch / gloo / DeepSpeed
teardown after the job's own work is done, and was not reproducible on demand (12 idle launches
of the same job ran clean). So a job that started from fresh outputs and whose failure is that
abort is run once more from fresh outputs; any other failure, the abort twice, or a job that
continued earlier outputs (a resume) is returned as it is.
"""

from __future__ import annotations

import shutil
import subprocess
import warnings
from pathlib import Path

TEARDOWN_ABORT = "terminate called without an active exception"


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def run_job(cmd: list[str], outputs: tuple[Path, ...] = (), **kwargs) -> subprocess.CompletedProcess:
    """subprocess.run(cmd, capture_output=True, text=True, **kwargs); `outputs`: what the job
    writes. Retried once on TEARDOWN_ABORT when none of `outputs` existed before it (they are
    removed first); without `outputs`, never retried."""
    fresh = bool(outputs) and not any(Path(p).exists() for p in outputs)
    proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if fresh and proc.returncode != 0 and TEARDOWN_ABORT in proc.stderr:
        warnings.warn(f"a rank aborted at interpreter exit ({TEARDOWN_ABORT!r}); running the job once more", stacklevel=2)
        for p in outputs:
            _remove(Path(p))
        proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    return proc
