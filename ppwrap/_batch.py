"""Batched generation: several prompts decoded together through the pipeline.

The prompts are split into micro-batches, each left-padded (mlx-lm's
``BatchKVCache`` keeps the padding out of attention) and prefilled in chunks
like one prompt, and decoded round the ring all at once (``ppwrap._inflight``),
with one ``[token, flag]`` per sequence in every message: the final rank
samples each sequence with its own sampler and sends the rows to the first
stage, and the stage messages carry them on. Each sequence ends on its own (a
stop token, its token limit, or the final rank's ``should_stop``), on every
rank after the same token; the batch ends when the last one does.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Generator, Sequence
from typing import Any

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
from ._inflight import MicroBatch, decode
from ._liveness import ACTIVITY
from ._pace import WaitMode
from ._pipeline import Stage
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


def sample_rows(logits: mx.array, samplers: Sequence[Sampler | None]) -> tuple[mx.array, mx.array]:
    """Each row's token from ``logits`` (B, V) with its own sampler (``None``:
    greedy), and the rows' log probabilities; all greedy in one argmax."""
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    if all(s is None for s in samplers):
        return mx.argmax(logprobs, axis=-1), logprobs
    tokens = [(s or row_sampler())(logprobs[j : j + 1]).reshape(1) for j, s in enumerate(samplers)]
    return mx.concatenate(tokens), logprobs


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
    micro_batches: int | None = None,
    wait: WaitMode = "auto",
) -> Generator[list[Row], None, None]:
    """Decode several prompts together on every rank of the pipeline.

    The prompts are split into micro-batches, all in flight at once, so that
    every stage computes while the final rank samples (see ``ppwrap._inflight``).

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
            the next few tokens.
        micro_batches: How many micro-batches to keep in flight (default: one
            per stage, at most one per prompt; one for a looped stack, see
            ``Stage.in_flight``). Every rank must pass the same.
        wait: How a rank waits for each step's message: ``"wake"`` sleeps
            until just before it is due and polls for it (see
            :func:`ppwrap.generate_step`); ``"auto"`` does so on MLX CUDA and
            where ranks share cores; anything else dispatches at once.

    Yields:
        Per decode step of a micro-batch, ``(sequence, token, logprobs)`` for
        each of its sequences still running (``logprobs`` on the final rank;
        ``None`` elsewhere). Every rank yields the same sequences and tokens in
        the same order: the final rank as it samples them, the others as they
        come round the ring. Consume it to the end on every rank (to end
        sequences early, use ``should_stop``).

    Raises:
        ValueError: No prompts, an empty prompt, a family whose caches are not
            plain KV caches, or a model split by mlx-lm's own pipeline.
        NonFiniteLogitsError: A sequence's first logits hold NaN or +inf
            (once every rank has finished the batch).
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
    count = min(rows, micro_batches or (stage.in_flight if stage is not None else 1))
    if count < 1:
        raise ValueError(f"micro_batches must be at least 1; got {micro_batches}")
    ACTIVITY.begin_generation()
    watch = watchdog.watch if watchdog is not None else _unwatched
    stop_asked = should_stop or (lambda row: False)
    running = [True] * rows
    batches = []
    for group in (list(range(rows))[g::count] for g in range(count)):
        lengths = [len(prompts[i]) for i in group]
        cache = _batch_cache(head, lengths)
        ids = [[0] * (max(lengths) - len(prompts[i])) + list(prompts[i]) for i in group]
        _prefill(head, stage, mx.array(ids, mx.uint32), cache, prefill_step_size, watch)
        batches.append(MicroBatch(group, cache, [prompts[i][-1] for i in group]))

    def sample(m: int, logits: mx.array) -> tuple[mx.array, mx.array]:
        return sample_rows(logits, [pick[i] for i in batches[m].rows])

    def stops(m: int) -> list[bool]:
        return [running[i] and stop_asked(i) for i in batches[m].rows]

    produced = [0] * rows
    failed = False
    for m, words, logprobs in decode(
        head,
        batches,
        sample=sample,
        should_end=lambda left: not any(running),
        watch=watch,
        stops=stops,
        wait=wait,
    ):
        out: list[Row] = []
        for j, (token, flag) in enumerate(words):
            i = batches[m].rows[j]
            if not running[i]:
                continue
            if flag & (STOP | NON_FINITE):
                running[i] = False
                failed |= bool(flag & NON_FINITE) and produced[i] == 0
                continue
            out.append((i, token, None if logprobs is None else logprobs[j]))
            produced[i] += 1
            if token in stop_tokens or produced[i] >= limits[i]:
                running[i] = False
        if out and not failed:
            yield out
    if failed:
        raise NonFiniteLogitsError(NON_FINITE_MESSAGE)


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
