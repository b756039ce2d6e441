"""``ppwrap bench`` runs end to end and writes a well-formed report.

Nothing here is about speed: the tiny model only checks that every
measurement runs and lands in bench.json and bench.png.
"""

from __future__ import annotations

import io
import json
import socket
import statistics
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlx.core as mx
import pytest
from PIL import Image

from ppwrap._cli import main as cli_main
from ppwrap._relay import DelayRelay, set_delay
from ppwrap.bench import pipeline as _bench
from ppwrap.bench.pipeline import VARIANTS, chart

from families import write_model_folder

# A real report (ppwrap bench on a GPU, 2 ranks), as docs/gpu.md shows it.
GPU_REPORT = Path(__file__).parent.parent / "docs" / "img" / "gpu-bench.json"


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
    assert e2e["device"] == mx.default_device().type.name  # MLX's default
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

    image = Image.open(out / "bench.png")
    assert image.format == "PNG" and image.info["Software"].startswith("Matplotlib")


def test_chart_is_a_png_drawn_by_matplotlib_with_a_panel_per_measurement() -> None:
    png = chart(json.loads(GPU_REPORT.read_text()))
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    image = Image.open(io.BytesIO(png))
    image.verify()  # the chunks and their checksums are intact
    assert image.info["Software"].startswith("Matplotlib")
    # One group of bars, so the narrowest width; four panels of 2.6 inches at 100 dpi.
    assert image.size == (600, 1140)


def test_bench_without_matplotlib_writes_json_and_table_and_says_how_to_get_the_chart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # None in sys.modules makes `import matplotlib...` raise ImportError.
    for name in [m for m in sys.modules if m.split(".")[0] == "matplotlib"] + ["matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)
    # The measurements of a real report stand in for running the ranks.
    (measured,) = json.loads(GPU_REPORT.read_text())["models"][0]["runs"]

    def compute(*args: Any, **kwargs: Any) -> tuple[list[dict[str, Any]], dict[str, str]]:
        return measured["per_rank"], {}

    monkeypatch.setattr(_bench, "measure_compute", compute)
    monkeypatch.setattr(_bench, "measure_end_to_end", lambda *a, **k: measured["end_to_end"])
    model = write_model_folder("qwen2", tmp_path / "qwen2")
    out = tmp_path / "out"
    assert main(["--model", str(model), "--ranks", "2", "--out", str(out)]) == 0

    assert sorted(p.name for p in out.iterdir()) == ["bench.json"]
    (entry,) = json.loads((out / "bench.json").read_text())["models"]
    assert entry["runs"][0]["end_to_end"] == measured["end_to_end"]
    printed = capsys.readouterr().out
    assert "decode tok/s" in printed and "stock mlx-lm" in printed  # the table
    (skipped,) = [line for line in printed.splitlines() if "skipped bench.png" in line]
    assert 'pip install "ppwrap[bench]"' in skipped
    assert printed.rstrip().endswith(f"wrote {out / 'bench.json'}")


def test_bench_refuses_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--model", str(tmp_path), "--ranks", "1"]) == 2
    assert "at least 2" in capsys.readouterr().err
    assert main(["--model", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "no config.json" in capsys.readouterr().err


def link_bench(tmp_path: Path, *options: str) -> dict[str, Any]:
    """``ppwrap bench OPTIONS`` on 2 ranks of the tests' tiny qwen2 (a short run, medians of
    3: one sample can catch a busy machine's stall): the report."""
    model = write_model_folder("qwen2", tmp_path / "qwen2")
    argv = ["--model", str(model), "--ranks", "2", "--tokens", "4", "--repeats", "3"]
    argv += ["--prompt-tokens", "8", "--out", str(tmp_path / "out"), "--timeout", "120"]
    assert main([*argv, *options]) == 0
    return json.loads((tmp_path / "out" / "bench.json").read_text())  # type: ignore[no-any-return]


@pytest.mark.timeout(300)
def test_bench_link_delay_on_the_cpu_reports_time_per_token_and_implied_hops(
    tmp_path: Path,
) -> None:
    report = link_bench(tmp_path, "--link-delay", "10", "--device", "cpu")
    assert report["settings"]["link_delay_ms"] == [10.0]
    assert report["settings"]["device"] == "cpu"
    rows = report["links"]
    assert [(r["ranks"], r["delay_ms"]) for r in rows] == [(2, 0.0), (2, 10.0)]
    for row in rows:
        assert row["device"] == "cpu"  # both variants' generation streams, on every rank
        assert row["same_tokens"] is True  # stock and ppwrap, side by side
        assert set(row["variants"]) == {"stock", "ppwrap"}
        for v, r in row["variants"].items():
            assert r["ms_per_token"] > 0 and r["first_token_ms"] > 0
            assert len(r["ms_per_token_samples"]) == 3  # --repeats 3, at each delay
            assert r["expected_hops"] == {"stock": 2, "ppwrap": 2}[v]
    # Both delays in one launch: the relay's delay changed between them (a token
    # crosses 2 hops of 10 ms; a loaded machine's noise leaves most of it).
    for v in ("stock", "ppwrap"):
        assert rows[1]["variants"][v]["ms_per_token"] > rows[0]["variants"][v]["ms_per_token"]
    assert rows[0]["variants"]["ppwrap"]["implied_hops"] is None  # no delay, no hops
    assert isinstance(rows[1]["variants"]["ppwrap"]["implied_hops"], float)


@pytest.mark.timeout(300)
def test_bench_link_mbps_limits_every_delayed_link_and_keeps_an_unlimited_baseline(
    tmp_path: Path,
) -> None:
    # 2.5 kB/s: a stage message of the tiny model (32 float32 values) takes 50 ms
    # to go out, far above what a busy machine adds to a token.
    report = link_bench(tmp_path, "--link-delay", "0", "1", "--link-mbps", "0.02")
    assert report["settings"]["link_mbps"] == 0.02
    rows = report["links"]
    # The baseline, then each delay listed at the limit (0 ms too: a link of bandwidth only).
    assert [(r["delay_ms"], r["mbps"]) for r in rows] == [(0.0, None), (0.0, 0.02), (1.0, 0.02)]
    for row in rows:
        assert row["same_tokens"] is True
        for v, r in row["variants"].items():
            assert r["implied_hops"] is None  # bytes count too: not a number of hops
            if row["mbps"] is not None:
                assert r["ms_per_token"] > rows[0]["variants"][v]["ms_per_token"] + 10
    model = str(tmp_path / "qwen2")
    assert main(["--model", model, "--link-mbps", "10"]) == 2  # needs --link-delay
    assert main(["--model", model, "--link-delay", "1", "--link-mbps", "0"]) == 2


def echo_server() -> socket.socket:
    """A listening socket whose first connection gets back all it sends, then EOF."""
    server = socket.create_server(("127.0.0.1", 0))

    def echo() -> None:
        conn, _ = server.accept()
        with conn:
            while data := conn.recv(1 << 16):
                conn.sendall(data)

    threading.Thread(target=echo, daemon=True).start()
    return server


@contextmanager
def echo_behind_relay(delay: float) -> Iterator[tuple[DelayRelay, socket.socket]]:
    """A relay holding chunks ``delay`` seconds, and a client connected through
    it to an echo server."""
    server = echo_server()
    with (
        server,
        DelayRelay([server.getsockname()[1]], delay) as relay,
        socket.create_connection(("127.0.0.1", relay.ports[0])) as client,
    ):
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        yield relay, client


def round_trip(client: socket.socket, payload: bytes) -> float:
    """Seconds until ``payload`` came back whole through the echo server."""
    start = time.perf_counter()
    client.sendall(payload)
    got = b""
    while len(got) < len(payload):
        got += client.recv(1 << 16)
    assert got == payload
    return time.perf_counter() - start


def test_relay_delays_each_direction_and_keeps_the_bytes() -> None:
    with echo_behind_relay(0.05) as (_, client):
        elapsed = round_trip(client, bytes(range(256)) * 64)
        # Our end of the stream reaches the echo server, and its end comes back.
        client.shutdown(socket.SHUT_WR)
        assert client.recv(1 << 16) == b""
    assert elapsed >= 0.1  # 50 ms there and 50 ms back


def test_relay_holds_each_chunk_for_the_delay_and_not_much_longer() -> None:
    delay = 0.002
    with echo_behind_relay(delay) as (_, client):
        trips = [round_trip(client, bytes([i]) * 64) for i in range(21)]
    # The median: a shared machine stalls the odd trip. An event loop's timers
    # overshoot by up to a millisecond each way; the bound leaves room for the
    # loopback, the echo server and a busy host, not for that.
    assert 2 * delay <= statistics.median(trips) <= 2 * delay + 0.0015


def test_relay_with_a_rate_sends_each_direction_at_that_bandwidth_then_the_delay() -> None:
    with echo_behind_relay(0.0) as (relay, client):
        control = f"127.0.0.1:{relay.control_port}"
        # 100 kB/s each way, 10 ms each way: 2 kB take 20 ms to go out in each
        # direction, and 10 ms to arrive.
        set_delay(control, 0.01, 100_000.0)
        assert (relay.delay, relay.rate) == (0.01, 100_000.0)
        trips = [round_trip(client, b"r" * 2000) for _ in range(5)]
        assert 0.06 <= statistics.median(trips) <= 0.06 + 0.015
        # Back to no limit: the same bytes cost the delay alone.
        set_delay(control, 0.01)
        assert relay.rate is None
        trips = [round_trip(client, b"r" * 2000) for _ in range(5)]
        assert 0.02 <= statistics.median(trips) <= 0.02 + 0.015
        for bad in (0.0, -5.0, float("inf")):
            with pytest.raises(ValueError, match="refused a delay of 0.01 s at"):
                set_delay(control, 0.01, bad)
    with pytest.raises(ValueError, match="bytes per second > 0"):
        DelayRelay([1], 0.0, rate=0.0)  # refused before it listens or connects


def test_relay_takes_a_new_delay_over_its_control_port_and_refuses_bad_ones() -> None:
    with echo_behind_relay(0.0) as (relay, client):
        control = f"127.0.0.1:{relay.control_port}"
        assert round_trip(client, b"x") < 0.04
        set_delay(control, 0.03)
        assert relay.delay == 0.03
        assert round_trip(client, b"x") >= 0.06  # 30 ms there and 30 ms back
        set_delay(control, 0.0)
        assert round_trip(client, b"x") < 0.04
        for bad in (-1.0, float("nan"), float("inf")):
            with pytest.raises(ValueError, match="refused a delay"):
                set_delay(control, bad)
        assert relay.delay == 0.0


def test_relay_closes_promptly_while_its_target_does_not_listen() -> None:
    with socket.create_server(("127.0.0.1", 0)) as unused:
        port = unused.getsockname()[1]  # free once closed: nobody listens there
    relay = DelayRelay([port], 0.01)
    with socket.create_connection(("127.0.0.1", relay.ports[0])) as client:
        time.sleep(0.1)  # the relay is retrying the target
        start = time.monotonic()
        relay.close()
        assert time.monotonic() - start < 2
        assert client.recv(1) == b""  # the relay dropped our connection
