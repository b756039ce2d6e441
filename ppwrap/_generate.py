"""Generation over a pipeline: the final rank samples, every rank gets the token.

These mirror mlx-lm's ``generate_step``, ``stream_generate`` and ``generate``
(same keyword options, same ``GenerationResponse``), with three differences:

- prompt chunks before the last token run the backbone only, on every rank;
- only the final rank applies the logits processors and the sampler; over a
  ``ppwrap.pipeline`` split the token goes round the ring (the final rank
  sends it to the first stage, which passes it on inside its stage message:
  one send and one receive per rank and token, no collective); over mlx-lm's
  own split it reaches every rank through one small collective that depends
  on each rank's stage output;
- only the final rank detokenizes: elsewhere ``text`` is ``""`` and
  ``logprobs`` is ``None``.

Every rank sees the same tokens, so all stop on the same step.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, cast

import attrs
import mlx.core as mx
from mlx_lm.generate import GenerationResponse
from mlx_lm.sample_utils import make_sampler
from mlx_lm.tokenizer_utils import TokenizerWrapper

from ._head import PipelineHead
from ._liveness import ACTIVITY
from ._pace import Arrivals, Inbox, Pace, Poll, WaitMode, should_pace, waker
from ._pipeline import HEADER_WORDS, Stage, receive_ahead
from ._watchdog import Watchdog

__all__ = ["NonFiniteLogitsError", "generate", "generate_step", "stream_generate"]

Sampler = Callable[[mx.array], mx.array]
LogitsProcessor = Callable[[mx.array, mx.array], mx.array]

generation_stream = mx.new_stream(mx.default_device())

# What the final rank broadcasts beside each token.
STOP = 1  # should_stop() asked to stop
NON_FINITE = 2  # the first logits hold NaN or +inf


class NonFiniteLogitsError(RuntimeError):
    """Raised on every rank when the first step's logits hold NaN or +inf."""


NON_FINITE_MESSAGE = (
    "ppwrap: the final rank's logits for the first generated token hold NaN or +inf, so "
    "every token would be garbage. Likely causes: a float16 checkpoint whose activations "
    "overflow (load it in bfloat16 or float32), corrupt or mismatched weights, or a pipeline "
    "split outside ppwrap whose stages exchange hidden states in another dtype than they "
    "compute in (mlx-lm's own pipeline() with mixed-dtype checkpoints)."
)


def _check_head(head: Any) -> PipelineHead:
    if not isinstance(head, PipelineHead):
        raise TypeError(
            f"ppwrap's generation takes a PipelineHead (from ppwrap.load or "
            f"PipelineHead.wrap); got {type(head).__module__}.{type(head).__qualname__}."
        )
    return head


def generate_step(
    prompt: mx.array,
    head: PipelineHead,
    *,
    max_tokens: int = 256,
    sampler: Sampler | None = None,
    logits_processors: Sequence[LogitsProcessor] | None = None,
    max_kv_size: int | None = None,
    prompt_cache: list[Any] | None = None,
    prefill_step_size: int = 2048,
    prompt_progress_callback: Callable[[int, int], None] | None = None,
    watchdog: Watchdog | None = None,
    should_stop: Callable[[], bool] | None = None,
    wait: WaitMode = "auto",
) -> Generator[tuple[int, mx.array | None], None, None]:
    """Produce token ids from ``prompt`` on every rank of the pipeline.

    Args:
        prompt: The prompt's token ids, 1-D.
        head: The wrapped, pipelined model.
        max_tokens: Tokens to generate; ``-1`` for no limit.
        sampler: Picks a token from log probabilities (final rank only);
            default greedy.
        logits_processors: Applied to the logits before sampling (final rank only).
        max_kv_size: Keep at most this many entries in a rotating cache.
        prompt_cache: A cache from ``head.make_cache()``, updated in place.
        prefill_step_size: Prompt tokens per prefill chunk.
        prompt_progress_callback: Called with (processed, total) prompt tokens.
        watchdog: Watches every step; a step that waits on a peer for longer
            than its timeout ends this rank with a message (see
            :class:`ppwrap.Watchdog`). ``None``: no watchdog.
        should_stop: Asked on the final rank before each step is issued; once
            it returns ``True``, every rank stops within the next two tokens.
            For stops that only the final rank can see (a stop string, a
            client gone). The answer rides along with the token broadcast, so
            all ranks stop on the same step; tokens yielded after it returned
            ``True`` are the ranks finishing in step, not output.
        wait: How ranks wait for their peers while decoding (for the token,
            and for the previous stage's hidden state). ``"spin"``: dispatch
            every step at once; MLX's ring backend then polls, holding a core.
            ``"sleep"``: sleep through half of the wait the last steps showed
            before dispatching what waits; for ranks that share a machine's
            cores, where spinning takes a core from the rank that computes.
            ``"wake"``: sleep until just before each stage message is due,
            poll the ring backend's sockets until it is in, then wait for it
            alone (MLX CUDA notices a long wait late; see
            ``ppwrap._pace.Arrivals``). ``"auto"`` (default): ``"wake"`` on
            MLX CUDA; on the CPU when this host runs more ranks than it has
            cores, ``"wake"`` while decoding where it finds the sockets
            (``"sleep"`` otherwise) and for the prompt ``"sleep"``, then a
            poll of the sockets; else ``"spin"``. The tokens are the same
            either way.

    Yields:
        The token (the same on every rank) and its log probabilities (on the
        final rank; ``None`` elsewhere). The final rank yields a token as it
        samples it; the first stage once the token reaches it; the ranks
        between once the next stage message brings it, one pipeline pass
        later. Every rank yields the same tokens and stops after the same one.

    Raises:
        ValueError: The prompt is empty, not 1-D, not integer, or has ids
            outside the vocabulary, ``prefill_step_size`` < 1, or ``wait`` is
            not one of the modes above.
        NonFiniteLogitsError: The first step's logits hold NaN or +inf (on
            every rank, on the same step).
    """
    head = _check_head(head)
    ACTIVITY.begin_generation()
    paced = should_pace(wait, size=head.size)
    stage = head.stage
    # Non-final ranks wait for the token; with ppwrap's split, every rank but
    # the first also waits for the previous stage's hidden state, per decoded
    # token and per prompt token of a prefill chunk. The head keeps what the
    # waits were, so the next generation paces from its first step.
    receives = paced and stage is not None and not stage.is_first
    token_pace = head._pace("token") if paced and not head.is_final else None
    input_pace = head._pace("input") if receives else None
    prefill_pace = head._pace("prefill") if receives else None
    prefill_poll = Poll(Inbox.find()) if prefill_pace is not None else None
    _check_prompt(prompt, head.vocab_size)
    if prefill_step_size < 1:
        raise ValueError(f"prefill_step_size must be at least 1; got {prefill_step_size}.")
    cache = prompt_cache if prompt_cache is not None else head.make_cache(max_kv_size)
    sampler = sampler or (lambda logprobs: mx.argmax(logprobs, axis=-1))
    progress = prompt_progress_callback or (lambda *_: None)
    final = head.is_final
    tokens: mx.array | None = None
    watch = watchdog.watch if watchdog is not None else _unwatched

    stop_asked = should_stop or (lambda: False)

    def _sample(out: mx.array, y: mx.array, *, first: bool) -> tuple[mx.array, mx.array]:
        # The final rank's [token, flag] and log probabilities for the last position.
        nonlocal tokens
        logits = out[:, -1, :]
        flag = mx.array([STOP if stop_asked() else 0], mx.uint32)
        if first:
            # One silent wrong answer costs more than any hang: NaN or +inf
            # in the first logits ends the generation on every rank.
            bad = mx.any(mx.isnan(logits) | mx.isposinf(logits))
            flag = mx.where(bad, mx.array([NON_FINITE], mx.uint32), flag)
        if logits_processors:
            tokens = mx.concat([tokens, y]) if tokens is not None else y
            for processor in logits_processors:
                logits = processor(tokens, logits)
        logprobs = logits - mx.logsumexp(logits, keepdims=True)
        token = sampler(logprobs).astype(mx.uint32)
        return mx.concat([token, flag]), logprobs.squeeze(0)

    def _step(y: mx.array, *, first: bool = False) -> tuple[mx.array, mx.array | None, mx.array]:
        # Broadcasts [token, stop]: the final rank's stop request reaches every
        # rank in the same collective as the token, at no extra cost.
        nonlocal tokens
        with mx.stream(generation_stream):
            out = head(y[None], cache=cache)
            if not final:
                return head.broadcast(mx.zeros((2,), mx.uint32), out), None, out
            words, logprobs = _sample(out, y, first=first)
            return head.broadcast(words, out), logprobs, out

    def _arrive(
        pace: Pace | None, scale: float = 1.0, *, always: bool = False, poll: Poll | None = None
    ) -> None:
        # Wait for the hidden state this rank just built a receive for,
        # sleeping through the part of the wait the pace predicts, then
        # polling the ring's sockets until it comes in (MLX's receive would
        # spin on a core the ranks that compute need); without a pace only
        # when ``always`` (a prefill chunk: what follows computes).
        received = stage.received.pop() if stage is not None and stage.received else None
        if received is None or (pace is None and not always):
            return
        if pace is not None:
            pace.sleep(scale)
        if poll is not None:
            poll.wait()
        mx.eval(received)
        if poll is not None:
            poll.done()
        if pace is not None:
            pace.arrived(scale)

    total = prompt.size
    done = 0
    progress(done, total)
    for pace in (prefill_pace, input_pace):
        if pace is not None:
            pace.issued()
    with mx.stream(generation_stream):
        # Prefill all but the last prompt token: backbone only, no head anywhere.
        while total - done > 1:
            n = min(prefill_step_size, total - done - 1)
            chunk = prompt[done : done + n]
            hidden = head.hidden_states(chunk[None], cache=cache)
            # Elsewhere the hidden states carry this rank's send. On the final
            # rank nobody reads them: evaluating only the caches (their keys
            # depend on the received stage input), as mlx-lm does, skips the
            # last layer's MLP and the final norm over the whole chunk.
            tokens_range = f"prompt tokens {done}-{done + n}"
            if stage is not None:
                # The receive on its own, then the layers: the watchdog can
                # tell a rank that computes a long chunk from one that waits.
                with watch(f"prefill of {tokens_range}: waiting for the previous stage"):
                    _arrive(prefill_pace, n, always=True, poll=prefill_poll)
            # The previous stage goes on with the next chunk meanwhile.
            for pace in (prefill_pace, input_pace):
                if pace is not None:
                    pace.issued()
            with watch(f"prefill of {tokens_range}", busy=stage is not None):
                mx.eval([] if final else hidden, [c.state for c in cache])
            if final and logits_processors:
                tokens = mx.concat([tokens, chunk]) if tokens is not None else chunk
            done += n
            progress(done, total)
            mx.clear_cache()

    if stage is not None and stage.size > 1:
        wake = waker(wait, size=head.size)
        yield from _ring_decode(
            head,
            stage,
            prompt[done:],
            cache,
            max_tokens=max_tokens,
            sample=_sample,
            progress=lambda: progress(total, total),
            watch=watch,
            pace=head._pace("ring") if paced and not head.is_final and wake is None else None,
            wake=wake,
        )
        return

    # A pacing rank dispatches nothing that would wait on a peer before its
    # sleep (a dispatched receive polls from the start): it waits for the
    # token, then for the previous stage's hidden state, and only then
    # dispatches its stage work (and, on the final rank, the head and sampling).
    with watch("first decode step (stage send/recv and token broadcast)"):
        y, logprobs, out = _step(prompt[done:], first=True)
        _arrive(input_pace)
        mx.async_eval(out if token_pace else (y, logprobs))  # type: ignore[no-untyped-call]
        if token_pace is not None:
            token_pace.issued()
    pending: mx.array | None = None
    n = 0
    try:
        while True:
            # Any of these can wait on a peer: async_eval too, once the
            # transfer queue is full.
            with watch(f"decode step {n} (stage send/recv and token broadcast)"):
                if n != max_tokens and token_pace is None:
                    next_y, next_logprobs, next_out = _step(y[:1])
                    if not paced:
                        mx.async_eval(next_y, next_logprobs)  # type: ignore[no-untyped-call]
                    pending = next_y
                if token_pace is not None:
                    token_pace.sleep()
                    # Join this step's broadcast before building the next step:
                    # some families evaluate inside their forward pass (dbrx's
                    # MoE routing), which would wait on a peer that waits for
                    # this rank's share of the broadcast.
                    mx.async_eval(y)  # type: ignore[no-untyped-call]
                    if n != max_tokens:
                        next_y, next_logprobs, next_out = _step(y[:1])
                        pending = next_y
                if n == 0:
                    mx.eval(y)
                    progress(total, total)
                if n == max_tokens:
                    break
                # eval, unlike item(), lets the watchdog thread run while it waits.
                mx.eval(y)
                if paced:
                    if token_pace is not None:
                        token_pace.arrived()
                    if input_pace is not None:
                        input_pace.issued()  # the token is out: the first stage starts
                    _arrive(input_pace)
                    mx.async_eval(next_out if token_pace else (next_y, next_logprobs))  # type: ignore[no-untyped-call]
                    if token_pace is not None:
                        token_pace.issued()
                token, stop = cast("list[int]", y.tolist())
            if stop == NON_FINITE:
                raise NonFiniteLogitsError(NON_FINITE_MESSAGE)
            if stop:
                # Every rank reads the same flag here, with the same step in
                # flight (drained below): all leave on the same step.
                break
            yield token, logprobs
            if n % 256 == 0:
                mx.clear_cache()
            y, logprobs = next_y, next_logprobs
            n += 1
    finally:
        # The step computed ahead is already in flight on every rank. Finish it
        # before anyone moves on (or exits), or a peer waits on a dead transfer.
        if pending is not None:
            with watch(f"finishing decode step {n + 1}"):
                mx.eval(pending)


@attrs.frozen
class Step:
    """One decode step (or batch position) of this rank, built and ready to dispatch.

    Attributes:
        work: What evaluating runs the step (its send or receive included).
        words: ``[token, flag]`` (a row per sequence in a batch) as this rank
            learns them in this step: the final rank's sample; the token the
            first stage received; the words a later stage's message brought.
            ``None`` where there is nothing to learn yet (the first step of
            the first and middle stages).
        logprobs: The sample's log probabilities (final rank).
        arrival: The step's first receive, as it comes off the wire: what the
            step waits for before anything else (``None`` if nothing).
    """

    work: list[mx.array]
    words: mx.array | None
    logprobs: mx.array | None = None
    arrival: mx.array | None = None


def dispatch(step: Step, wake: Arrivals | None) -> None:
    """Dispatch ``step``; with ``wake``, wait first for its arrival on its own,
    from just before it is due.

    Dispatched at once, the step would wait for the message inside
    ``async_eval`` from now, where MLX CUDA notices it late (see Arrivals).
    """
    if wake is not None and step.arrival is not None:
        wake.take(step.arrival)
    mx.async_eval(step.work)  # type: ignore[no-untyped-call]


def _ring_decode(
    head: PipelineHead,
    stage: Stage,
    last_prompt: mx.array,
    cache: list[Any],
    *,
    max_tokens: int,
    sample: Callable[..., tuple[mx.array, mx.array]],
    progress: Callable[[], None],
    watch: Callable[[str], Any],
    pace: Pace | None,
    wake: Arrivals | None = None,
) -> Generator[tuple[int, mx.array | None], None, None]:
    """Decode around the ring: one send and one receive per rank and token.

    The final rank sends ``[token, flag]`` straight to the first stage (rank
    ``size - 1``, its neighbour in MLX's ring), which embeds the token and
    sends its hidden state on with the same words appended; each later stage
    reads them off the message it receives and forwards them. So every rank
    learns each token, and whether to stop, with no collective: the first
    stage as the token arrives, the others with the next stage message.

    Every rank leaves after the same token ``t``, with the step that follows
    it in flight, which it finishes: the first stage's message after ``t``
    still travels to the final rank (which dispatched its step ahead, as
    mlx-lm's loop does), and the first stage takes the final rank's last,
    unused token off the wire, so the next generation starts clean. Only the
    final rank dispatches a step before it has read the previous token; the
    others read what their step received before building the next one, so no
    rank ever waits for a message nobody will send.
    """
    final, first = stage.is_final, stage.is_first
    group, stream = stage.group, stage.stream
    ring = stage.ring

    def final_words() -> mx.array:
        # What the final rank sends the first stage: [token, flag].
        return mx.distributed.recv((HEADER_WORDS,), mx.uint32, 0, group=group, stream=stream)

    def step(y: mx.array | None, *, start: bool) -> Step:
        with mx.stream(generation_stream):
            stage.wire_in.clear()
            if first:
                words = arrival = None
                if start:
                    ids, ring.header = last_prompt, mx.zeros((HEADER_WORDS,), mx.uint32)
                else:
                    # A copy on this stream: the GPU never waits on the wire
                    # itself (see PipelineHead.broadcast).
                    arrival = final_words()
                    words = arrival + 0
                    ids, ring.header = words[:1], words
                out = head(ids[None], cache=cache)
                return Step([out] if words is None else [out, words], words, arrival=arrival)
            if start:
                x = last_prompt
            elif final:
                assert y is not None
                x = y
            elif stage.embeds_everywhere:
                # The token comes with the stage message: take it first, so that
                # a family that embeds it on every rank sees the real one.
                x = receive_ahead(stage, (1, 1))[0, :1]
            else:
                x = last_prompt  # only its shape counts: the layers take the message
            out = head(x[None], cache=cache)
            arrival = stage.wire_in[0] if stage.wire_in else None
            if not final:
                words = None
                if not start:
                    assert ring.received is not None, "a stage message came without words"
                    words = ring.received + 0
                return Step([out] if words is None else [out, words], words, arrival=arrival)
            words, logprobs = sample(out, x, first=start)
            sent = mx.distributed.send(words, stage.size - 1, group=group, stream=stream)
            return Step([sent, words, logprobs], words, logprobs, arrival)

    def read(r: Step) -> tuple[int, int]:
        assert r.words is not None
        mx.eval(r.words)  # eval, unlike item(), lets the watchdog thread run
        if pace is not None:
            pace.arrived()
            pace.issued()
        token, flag = cast("list[int]", r.words.reshape(-1).tolist())
        return token, flag

    ring.on = True
    pending: Step | None = None
    try:
        with watch("first decode step (stage send/recv)"):
            current = pending = step(None, start=True)
            dispatch(current, wake)
        if pace is not None:
            pace.issued()
        n = 0
        while n != max_tokens:
            # Dispatching can wait on a peer too (MLX waits inside an
            # evaluation for what another stream, the transfers', produces).
            with watch(f"decode step {n} (the token coming round the ring)"):
                if final:
                    # mlx-lm's overlap: the next step goes out before this token is read.
                    assert current.words is not None
                    ahead = pending = step(current.words[:1], start=False)
                    dispatch(ahead, wake)
                else:
                    # A pacing rank sleeps before its receive goes out: a
                    # dispatched receive polls, holding a core, from the start.
                    if pace is not None:
                        pace.sleep()
                    current = pending = step(None, start=False)
                    dispatch(current, wake)
                token, flag = read(current)
            if n == 0:
                progress()
            if flag == NON_FINITE:
                raise NonFiniteLogitsError(NON_FINITE_MESSAGE)
            if flag == STOP:
                break
            yield token, current.logprobs
            if n % 256 == 0:
                mx.clear_cache()
            if final:
                current = ahead
            n += 1
    finally:
        try:
            if pending is not None:
                with watch(f"finishing decode step {n + 1}"):
                    mx.eval(pending.work)
                    if first:
                        # The final rank's token for the step in flight: unused.
                        mx.eval(final_words())
        finally:
            ring.on, ring.header, ring.received = False, None, None
            stage.wire_in.clear()


@contextmanager
def _unwatched(what: str, *, busy: bool = False) -> Iterator[None]:
    yield


def _check_prompt(prompt: mx.array, vocab_size: int | None) -> None:
    if not isinstance(prompt, mx.array):
        raise TypeError(f"prompt must be an mx.array of token ids; got {type(prompt).__name__}.")
    if prompt.ndim != 1 or prompt.size == 0:
        raise ValueError(
            f"prompt must be a non-empty 1-D array of token ids; got shape {tuple(prompt.shape)}."
        )
    if not mx.issubdtype(prompt.dtype, mx.integer):
        raise ValueError(f"prompt must hold integer token ids; got dtype {prompt.dtype}.")
    low, high = cast(int, mx.min(prompt).item()), cast(int, mx.max(prompt).item())
    if low < 0 or (vocab_size is not None and high >= vocab_size):
        raise ValueError(
            f"prompt has token ids from {low} to {high}, outside the model's vocabulary "
            f"0..{vocab_size - 1 if vocab_size else '?'}; was it encoded with another tokenizer?"
        )


def _encode(tokenizer: TokenizerWrapper, prompt: str | mx.array | Sequence[int]) -> mx.array:
    if isinstance(prompt, mx.array):
        return prompt
    if isinstance(prompt, str):
        bos = tokenizer.bos_token
        prompt = tokenizer.encode(
            prompt, add_special_tokens=bos is None or not prompt.startswith(bos)
        )
    return mx.array(list(prompt))


def stream_generate(
    head: PipelineHead,
    tokenizer: Any,
    prompt: str | mx.array | Sequence[int],
    *,
    max_tokens: int = 256,
    **kwargs: Any,
) -> Generator[GenerationResponse, None, None]:
    """Stream a response, on every rank of the pipeline.

    Every rank must call it with the same prompt and options. Only the final
    rank's responses carry text and log probabilities.

    Args:
        head: The wrapped, pipelined model.
        tokenizer: The tokenizer (``ppwrap.load`` returns it).
        prompt: Text, or token ids.
        max_tokens: Tokens to generate; ``-1`` for no limit.
        **kwargs: Passed to :func:`generate_step` (``sampler``,
            ``logits_processors``, ``prompt_cache``, ``prefill_step_size``, ...).

    Yields:
        mlx-lm's ``GenerationResponse``; the last one has ``finish_reason``
        ``"stop"`` (end of sequence) or ``"length"``.

    Raises:
        ValueError: ``max_tokens`` is 0 or the prompt is empty.
    """
    if max_tokens == 0:
        raise ValueError("max_tokens must be non-zero (use -1 for no limit).")
    if not isinstance(tokenizer, TokenizerWrapper):
        tokenizer = TokenizerWrapper(tokenizer)
    prompt = _encode(tokenizer, prompt)
    final = _check_head(head).is_final
    detokenizer = tokenizer.detokenizer
    detokenizer.reset()
    eos = tokenizer.eos_token_ids

    def response(n: int, token: int, logprobs: Any, finish: str | None) -> GenerationResponse:
        return GenerationResponse(
            text=detokenizer.last_segment if final else "",
            token=token,
            logprobs=logprobs,
            from_draft=False,
            prompt_tokens=prompt.size,
            prompt_tps=prompt_tps,
            generation_tokens=n + 1,
            generation_tps=(n + 1) / (time.perf_counter() - tic),
            peak_memory=mx.get_peak_memory() / 1e9,
            finish_reason=finish,
        )

    tic = time.perf_counter()
    prompt_tps = 0.0
    token, logprobs, n = 0, None, 0
    for n, (token, logprobs) in enumerate(
        generate_step(prompt, head, max_tokens=max_tokens, **kwargs)
    ):
        if n == 0:
            prompt_tps = prompt.size / (time.perf_counter() - tic)
            tic = time.perf_counter()
        if token in eos:
            break
        if final:
            detokenizer.add_token(token)
        if n + 1 == max_tokens:
            break
        yield response(n, token, logprobs, None)
    if final:
        detokenizer.finalize()
    yield response(n, token, logprobs, "stop" if token in eos else "length")


def generate(
    head: PipelineHead,
    tokenizer: Any,
    prompt: str | mx.array | Sequence[int],
    *,
    verbose: bool = False,
    **kwargs: Any,
) -> str:
    """Generate a complete response; the text on the final rank, ``""`` elsewhere.

    Args:
        head: The wrapped, pipelined model.
        tokenizer: The tokenizer.
        prompt: Text, or token ids.
        verbose: Print the text as it streams and the speeds (final rank).
        **kwargs: Passed to :func:`stream_generate`.
    """
    text = ""
    last = None
    for last in stream_generate(head, tokenizer, prompt, **kwargs):
        if verbose and head.is_final:
            print(last.text, end="", flush=True)
        text += last.text
    if verbose and head.is_final and last is not None:
        print()
        print(f"Prompt: {last.prompt_tokens} tokens, {last.prompt_tps:.3f} tokens-per-sec")
        print(
            f"Generation: {last.generation_tokens} tokens, {last.generation_tps:.3f} tokens-per-sec"
        )
    return text


def sampler_from(temp: float = 0.0, top_p: float = 0.0) -> Sampler:
    """mlx-lm's sampler for a temperature and top-p (greedy at temperature 0)."""
    return make_sampler(temp=temp, top_p=top_p)  # type: ignore[no-any-return]
