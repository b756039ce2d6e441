"""The README's custom loop runs as written on 2 local ranks."""

import re
from pathlib import Path

from ppwrap._launch import run_local

from families import write_checkpoint
from launcher import describe

README = Path(__file__).parent.parent / "README.md"


def readme_example(name: str) -> str:
    text = README.read_text()
    match = re.search(rf"<!-- example: {name} -->\n```python\n(.*?)```", text, re.S)
    assert match, f"no example {name!r} in README.md"
    return match.group(1)


def test_readme_loop_runs_on_two_ranks_and_only_rank_0_returns_logits(tmp_path):
    script = tmp_path / "loop.py"
    script.write_text(readme_example("readme-loop"))
    model = write_checkpoint("qwen2", tmp_path / "qwen2")
    run = run_local(2, [str(script), str(model)], timeout=180, capture=True)
    assert run.returncode == 0, describe(run)
    lines = [line for out in run.stdout for line in out.splitlines()]
    # tiny qwen2: vocab 128, hidden 32
    assert lines == ["rank 0: (1, 1, 128)", "rank 1: (1, 1, 32)"]
