"""The ``ppwrap`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from ._version import __version__


def _demo(args: argparse.Namespace) -> int:
    from ._launch import run_local

    if args.ranks < 1:
        print(f"ppwrap demo: --ranks must be at least 1; got {args.ranks}", file=sys.stderr)
        return 2
    script = Path(__file__).with_name("_demo.py")
    print(f"ppwrap demo: {args.ranks} local ranks, tiny random qwen2 model", flush=True)
    run = run_local(args.ranks, [str(script), str(args.steps)], timeout=args.timeout)
    if run.timed_out:
        print(f"ppwrap demo: killed after {args.timeout:.0f} s", file=sys.stderr)
    elif run.first_failure is not None:
        print(
            f"ppwrap demo: rank {run.first_failure} failed with exit code "
            f"{run.returncodes[run.first_failure]}",
            file=sys.stderr,
        )
    return run.returncode


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

    args = parser.parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
