"""On every rank: a pipeline run with one fault injected, to see it fail loudly.

Usage (on every rank): faults.py OUT_DIR SCENARIO FOLDER [OTHER_FOLDER]

Scenarios:
  stall      generate for a long time with a 5 s watchdog; the test suspends a
             rank (SIGSTOP) once OUT_DIR/started exists.
  skip       rank 1 skips the token broadcast of decode step 3 and sleeps: it is
             alive but out of step.
  mismatch   rank 1 loads OTHER_FOLDER: the handshake must refuse.
  split      every rank loads with a split that has a zero.
  floats     every rank calls the model with float inputs.
  absent     rank 1 never arrives at the handshake (it sleeps instead).
  load       every rank just loads FOLDER (a bad folder, or more ranks than layers).
  dtype      rank 0 says its stage takes only float16 hidden states (as a rank
             that made its receive from its float16 embedding once did): the
             handshake must refuse what rank 1 sends.
  nan        every rank generates from FOLDER, whose logits are NaN.
  empty      every rank generates from an empty prompt.
  vocab      every rank generates from a prompt with an id past the vocabulary.
"""

from __future__ import annotations

import sys
import time
import traceback
from pathlib import Path
from typing import Any

from common import write_result

import mlx.core as mx

import ppwrap


def only_float16(rank: int) -> None:
    """Make this rank's stage record say it takes float16 hidden states only."""
    from ppwrap import _pipeline

    real = _pipeline.stage_record

    def record(*args: Any, **kwargs: Any) -> dict[str, Any]:
        mine = real(*args, **kwargs)
        mine["table"] = {k: v for k, v in mine["table"].items() if k == "float16"}
        return mine

    _pipeline.stage_record = record


def main() -> None:
    out_dir, scenario, folder = sys.argv[1], sys.argv[2], sys.argv[3]
    group = mx.distributed.init()
    rank = group.rank()
    if scenario == "mismatch" and rank == 1:
        folder = sys.argv[4]
    if scenario == "absent" and rank == 1:
        time.sleep(600)
    if scenario == "dtype" and rank == 0:
        only_float16(rank)
    split = [group.size() + 1] + [0] * (group.size() - 1) if scenario == "split" else None
    try:
        wait = 5 if scenario == "absent" else 20
        head, tok = ppwrap.load(folder, group=group, handshake_timeout=wait, split=split)
    except ppwrap.HandshakeError as e:
        write_result(out_dir, rank, {"error": str(e)})
        raise
    dog = ppwrap.Watchdog(5.0, rank=rank)

    if scenario in ("stall", "stall-wake"):
        # "stall-wake": ranks that sleep until just before each message is due.
        how = "wake" if scenario == "stall-wake" else "auto"
        # Unwatched first: a GPU compiles its kernels in the first steps.
        for _ in ppwrap.stream_generate(head, tok, "The quick", max_tokens=2, wait=how):
            pass
        for i, _ in enumerate(
            ppwrap.stream_generate(
                head, tok, "The quick", max_tokens=100_000, watchdog=dog, wait=how
            )
        ):
            if i == 3 and rank == 0:
                Path(out_dir, "started").touch()
    elif scenario == "floats":
        head(mx.array([[1.0, 2.0]]))
    elif scenario == "nan":
        for _ in ppwrap.stream_generate(head, tok, "The quick", max_tokens=4, watchdog=dog):
            pass
    elif scenario in ("empty", "vocab"):
        prompt = [] if scenario == "empty" else [1, 2, 10**6]
        for _ in ppwrap.stream_generate(head, tok, prompt, max_tokens=4, watchdog=dog):
            pass
    elif scenario == "skip":
        cache = head.make_cache()
        x = mx.array([[1, 2, 3]])
        for step in range(10):
            with dog.watch(f"decode step {step}"):
                out = head(x, cache=cache)
                mine = (
                    mx.argmax(out[:, -1, :], axis=-1)
                    if head.is_final
                    else mx.zeros((1,), mx.uint32)
                )
                if step == 3 and rank == 1:
                    mx.eval(out)  # its send goes out, but it never joins the broadcast
                    break
                token = head.broadcast(mine.astype(mx.uint32), out)
                mx.eval(token)
            x = token[:, None]
        if rank == 1:
            time.sleep(600)  # alive, out of step
    write_result(out_dir, rank, {"done": True})


if __name__ == "__main__":
    try:
        main()
    except Exception:
        traceback.print_exc()
        sys.exit(1)
