"""The runnable examples in docs/ run as written."""

import re
import subprocess
import sys
from pathlib import Path

DOCS = Path(__file__).parent.parent / "docs"


def example(page: str, name: str) -> str:
    text = (DOCS / page).read_text()
    match = re.search(rf"<!-- example: {name} -->\n```python\n(.*?)```", text, re.S)
    assert match, f"no example {name!r} in docs/{page}"
    return match.group(1)


def test_custom_family_adapter_example_registers_wraps_and_matches_the_model(tmp_path):
    script = tmp_path / "example.py"
    script.write_text(example("adapters.md", "custom-family"))
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "tiny_lm (1, 3, 64)"


def test_docs_build_in_strict_mode(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
        cwd=DOCS.parent,
        capture_output=True,
        text=True,
        timeout=300,
        env={**__import__("os").environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "site" / "api" / "index.html").exists()
