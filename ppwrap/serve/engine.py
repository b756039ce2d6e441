"""The serving loop that every rank runs in lockstep behind ``ppwrap serve``.

The final rank takes requests from the HTTP side; before each one it sends
every rank a small header (what to do, prompt length, token limit, sampling
settings) and then the prompt's tokens, in two ``all_sum`` collectives. All
ranks then run :func:`ppwrap.generate_step` on the same prompt and stop on the
same step: at end of sequence or the token limit, which every rank sees, or
when the final rank asks to stop (a stop string matched, a client left), which
reaches the others round the ring with the token.

With ``max_batch`` above one the server batches continuously instead: the
running sequences are split into one micro-batch per stage, all in flight at
once (see ``ppwrap._inflight``). Between segments of decoding the final rank
sends a ``SYNC`` header and, in one more collective, each running sequence's
next token (or that it ended) and the new requests' settings, then their
prompts; every rank drops the ended rows, prefills the new ones (reusing
cached prompt prefixes) and places them in the same micro-batches.

When there is nothing to do the final rank sends a heartbeat header every
``heartbeat`` seconds, so an idle pipeline with a stalled peer is noticed by
the watchdog as quickly as a busy one; the other ranks sleep until its notice.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import struct
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, cast

import attrs
import mlx.core as mx

from .. import _liveness
from .._batch import _prefill, row_sampler, sample_rows
from .._generate import NON_FINITE, NON_FINITE_MESSAGE, NonFiniteLogitsError, generate_step
from .._head import PipelineHead
from .._inflight import MicroBatch, balance, decode
from .._watchdog import Watchdog
from .prefix import PrefixCache, bytes_per_token, reusable

log = logging.getLogger("ppwrap.serve")

HEARTBEAT, GENERATE, SHUTDOWN, SYNC = 0, 1, 2, 3
# int32 fields per new request of a SYNC: prompt length, then the header's settings
ROW = 6
FINAL_RANK = 0  # the rank that runs the last layers, samples and serves HTTP
# The warm-up generation: prompt tokens (a prefill chunk, then decode steps),
# and how long it may take before a rank counts as stalled.
WARM_UP_PROMPT = 16
WARM_UP_TIMEOUT = 300.0
# Seconds a stalled rank waits, after answering its clients, before it exits.
ABANDON_GRACE = 1.0
# int32 fields: kind, prompt length, max tokens, seed?, seed, temp, top-p, and the
# prompt tokens the final rank's prefix cache reuses (every rank must find as many).
HEADER = 8
# Prompt positions per prefill chunk.
PREFILL_STEP = 2048


def _float_bits(x: float) -> int:
    return int(struct.unpack("<i", struct.pack("<f", x))[0])


def _settings(job: Job) -> list[int]:
    """A request's settings as header fields: token limit, seed (whether, which),
    temperature and top-p (as float bits)."""
    return [
        job.max_tokens,
        int(job.seed is not None),
        job.seed or 0,
        _float_bits(job.temperature),
        _float_bits(job.top_p),
    ]


def _bits_float(i: int) -> float:
    return float(struct.unpack("<f", struct.pack("<i", i))[0])


@attrs.define(eq=False)
class Job:
    """One request, as the serving loop sees it.

    The HTTP side creates it with the prompt's token ids and reads its events:
    ``("text", str, scored)`` pieces (``scored``: the log probabilities of the
    tokens they hold, when asked), then one ``("done", finish_reason, usage)``
    or ``("error", message, http_status)``.
    """

    id: str
    prompt: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = attrs.field(factory=list)
    loop: asyncio.AbstractEventLoop | None = None
    events: asyncio.Queue[tuple[Any, ...]] | None = None
    cancelled: threading.Event = attrs.field(factory=threading.Event)
    finished: bool = False
    #: Monotonic time by which the request must be done (``None``: no limit).
    deadline: float | None = None
    #: Log probabilities with the text: ``None`` none; ``k`` the token's and the top k.
    logprobs: int | None = None

    def emit(self, *event: Any) -> None:
        if self.loop is None or self.events is None:
            return
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is closed: the server is going down
            pass

    async def stream(
        self, disconnected: Callable[[], Awaitable[bool]] | None = None
    ) -> AsyncIterator[tuple[Any, ...]]:
        """The job's events until its last; a client gone meanwhile cancels it."""
        assert self.events is not None
        while True:
            if self.deadline is not None and time.monotonic() > self.deadline:
                # Ends it on every rank as a client leaving would.
                self.cancelled.set()
                self.finished = True
                yield ("error", "the request took longer than this server's time limit", 504)
                return
            try:
                event = await asyncio.wait_for(self.events.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if disconnected is not None and await disconnected():
                    self.cancelled.set()
                    return
                continue
            yield event
            if event[0] in ("done", "error"):
                self.finished = True
                return


class QueueFull(Exception):
    """The server already holds as many requests as it queues."""


def _explain(e: BaseException) -> str:
    """An error for clients and logs, with MLX's transport messages made plain."""
    said = str(e)
    if said.startswith("[ring]") or "connection to a peer" in said:
        return f"a rank of the pipeline went away (its process ended or its link broke: {said})"
    return f"{type(e).__name__}: {said}"


def _held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters of ``text`` could start a stop string."""
    hold = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), hold, -1):
            if text.endswith(stop[:k]):
                hold = k
                break
    return hold


class Engine:
    """Runs requests on every rank of the pipeline, in order: alone, or those
    waiting together as one batch.

    Args:
        head: The loaded, pipelined model.
        tokenizer: Its tokenizer (every rank needs the end-of-sequence ids).
        watchdog: Watches every step; a peer that stops answering ends the rank.
        heartbeat: Seconds between headers when idle.
        max_queue: Requests waiting beyond this are refused (:class:`QueueFull`).
        prompt_cache_bytes: Bytes of recent sequences' caches each rank keeps
            for prompts that start with them (see ``ppwrap.serve.prefix``); 0: none.
        max_batch: Above one, requests are batched continuously, up to this
            many at once, in one micro-batch per stage (families with plain KV
            caches on ppwrap's split); one: each request runs alone.
    """

    def __init__(
        self,
        head: PipelineHead,
        tokenizer: Any,
        *,
        watchdog: Watchdog,
        heartbeat: float = 1.0,
        max_queue: int = 64,
        prompt_cache_bytes: int = 0,
        max_batch: int = 1,
    ) -> None:
        if heartbeat >= watchdog.timeout:
            raise ValueError(
                f"the heartbeat ({heartbeat} s) must be shorter than the watchdog "
                f"timeout ({watchdog.timeout} s), or idle ranks would time out"
            )
        self.head = head
        self.tokenizer = tokenizer
        self.watchdog = watchdog
        self.heartbeat = heartbeat
        self.jobs: queue.Queue[Job] = queue.Queue(maxsize=max_queue)
        self.active: Job | None = None
        self.served = 0
        self.cancelled = 0
        self.failure: str | None = None
        self.running = False
        self.pids: list[int] = []
        self.prompt_cache_bytes = prompt_cache_bytes
        self.prefix: PrefixCache | None = None
        self._joining: list[Job] = []  # the final rank's requests being announced
        kinds = {type(c).__name__ for c in head.make_cache()}
        splits = head.stage is not None or head.size == 1
        self.max_batch = max_batch if kinds == {"KVCache"} and splits else 1
        # Continuous batching: the micro-batches (every rank, in step), the
        # final rank's sequences by row id, and the next row id (every rank).
        in_flight = head.stage.in_flight if head.stage is not None else head.size
        self.batches = [MicroBatch() for _ in range(in_flight)]
        self.seqs: dict[int, _Seq] = {}
        self.next_row = 0
        self._stopping = threading.Event()

    # --- the HTTP side (final rank) -------------------------------------------

    def submit(self, job: Job) -> None:
        """Queue a job for the serving loop (any thread)."""
        if self._stopping.is_set():
            raise QueueFull("the server is shutting down")
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise QueueFull(
                f"{self.jobs.maxsize} requests are already waiting; retry later"
            ) from None

    def abandon(self, why: str) -> None:
        """Answer every request in flight or queued with a 503, from any thread.

        The watchdog calls it just before it ends a stalled rank, so clients get
        an error instead of a dropped connection; the pause lets the HTTP
        thread write the answers out.
        """
        if self._answer_all(f"the pipeline stopped: {why}"):
            time.sleep(ABANDON_GRACE)

    def _answer_all(self, why: str) -> int:
        """Answer the request in flight and every queued one with a 503; how many."""
        left = [self.active] if self.active is not None else []
        left += self.active_batch
        left += [job for job in self._joining if job not in left]
        while not self.jobs.empty():
            left.append(self.jobs.get_nowait())
        for job in left:
            job.emit("error", why, 503)
        return len(left)

    @property
    def active_batch(self) -> list[Job]:
        """The requests decoding in the continuous batch (final rank)."""
        return [s.reply.job for s in list(self.seqs.values()) if not s.done]

    def stop(self) -> None:
        """Ask every rank to leave the loop after the current request."""
        self._stopping.set()
        for job in [self.active, *self.active_batch]:
            if job is not None:
                job.cancelled.set()

    def health(self, stall_after: float) -> tuple[bool, dict[str, Any]]:
        """Whether the pipeline makes progress, and what the loop is doing.

        Unhealthy when the loop has failed or is not running, when a peer has
        gone silent, or when one step has waited on the ranks for more than
        ``stall_after`` seconds while no rank computes (the watchdog ends the
        rank at its own, longer timeout). A rank computing a long prefill is
        reported under ``activity`` and keeps the server healthy.
        """
        verdict = self.watchdog.verdict(timeout=stall_after)
        info: dict[str, Any] = {
            "ranks": self.head.size,
            "pids": self.pids,
            "queued": self.jobs.qsize(),
            "busy": self.active is not None or bool(self.active_batch),
            "served": self.served,
            "cancelled": self.cancelled,
        }
        if self.prefix is not None:
            info["prompt_cache"] = {
                "entries": len(self.prefix),
                "bytes": self.prefix.nbytes,
                "max_bytes": self.prefix.max_bytes,
                "hits": self.prefix.hits,
                "reused_tokens": self.prefix.reused_tokens,
            }
        reason = None
        if self.failure is not None:
            reason = self.failure
        elif not self.running:
            reason = "the serving loop is not running"
        elif verdict is not None and verdict.stalled:
            reason = verdict.message
        elif verdict is not None and verdict.slow:
            info["activity"] = verdict.message  # a long prefill: slow, not stuck
        now = time.monotonic()
        info["peers"] = [
            {
                "rank": p.rank,
                "doing": p.what,
                "seconds": round(p.seconds, 1),
                "computing": p.busy,
                "generation": p.generation,
                "heard_seconds_ago": round(p.silent_for(now), 1),
            }
            for p in sorted(self.watchdog.peers().values(), key=lambda p: p.rank)
        ]
        if reason is not None:
            info["reason"] = reason
        info["status"] = "ok" if reason is None else "unhealthy"
        return reason is None, info

    # --- every rank -------------------------------------------------------------

    def _all_sum(self, values: list[int], what: str) -> list[int]:
        if self.head.size == 1:
            return values
        mine = mx.array(values if self.head.is_final else [0] * len(values), mx.int32)
        with self.watchdog.watch(what):
            out = mx.distributed.all_sum(mine, group=self.head.group, stream=mx.cpu)
            mx.eval(out)
        return cast("list[int]", out.tolist())

    def _next_header(self) -> tuple[list[int], Job | None]:
        if self._stopping.is_set():
            return [SHUTDOWN] + [0] * (HEADER - 1), None
        if self.max_batch > 1:
            return self._sync_header()
        try:
            job = self.jobs.get(timeout=self.heartbeat)
        except queue.Empty:
            return [HEARTBEAT] + [0] * (HEADER - 1), None
        if job.cancelled.is_set():  # its client left while it waited
            self.cancelled += 1
            return [HEARTBEAT] + [0] * (HEADER - 1), None
        reuse = self.prefix.match(job.prompt)[1] if self.prefix is not None else 0
        return [GENERATE, len(job.prompt), *_settings(job), reuse], job

    def _waiting(self, room: int, timeout: float | None) -> list[Job]:
        """Up to ``room`` queued requests whose clients are still there; waits
        up to ``timeout`` for the first (``None``: takes only what is queued)."""
        jobs: list[Job] = []
        while len(jobs) < room:
            try:
                job = self.jobs.get(timeout=timeout) if timeout else self.jobs.get_nowait()
            except queue.Empty:
                break
            timeout = None
            if job.cancelled.is_set():  # its client left while it waited
                self.cancelled += 1
            else:
                jobs.append(job)
        return jobs

    def _sync_header(self) -> tuple[list[int], Job | None]:
        """The final rank's next header with continuous batching: ``SYNC`` while
        sequences run or requests join, else a heartbeat."""
        rows = sum(len(b.rows) for b in self.batches)
        running = sum(not s.done for s in self.seqs.values())
        self._joining = self._waiting(self.max_batch - running, None if rows else self.heartbeat)
        if not rows and not self._joining:
            return [HEARTBEAT] + [0] * (HEADER - 1), None
        # What the prompt cache reused so far: every rank checks it reused as much.
        reused = self.prefix.reused_tokens if self.prefix is not None else 0
        return [SYNC, len(self._joining), rows, reused] + [0] * (HEADER - 4), None

    def run(self) -> None:
        """Serve until :meth:`stop` (on the final rank) ends every rank's loop."""
        head = self.head
        # Every rank's pid lands on the final rank (a non-final rank's own entry
        # would be zeroed by _all_sum, so each sends its pid in its own slot).
        self.pids = self._each_rank(os.getpid(), "exchanging process ids")
        self._start_prefix_cache(self._warm_up())
        self._log_stage_times()
        # From here a silent peer counts as dead or suspended (see ppwrap._watchdog).
        if missing := self.watchdog.hear_peers():
            log.warning(
                "no heartbeats from rank(s) %s (UDP blocked?): the watchdog times steps only",
                missing,
            )
        self.running = True
        live = _liveness.shared()
        headers = 0
        try:
            while True:
                if head.is_final:
                    header, job = self._next_header()
                    if live is not None:
                        live.notify()  # the others leave their sleep for the collective
                else:
                    header, job = [0] * HEADER, None
                    self._await_header(live, headers + 1)
                kind, length, *settings = self._all_sum(
                    header, "waiting for the final rank's next request header"
                )
                headers += 1
                if kind == SHUTDOWN:
                    return
                if kind == HEARTBEAT:
                    continue
                if kind == SYNC:
                    self._sync(length, settings[0], settings[1])
                    self._segment()
                    continue
                prompt = self._all_sum(
                    job.prompt if job is not None else [0] * length, "receiving a prompt"
                )
                self._generate(job, prompt, *settings)
        except BaseException as e:
            self.failure = f"the serving loop failed: {_explain(e)}"
            raise
        finally:
            self.running = False
            # Nobody will run what is left: tell the clients instead of leaving them
            # waiting, and give the HTTP thread a moment to write the answers out
            # before the server shuts down.
            if self._answer_all(self.failure or "the server is shutting down"):
                time.sleep(ABANDON_GRACE)

    def _log_stage_times(self) -> None:
        """Log each rank's part of a decode step, measured alone: how even the split is."""
        head = self.head
        if head.size == 1 or head.stage is None:
            return
        rows = max(1, self.max_batch // len(self.batches))  # a micro-batch's rows
        mine = round(head.stage_seconds(rows) * 1e6)
        times = self._each_rank(mine, "sharing the stages' times")
        if head.is_final:
            layers = head.stage.split
            log.info(
                "stage compute per decode step of %d sequence(s), each rank alone: %s",
                rows,
                ", ".join(
                    f"rank {r} {t / 1e3:.1f} ms ({layers[r]} layers{' + head' if r == 0 else ''})"
                    for r, t in enumerate(times)
                ),
            )

    def _each_rank(self, value: int, what: str) -> list[int]:
        """Every rank's ``value``, by rank (each rank sums into its own slot)."""
        head = self.head
        mine = [value if r == head.rank else 0 for r in range(head.size)]
        if head.size == 1:
            return mine
        with self.watchdog.watch(what):
            out = mx.distributed.all_sum(mx.array(mine), group=head.group, stream=mx.cpu)
            mx.eval(out)
        return cast("list[int]", out.tolist())

    def _start_prefix_cache(self, cache: list[Any]) -> None:
        """Agree with every rank on the prefix cache's terms, from a used cache.

        Every rank must make the same decisions: the cost of a token is the
        largest over the ranks, and the cache is on only if every rank's layers
        can cut a cache back to a prefix.
        """
        per_token = self._each_rank(bytes_per_token(cache), "agreeing on the prompt cache")
        unable = self._each_rank(0 if reusable(cache) else 1, "agreeing on the prompt cache")
        if self.prompt_cache_bytes <= 0:
            return
        if any(unable):
            ranks = [r for r, u in enumerate(unable) if u]
            log.info("prompt cache off: rank(s) %s hold caches that cannot be cut back", ranks)
            return
        self.prefix = PrefixCache(self.prompt_cache_bytes, max(per_token))
        log.info(
            "prompt cache: up to %.0f MB per rank, %.1f KB per token",
            self.prompt_cache_bytes / 1e6,
            max(per_token) / 1e3,
        )

    def _await_header(self, live: _liveness.Liveness | None, count: int) -> None:
        """Sleep until the final rank announces its next header (non-final ranks).

        A rank waiting inside MLX's ring collective polls, holding a core; an
        idle server would burn one per non-final rank. The final rank's notice
        comes over the heartbeat channel; a lost one costs at most the wait
        below, after which the rank waits in the collective as before.
        """
        if live is None or FINAL_RANK not in live.peers():
            return
        with self.watchdog.watch("waiting for the final rank's notice of its next header"):
            live.wait_notice(FINAL_RANK, count, timeout=2 * self.heartbeat + 0.5)

    def _scored(self, token: int, logprobs: mx.array, top: int) -> dict[str, Any]:
        """The token's log probability and the ``top`` most likely tokens'."""
        decode = self.tokenizer.decode
        entry: dict[str, Any] = {
            "id": token,
            "token": decode([token]),
            "logprob": logprobs[token].item(),
            "top": [],
        }
        if top > 0:
            ids = mx.argpartition(-logprobs, kth=top - 1)[:top]
            values = logprobs[ids]
            order = mx.argsort(-values)
            ranked = cast("list[int]", ids[order].tolist())
            scores = cast("list[float]", values[order].tolist())
            for i, v in zip(ranked, scores, strict=True):
                entry["top"].append({"id": i, "token": decode([i]), "logprob": v})
        return entry

    def _warm_up(self) -> list[Any]:
        """Run a short generation on every rank before the first request.

        A GPU compiles its kernels in the first prefill and decode steps (tens
        of seconds for a large model), which the watchdog would take for a
        dead peer, and the first client would wait for. Returns the cache used.
        """
        dog = Watchdog(max(self.watchdog.timeout, WARM_UP_TIMEOUT), rank=self.head.rank)
        prompt = mx.zeros((WARM_UP_PROMPT,), mx.int32)
        cache = self.head.make_cache()
        for _ in generate_step(prompt, self.head, max_tokens=2, watchdog=dog, prompt_cache=cache):
            pass
        if self.max_batch > 1:
            # And the batched kernels: one short sequence per micro-batch, for
            # one round of the ring.
            batches = []
            for _ in self.batches:
                rows = self.head.make_cache()
                ids = mx.zeros((1, WARM_UP_PROMPT), mx.uint32)
                _prefill(self.head, self.head.stage, ids, rows, PREFILL_STEP, dog.watch)
                batches.append(MicroBatch())
                batches[-1].add([0], [rows], [0])

            def greedy(m: int, logits: mx.array) -> tuple[mx.array, mx.array]:
                return sample_rows(logits, [None])

            for _ in decode(
                self.head, batches, sample=greedy, should_end=lambda left: True, watch=dog.watch
            ):
                pass
        return cache

    def _generate(
        self,
        job: Job | None,
        prompt: list[int],
        max_tokens: int,
        has_seed: int,
        seed: int,
        temp_bits: int,
        top_p_bits: int,
        reuse: int,
    ) -> None:
        head = self.head
        cache, reused = self.prefix.take(prompt) if self.prefix is not None else (None, 0)
        if reused != reuse:
            raise RuntimeError(
                f"rank {head.rank}'s prompt cache reuses {reused} prompt tokens where the "
                f"final rank's reuses {reuse}: the ranks' prompt caches disagree (a bug)"
            )
        cache = cache if cache is not None else head.make_cache()
        generated: list[int] = []
        # The sampler a batch gives this request too: a seeded request gets the
        # same tokens alone and in a batch.
        sampler = row_sampler(
            _bits_float(temp_bits), _bits_float(top_p_bits), seed if has_seed else None
        )
        eos = self.tokenizer.eos_token_ids
        reply = _Reply(self, job, len(prompt), reused, max_tokens) if job is not None else None
        self.active = job
        try:
            for n, (token, logprobs) in enumerate(
                generate_step(
                    mx.array(prompt[reused:]),
                    head,
                    max_tokens=max_tokens,
                    sampler=sampler,
                    watchdog=self.watchdog,
                    should_stop=reply.stopping if reply is not None else None,
                    prompt_cache=cache,
                )
            ):
                generated.append(token)
                if reply is not None:
                    reply.started(n)
                # Every rank sees the same token and leaves here on the same step.
                if token in eos:
                    break
                if reply is not None and not reply.stopping():
                    reply.add(token, logprobs)
        except NonFiniteLogitsError as e:
            # Raised on every rank on the same step: the ranks stay in step,
            # so only this request fails.
            if reply is not None:
                reply.fail(str(e), 500)
        else:
            if self.prefix is not None:
                self.prefix.put(prompt + generated, cache)
        # Not on other errors: they end the loop, which answers the active job.
        self.active = None
        if reply is not None:
            reply.close()

    def _sync(self, joining: int, rows: int, reused: int) -> None:
        """Every rank: drop the rows that ended, admit the new requests.

        One collective carries each current row's next token (``-1``: it
        ended) and each new request's prompt length and settings, one more
        their prompts. Each rank then prefills the new prompts alone (reusing
        a cached prefix) and places every new row in the emptiest micro-batch,
        the same on every rank.
        """
        head = self.head
        mine = sum(len(b.rows) for b in self.batches)
        if mine != rows:
            raise RuntimeError(
                f"rank {head.rank} holds {mine} sequences where the final rank holds {rows}: "
                "the ranks' batches disagree (a bug)"
            )
        if self.prefix is not None and self.prefix.reused_tokens != reused:
            raise RuntimeError(
                f"rank {head.rank}'s prompt cache reused {self.prefix.reused_tokens} prompt "
                f"tokens so far where the final rank's reused {reused}: the ranks' prompt "
                "caches disagree (a bug)"
            )
        # Kept in _joining until they have rows: a failure meanwhile answers them.
        jobs: list[Job | None] = list(self._joining) if head.is_final else [None] * joining
        table = [0] * (rows + ROW * joining)
        if head.is_final:
            at = 0
            for b in self.batches:
                for i, row in enumerate(b.rows):
                    table[at] = -1 if self.seqs[row].done else b.inputs[i]
                    at += 1
            for i, job in enumerate(jobs):
                assert job is not None
                table[rows + ROW * i : rows + ROW * (i + 1)] = [len(job.prompt), *_settings(job)]
        table = self._all_sum(table, "receiving the batch's next tokens and new requests")
        at = 0
        for b in self.batches:
            tokens = table[at : at + len(b.rows)]
            at += len(b.rows)
            for row, token in zip(list(b.rows), tokens, strict=True):
                if token < 0:
                    self.seqs.pop(row, None)
            kept = [i for i, token in enumerate(tokens) if token >= 0]
            b.keep(kept)
            b.inputs = [tokens[i] for i in kept]
        new = [table[rows + ROW * i : rows + ROW * (i + 1)] for i in range(joining)]
        lengths = [fields[0] for fields in new]
        flat = [t for job in jobs if job is not None for t in job.prompt]
        flat = self._all_sum(flat or [0] * sum(lengths), "receiving the new prompts")
        at = 0
        for job, (length, max_tokens, has_seed, seed, temp, top_p) in zip(jobs, new, strict=True):
            prompt = flat[at : at + length]
            at += length
            cache, hit = self._prefilled(prompt)
            row = self.next_row
            self.next_row += 1
            min(self.batches, key=lambda b: len(b.rows)).add([row], [cache], [prompt[-1]])
            if job is not None:
                temperature = _bits_float(temp)
                self.seqs[row] = _Seq(
                    _Reply(self, job, length, hit, max_tokens),
                    row_sampler(temperature, _bits_float(top_p), seed if has_seed else None)
                    if temperature > 0
                    else None,
                )
        self._joining = []
        balance(self.batches)
        if head.is_final and joining:
            log.info(
                "%d joined; micro-batches of %s sequences",
                joining,
                [len(b.rows) for b in self.batches],
            )

    def _prefilled(self, prompt: list[int]) -> tuple[list[Any], int]:
        """A cache holding all of ``prompt`` but its last token, from the prompt
        cache's longest prefix where it has one; and how many it reused."""
        head = self.head
        cache, reused = self.prefix.take(prompt) if self.prefix is not None else (None, 0)
        cache = cache if cache is not None else head.make_cache()
        ids = mx.array([prompt[reused:]], mx.uint32)
        _prefill(head, head.stage, ids, cache, PREFILL_STEP, self.watchdog.watch)
        if self.prefix is not None:
            self.prefix.put(prompt, cache)
        return cache, reused

    def _segment(self) -> None:
        """Decode the micro-batches until the final rank ends the segment: at
        once when a request waits and there is room, half the rows have ended
        or the server stops; else where every row reaches its token limit."""
        batches = [b for b in self.batches if b.rows]
        if not batches:
            return
        eos = self.tokenizer.eos_token_ids
        seqs = self.seqs

        def sample(m: int, logits: mx.array) -> tuple[mx.array, mx.array]:
            return sample_rows(logits, [seqs[row].sampler for row in batches[m].rows])

        def should_end(left: list[int]) -> bool:
            running = sum(not s.done for s in seqs.values())
            ended = len(seqs) - running
            waiting = not self.jobs.empty() and running < self.max_batch
            if running == 0 or waiting or 2 * ended >= len(seqs) or self._stopping.is_set():
                return True
            # Or when every row reaches its token limit within the positions the
            # end computes anyway: the next request then waits for none.
            return all(
                seqs[row].done or seqs[row].reply.left() <= left[m]
                for m, batch in enumerate(batches)
                for row in batch.rows
            )

        for m, rows, logprobs in decode(
            self.head, batches, sample=sample, should_end=should_end, watch=self.watchdog.watch
        ):
            if not self.head.is_final:
                continue
            batch = batches[m]
            for i, (token, flag) in enumerate(rows):
                batch.inputs[i] = token
                seq = seqs[batch.rows[i]]
                if not seq.done:
                    seq.take(token, flag, None if logprobs is None else logprobs[i], eos)


@attrs.define(eq=False)
class _Seq:
    """A request decoding in the continuous batch (final rank)."""

    reply: _Reply
    sampler: Any  # its row_sampler, or None for greedy
    done: bool = False

    def take(self, token: int, flag: int, logprobs: mx.array | None, eos: Any) -> None:
        """The row's next token: text for the client, or its end."""
        reply = self.reply
        reply.started(reply.produced)
        if flag & NON_FINITE and reply.produced == 0:
            reply.fail(NON_FINITE_MESSAGE, 500)
        elif token not in eos:
            if not reply.stopping():
                reply.add(token, logprobs)
            if reply.left() > 0 and not reply.stopping():
                return
        self.done = True
        reply.close()


class _Reply:
    """One request's answer on the final rank: text pieces with stop strings
    held back, log probabilities, and the last event, as tokens come."""

    def __init__(
        self, engine: Engine, job: Job, prompt_tokens: int, reused: int, max_tokens: int
    ) -> None:
        self.engine, self.job = engine, job
        self.prompt_tokens, self.reused, self.max_tokens = prompt_tokens, reused, max_tokens
        self.detokenizer = engine.tokenizer.detokenizer
        self.detokenizer.reset()
        self.text, self.sent, self.produced = "", 0, 0
        self.scored: list[dict[str, Any]] = []  # log probabilities not yet sent
        self.finish: str | None = None
        self.tic = time.perf_counter()
        self.prompt_time = 0.0

    def left(self) -> int:
        """Tokens this request may still produce."""
        return self.max_tokens - self.produced

    def stopping(self) -> bool:
        """Whether the final rank wants this request to end (a stop string, a client gone)."""
        return self.finish is not None or self.job.cancelled.is_set()

    def started(self, step: int) -> None:
        if step == 0:
            self.prompt_time = time.perf_counter() - self.tic

    def add(self, token: int, logprobs: mx.array | None) -> None:
        job, stops = self.job, self.job.stop
        try:
            self.produced += 1
            if job.logprobs is not None and logprobs is not None:
                self.scored.append(self.engine._scored(token, logprobs, job.logprobs))
            self.detokenizer.add_token(token)
            self.text += self.detokenizer.last_segment
            hit = [i for i in (self.text.find(s) for s in stops) if i >= 0]
            if hit:
                self._send(min(hit))
                self.finish = "stop"
            else:
                self._send(len(self.text) - _held_back(self.text, stops))
        except Exception as e:  # keep the ranks in step; fail this request only
            self.fail(f"{type(e).__name__}: {e}", 500)

    def fail(self, message: str, status: int) -> None:
        self.finish = "error"
        self.job.emit("error", message, status)

    def _send(self, upto: int, *, last: bool = False) -> None:
        if upto > self.sent or (last and self.scored):
            self.job.emit("text", self.text[self.sent : upto], self.scored)
            self.sent, self.scored = max(self.sent, upto), []

    def close(self) -> None:
        """The last event: done (stop or length), or nothing more after an error
        or a client that left."""
        engine, job = self.engine, self.job
        if job.cancelled.is_set() and self.finish is None:
            if engine._stopping.is_set():
                job.emit("error", "the server is shutting down", 503)
                return
            engine.cancelled += 1
            log.info("%s: cancelled by its client after %d tokens", job.id, self.produced)
            return
        if self.finish is None:
            self.detokenizer.finalize()
            self.text += self.detokenizer.last_segment
            self._send(len(self.text), last=True)
            self.finish = "length" if self.produced >= self.max_tokens else "stop"
        elif self.finish == "stop":
            self._send(self.sent, last=True)  # the log probabilities up to the stop
        if self.finish == "error":
            return
        elapsed = time.perf_counter() - self.tic
        usage = {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.produced,
            "total_tokens": self.prompt_tokens + self.produced,
            "prompt_tokens_details": {"cached_tokens": self.reused},
        }
        job.emit("done", self.finish, usage)
        engine.served += 1
        produced = self.produced
        decode_tps = (produced - 1) / max(elapsed - self.prompt_time, 1e-9) if produced > 1 else 0
        log.info(
            "%s: %d prompt tokens (%d cached) at %.1f tokens/s, %d generated at %.2f tokens/s, "
            "finish %s",
            job.id,
            self.prompt_tokens,
            self.reused,
            (self.prompt_tokens - self.reused) / max(self.prompt_time, 1e-9),
            produced,
            decode_tps,
            self.finish,
        )
