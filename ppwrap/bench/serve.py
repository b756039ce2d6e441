"""``ppwrap bench-serve``: requests per minute and tokens/s of ``ppwrap serve`` under load,
and of mlx-lm's own server on the same requests (``--servers ppwrap stock single``).

For each server it starts ``ppwrap serve --ranks N`` as a subprocess (or
``mlx_lm.server --pipeline`` on N ranks, or in one process), waits for ``/health``,
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
import shutil
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
from typing import TYPE_CHECKING, Any, cast

from .pipeline import machine_info, versions

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


class StockServer(Server):
    """mlx-lm's own server: ``mlx_lm.server --pipeline`` on ``ranks`` local ranks
    (each started here with ``MLX_RANK`` and ``MLX_HOSTFILE``, as ``mlx.launch``
    would, without its output relay, which polls a core), or one process.
    """

    def __init__(self, model: str, ranks: int, port: int, log: Path) -> None:
        from .._launch import free_port_base

        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        self.procs: list[subprocess.Popen[bytes]] = []
        argv = [sys.executable, "-m", "mlx_lm.server", "--model", model, "--port", str(port)]
        env = dict(os.environ)
        if ranks > 1:
            argv.append("--pipeline")
            base = free_port_base(ranks)
            hostfile = log.parent / "hosts.json"
            hostfile.write_text(json.dumps([[f"127.0.0.1:{base + r}"] for r in range(ranks)]))
            env["MLX_HOSTFILE"] = str(hostfile)
        for rank in range(ranks):
            out = open(log if rank == 0 else log.with_suffix(f".{rank}.log"), "wb")  # noqa: SIM115
            self.procs.append(
                subprocess.Popen(
                    argv,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    env={**env, "MLX_RANK": str(rank)} if ranks > 1 else env,
                )
            )
            out.close()
        self.proc = self.procs[0]
        self.pids = [p.pid for p in self.procs]

    def wait_healthy(self, timeout: float) -> None:
        pids = self.pids
        deadline = time.monotonic() + timeout
        # mlx_lm.server answers 503 for good when a rank's loading failed:
        # a rank that exited ends the wait at once.
        while self.health()[0] != 200:
            dead = [r for r, p in enumerate(self.procs) if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                what = f"rank {dead[0]} exited" if dead else f"not healthy after {timeout:.0f} s"
                raise ServerError(f"mlx_lm.server: {what}; its output:\n{self.output()}")
            time.sleep(0.5)
        self.pids = pids  # mlx-lm's /health lists none

    def stop(self, timeout: float = 60) -> int | None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        # mlx_lm.server has no SIGTERM handler: ending by it is its normal stop.
        return 0 if code == -signal.SIGTERM else code

    def signal_all(self, sig: signal.Signals) -> None:
        for pid in self.pids:
            with suppress(ProcessLookupError):
                os.kill(pid, sig)

    def kill(self) -> None:
        self.signal_all(signal.SIGKILL)
        for p in self.procs:
            p.wait()


def qwen2_form(src: str | Path, dst: str | Path) -> Path:
    """A llama checkpoint saved as the same model in mlx-lm's qwen2 form, once.

    Stock mlx-lm pipelines qwen2 but not llama. A llama model with
    ``rope_traditional`` loads unchanged as qwen2 with zero q/k/v biases, so
    stock and ppwrap can be compared on the same weights.
    """
    import mlx.core as mx

    src, dst = Path(src), Path(dst)
    if (dst / "config.json").is_file():
        return dst
    config = json.loads((src / "config.json").read_text())
    if config.get("model_type") != "llama":
        raise ValueError(f"{src} is a {config.get('model_type')} checkpoint, not llama")
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}-", dir=dst.parent))
    try:
        for f in src.iterdir():
            if f.is_file() and f.suffix != ".safetensors":
                shutil.copy(f, tmp / f.name)
        heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
        head_dim = config.get("head_dim") or config["hidden_size"] // heads
        weight_map: dict[str, str] = {}
        for f in src.glob("*.safetensors"):
            weights = cast("dict[str, mx.array]", mx.load(str(f)))
            for key in [k for k in weights if k.endswith("self_attn.q_proj.weight")]:
                base = key[: -len("q_proj.weight")]
                weights[base + "q_proj.bias"] = mx.zeros((heads * head_dim,), mx.float16)
                for name in ("k_proj", "v_proj"):
                    weights[f"{base}{name}.bias"] = mx.zeros((kv * head_dim,), mx.float16)
            mx.save_safetensors(str(tmp / f.name), weights, metadata={"format": "mlx"})
            weight_map.update(dict.fromkeys(weights, f.name))
        # mlx-lm's pipelined loading reads the index to load only its shard.
        index = {"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
        config["model_type"] = "qwen2"
        (tmp / "config.json").write_text(json.dumps(config, indent=1))
        tmp.rename(dst)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return dst


@contextmanager
def serving(
    model: str,
    ranks: int,
    timeout: float,
    extra: Sequence[str] = (),
    kind: str = "ppwrap",
) -> Iterator[Server]:
    """A healthy server on a free port; every process of it is gone afterwards.

    Args:
        model: The checkpoint folder.
        ranks: The number of local ranks.
        timeout: Seconds for ``/health`` to answer 200.
        extra: More ``ppwrap serve`` arguments.
        kind: ``"ppwrap"`` (``ppwrap serve``) or ``"stock"`` (``mlx_lm.server``).
    """
    from .._launch import free_port_base

    with tempfile.TemporaryDirectory(prefix="ppwrap-bench-serve-") as tmp:
        server = (
            StockServer(model, ranks, free_port_base(1), Path(tmp) / "serve.log")
            if kind == "stock"
            else Server(model, ranks, free_port_base(1), Path(tmp) / "serve.log", extra)
        )
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


def _percentile(values: Sequence[float], p: int) -> float:
    """The ``p``-th percentile (inclusive: with few values, near the largest)."""
    if len(values) < 2:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[p - 1]


def _spread(values: Sequence[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {
        "median": statistics.median(values),
        "p90": _percentile(values, 90),
        "p99": _percentile(values, 99),
    }


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
        "latency_s": _spread(latency),
        "ttft_s": _spread(ttft),
        "samples": samples,
    }


# ------------------------------------------------------------------ the report


def _seconds(stats: dict[str, float] | None, key: str) -> str:
    return "-" if stats is None else f"{stats[key]:.2f}"


def table(report: dict[str, Any]) -> str:
    """The report as markdown: a table per server, then ppwrap against the others."""
    s = report["settings"]
    lines = [
        f"{s['ranks']} ranks, max_tokens {s['max_tokens']}, {s['requests']} request(s) per "
        "client, streamed chat completions at temperature 0",
    ]
    for run in report["runs"]:
        lines += ["", f"{SERVERS[run['kind']]} ({run['server']['model']})", ""]
        said = [f"- {run['server'][k]}" for k in ("split", "stages") if k in run["server"]]
        lines += [*said, *([""] if said else [])]
        lines += [
            "| clients | requests | failed | requests/min | completion tokens/s "
            "| p50 latency s | p99 latency s | p50 TTFT s | p99 TTFT s |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for level in run["levels"]:
            lines.append(
                f"| {level['clients']} | {level['requests']} | {level['failed']} "
                f"| {level['requests_per_min']:.1f} | {level['tokens_per_s']:.1f} "
                f"| {_seconds(level['latency_s'], 'median')} "
                f"| {_seconds(level['latency_s'], 'p99')} "
                f"| {_seconds(level['ttft_s'], 'median')} "
                f"| {_seconds(level['ttft_s'], 'p99')} |"
            )
    runs = {r["kind"]: {lv["clients"]: lv for lv in r["levels"]} for r in report["runs"]}
    others = [k for k in runs if k != "ppwrap"]
    if "ppwrap" in runs and others:
        lines += [
            "",
            "| clients | " + " | ".join(f"ppwrap / {SERVERS[k]} tokens/s" for k in others) + " |",
            "|---:|" + "---:|" * len(others),
        ]
        for n, mine in runs["ppwrap"].items():
            ratios = [
                f"{mine['tokens_per_s'] / runs[k][n]['tokens_per_s']:.2f}x"
                if n in runs[k] and runs[k][n]["tokens_per_s"] > 0
                else "-"
                for k in others
            ]
            lines.append(f"| {n} | " + " | ".join(ratios) + " |")
    return "\n".join(lines) + "\n"


def _model(args: argparse.Namespace, say: Any) -> str | None:
    """The checkpoint folder: --model, or SmolLM2 fetched once; None after an error."""
    from ..models.gguf import FetchError, GGUFError, default_model

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


SERVERS = {
    "ppwrap": "ppwrap serve",
    "stock": "mlx_lm.server --pipeline",
    "single": "mlx_lm.server, one process",
}


def measure(model: str, kind: str, args: argparse.Namespace, say: Any) -> dict[str, Any]:
    """Start one server, run every level, stop it: that server's run."""
    api = _openai()
    extra = (
        [] if args.watchdog_timeout is None else ["--watchdog-timeout", str(args.watchdog_timeout)]
    )
    if args.max_batch is not None:
        extra += ["--max-batch", str(args.max_batch)]
    ranks = 1 if kind == "single" else args.ranks
    run: dict[str, Any] = {"kind": kind, "server": {"model": model}, "levels": []}
    with serving(
        model, ranks, args.startup_timeout, extra, "stock" if kind != "ppwrap" else kind
    ) as server:
        say(f"{SERVERS[kind]} on {server.url}, {ranks} rank(s) (pids {server.pids})")
        if kind == "ppwrap":
            with api.OpenAI(base_url=server.url + "/v1", api_key="unused") as client:
                model_id = client.models.list().data[0].id
        else:
            model_id = "default_model"  # mlx_lm.server's name for its --model
        run["server"].update(model_id=model_id, pids=server.pids)
        if kind == "ppwrap":
            # The split it chose and each stage's time, from its startup log.
            said = server.output().splitlines()
            for key, mark in (("split", "layers per rank"), ("stages", "stage compute per")):
                found = [line.split(": ", 1)[-1] for line in said if mark in line]
                if found:
                    run["server"][key] = found[0]
        # The first request pays for lazy work (compilation, caches): not measured.
        warm = run_level(server.url, model_id, 1, 1, args.max_tokens, args.request_timeout)
        run["warmup"] = summarize(1, warm)["samples"][0]
        for n in args.clients:
            if server.proc.poll() is not None:  # every request would fail at once
                print(
                    f"ppwrap bench-serve: {SERVERS[kind]} exited with code "
                    f"{server.proc.returncode} during the run; skipping {n} concurrent "
                    "client(s) and beyond",
                    file=sys.stderr,
                )
                break
            say(f"{SERVERS[kind]}: {n} concurrent client(s), {args.requests} request(s) each")
            samples = run_level(
                server.url, model_id, n, args.requests, args.max_tokens, args.request_timeout
            )
            run["levels"].append(summarize(n, samples))
        run["server"]["exit_code"] = server.stop()
        run["server"]["output"] = server.output()[-6000:]
    return run


def _models(model: str, kinds: Sequence[str], say: Any) -> dict[str, str]:
    """The checkpoint each server runs: stock mlx-lm cannot pipeline llama, so it
    runs the same weights in qwen2 form (see :func:`qwen2_form`)."""
    config = json.loads(Path(model, "config.json").read_text())
    out = {}
    for kind in kinds:
        if kind != "ppwrap" and config.get("model_type") == "llama":
            dst = Path(model).parent / f"{Path(model).name}-qwen2-form"
            if not (dst / "config.json").is_file():
                say(f"saving {model} in qwen2 form for mlx-lm's server: {dst}")
            out[kind] = str(qwen2_form(model, dst))
        else:
            out[kind] = model
    return out


def run(args: argparse.Namespace) -> int:
    """Run ``ppwrap bench-serve`` with parsed arguments; return the exit code.

    Returns:
        0 when every request succeeded and every server stopped with code 0; 1
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
            "servers": list(args.servers),
            "clients": list(args.clients),
            "requests": args.requests,
            "max_tokens": args.max_tokens,
            "temperature": 0,
            "stream": True,
            "prompts": list(PROMPTS),
            "watchdog_timeout": args.watchdog_timeout,
            "max_batch": args.max_batch,
        },
        "runs": [],
    }
    started = time.monotonic()
    # The machine may be shared: its load belongs next to the figures.
    report["load_average"] = {"start": list(os.getloadavg())}
    try:
        models = _models(model, args.servers, say)
        for kind in args.servers:
            report["runs"].append(measure(models[kind], kind, args, say))
            # Written after every server, so an interrupted bench keeps what it measured.
            (out / "bench-serve.json").write_text(json.dumps(report, indent=1))
    except (ServerError, ValueError) as e:
        print(f"ppwrap bench-serve: {e}", file=sys.stderr)
        return 2
    report["wall_s"] = time.monotonic() - started
    report["load_average"]["end"] = list(os.getloadavg())
    (out / "bench-serve.json").write_text(json.dumps(report, indent=1))
    print(table(report), end="")
    load = report["load_average"]
    say(
        f"wrote {out / 'bench-serve.json'} ({report['wall_s']:.0f} s; 1-minute load "
        f"average {load['start'][0]:.1f} at the start, {load['end'][0]:.1f} at the end)"
    )
    status = 0
    for r in report["runs"]:
        failed = sum(level["failed"] for level in r["levels"]) + (r["warmup"]["error"] is not None)
        skipped = len(args.clients) - len(r["levels"])
        code = r["server"]["exit_code"]
        if failed or skipped or code != 0:
            tail = "\n".join(r["server"]["output"].splitlines()[-8:])
            print(
                f"ppwrap bench-serve: {SERVERS[r['kind']]}: {failed} request(s) failed, "
                f"{skipped} level(s) skipped; it exited with code {code}. The end of its "
                f"output:\n{tail}",
                file=sys.stderr,
            )
            status = 1
    return status


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
        "--servers",
        nargs="+",
        choices=list(SERVERS),
        default=["ppwrap"],
        help="servers to measure one after another on the same requests: ppwrap (ppwrap "
        "serve), stock (mlx_lm.server --pipeline on the same ranks; a llama checkpoint "
        "runs in qwen2 form), single (mlx_lm.server in one process). Default: ppwrap",
    )
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
    p.add_argument(
        "--max-batch",
        type=int,
        default=None,
        help="ppwrap serve's --max-batch (default: serve's own)",
    )
    p.set_defaults(run=run, argv=None)
