"""Every Python example in the README and docs/ runs as written; the docs site builds."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ppwrap._launch import run_local

from families import write_model_folder
from launcher import describe

ROOT = Path(__file__).parent.parent
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
MARKED = re.compile(r"<!-- example: ([\w-]+)(?:, ranks=(\d+))? -->\n```python\n(.*?)```", re.S)


def examples():
    found = []
    for page in PAGES:
        for name, ranks, code in MARKED.findall(page.read_text()):
            found.append(pytest.param(code, int(ranks or 1), id=f"{page.name}:{name}"))
    return found


def test_every_python_block_in_the_docs_is_a_marked_example():
    for page in PAGES:
        text = page.read_text()
        assert text.count("```python") == len(MARKED.findall(text)), page.name


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    # qwen2: the README loop uses mlx-lm's own split, which needs a PipelineMixin family.
    return write_model_folder("qwen2", tmp_path_factory.mktemp("docs") / "qwen2")


@pytest.mark.parametrize("code,ranks", examples())
def test_example_runs_as_written(code, ranks, model_folder, tmp_path):
    script = tmp_path / "example.py"
    script.write_text(code)
    if ranks == 1:
        done = subprocess.run(
            [sys.executable, str(script), str(model_folder)],
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert done.returncode == 0, done.stderr[-3000:]
    else:
        run = run_local(ranks, [str(script), str(model_folder)], timeout=180, capture=True)
        assert run.returncode == 0, describe(run)


def test_custom_family_example_prints_its_family_and_logit_shape(tmp_path):
    code = dict((name, c) for name, _, c in MARKED.findall((DOCS / "adapters.md").read_text()))
    script = tmp_path / "example.py"
    script.write_text(code["custom-family"])
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120
    )
    assert done.stdout.strip() == "tiny_lm (1, 3, 64)", done.stderr


def test_docs_build_in_strict_mode(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "site" / "api" / "index.html").exists()
