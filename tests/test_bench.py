"""``ppwrap bench`` runs end to end and writes a well-formed report.

Nothing here is about speed: the tiny model only checks that every
measurement runs and lands in bench.json and bench.png.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ppwrap._bench import VARIANTS
from ppwrap._cli import main as cli_main

from families import write_model_folder


def main(argv: list[str]) -> int:
    """``ppwrap bench ARGV``, in this process."""
    return cli_main(["bench", *argv])


@pytest.mark.timeout(120)
def test_bench_writes_report(tmp_path: Path) -> None:
    model = write_model_folder("qwen2", tmp_path / "qwen2")
    out = tmp_path / "out"
    argv = ["--model", str(model), "--ranks", "2", "--tokens", "4", "--repeats", "1"]
    argv += ["--prompt-tokens", "8", "--compute-steps", "2", "--out", str(out)]
    argv += ["--timeout", "90"]  # the multi-rank run is killed if it hangs
    assert main(argv) == 0

    report = json.loads((out / "bench.json").read_text())
    assert {"command", "created", "machine", "versions", "settings", "models"} <= set(report)
    assert report["command"][:2] == ["ppwrap", "bench"]
    assert {"mlx", "mlx-lm", "ppwrap"} <= set(report["versions"])
    (entry,) = report["models"]
    assert entry["model_type"] == "qwen2"
    assert entry["variants"] == list(VARIANTS)  # qwen2 has PipelineMixin: stock runs
    (run,) = entry["runs"]
    assert run["ranks"] == 2

    e2e = run["end_to_end"]
    assert e2e["same_tokens"] is True
    for v in VARIANTS:
        stats = e2e["variants"][v]
        for key in ("decode_tps", "prefill_tps"):
            assert len(stats[key]["samples"]) == 1
            assert stats[key]["median"] > 0
        assert len(stats["tokens"]) == 4
        assert all(b > 0 for b in stats["resident_bytes_per_rank"])
    assert set(e2e["ratios"]) == {"ppwrap-head/stock", "ppwrap/stock"}

    assert [r["rank"] for r in run["per_rank"]] == [0, 1]
    assert [r["role"] for r in run["per_rank"]] == ["final", "first"]
    for r in run["per_rank"]:
        assert r["layers_only_ms"]["median"] > 0
        for v in VARIANTS:
            s = r["variants"][v]
            assert s["ms_per_token"]["median"] > 0
            assert s["ratio_to_layers_only"] > 0
            assert s["resident_bytes"] > 0

    png = (out / "bench.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    assert png[12:16] == b"IHDR" and png.endswith(b"IEND\xaeB`\x82")


def test_bench_refuses_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--model", str(tmp_path), "--ranks", "1"]) == 2
    assert "at least 2" in capsys.readouterr().err
    assert main(["--model", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "no config.json" in capsys.readouterr().err


@pytest.mark.timeout(300)
def test_bench_link_delay_reports_time_per_token_and_implied_hops(tmp_path: Path) -> None:
    model = write_model_folder("qwen2", tmp_path / "qwen2")
    out = tmp_path / "out"
    argv = ["--model", str(model), "--ranks", "2", "--tokens", "4", "--repeats", "1"]
    argv += ["--prompt-tokens", "8", "--link-delay", "2", "--out", str(out), "--timeout", "120"]
    assert main(argv) == 0

    report = json.loads((out / "bench.json").read_text())
    assert report["settings"]["link_delay_ms"] == [2.0]
    rows = report["links"]
    assert [(r["ranks"], r["delay_ms"]) for r in rows] == [(2, 0.0), (2, 2.0)]
    for row in rows:
        assert row["same_tokens"] is True  # stock and ppwrap, side by side
        assert set(row["variants"]) == {"stock", "ppwrap"}
        for v, r in row["variants"].items():
            assert r["ms_per_token"] > 0
            assert r["expected_hops"] == {"stock": 2, "ppwrap": 2}[v]
    assert rows[0]["variants"]["ppwrap"]["implied_hops"] is None  # no delay, no hops
    assert isinstance(rows[1]["variants"]["ppwrap"]["implied_hops"], float)


def test_relay_delays_each_direction_and_keeps_the_bytes(tmp_path: Path) -> None:
    import socket
    import threading
    import time

    from ppwrap._relay import DelayRelay

    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def echo() -> None:
        conn, _ = server.accept()
        with conn:
            while data := conn.recv(1 << 16):
                conn.sendall(data)

    threading.Thread(target=echo, daemon=True).start()
    payload = bytes(range(256)) * 64
    with (
        DelayRelay([port], 0.05) as relay,
        socket.create_connection(("127.0.0.1", relay.ports[0])) as client,
    ):
        start = time.monotonic()
        client.sendall(payload)
        got = b""
        while len(got) < len(payload):
            got += client.recv(1 << 16)
        elapsed = time.monotonic() - start
    server.close()
    assert got == payload
    assert elapsed >= 0.1  # 50 ms there and 50 ms back
