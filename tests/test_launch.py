"""The local launcher: exact exit codes, and a grace period for ranks that fail on their own."""

from __future__ import annotations

import signal
from pathlib import Path

from ppwrap._launch import run_local

# Rank 1 fails at once; rank 0 fails too, a second later, and says so.
SCRIPT = """
import os, sys, time
if os.environ["MLX_RANK"] == "1":
    sys.exit("rank 1: bad input")
time.sleep(1)
sys.exit("rank 0: bad input too")
"""


def test_a_failed_rank_ends_the_others_at_once_by_default(tmp_path: Path) -> None:
    script = tmp_path / "fail.py"
    script.write_text(SCRIPT)
    run = run_local(2, [str(script)], timeout=30, capture=True)
    assert run.first_failure == 1 and not run.timed_out
    assert run.returncodes == [-signal.SIGKILL, 1]
    assert "rank 1: bad input" in run.stderr[1] and run.stderr[0] == ""


def test_with_a_grace_period_every_rank_fails_on_its_own_and_says_why(tmp_path: Path) -> None:
    script = tmp_path / "fail.py"
    script.write_text(SCRIPT)
    run = run_local(2, [str(script)], timeout=30, capture=True, grace=20)
    assert run.first_failure == 1 and not run.timed_out
    assert run.returncodes == [1, 1]
    assert "rank 0: bad input too" in run.stderr[0]
    assert run.seconds < 15  # the grace ends when every rank has exited


# Rank 1 waits forever in a function whose name the stacks must show.
STUCK = """
import os, time
def wait_for_a_peer_that_never_sends():
    time.sleep(600)
if os.environ["MLX_RANK"] == "1":
    wait_for_a_peer_that_never_sends()
time.sleep(600)
"""


def test_a_run_that_times_out_shows_where_each_rank_waited(tmp_path: Path) -> None:
    script = tmp_path / "stuck.py"
    script.write_text(STUCK)
    run = run_local(2, [str(script)], timeout=2, capture=True)
    assert run.timed_out and run.first_failure is None
    assert run.returncodes == [-signal.SIGABRT, -signal.SIGABRT]
    assert "wait_for_a_peer_that_never_sends" in run.stderr[1]
    assert "wait_for_a_peer_that_never_sends" not in run.stderr[0]
    assert all("most recent call first" in err for err in run.stderr)
