"""docs/support.md is the support table of the installed mlx-lm, as ppwrap generates it."""

from pathlib import Path

from ppwrap._cli import main
from ppwrap._support import support_table

DOC = Path(__file__).parent.parent / "docs" / "support.md"


def test_docs_support_table_is_current():
    assert DOC.read_text() == support_table(), "regenerate: ppwrap families > docs/support.md"


def test_every_family_that_is_not_a_plain_yes_says_why(capsys):
    assert main(["families"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")][2:]
    for row in rows:
        family, wrap, mlx, split, traffic, _ = (c.strip() for c in row.strip("|").split("|"))
        for cell in (wrap, split):
            assert cell == "yes" or ": " in cell, row
        # What a boundary carries, for every family ppwrap splits.
        assert traffic.startswith("hidden state") if split == "yes" else traffic == "-", row
