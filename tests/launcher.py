"""Run a rank script on several local ranks and collect each rank's result.

Every run has a hard timeout: a deadlock in a collective fails the test that
started it instead of hanging the suite.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ppwrap._launch import LocalRun, run_local
from ppwrap.bench.serve import Server
from ppwrap.bench.serve import serving as bench_serving

RANKS_DIR = Path(__file__).parent / "ranks"


class LaunchError(AssertionError):
    """A launched run timed out, failed, or a rank wrote no result."""


def describe(run: LocalRun, out_dir: str | None = None) -> str:
    """Each rank's exit code, output tail and partial result, for failure messages."""
    parts = []
    for path in sorted(Path(out_dir).glob("rank*.json")) if out_dir else []:
        parts.append(f"--- {path.name} (partial) ---\n{path.read_text()[-3000:]}")
    for r, code in enumerate(run.returncodes):
        parts.append(
            f"--- rank {r} exit {code} ---\n{run.stdout[r][-2000:]}{run.stderr[r][-3000:]}"
        )
    return "\n".join(parts)


def launch(
    script: str,
    n: int,
    *args: str,
    timeout: float = 300,
    env: dict[str, str] | None = None,
) -> list[dict[str, Any]]:
    """Run ``tests/ranks/<script>`` on ``n`` ranks and return each rank's result.

    The script gets an output directory as its first argument and writes
    ``rank<r>.json`` there (``ranks/common.py: write_result``).

    Raises:
        LaunchError: The run timed out or failed, or a rank wrote no result.
    """
    with tempfile.TemporaryDirectory(prefix="ppwrap-launch-") as out_dir:
        argv = [str(RANKS_DIR / script), out_dir, *args]
        run = run_local(n, argv, timeout=timeout, capture=True, env=env)
        if run.timed_out:
            raise LaunchError(
                f"{script} on {n} ranks timed out after {timeout:.0f} s "
                f"(a rank is stuck: deadlock?)\n{describe(run, out_dir)}"
            )
        if run.returncode != 0:
            raise LaunchError(
                f"{script} on {n} ranks failed first on rank {run.first_failure}\n"
                f"{describe(run, out_dir)}"
            )
        results = []
        for rank in range(n):
            path = Path(out_dir) / f"rank{rank}.json"
            if not path.exists():
                raise LaunchError(
                    f"rank {rank} of {script} wrote no result\n{describe(run, out_dir)}"
                )
            results.append(json.loads(path.read_text()))
        return results


def family_results(
    ranks: list[dict[str, Any]], family: str
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One family's results from ``ranks/pipeline_families.py``: (final rank, the others).

    Fails the test when a rank raised or the ranks are out of order.
    """
    results = [r[family] for r in ranks]
    assert not any("error" in r for r in results), results
    assert [r["rank"] for r in results] == list(range(len(ranks)))
    final, others = results[0], results[1:]
    assert final["is_final"] and final["prompt_ok"], final
    assert final["max_diff"] <= 1e-4
    # Non-final ranks return hidden states of shape (B, L, hidden).
    for r in others:
        assert not r["is_final"] and r["prompt_ok"], r
    return final, others


@contextmanager
def serving(model: str | Path, n: int = 2, *args: str, timeout: float = 300) -> Iterator[Server]:
    """``ppwrap serve --model MODEL --ranks N ARGS`` on a free port, healthy.

    The server ``ppwrap bench-serve`` runs: every rank is resumed and killed
    when the block ends, whatever happened in it.
    """
    with bench_serving(str(model), n, timeout, args) as server:
        yield server
