"""Several micro-batches in flight round the ring, for continuous batching.

With one batch in flight every stage of a pipeline waits for the others most
of the time: the first stage needs the final stage's tokens before it can
embed the next step. Here the running sequences are split into up to one
micro-batch per stage, and the stages work on them in turn, in the same order
on every rank (position ``q`` is micro-batch ``q % M``): while the final rank
computes and samples one micro-batch, the stages before it compute the others.

Per position each rank does one receive and one send, no collective: the final
rank sends each micro-batch's ``[token, flag]`` rows straight to the first
stage, which embeds them for that micro-batch's next position, M positions
later, and the stage messages carry the rows on (see ``ppwrap._pipeline.Ring``).

The set of sequences is fixed while they decode (a *segment*). The final rank
ends a segment (to admit new sequences or drop finished ones) by flagging
``END`` on the rows it sends for position ``p``; the first stage reads it when
it embeds them at position ``p + M``, computes that position and stops, the
later stages stop after forwarding it, and the final rank computes every
position up to ``p + M`` without sending their rows. So every rank computes
the same positions and all caches stay in step; the tokens sampled after ``p``
are held by the final rank, which hands them to every rank with the next
composition (see ``ppwrap.serve.engine``).
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from typing import Any, cast

import attrs
import mlx.core as mx
from mlx_lm.models.cache import BatchKVCache, KVCache

from ._generate import NON_FINITE, STOP, Step, dispatch, generation_stream
from ._head import PipelineHead
from ._pace import WaitMode, waker
from ._pipeline import HEADER_WORDS, receive_ahead

__all__ = ["END", "MicroBatch", "decode"]

END = 4  # the final rank ends the segment after the positions in flight

# (micro-batch, (token, flag) per row, the rows' log probabilities on the final rank)
Position = tuple[int, list[tuple[int, int]], "mx.array | None"]
# The final rank's sampler for a micro-batch: (micro-batch, logits (B, V)) ->
# (tokens (B,), log probabilities (B, V)).
BatchSampler = Callable[[int, mx.array], tuple[mx.array, mx.array]]


@attrs.define(eq=False)
class MicroBatch:
    """Sequences decoded together: the same rows, in the same order, on every rank.

    Attributes:
        rows: The caller's id of each sequence, in cache order.
        cache: One ``BatchKVCache`` per layer (``None`` while empty).
        inputs: Each row's next input token (the first stage embeds them when
            a segment starts; the other ranks only need as many).
    """

    rows: list[int] = attrs.field(factory=list)
    cache: list[Any] | None = None
    inputs: list[int] = attrs.field(factory=list)

    def add(self, rows: Sequence[int], caches: Sequence[list[Any]], inputs: Sequence[int]) -> None:
        """Append sequences, each with its own per-layer ``KVCache`` list."""
        if not rows:
            return
        merged = [BatchKVCache.merge(list(layer)) for layer in zip(*caches, strict=True)]
        if self.cache is None:
            self.cache = merged
        else:
            for mine, theirs in zip(self.cache, merged, strict=True):
                mine.extend(theirs)
        self.rows += rows
        self.inputs += inputs

    def keep(self, indices: Sequence[int]) -> None:
        """Keep only the rows at ``indices`` (in this order)."""
        if len(indices) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in indices]
        self.inputs = [self.inputs[i] for i in indices]
        if not indices:
            self.cache = None
        elif self.cache is not None:
            keep = mx.array(list(indices))
            for c in self.cache:
                c.filter(keep)

    def take(self, index: int) -> tuple[int, list[Any], int]:
        """Remove one row; its id, per-layer ``KVCache`` list and next input."""
        assert self.cache is not None
        caches = [_extract(c, index) for c in self.cache]
        row, token = self.rows[index], self.inputs[index]
        self.keep([i for i in range(len(self.rows)) if i != index])
        return row, caches, token


def _extract(cache: BatchKVCache, index: int) -> KVCache:
    return KVCache() if cache.keys is None else cache.extract(index)


def balance(batches: list[MicroBatch]) -> None:
    """Move rows from the fullest micro-batch to the emptiest until they differ
    by at most one row (the slowest micro-batch sets every stage's pace)."""
    while True:
        big = max(batches, key=lambda b: len(b.rows))
        small = min(batches, key=lambda b: len(b.rows))
        if len(big.rows) - len(small.rows) <= 1:
            return
        row, cache, token = big.take(len(big.rows) - 1)
        small.add([row], [cache], [token])


def decode(
    head: PipelineHead,
    batches: Sequence[MicroBatch],
    *,
    sample: BatchSampler,
    should_end: Callable[[list[int]], bool],
    watch: Callable[..., Any],
    stops: Callable[[int], list[bool]] | None = None,
    wait: WaitMode = "auto",
) -> Generator[Position, None, None]:
    """Decode the micro-batches in turn until the final rank ends the segment.

    Every rank calls it with the same micro-batches (rows and caches), which
    must all hold rows; the caches are updated in place.

    Args:
        head: The wrapped model, split with ppwrap's pipeline (or on one rank).
        batches: The micro-batches, at most one per stage for the pipeline to
            stay full.
        sample: The final rank's sampler (see ``BatchSampler``).
        should_end: Asked on the final rank before each position is issued,
            with how many more tokens each micro-batch's rows get if the
            segment ends there (those in flight and those the end still
            computes); ``True`` ends the segment once they are done. A caller
            whose rows all end within them by their token limits loses no
            position to the end.
        watch: The watchdog's ``watch`` (or a no-op context).
        stops: The final rank's rows of a micro-batch to flag ``STOP`` in the
            position it issues (rows whose end only it can see).
        wait: ``"wake"``: sleep until just before each position's message is
            due, then wait for it alone before dispatching the position (see
            ``ppwrap._pace.Arrivals``); ``"auto"``: so on MLX CUDA, and where
            ranks share cores and the ring's sockets are found; otherwise
            dispatch each position at once.

    Yields:
        ``(micro-batch, rows, logprobs)`` per position: on the final rank every
        sampled position, as it is read; on the first stage the rows it
        embeds, as they arrive; on the stages between, the rows each message
        brings. The final rank alone yields the positions after the end flag
        (their rows are not sent): the caller hands them on.
    """
    stage = head.stage
    if not batches or any(not b.rows for b in batches):
        raise ValueError("every micro-batch in flight needs at least one row")
    flagged = _flagging(sample, stops)
    if stage is None or stage.size == 1:
        yield from _local(head, batches, flagged, should_end, watch)
        return
    final, first = stage.is_final, stage.is_first
    group, stream, ring = stage.group, stage.stream, stage.ring
    count = len(batches)
    if count > stage.in_flight:
        raise ValueError(
            f"{count} micro-batches in flight, but this pipeline keeps at most "
            f"{stage.in_flight} (a looped stack's runs share the link from the final "
            "rank to the first stage with the tokens)."
        )
    wake = waker(wait, size=stage.size)
    end: int | None = None  # the final rank's last position
    issued, taken = [0] * count, [0] * count  # the final rank's positions per micro-batch

    def build(q: int) -> Step:
        nonlocal end
        m = q % count
        batch = batches[m]
        rows = len(batch.rows)
        stage.wire_in.clear()
        with mx.stream(generation_stream):
            if first:
                if q < count:
                    ids = mx.array(batch.inputs, mx.uint32)[:, None]
                    ring.header = mx.zeros((rows, HEADER_WORDS), mx.uint32)
                    return Step([head(ids, cache=batch.cache)], None)
                # A copy on this stream: the compute never waits on the wire itself.
                arrival = mx.distributed.recv(
                    (rows, HEADER_WORDS), mx.uint32, 0, group=group, stream=stream
                )
                words = arrival + 0
                ids, ring.header = words[:, :1], words
                out = head(ids, cache=batch.cache)
                return Step([out, words], words, arrival=arrival)
            if q < count:
                ids = mx.array(batch.inputs, mx.uint32)[:, None]
            elif stage.embeds_everywhere:
                # The tokens come with the stage message: take it first, so that
                # a family that embeds them on every rank sees the real ones.
                ids = receive_ahead(stage, (rows, 1))[:, :1]
            else:
                ids = mx.zeros((rows, 1), mx.uint32)  # the shape: the layers take the message
            out = head(ids, cache=batch.cache)
            message = stage.wire_in[0] if stage.wire_in else None
            if not final:
                words = cast(mx.array, ring.received) + 0
                return Step([out, words], words, arrival=message)
            flag = 0
            if end is None and should_end(_left(q, count, issued, taken)):
                end, flag = q + count, END
            issued[m] += 1
            tokens, logprobs, flags = flagged(m, out[:, -1, :], flag)
            words = mx.stack([tokens.astype(mx.uint32), flags], axis=1)
            if end is not None and q > end - count:
                # Held: the segment ends.
                return Step([words, logprobs], words, logprobs, message)
            sent = mx.distributed.send(words, stage.size - 1, group=group, stream=stream)
            return Step([sent, words, logprobs], words, logprobs, message)

    def read(words: mx.array) -> list[tuple[int, int]]:
        mx.eval(words)  # eval, unlike tolist(), lets the watchdog thread run
        return [(t, f) for t, f in cast("list[list[int]]", words.tolist())]

    ring.on = True
    pending: list[mx.array] | None = None
    q = 0
    try:
        if final:
            with watch("first position in flight"):
                built = build(0)
                pending = built.work
                dispatch(built, wake)
            while True:
                with watch(f"position {q} in flight (micro-batch {q % count})"):
                    ahead = None
                    if end is None or q < end:
                        ahead = build(q + 1)
                        pending = ahead.work
                        dispatch(ahead, wake)
                    assert built.words is not None
                    rows = read(built.words)
                taken[q % count] += 1
                yield q % count, rows, built.logprobs
                if ahead is None:
                    break
                built = ahead
                q += 1
                if q % 256 == 0:
                    mx.clear_cache()
        else:
            while True:
                with watch(f"position {q} in flight (micro-batch {q % count})"):
                    built = build(q)
                    pending = built.work
                    dispatch(built, wake)
                    rows = read(built.words) if built.words is not None else []
                if q >= count:
                    # The rows of position q - M, which this position embeds.
                    yield q % count, rows, None
                if any(f & END for _, f in rows):
                    break
                q += 1
                if q % 256 == 0:
                    mx.clear_cache()
        with watch("finishing the last position in flight"):
            mx.eval(pending)
    finally:
        ring.on, ring.header, ring.received = False, None, None
        stage.wire_in.clear()


def _left(q: int, count: int, issued: list[int], taken: list[int]) -> list[int]:
    """Tokens each micro-batch still gets if the segment ends at position ``q``:
    those in flight, and one per position up to ``q + count`` (two for ``q``'s own)."""
    return [issued[m] - taken[m] + (2 if m == q % count else 1) for m in range(count)]


Flagged = Callable[[int, mx.array, int], tuple[mx.array, mx.array, mx.array]]


def _flagging(sample: BatchSampler, stops: Callable[[int], list[bool]] | None) -> Flagged:
    """The sampler with each row's flags: ``flag`` for all, ``STOP`` where
    ``stops`` asks, ``NON_FINITE`` where the logits hold NaN or +inf."""

    def flagged(m: int, logits: mx.array, flag: int) -> tuple[mx.array, mx.array, mx.array]:
        tokens, logprobs = sample(m, logits)
        flags = mx.full((logits.shape[0],), flag, mx.uint32)
        if stops is not None:
            flags = flags | mx.array([STOP if s else 0 for s in stops(m)], mx.uint32)
        bad = mx.any(mx.isnan(logits) | mx.isposinf(logits), axis=-1)
        return tokens, logprobs, mx.where(bad, flags | NON_FINITE, flags)

    return flagged


def _local(
    head: PipelineHead,
    batches: Sequence[MicroBatch],
    sample: Flagged,
    should_end: Callable[[list[int]], bool],
    watch: Callable[..., Any],
) -> Generator[Position, None, None]:
    """One rank: the micro-batches in turn, each step sampled and read before the next."""
    count = len(batches)
    inputs = [mx.array(b.inputs, mx.uint32)[:, None] for b in batches]
    end: int | None = None
    q = 0
    while end is None or q <= end:
        m = q % count
        with watch(f"position {q} (micro-batch {m})"), mx.stream(generation_stream):
            flag = 0
            if end is None and should_end([int(m == q % count) for m in range(count)]):
                end, flag = q, END  # nothing in flight to finish on one rank
            out = head(inputs[m], cache=batches[m].cache)
            tokens, logprobs, flags = sample(m, out[:, -1, :], flag)
            mx.eval(tokens, flags, logprobs)
        inputs[m] = tokens.astype(mx.uint32)[:, None]
        rows = list(
            zip(cast("list[int]", tokens.tolist()), cast("list[int]", flags.tolist()), strict=True)
        )
        yield m, rows, logprobs
        q += 1
