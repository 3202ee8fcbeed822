"""The tests' launcher helper (tests/_launch.py) retries only the teardown abort, only once,
and only a job that started from fresh outputs."""

from __future__ import annotations

import sys

import pytest
from _launch import TEARDOWN_ABORT, run_job

# A job that writes `out`, counts its attempts in `tries`, and fails as told on its first attempt.
JOB = """
import sys
from pathlib import Path
out, tries, first = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
n = int(tries.read_text()) + 1 if tries.exists() else 1
tries.write_text(str(n))
out.mkdir(exist_ok=True)
(out / f"attempt{n}").write_text("x")
if n == 1 and first != "ok":
    sys.stderr.write(first + "\\n")
    sys.exit(134)
"""


def _job(tmp_path, first):
    return [sys.executable, "-c", JOB, str(tmp_path / "out"), str(tmp_path / "tries"), first]


def test_a_teardown_abort_is_run_once_more_from_fresh_outputs(tmp_path):
    with pytest.warns(UserWarning, match="once more"):
        proc = run_job(_job(tmp_path, TEARDOWN_ABORT), outputs=(tmp_path / "out",))
    assert proc.returncode == 0 and (tmp_path / "tries").read_text() == "2"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["attempt2"]  # the first attempt's outputs removed


@pytest.mark.parametrize("first", ["Traceback: a real error", "ok"])
def test_other_outcomes_are_returned_as_they_are(tmp_path, first):
    proc = run_job(_job(tmp_path, first), outputs=(tmp_path / "out",))
    assert proc.returncode == (0 if first == "ok" else 134) and (tmp_path / "tries").read_text() == "1"


def test_a_job_that_continues_earlier_outputs_is_not_rerun(tmp_path):
    (tmp_path / "out").mkdir()  # e.g. a --resume into an existing run
    proc = run_job(_job(tmp_path, TEARDOWN_ABORT), outputs=(tmp_path / "out",))
    assert proc.returncode == 134 and (tmp_path / "tries").read_text() == "1"
    proc = run_job(_job(tmp_path / "out", TEARDOWN_ABORT))  # no outputs given: never rerun
    assert (tmp_path / "out" / "tries").read_text() == "1"
