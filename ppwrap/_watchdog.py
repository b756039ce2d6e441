"""A progress watchdog: a rank stuck in one operation ends itself, loudly.

MLX's collectives have no timeout, and a peer that is alive but out of step (or
suspended) makes them wait forever. The watchdog watches the loop itself: each
blocking operation runs inside :meth:`Watchdog.watch`. Where the ranks can hear
each other's heartbeats (``ppwrap._liveness``; any multi-rank run whose MLX host
file or ``PPWRAP_LIVENESS`` gives addresses), it tells slow from stuck:

- a peer that has gone silent (dead or suspended) ends the rank within
  ``min(timeout, 10 s)``, whatever this rank is doing;
- an operation past the timeout ends the rank when no rank is computing (every
  one waits: someone is out of step) or a peer is in another generation; it
  does not while a rank still computes (a long prefill on a slow host).

Without heartbeats an operation past the timeout ends the rank, as it must
assume the worst. Ending means printing what stalled and exiting with
:data:`STALL_EXIT_CODE`, so the launcher tears the other ranks down.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import attrs

from . import _liveness
from ._liveness import ACTIVITY, PeerState

__all__ = ["STALL_EXIT_CODE", "Verdict", "Watchdog", "judge"]

STALL_EXIT_CODE = 75  # EX_TEMPFAIL: the rank did nothing wrong; a peer did.
# Seconds of silence after which a peer that was heard counts as dead or suspended.
SILENT_AFTER = 10.0
# Never less: heartbeats come every half second, and a loaded host delays some.
MIN_SILENT_AFTER = 2.0


@attrs.frozen
class Verdict:
    """What the watchdog makes of the operation being watched.

    Attributes:
        stalled: The rank must end: a peer is dead, suspended or out of step.
        slow: Past the timeout, but a rank is still computing: keep waiting.
        message: What was found, for the log, ``/health`` and the exit.
    """

    stalled: bool
    slow: bool
    message: str


def judge(
    what: str,
    elapsed: float,
    *,
    timeout: float,
    busy: bool = False,
    generation: int = 0,
    peers: dict[int, PeerState] | None = None,
    size: int = 0,
    now: float | None = None,
) -> Verdict | None:
    """Judge an operation that has run ``elapsed`` seconds; ``None``: all is well.

    Args:
        what: The operation, as its watcher named it.
        elapsed: Seconds it has run.
        timeout: Seconds any operation may take when no rank is computing.
        busy: Whether this rank's operation computes (rather than waits).
        generation: This rank's generation count.
        peers: The peers' last heartbeats; ``None`` without heartbeats.
        size: The number of ranks (with ``peers``).
        now: The monotonic time the heartbeats are judged at.
    """
    silent_after = max(min(timeout, SILENT_AFTER), MIN_SILENT_AFTER)
    if peers is not None:
        for peer in peers.values():
            if peer.silent_for(now) > silent_after:
                return Verdict(
                    True,
                    False,
                    f"{what}: rank {peer.rank} has sent no heartbeat for "
                    f"{peer.silent_for(now):.0f} s: it is dead or suspended "
                    f"(last heard: {peer.describe(now)}).",
                )
    if elapsed < timeout:
        return None
    if peers is None or len(peers) < size - 1:
        return Verdict(
            True,
            False,
            f"{what} made no progress for {timeout:.0f} s. A peer is dead, suspended or "
            f"out of step (running other calls than this rank).",
        )
    states = "; ".join(p.describe(now) for p in sorted(peers.values(), key=lambda p: p.rank))
    apart = [p for p in peers.values() if p.generation != generation]
    if apart:
        return Verdict(
            True,
            False,
            f"{what} made no progress for {elapsed:.0f} s and rank {apart[0].rank} is out of "
            f"step: it is at generation {apart[0].generation}, this rank at {generation}. "
            f"Peers: {states}.",
        )
    computing = [p for p in peers.values() if p.busy]
    if busy or computing:
        who = "this rank" if busy else f"rank {computing[0].rank}"
        doing = what if busy else computing[0].what
        return Verdict(False, True, f"busy: {who} is computing {doing} ({elapsed:.0f} s so far)")
    return Verdict(
        True,
        False,
        f"{what} made no progress for {elapsed:.0f} s while every rank is alive and none "
        f"computes: a peer is out of step (waiting on another call than this rank). "
        f"Peers: {states}.",
    )


class Watchdog:
    """Ends this process when one watched operation stalls.

    Args:
        timeout: Seconds an operation may wait when no rank computes; well
            under a minute suits a decode step. With heartbeats (see the
            module), a rank that computes (a long prefill) is given the time
            it needs, and a silent peer is caught sooner.
        rank: This rank, for the message.
        exit: Exit the process when an operation stalls (the default). With
            ``False`` the stall is only reported: for tests and for callers
            that handle it themselves through :attr:`stalled`.
        on_stall: Called from the watchdog's thread with the stall message
            before the process exits (a server answers its clients there).
        heartbeats: Hear the peers' heartbeats where the ranks have addresses
            (the default); ``False`` judges by the timeout alone.

    Use it around every operation that can wait on a peer::

        dog = Watchdog(20.0, rank=head.rank)
        with dog.watch("decode step 12: token broadcast"):
            mx.eval(token)
    """

    def __init__(
        self,
        timeout: float,
        *,
        rank: int = 0,
        exit: bool = True,
        on_stall: Callable[[str], None] | None = None,
        heartbeats: bool = True,
    ) -> None:
        if timeout <= 0:
            raise ValueError(f"the watchdog timeout must be positive; got {timeout}")
        self.timeout = timeout
        self.rank = rank
        self.exit = exit
        self.on_stall = on_stall
        self.heartbeats = heartbeats
        self.stalled: str | None = None
        self._what: str | None = None
        self._since = 0.0
        self._busy = False
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._liveness: _liveness.Liveness | None = None

    @contextmanager
    def watch(self, what: str, *, busy: bool = False) -> Iterator[None]:
        """Watch one operation, described by ``what`` in the stall message.

        Args:
            what: The operation.
            busy: The operation computes rather than waits on a peer (its
                receives were evaluated before it): with heartbeats, it may
                take longer than the timeout.
        """
        self._start()
        with self._lock:
            outer = self._what, self._since, self._busy
            self._what, self._since, self._busy = what, time.monotonic(), busy
        try:
            with ACTIVITY.doing(what, busy=busy):
                yield
        finally:
            with self._lock:
                self._what, self._since, self._busy = outer

    def waiting(self) -> tuple[str, float] | None:
        """The operation being watched and for how many seconds; ``None`` when idle."""
        with self._lock:
            what, since = self._what, self._since
        return None if what is None else (what, time.monotonic() - since)

    def verdict(self, timeout: float | None = None) -> Verdict | None:
        """The watched operation judged now (see :func:`judge`); ``None`` when
        idle or within bounds.

        Args:
            timeout: Judge against this bound instead of the watchdog's own
                (a health check warns before the watchdog acts).
        """
        with self._lock:
            what, since, busy = self._what, self._since, self._busy
        if what is None:
            return None
        live = self._liveness
        return judge(
            what,
            time.monotonic() - since,
            timeout=self.timeout if timeout is None else timeout,
            busy=busy,
            generation=ACTIVITY.generation,
            peers=live.peers() if live is not None else None,
            size=live.size if live is not None else 0,
        )

    def peers(self) -> dict[int, PeerState]:
        """The peers' last heartbeats (empty without heartbeats)."""
        return self._liveness.peers() if self._liveness is not None else {}

    def hear_peers(self, timeout: float = 3.0) -> list[int]:
        """Wait until every peer's heartbeat has come, at most ``timeout`` seconds.

        Returns:
            The ranks not heard from (empty also where there are no heartbeats).
        """
        self._start()
        live = self._liveness
        if live is None:
            return []
        deadline = time.monotonic() + timeout
        while True:
            missing = [r for r in range(live.size) if r != live.rank and r not in live.peers()]
            if not missing or time.monotonic() > deadline:
                return missing
            time.sleep(0.05)

    def _start(self) -> None:
        if self._thread is None:
            if self.heartbeats:
                self._liveness = _liveness.shared()
            self._thread = threading.Thread(target=self._run, name="ppwrap-watchdog", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            time.sleep(min(0.25, self.timeout / 4))
            verdict = self.verdict()
            if verdict is None or not verdict.stalled:
                continue
            with self._lock:
                self.stalled = self._what
            message = f"ppwrap: rank {self.rank} stalled: {verdict.message}"
            sys.stderr.write(f"{message} Exiting with code {STALL_EXIT_CODE}.\n")
            sys.stderr.flush()
            if self.on_stall is not None:
                try:
                    self.on_stall(message)
                except Exception as e:  # the exit below must happen regardless
                    sys.stderr.write(f"ppwrap: the stall handler failed: {e!r}\n")
            if self.exit:
                # The main thread is blocked inside a collective that no
                # exception can interrupt; only leaving the process ends it.
                os._exit(STALL_EXIT_CODE)
            return
