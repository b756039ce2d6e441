"""The ``ppwrap`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ._version import __version__


def _demo(args: argparse.Namespace) -> int:
    from ._launch import run_local

    if args.ranks < 1:
        print(f"ppwrap demo: --ranks must be at least 1; got {args.ranks}", file=sys.stderr)
        return 2
    script = Path(__file__).with_name("_demo.py")
    print(f"ppwrap demo: {args.ranks} local ranks, tiny random qwen2 model", flush=True)
    run = run_local(args.ranks, [str(script), str(args.steps)], timeout=args.timeout)
    return _report(run, "demo", args.timeout)


def _families(args: argparse.Namespace) -> int:
    from ._support import support_table

    print(support_table(), end="")
    return 0


def _generate_here(args: argparse.Namespace) -> int:
    """Run generation as one rank (under mlx.launch, or alone)."""
    import mlx.core as mx

    from ._generate import sampler_from, stream_generate
    from ._load import load

    group = mx.distributed.init()
    head, tokenizer = load(args.model, group=group)
    if args.seed is not None:
        mx.random.seed(args.seed)
    prompt: str | list[int] = args.prompt
    if not args.ignore_chat_template and getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": args.prompt}]
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    sampler = sampler_from(args.temp, args.top_p)
    last = None
    for last in stream_generate(
        head, tokenizer, prompt, max_tokens=args.max_tokens, sampler=sampler
    ):
        if head.is_final:
            print(last.text, end="", flush=True)
    mine = mx.array([head.resident_bytes() / 1e6], dtype=mx.float32)
    resident = mx.distributed.all_gather(mine, group=group, stream=mx.cpu) if head.size > 1 else mine
    mx.eval(resident)
    if head.is_final and last is not None:
        print()
        print("=" * 10)
        print(f"Prompt: {last.prompt_tokens} tokens, {last.prompt_tps:.3f} tokens-per-sec")
        print(
            f"Generation: {last.generation_tokens} tokens, "
            f"{last.generation_tps:.3f} tokens-per-sec"
        )
        for rank, mb in enumerate(resident.tolist()):
            print(f"Rank {rank} parameters: {mb:.3f} MB")
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
    run = run_local(args.ranks, argv, timeout=args.timeout)
    return _report(run, "generate", args.timeout)


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
        print(f"ppwrap {what}: killed after {timeout:.0f} s", file=sys.stderr)
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

    demo = sub.add_parser("demo", help="run a custom decode loop on local ranks")
    demo.add_argument("--ranks", type=int, default=2, help="local ranks (default 2)")
    demo.add_argument("--steps", type=int, default=8, help="decode steps (default 8)")
    demo.add_argument(
        "--timeout", type=float, default=300, help="seconds before the run is killed"
    )
    demo.set_defaults(run=_demo)

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
    gen.add_argument(
        "--ignore-chat-template", action="store_true", help="use the prompt as it is"
    )
    gen.add_argument(
        "--timeout", type=float, default=None, help="with --ranks: seconds before the run is killed"
    )
    gen.set_defaults(run=_generate)

    fam = sub.add_parser("families", help="print the support table of the installed mlx-lm")
    fam.set_defaults(run=_families)

    args = parser.parse_args(argv)
    args.argv = None if argv is None else list(argv)
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
