"""Batched generation: several prompts decoded together through the pipeline.

The prompts are left-padded into one batch (mlx-lm's ``BatchKVCache`` keeps the
padding out of attention), prefilled in chunks like one prompt, and decoded
round the ring as in :func:`ppwrap.generate_step`, with one ``[token, flag]``
per sequence in every message: the final rank samples each sequence with its
own sampler and sends the rows to the first stage, and the stage messages carry
them on. Each sequence ends on its own (a stop token, its token limit, or the
final rank's ``should_stop``), every rank on the same step; the batch ends when
the last one does.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Generator, Sequence
from typing import Any, cast

import mlx.core as mx
from mlx_lm.models.cache import BatchKVCache, KVCache
from mlx_lm.sample_utils import apply_top_p

from ._generate import (
    NON_FINITE,
    NON_FINITE_MESSAGE,
    STOP,
    NonFiniteLogitsError,
    Sampler,
    _check_head,
    _unwatched,
    generation_stream,
)
from ._head import PipelineHead
from ._liveness import ACTIVITY
from ._pipeline import HEADER_WORDS, Stage
from ._watchdog import Watchdog

__all__ = ["batch_generate_step", "row_sampler"]

Row = tuple[int, int, "mx.array | None"]


def row_sampler(temp: float = 0.0, top_p: float = 1.0, seed: int | None = None) -> Sampler:
    """A sampler for one sequence: greedy at temperature 0; with a ``seed``, its
    own random key, so that a sequence samples the same tokens alone or in any
    batch."""
    if temp <= 0:
        return lambda logprobs: mx.argmax(logprobs, axis=-1)
    key = [mx.random.key(seed)] if seed is not None else None

    def sample(logprobs: mx.array) -> mx.array:
        if top_p < 1.0:
            logprobs = apply_top_p(logprobs, top_p)
        if key is None:
            return mx.random.categorical(logprobs * (1 / temp))
        key[0], sub = mx.random.split(key[0])
        return mx.random.categorical(logprobs * (1 / temp), key=sub)

    return sample


def batch_generate_step(
    prompts: Sequence[Sequence[int]],
    head: PipelineHead,
    *,
    max_tokens: int | Sequence[int] = 256,
    samplers: Sequence[Sampler | None] | None = None,
    stop_tokens: Collection[int] = (),
    prefill_step_size: int = 2048,
    watchdog: Watchdog | None = None,
    should_stop: Callable[[int], bool] | None = None,
) -> Generator[list[Row], None, None]:
    """Decode several prompts together on every rank of the pipeline.

    Args:
        prompts: Token ids, one list per sequence.
        head: The wrapped model, split with ppwrap's pipeline (or on one rank).
        max_tokens: Tokens per sequence, one for all or one each.
        samplers: One per sequence (final rank only); ``None`` is greedy. See
            :func:`row_sampler`.
        stop_tokens: A sequence ends after it yields one of these (EOS).
        prefill_step_size: Prompt positions per prefill chunk.
        watchdog: Watches every step (see :class:`ppwrap.Watchdog`).
        should_stop: Asked on the final rank for each running sequence before a
            step is issued; ``True`` ends that sequence on every rank within
            the next two tokens (as :func:`ppwrap.generate_step`'s).

    Yields:
        Per step, ``(sequence, token, logprobs)`` for each sequence still
        running (``logprobs`` on the final rank; ``None`` elsewhere). Every rank
        yields the same sequences and tokens, step by step.

    Raises:
        ValueError: No prompts, an empty prompt, a family whose caches are not
            plain KV caches, or a model split by mlx-lm's own pipeline.
        NonFiniteLogitsError: The first step's logits hold NaN or +inf.
    """
    head = _check_head(head)
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("batched generation takes one or more non-empty prompts")
    stage = head.stage
    if stage is None and head.size > 1:
        raise ValueError(
            "batched generation needs ppwrap's split (ppwrap.load or ppwrap.pipeline), "
            "not mlx-lm's own pipeline"
        )
    rows = len(prompts)
    limits = [max_tokens] * rows if isinstance(max_tokens, int) else list(max_tokens)
    if len(limits) != rows:
        raise ValueError(f"max_tokens has {len(limits)} entries for {rows} prompts")
    pick = list(samplers) if samplers is not None else [None] * rows
    ACTIVITY.begin_generation()
    watch = watchdog.watch if watchdog is not None else _unwatched
    cache = _batch_cache(head, [len(p) for p in prompts])
    longest = max(len(p) for p in prompts)
    ids = mx.array([[0] * (longest - len(p)) + list(p) for p in prompts], mx.uint32)
    stop_asked = should_stop or (lambda row: False)
    running = [True] * rows

    def sample(out: mx.array, *, first: bool) -> tuple[mx.array, mx.array]:
        # The final rank's (B, [token, flag]) and log probabilities.
        logits = out[:, -1, :]
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        if all(s is None for s in pick):
            tokens = mx.argmax(logprobs, axis=-1)
        else:
            tokens = mx.concatenate(
                [(s or row_sampler())(logprobs[i : i + 1]).reshape(1) for i, s in enumerate(pick)]
            )
        flags = mx.array([STOP if running[i] and stop_asked(i) else 0 for i in range(rows)])
        if first:
            bad = mx.any(mx.isnan(logits) | mx.isposinf(logits), axis=-1)
            flags = mx.where(bad, NON_FINITE, flags)
        words = mx.stack([tokens.astype(mx.uint32), flags.astype(mx.uint32)], axis=1)
        return words, logprobs

    _prefill(head, stage, ids, cache, prefill_step_size, watch)
    if stage is not None and stage.size > 1:
        rounds = _ring_rows(head, stage, ids[:, -1:], cache, sample, watch)
    else:
        rounds = _local_rows(head, ids[:, -1:], cache, sample, watch)
    produced = [0] * rows
    try:
        for step, (words, logprobs) in enumerate(rounds):
            out: list[Row] = []
            for i, (token, flag) in enumerate(words):
                if not running[i]:
                    continue
                if flag == NON_FINITE and step == 0:
                    raise NonFiniteLogitsError(NON_FINITE_MESSAGE)
                if flag == STOP:
                    running[i] = False
                    continue
                out.append((i, token, None if logprobs is None else logprobs[i]))
                produced[i] += 1
                if token in stop_tokens or produced[i] >= limits[i]:
                    running[i] = False
            if out:
                yield out
            if not any(running):
                break
    finally:
        rounds.close()


def _batch_cache(head: PipelineHead, lengths: list[int]) -> list[Any]:
    longest = max(lengths)
    cache = head.make_cache()
    if any(type(c) is not KVCache for c in cache):
        kinds = sorted({type(c).__name__ for c in cache})
        raise ValueError(
            f"batched generation needs plain KV caches on every layer; this model has {kinds}"
        )
    return [BatchKVCache([longest - n for n in lengths]) for _ in cache]


def _prefill(
    head: PipelineHead,
    stage: Stage | None,
    ids: mx.array,
    cache: list[Any],
    step_size: int,
    watch: Callable[..., Any],
) -> None:
    """All but the last position of every row, in chunks (no head anywhere)."""
    done, total = 0, ids.shape[1] - 1
    with mx.stream(generation_stream):
        while done < total:
            n = min(step_size, total - done)
            hidden = head.hidden_states(ids[:, done : done + n], cache=cache)
            what = f"prefill of prompt tokens {done}-{done + n}"
            if ids.shape[0] > 1:
                what += f" of {ids.shape[0]} prompts"
            received = stage.received.pop() if stage is not None and stage.received else None
            if received is not None:
                with watch(f"{what}: waiting for the previous stage"):
                    mx.eval(received)
            with watch(what, busy=stage is not None):
                mx.eval([] if head.is_final else hidden, [c.state for c in cache])
            done += n
            mx.clear_cache()


Words = tuple[list[tuple[int, int]], "mx.array | None"]


def _local_rows(
    head: PipelineHead,
    last: mx.array,
    cache: list[Any],
    sample: Callable[..., tuple[mx.array, mx.array]],
    watch: Callable[..., Any],
) -> Generator[Words, None, None]:
    """One rank: every step samples each row from the logits of the last."""
    ids, n = last, 0
    while True:
        with watch(f"batched decode step {n}"), mx.stream(generation_stream):
            words, logprobs = sample(head(ids, cache=cache), first=n == 0)
            mx.eval(words, logprobs)
        yield _rows(words), logprobs
        ids, n = words[:, :1], n + 1


def _rows(words: mx.array) -> list[tuple[int, int]]:
    return [(t, f) for t, f in cast("list[list[int]]", words.tolist())]


def _ring_rows(
    head: PipelineHead,
    stage: Stage,
    last: mx.array,
    cache: list[Any],
    sample: Callable[..., tuple[mx.array, mx.array]],
    watch: Callable[..., Any],
) -> Generator[Words, None, None]:
    """:func:`ppwrap._generate._ring_decode` with one ``[token, flag]`` row per
    sequence: the same messages, the same one-step lookahead on the final rank
    and the same drain when the caller stops."""
    final, first = stage.is_final, stage.is_first
    group, stream, ring = stage.group, stage.stream, stage.ring
    rows = last.shape[0]
    started = False

    def final_words() -> mx.array:
        shape = (rows, HEADER_WORDS)
        return mx.distributed.recv(shape, mx.uint32, 0, group=group, stream=stream)

    def step(y: mx.array | None) -> tuple[list[mx.array], mx.array | None, mx.array | None]:
        nonlocal started
        start, started = not started, True
        with mx.stream(generation_stream):
            if first:
                if start:
                    ids, ring.header, words = last, mx.zeros((HEADER_WORDS,), mx.uint32), None
                else:
                    words = final_words() + 0  # a copy on this stream (see _ring_decode)
                    ids, ring.header = words[:, :1], words
                out = head(ids, cache=cache)
                return ([out] if words is None else [out, words]), words, None
            x = last if start or y is None else y
            out = head(x, cache=cache)  # a later stage: x only gives the shape
            if not final:
                words = None if start else cast(mx.array, ring.received) + 0
                return ([out] if words is None else [out, words]), words, None
            words, logprobs = sample(out, first=start)
            sent = mx.distributed.send(words, stage.size - 1, group=group, stream=stream)
            return [sent, words, logprobs], words, logprobs

    ring.on = True
    pending: list[mx.array] | None = None
    try:
        with watch("first batched decode step (stage send/recv)"):
            work, words, logprobs = step(None)
            pending = work
            mx.async_eval(work)  # type: ignore[no-untyped-call]
        n = 0
        while True:
            with watch(f"batched decode step {n} (the tokens coming round the ring)"):
                if final:
                    assert words is not None
                    ahead = step(words[:, :1])
                    pending = ahead[0]
                    mx.async_eval(ahead[0])  # type: ignore[no-untyped-call]
                else:
                    work, words, logprobs = step(None)
                    pending = work
                    mx.async_eval(work)  # type: ignore[no-untyped-call]
                assert words is not None
                mx.eval(words)
            yield _rows(words), logprobs
            if final:
                _, words, logprobs = ahead
            n += 1
    finally:
        try:
            if pending is not None:
                with watch("finishing the last batched decode step"):
                    mx.eval(pending)
                    if first:
                        mx.eval(final_words())  # the final rank's last, unused rows
        finally:
            ring.on, ring.header, ring.received = False, None, None
