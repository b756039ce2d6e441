"""On every rank: ppwrap.load each checkpoint folder and generate from it.

Usage (on every rank): generate_folders.py OUT_DIR TOKENS[:greedy] FOLDER [FOLDER ...]

With ``:greedy`` only the greedy tokens are recorded.

Per folder the rank records: the greedy tokens; the tokens sampled at
temperature 1 with a seed of its own (only the final rank's seed matters); its
resident parameter bytes; the collectives it issued per decoded token; and
the tokens of a generation that only the final rank asks to stop; and the
greedy tokens again with the non-final ranks spinning and sleeping while they
wait (``wait="spin"``, ``"sleep"`` and ``"wake"``), and a stop asked while they
sleep; and how many of the waking ranks' waits for a message the ring
backend's sockets (``ppwrap._pace.Inbox``) ended, and of the sleeping ranks'
waits for a prompt chunk.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path
from typing import Any

from common import COUNTED, calls, count_collectives, write_result

import mlx.core as mx
from mlx_lm.sample_utils import make_sampler

import ppwrap
from ppwrap import _pace

STOP_AT = 5


def polled(run: Any, *args: Any, **kwargs: Any) -> tuple[Any, int]:
    """What ``run(*args, **kwargs)`` returns, and how many inbox waits in it
    found a message."""
    found = 0
    wait = _pace.Inbox.wait

    def counting(self: _pace.Inbox, timeout: float) -> bool:
        nonlocal found
        got = wait(self, timeout)
        found += got
        return got

    _pace.Inbox.wait = counting  # type: ignore[method-assign]
    try:
        return run(*args, **kwargs), found
    finally:
        _pace.Inbox.wait = wait  # type: ignore[method-assign]


def forcing(token: int) -> Any:
    """A logits processor that makes ``token`` the greedy choice (final rank only)."""

    def force(tokens: mx.array, logits: mx.array) -> mx.array:
        chosen = mx.arange(logits.shape[-1]) == token
        return mx.where(chosen, 1e4, -1e4).astype(logits.dtype) + 0 * logits

    return force


def tokens_of(head: ppwrap.PipelineHead, tok: Any, n: int, **kwargs: Any) -> list[int]:
    return [
        r.token
        for r in ppwrap.stream_generate(head, tok, "The quick brown", max_tokens=n, **kwargs)
    ]


def stopped(head: ppwrap.PipelineHead, prompt: mx.array, n: int, **kwargs: Any) -> list[int]:
    """Tokens of a generation with a stop only the final rank sees (a server's
    stop string, a client gone), asked from the 5th token on: every rank must
    leave in step."""
    seen: list[int] = []
    for token, _ in ppwrap.generate_step(
        prompt, head, max_tokens=n, should_stop=lambda: len(seen) >= STOP_AT, **kwargs
    ):
        seen.append(token)
    return seen


def main() -> None:
    out_dir, tokens, folders = sys.argv[1], sys.argv[2], sys.argv[3:]
    n, greedy_only = int(tokens.split(":")[0]), tokens.endswith(":greedy")
    count_collectives()
    group = mx.distributed.init()
    results: dict[str, Any] = {}
    for folder in folders:
        head, tok = ppwrap.load(folder, group=group)
        greedy = tokens_of(head, tok, n)
        # Collectives per decoded token: the difference between two lengths.
        calls.clear()
        tokens_of(head, tok, 8)
        at_8 = Counter(calls)
        calls.clear()
        tokens_of(head, tok, 16)
        per_token = {k: (calls[k] - at_8[k]) / 8 for k in COUNTED}
        if greedy_only:
            results[Path(folder).name] = {
                "rank": head.rank,
                "greedy": greedy,
                "per_token": per_token,
            }
            write_result(out_dir, group.rank(), results)
            continue
        # The end of sequence as the very first token, and a single token:
        # every rank leaves in step, and the next generation is the usual one.
        eos = tok.eos_token_id
        first_eos = [
            (r.token, r.finish_reason)
            for r in ppwrap.stream_generate(
                head, tok, "The quick brown", max_tokens=n, logits_processors=[forcing(eos)]
            )
        ]
        one = [r.token for r in ppwrap.stream_generate(head, tok, "The quick brown", max_tokens=1)]
        after_short = tokens_of(head, tok, n)
        prompt = mx.array(tok.encode("The quick brown"))
        seen = stopped(head, prompt, n)
        after_stop = tokens_of(head, tok, n)
        greedy_spin = tokens_of(head, tok, n, wait="spin")
        # A prompt chunk per token: a sleeping rank that receives waits for
        # each one in poll(2) on the ring's sockets after its sleep.
        greedy_sleep, prefill_polled = polled(
            tokens_of, head, tok, n, wait="sleep", prefill_step_size=1
        )
        greedy_wake, woken = polled(tokens_of, head, tok, n, wait="wake")
        seen_sleeping = stopped(head, prompt, n, wait="sleep")
        mx.random.seed(1000 + group.rank())  # a different seed on every rank
        sampled = tokens_of(head, tok, n, sampler=make_sampler(temp=1.0))
        results[Path(folder).name] = {
            "rank": head.rank,
            "greedy": greedy,
            "stopped": seen,
            "after_stop": after_stop,
            "greedy_spin": greedy_spin,
            "greedy_sleep": greedy_sleep,
            "prefill_polled": prefill_polled,
            "prompt_chunks": len(tok.encode("The quick brown")) - 1,
            "size": head.size,
            "greedy_wake": greedy_wake,
            "woken_by_inbox": woken,
            "stopped_sleeping": seen_sleeping,
            "sampled": sampled,
            "first_eos": first_eos,
            "eos": eos,
            "one": one,
            "after_short": after_short,
            "resident_bytes": head.resident_bytes(),
            "per_token": per_token,
        }
        write_result(out_dir, group.rank(), results)


if __name__ == "__main__":
    main()
