"""``ppwrap bench-serve``: requests per minute and tokens/s of ``ppwrap serve`` under load.

It starts ``ppwrap serve --ranks N`` as a subprocess, waits for ``/health``,
sends one warm-up request, and then, for each number of concurrent clients,
runs that many client threads. Each thread is its own official ``openai``
client and sends its requests one after another: streamed chat completions at
temperature 0 with a fixed ``max_tokens``, over a few short prompts.

Per level it reports requests per minute and completion tokens/s over the
level's wall time (first request sent to last answer read), and the median
and 90th percentile of the request latency and the median time to first
token. The server then gets SIGTERM, as a supervisor would send it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._bench import machine_info, versions

if TYPE_CHECKING:
    import openai

__all__ = ["PROMPTS", "add_parser", "run"]

# Open questions, so that most answers run to max_tokens and every request
# costs about the same.
PROMPTS = (
    "Explain why the sky is blue.",
    "Write a short poem about the sea.",
    "Describe how a bicycle works.",
    "Give some advice for a first job interview.",
    "Tell a short story about a lost cat.",
)


class ServerError(RuntimeError):
    """The server exited, or never answered ``/health`` with 200."""


# ------------------------------------------------------------------ the server


class Server:
    """A ``ppwrap serve --ranks N`` subprocess, in its own session.

    Attributes:
        proc: The ``ppwrap serve`` process (it starts and waits for the ranks).
        url: The server's base address, ``http://127.0.0.1:PORT``.
        log: The file that holds its standard output and error.
        pids: The ranks' process ids, from ``/health`` once it answers.
    """

    def __init__(
        self, model: str, ranks: int, port: int, log: Path, extra: Sequence[str] = ()
    ) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        self.pids: list[int] = []
        argv = [sys.executable, "-m", "ppwrap", "serve", "--model", model]
        argv += ["--ranks", str(ranks), "--port", str(port), *extra]
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

    def output(self) -> str:
        """The tail of the server's output, for error messages."""
        return self.log.read_text(errors="replace")[-6000:]

    def health(self, timeout: float = 5) -> tuple[int, dict[str, Any]]:
        """``/health``'s status code and body; ``(0, {})`` when nothing answers in time."""
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=timeout) as r:
                return int(r.status), json.loads(r.read())
        except urllib.error.HTTPError as e:
            try:
                return e.code, json.loads(e.read())  # a 503 says why
            except ValueError:
                return e.code, {}
        except (OSError, ValueError):
            return 0, {}

    def wait_healthy(self, timeout: float) -> None:
        """Return once ``/health`` answers 200; keep the ranks' process ids.

        Raises:
            ServerError: The server exited first, or ``timeout`` seconds passed.
        """
        deadline = time.monotonic() + timeout
        while True:
            code, body = self.health()
            if code == 200:
                self.pids = [int(p) for p in body.get("pids", [])]
                return
            if self.proc.poll() is not None:
                raise ServerError(
                    f"the server exited with code {self.proc.returncode} before it was "
                    f"healthy; its output:\n{self.output()}"
                )
            if time.monotonic() > deadline:
                raise ServerError(
                    f"the server was not healthy after {timeout:.0f} s (last /health: "
                    f"{code or 'no answer'}); its output:\n{self.output()}"
                )
            time.sleep(0.5)

    def stop(self, timeout: float = 60) -> int | None:
        """SIGTERM, for a graceful stop; the exit code, or None if it did not exit."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def signal_all(self, sig: signal.Signals) -> None:
        """Send ``sig`` to the server and every rank it reported."""
        for pid in [*self.pids, self.proc.pid]:
            with suppress(ProcessLookupError):
                os.kill(pid, sig)

    def kill(self) -> None:
        """SIGKILL whatever is left of the server and its ranks."""
        self.signal_all(signal.SIGKILL)
        self.proc.wait()


@contextmanager
def serving(model: str, ranks: int, timeout: float, extra: Sequence[str] = ()) -> Iterator[Server]:
    """A healthy server on a free port; every process of it is gone afterwards.

    Args:
        model: The checkpoint folder.
        ranks: The number of local ranks.
        timeout: Seconds for ``/health`` to answer 200.
        extra: More ``ppwrap serve`` arguments.
    """
    from ._launch import free_port_base

    with tempfile.TemporaryDirectory(prefix="ppwrap-bench-serve-") as tmp:
        server = Server(model, ranks, free_port_base(1), Path(tmp) / "serve.log", extra)
        try:
            server.wait_healthy(timeout)
            yield server
        finally:
            # Resume any suspended rank, stop gracefully (a no-op when the
            # caller stopped it), then kill the leftovers.
            server.signal_all(signal.SIGCONT)
            server.stop(timeout=30)
            server.kill()


# ------------------------------------------------------------------ the clients


def _openai() -> Any:
    try:
        import openai
    except ImportError as e:
        raise ImportError(
            "ppwrap bench-serve measures with the official OpenAI client: "
            "pip install 'ppwrap[bench,serve]' (or pip install openai)"
        ) from e
    return openai


def ask(client: openai.OpenAI, model: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    """Send one streamed chat completion; return its timings and token counts.

    A failed request is returned with its ``error`` rather than raised, so
    that one failure does not end the level.
    """
    start = time.perf_counter()
    sample: dict[str, Any] = {"prompt": prompt, "error": None, "start": start}
    first = None
    try:
        stream = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": prompt}],
            temperature=0,
            max_tokens=max_tokens,
            stream=True,
            stream_options={"include_usage": True},
        )
        for chunk in stream:
            # The server sends the role at once; the first token comes with content.
            if first is None and chunk.choices and chunk.choices[0].delta.content:
                first = time.perf_counter()
            if chunk.choices and chunk.choices[0].finish_reason:
                sample["finish_reason"] = chunk.choices[0].finish_reason
            if chunk.usage is not None:
                sample["prompt_tokens"] = chunk.usage.prompt_tokens
                sample["completion_tokens"] = chunk.usage.completion_tokens
        if "completion_tokens" not in sample:
            raise RuntimeError("the stream ended without its usage chunk")
    except Exception as e:  # any failure is a failed sample, reported in the table
        sample["error"] = f"{type(e).__name__}: {e}"[:1000]
    end = time.perf_counter()
    sample["end"] = end
    sample["latency_s"] = end - start
    sample["ttft_s"] = None if first is None else first - start
    return sample


def run_level(
    url: str, model: str, clients: int, requests: int, max_tokens: int, timeout: float
) -> list[dict[str, Any]]:
    """``clients`` threads, each sending ``requests`` requests one after another.

    Returns:
        Every request's sample, with its client's and its own index.
    """
    api = _openai()
    barrier = threading.Barrier(clients)

    def client_loop(c: int) -> list[dict[str, Any]]:
        # A client of its own per thread: its own connections, like a separate user.
        with api.OpenAI(
            base_url=url + "/v1", api_key="unused", timeout=timeout, max_retries=0
        ) as client:
            barrier.wait()  # every client starts at once
            samples = []
            for r in range(requests):
                prompt = PROMPTS[(c + r) % len(PROMPTS)]
                sample = ask(client, model, prompt, max_tokens)
                samples.append({"client": c, "request": r, **sample})
            return samples

    with ThreadPoolExecutor(clients) as pool:
        per_client = list(pool.map(client_loop, range(clients)))
    return [s for samples in per_client for s in samples]


def _p90(values: Sequence[float]) -> float:
    if len(values) < 2:
        return values[0]
    return statistics.quantiles(values, n=10, method="inclusive")[-1]


def summarize(clients: int, samples: list[dict[str, Any]]) -> dict[str, Any]:
    """One level's figures from its samples; times are made relative to its start."""
    begin = min(s["start"] for s in samples)
    # Requests refused at once could end within the clock's resolution.
    wall = max(max(s["end"] for s in samples) - begin, 1e-6)
    ok = [s for s in samples if s["error"] is None]
    tokens = sum(s["completion_tokens"] for s in ok)
    latency = [s["latency_s"] for s in ok]
    ttft = [s["ttft_s"] for s in ok if s["ttft_s"] is not None]
    for s in samples:
        s["start"], s["end"] = s["start"] - begin, s["end"] - begin
    return {
        "clients": clients,
        "requests": len(samples),
        "succeeded": len(ok),
        "failed": len(samples) - len(ok),
        "wall_s": wall,
        "completion_tokens": tokens,
        "requests_per_min": 60 * len(ok) / wall,
        "tokens_per_s": tokens / wall,
        "latency_s": {"median": statistics.median(latency), "p90": _p90(latency)}
        if latency
        else None,
        "ttft_s": {"median": statistics.median(ttft), "p90": _p90(ttft)} if ttft else None,
        "samples": samples,
    }


# ------------------------------------------------------------------ the report


def _seconds(stats: dict[str, float] | None, key: str) -> str:
    return "-" if stats is None else f"{stats[key]:.2f}"


def table(report: dict[str, Any]) -> str:
    """The report's levels as a markdown table."""
    s = report["settings"]
    lines = [
        f"{report['server']['model_id']} on {s['ranks']} ranks, max_tokens {s['max_tokens']}, "
        f"{s['requests']} request(s) per client, streamed chat completions at temperature 0",
        "",
        "| clients | requests | failed | requests/min | completion tokens/s "
        "| median latency s | p90 latency s | median TTFT s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for level in report["levels"]:
        lines.append(
            f"| {level['clients']} | {level['requests']} | {level['failed']} "
            f"| {level['requests_per_min']:.1f} | {level['tokens_per_s']:.1f} "
            f"| {_seconds(level['latency_s'], 'median')} | {_seconds(level['latency_s'], 'p90')} "
            f"| {_seconds(level['ttft_s'], 'median')} |"
        )
    return "\n".join(lines) + "\n"


def _model(args: argparse.Namespace, say: Any) -> str | None:
    """The checkpoint folder: --model, or SmolLM2 fetched once; None after an error."""
    from ._gguf import FetchError, GGUFError, default_model

    if args.model is not None:
        if not Path(args.model, "config.json").is_file():
            print(f"ppwrap bench-serve: {args.model} has no config.json", file=sys.stderr)
            return None
        return str(args.model)
    try:
        return str(default_model(progress=say))
    except (FetchError, GGUFError) as e:
        print(f"ppwrap bench-serve: {e}", file=sys.stderr)
        return None


def measure(model: str, args: argparse.Namespace, report: dict[str, Any], say: Any) -> int | None:
    """Start the server, run every level into ``report``, stop it; its exit code."""
    api = _openai()
    extra = (
        [] if args.watchdog_timeout is None else ["--watchdog-timeout", str(args.watchdog_timeout)]
    )
    with serving(model, args.ranks, args.startup_timeout, extra) as server:
        say(f"serving on {server.url} with {args.ranks} ranks (pids {server.pids})")
        with api.OpenAI(base_url=server.url + "/v1", api_key="unused") as client:
            model_id = client.models.list().data[0].id
        report["server"].update(model_id=model_id, pids=server.pids)
        # The first request pays for lazy work (compilation, caches): not measured.
        warm = run_level(server.url, model_id, 1, 1, args.max_tokens, args.request_timeout)
        report["warmup"] = summarize(1, warm)["samples"][0]
        for n in args.clients:
            if server.proc.poll() is not None:  # every request would fail at once
                print(
                    f"ppwrap bench-serve: the server exited with code {server.proc.returncode} "
                    f"during the run; skipping {n} concurrent client(s) and beyond",
                    file=sys.stderr,
                )
                break
            say(f"{n} concurrent client(s), {args.requests} request(s) each")
            samples = run_level(
                server.url, model_id, n, args.requests, args.max_tokens, args.request_timeout
            )
            report["levels"].append(summarize(n, samples))
        code = server.stop()
        report["server"]["output"] = server.output()[-6000:]
    return code


def run(args: argparse.Namespace) -> int:
    """Run ``ppwrap bench-serve`` with parsed arguments; return the exit code.

    Returns:
        0 when every request succeeded and the server stopped with code 0; 1
        otherwise (the report is still written); 2 for bad arguments, a
        missing ``openai`` package or a server that never became healthy.
    """
    if args.ranks < 1 or args.requests < 1 or args.max_tokens < 1 or min(args.clients) < 1:
        print(
            "ppwrap bench-serve: --ranks, --clients, --requests and --max-tokens must be "
            "at least 1",
            file=sys.stderr,
        )
        return 2

    def say(message: str) -> None:
        print(f"ppwrap bench-serve: {message}", flush=True)

    try:
        _openai()
    except ImportError as e:
        print(f"ppwrap bench-serve: {e}", file=sys.stderr)
        return 2
    model = _model(args, say)
    if model is None:
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "command": ["ppwrap", *(args.argv if args.argv is not None else sys.argv[1:])],
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_info(),
        "versions": versions(),
        "settings": {
            "ranks": args.ranks,
            "clients": list(args.clients),
            "requests": args.requests,
            "max_tokens": args.max_tokens,
            "temperature": 0,
            "stream": True,
            "prompts": list(PROMPTS),
            "watchdog_timeout": args.watchdog_timeout,
        },
        "server": {"model": model},
        "levels": [],
    }
    started = time.monotonic()
    # The machine may be shared: its load belongs next to the figures.
    report["load_average"] = {"start": list(os.getloadavg())}
    try:
        code = measure(model, args, report, say)
    except ServerError as e:
        print(f"ppwrap bench-serve: {e}", file=sys.stderr)
        return 2
    report["server"]["exit_code"] = code
    report["wall_s"] = time.monotonic() - started
    report["load_average"]["end"] = list(os.getloadavg())
    (out / "bench-serve.json").write_text(json.dumps(report, indent=1))
    print(table(report), end="")
    load = report["load_average"]
    say(
        f"wrote {out / 'bench-serve.json'} ({report['wall_s']:.0f} s; 1-minute load "
        f"average {load['start'][0]:.1f} at the start, {load['end'][0]:.1f} at the end)"
    )
    failed = sum(level["failed"] for level in report["levels"])
    failed += report["warmup"]["error"] is not None
    skipped = len(args.clients) - len(report["levels"])
    if failed or skipped or code != 0:
        tail = "\n".join(report["server"]["output"].splitlines()[-8:])
        print(
            f"ppwrap bench-serve: {failed} request(s) failed, {skipped} level(s) skipped; "
            f"the server exited with code {code}. The end of its output:\n{tail}",
            file=sys.stderr,
        )
        return 1
    return 0


def add_parser(subparsers: Any) -> None:
    """Add the ``bench-serve`` sub-command to an argparse ``subparsers`` object.

    Args:
        subparsers: What ``ArgumentParser.add_subparsers`` returned.
    """
    p = subparsers.add_parser(
        "bench-serve",
        help="requests/min and tokens/s of ppwrap serve under concurrent clients",
        description="Starts ppwrap serve on local ranks and measures it with the "
        "official openai client at each number of concurrent clients. Writes "
        "bench-serve.json and prints a markdown table. Needs the serve extra and openai.",
    )
    p.add_argument(
        "--model", default=None, help="an mlx-lm checkpoint folder (default: SmolLM2-135M)"
    )
    p.add_argument("--ranks", type=int, default=2, help="local ranks (default 2)")
    p.add_argument(
        "--clients",
        nargs="+",
        type=int,
        default=[1, 4, 8],
        help="numbers of concurrent clients (default 1 4 8)",
    )
    p.add_argument("--requests", type=int, default=3, help="requests per client (default 3)")
    p.add_argument("--max-tokens", type=int, default=32, help="max_tokens per request (32)")
    p.add_argument("--out", default=".", help="output folder (default: here)")
    p.add_argument(
        "--startup-timeout",
        type=float,
        default=300,
        help="seconds for the server to become healthy (300)",
    )
    p.add_argument("--request-timeout", type=float, default=600, help="seconds per request (600)")
    p.add_argument(
        "--watchdog-timeout",
        type=float,
        default=None,
        help="the server's --watchdog-timeout (default: serve's own)",
    )
    p.set_defaults(run=run, argv=None)
