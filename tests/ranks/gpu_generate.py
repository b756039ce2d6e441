"""On every rank: greedy tokens of every way ppwrap runs a pipeline, on this device.

Usage (on every rank): gpu_generate.py OUT_DIR TOKENS FOLDER [FOLDER ...]

Per folder: ``ppwrap.load`` + ``ppwrap.stream_generate`` with the head elided
(ranks waking just before each message, as "auto" does on MLX CUDA, then
spinning, then sleeping while they wait) and kept; and a custom loop
(docs/custom-loops.md) that dispatches each step before it reads the previous
token, as mlx-lm's loops do. A rank that hangs dumps every thread's stack and
exits.
"""

from __future__ import annotations

import faulthandler
import sys
import time
from pathlib import Path
from typing import Any

from common import write_result

import mlx.core as mx
import ppwrap

PROMPT = "The quick brown"


def timed(responses: Any) -> tuple[list[int], float]:
    """The tokens of a stream of responses and the seconds per decoded token."""
    tokens, starts = [], []
    for r in responses:
        tokens.append(r.token)
        starts.append(time.perf_counter())
    per_token = (starts[-1] - starts[0]) / max(len(starts) - 1, 1)
    return tokens, per_token


def overlapped(head: ppwrap.PipelineHead, tok: Any, n: int) -> list[int]:
    """Greedy tokens of a loop that dispatches step n+1 before reading token n."""
    cache = head.make_cache()

    def step(x: mx.array) -> mx.array:
        out = head(x[None], cache=cache)
        if head.is_final:
            mine = mx.argmax(out[:, -1, :], axis=-1).astype(mx.uint32)
        else:
            mine = mx.zeros((1,), mx.uint32)
        return head.broadcast(mine, out)

    y = step(mx.array(tok.encode(PROMPT)))
    mx.async_eval(y)
    tokens = []
    for _ in range(n):
        next_y = step(y)
        mx.async_eval(next_y)
        tokens.append(y.item())
        y = next_y
    mx.eval(y)  # every rank finishes the step in flight
    return tokens


def main() -> None:
    out_dir, n, folders = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    faulthandler.dump_traceback_later(240, exit=True)
    group = mx.distributed.init()
    results: dict[str, Any] = {}
    for folder in folders:
        r: dict[str, Any] = {"device": str(mx.default_device())}
        head, tok = ppwrap.load(folder, group=group)
        r["rank"] = head.rank
        r["stream"] = str(head.comm_stream)
        r["elided"], r["elided_s"] = timed(ppwrap.stream_generate(head, tok, PROMPT, max_tokens=n))
        r["elided_spin"], r["elided_spin_s"] = timed(
            ppwrap.stream_generate(head, tok, PROMPT, max_tokens=n, wait="spin")
        )
        r["elided_sleep"], _ = timed(
            ppwrap.stream_generate(head, tok, PROMPT, max_tokens=n, wait="sleep")
        )
        del head
        kept, tok = ppwrap.load(folder, group=group, elide_output_head=False)
        r["kept"], r["kept_s"] = timed(ppwrap.stream_generate(kept, tok, PROMPT, max_tokens=n))
        del kept
        head, tok = ppwrap.load(folder, group=group)
        r["overlapped"] = overlapped(head, tok, n)
        results[Path(folder).name] = r
        write_result(out_dir, group.rank(), results)
    faulthandler.cancel_dump_traceback_later()


if __name__ == "__main__":
    main()
