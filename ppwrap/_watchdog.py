"""A progress watchdog: a rank stuck in one operation ends itself, loudly.

MLX's collectives have no timeout, and a peer that is alive but out of step (or
suspended) makes them wait forever. The watchdog does not send heartbeats,
which stay green while the loop is stuck; it watches the loop itself: each
blocking operation runs inside :meth:`Watchdog.watch`, and an operation that
does not finish within the timeout makes the rank print what stalled and exit
with :data:`STALL_EXIT_CODE`, so the launcher tears the other ranks down.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

__all__ = ["STALL_EXIT_CODE", "Watchdog"]

STALL_EXIT_CODE = 75  # EX_TEMPFAIL: the rank did nothing wrong; a peer did.


class Watchdog:
    """Ends this process when one watched operation takes longer than ``timeout``.

    Args:
        timeout: Seconds an operation may take; well under a minute suits a
            decode step, a first step on a large prompt may need more.
        rank: This rank, for the message.
        exit: Exit the process when an operation stalls (the default). With
            ``False`` the stall is only reported: for tests and for callers
            that handle it themselves through :attr:`stalled`.

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
    ) -> None:
        if timeout <= 0:
            raise ValueError(f"the watchdog timeout must be positive; got {timeout}")
        self.timeout = timeout
        self.rank = rank
        self.exit = exit
        #: Called from the watchdog's thread with the stall message before the
        #: process exits (a server answers its clients there).
        self.on_stall = on_stall
        self.stalled: str | None = None
        self._what: str | None = None
        self._since = 0.0
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @contextmanager
    def watch(self, what: str) -> Iterator[None]:
        """Watch one operation, described by ``what`` in the stall message."""
        self._start()
        with self._lock:
            outer, outer_since = self._what, self._since
            self._what, self._since = what, time.monotonic()
        try:
            yield
        finally:
            with self._lock:
                self._what, self._since = outer, outer_since

    def waiting(self) -> tuple[str, float] | None:
        """The operation being watched and for how many seconds; ``None`` when idle."""
        with self._lock:
            what, since = self._what, self._since
        return None if what is None else (what, time.monotonic() - since)

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="ppwrap-watchdog", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            time.sleep(min(0.25, self.timeout / 4))
            with self._lock:
                what, since = self._what, self._since
            if what is None or time.monotonic() - since < self.timeout:
                continue
            self.stalled = what
            message = (
                f"ppwrap: rank {self.rank} stalled: {what} made no progress for "
                f"{self.timeout:.0f} s. A peer is dead, suspended or out of step "
                f"(running other calls than this rank)."
            )
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
