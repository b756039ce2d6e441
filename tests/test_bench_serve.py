"""``ppwrap bench-serve`` runs end to end and writes a well-formed report.

Nothing here is about speed: the tiny random-weight model only checks that
every level runs, every request succeeds and the figures land in the report.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ppwrap._cli import main as cli_main

from families import write_model_folder


@pytest.mark.timeout(300)
def test_bench_serve_measures_ppwrap_and_stock_side_by_side_and_writes_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = write_model_folder("llama", tmp_path / "llama")
    out = tmp_path / "out"
    argv = ["--model", str(model), "--clients", "1", "2", "--requests", "1"]
    argv += ["--max-tokens", "4", "--out", str(out), "--startup-timeout", "120"]
    argv += ["--servers", "ppwrap", "stock"]
    assert cli_main(["bench-serve", *argv]) == 0

    report = json.loads((out / "bench-serve.json").read_text())
    assert {"command", "created", "machine", "versions", "settings", "runs"} <= set(report)
    assert report["command"][:2] == ["ppwrap", "bench-serve"]
    assert {"mlx", "mlx-lm", "ppwrap"} <= set(report["versions"])
    assert report["settings"]["ranks"] == 2 and report["settings"]["max_tokens"] == 4
    assert [r["kind"] for r in report["runs"]] == ["ppwrap", "stock"]
    ppwrap, stock = report["runs"]
    # Stock mlx-lm cannot pipeline llama: it ran the same weights in qwen2 form.
    assert stock["server"]["model"].endswith("llama-qwen2-form")
    assert (
        json.loads(Path(stock["server"]["model"], "config.json").read_text())["model_type"]
        == "qwen2"
    )
    for run in report["runs"]:
        # SIGTERM stopped the server gracefully.
        assert run["server"]["exit_code"] == 0, run["server"]["output"]
        assert len(run["server"]["pids"]) == 2
        assert run["warmup"]["error"] is None
        assert [level["clients"] for level in run["levels"]] == [1, 2]
        for level in run["levels"]:
            n = level["clients"]
            assert level["requests"] == level["succeeded"] == n and level["failed"] == 0
            assert level["completion_tokens"] > 0 and level["wall_s"] > 0
            assert level["requests_per_min"] > 0 and level["tokens_per_s"] > 0
            latency = level["latency_s"]
            assert 0 < latency["median"] <= latency["p90"] <= latency["p99"]
            assert level["ttft_s"]["median"] > 0
            assert sorted(s["client"] for s in level["samples"]) == list(range(n))
            for s in level["samples"]:
                assert s["error"] is None, s
                assert 0 < s["completion_tokens"] <= 4
                assert 0 <= s["start"] < s["end"] <= level["wall_s"] + 1e-9
                assert 0 < s["ttft_s"] <= s["latency_s"]
    assert ppwrap["server"]["model_id"] == "llama"
    assert ppwrap["server"]["split"].startswith("layers per rank [")
    assert "rank 0 " in ppwrap["server"]["stages"] and "rank 1 " in ppwrap["server"]["stages"]

    table = capsys.readouterr().out
    assert "| clients | requests |" in table and "\n| 2 | 2 | 0 |" in table
    assert "| clients | ppwrap / mlx_lm.server --pipeline tokens/s |" in table
