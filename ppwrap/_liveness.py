"""Heartbeats between ranks, apart from MLX's data path: slow is not dead.

A rank blocked in an MLX evaluation cannot tell a peer that computes a long
prefill from one that is dead, suspended or out of step: both look like a
transfer that does not come. So each rank also sends its peers a small UDP
datagram twice a second, from a thread of its own, saying what it is doing:
the operation it is in (as its :class:`ppwrap.Watchdog` names it), for how
long, whether it is computing or waiting, and which generation it is in. A
suspended or dead rank stops sending (``SIGSTOP`` stops every thread); a rank
out of step says so by what it reports; a rank that computes says that too.
The watchdog reads these reports to decide (see ``ppwrap._watchdog``).

Each rank listens on the UDP port with the number of its MLX TCP port, on the
address its MLX host file gives it, and sends to its peers' addresses there.
``PPWRAP_LIVENESS`` (``host:port`` per rank, comma-separated, in rank order)
overrides that, for example when the MLX traffic goes through relays.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import attrs

from ._hostfile import ring_hosts

__all__ = ["ACTIVITY", "Activity", "Liveness", "PeerState", "addresses"]

log = logging.getLogger("ppwrap")

ENV = "PPWRAP_LIVENESS"
INTERVAL = 0.5  # seconds between heartbeats


@attrs.define
class Activity:
    """What this process's pipeline loop is doing: the operation being watched.

    Every :class:`ppwrap.Watchdog` of the process writes here, and the
    heartbeats carry it, so peers see the operation whichever watchdog watches it.
    """

    what: str | None = None
    since: float = 0.0
    busy: bool = False
    generation: int = 0
    _lock: threading.Lock = attrs.field(factory=threading.Lock, repr=False)

    @contextmanager
    def doing(self, what: str, *, busy: bool) -> Iterator[None]:
        with self._lock:
            outer = (self.what, self.since, self.busy)
            self.what, self.since, self.busy = what, time.monotonic(), busy
        try:
            yield
        finally:
            with self._lock:
                self.what, self.since, self.busy = outer

    def begin_generation(self) -> None:
        """Count one more generation; every rank runs the same ones in order."""
        with self._lock:
            self.generation += 1

    def report(self) -> dict[str, Any]:
        with self._lock:
            seconds = time.monotonic() - self.since if self.what is not None else 0.0
            return {"w": self.what, "s": seconds, "b": self.busy, "g": self.generation}


#: The process's activity (one pipeline loop per process).
ACTIVITY = Activity()


@attrs.frozen
class PeerState:
    """A peer's last heartbeat.

    Attributes:
        rank: The peer's rank.
        pid: Its process id (on its host).
        what: The operation it was in; ``None`` between operations.
        seconds: How long it had been in it when it sent the heartbeat.
        busy: Whether that operation computes (a prefill chunk) rather than waits.
        generation: How many generations it had begun.
        heard: This host's monotonic time when the heartbeat came.
        notices: How many notices it had given (see :meth:`Liveness.notify`).
    """

    rank: int
    pid: int
    what: str | None
    seconds: float
    busy: bool
    generation: int
    heard: float
    notices: int = 0

    def silent_for(self, now: float | None = None) -> float:
        return (time.monotonic() if now is None else now) - self.heard

    def describe(self, now: float | None = None) -> str:
        doing = "between operations" if self.what is None else f"in {self.what!r}"
        kind = " (computing)" if self.busy else ""
        return (
            f"rank {self.rank} (pid {self.pid}) was {doing}{kind} at generation "
            f"{self.generation}, heard {self.silent_for(now):.1f} s ago"
        )


def addresses(environ: dict[str, str] | None = None) -> list[tuple[str, int]] | None:
    """Each rank's heartbeat address, from ``PPWRAP_LIVENESS`` or MLX's ring host file.

    Returns:
        ``(host, port)`` per rank, or ``None`` when neither says (a single
        process, or a backend whose host file has another form).
    """
    env = os.environ if environ is None else environ
    if spec := env.get(ENV):
        found = []
        for item in spec.split(","):
            host, _, port = item.strip().rpartition(":")
            found.append((host, int(port)))
        return found
    hosts = ring_hosts(environ)
    if hosts is None:
        return None
    try:
        found = []
        for entry in hosts:
            host, _, port = entry[0].rpartition(":")
            found.append((host, int(port)))
        return found
    except ValueError:
        return None


class Liveness:
    """This rank's heartbeats to its peers, and what it heard from them.

    Args:
        rank: This rank.
        peers: Every rank's ``(host, port)``, this one's included.
        activity: What to report (default the process's :data:`ACTIVITY`).
        interval: Seconds between heartbeats.

    Raises:
        OSError: This rank's address cannot be bound.
    """

    def __init__(
        self,
        rank: int,
        peers: list[tuple[str, int]],
        *,
        activity: Activity | None = None,
        interval: float = INTERVAL,
    ) -> None:
        self.rank = rank
        self.size = len(peers)
        self.interval = interval
        self.started = time.monotonic()
        self._peers = peers
        self._activity = activity or ACTIVITY
        self._heard: dict[int, PeerState] = {}
        self._lock = threading.Lock()
        self._news = threading.Condition(self._lock)
        self._notices = 0
        self._pid = os.getpid()
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind(peers[rank])
        self._sock.settimeout(interval)
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ppwrap-liveness", daemon=True)
        self._thread.start()

    def peers(self) -> dict[int, PeerState]:
        """The last heartbeat of every peer heard from so far, by rank."""
        with self._lock:
            return dict(self._heard)

    def notify(self) -> None:
        """Give one more notice: a heartbeat goes out at once, with the count.

        A peer waiting for it in :meth:`wait_notice` wakes within a link's
        latency; if the datagram is lost, the next heartbeat carries the count.
        """
        with self._lock:
            self._notices += 1
        self._send()

    def wait_notice(self, rank: int, count: int, timeout: float) -> bool:
        """Wait until ``rank`` has given ``count`` notices; ``False`` on timeout."""
        deadline = time.monotonic() + timeout
        with self._news:
            while True:
                heard = self._heard.get(rank)
                if heard is not None and heard.notices >= count:
                    return True
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._news.wait(left)

    def close(self) -> None:
        self._closed.set()
        self._thread.join(timeout=2 * self.interval + 1)
        self._sock.close()

    def _send(self) -> None:
        with self._lock:
            notices = self._notices
        report = {"r": self.rank, "p": self._pid, "n": notices, **self._activity.report()}
        message = json.dumps(report).encode()
        for r, address in enumerate(self._peers):
            if r != self.rank:
                try:
                    self._sock.sendto(message, address)
                except OSError:  # unreachable for now: a heartbeat is worth no error
                    pass

    def _run(self) -> None:
        due = 0.0
        while not self._closed.is_set():
            now = time.monotonic()
            if now >= due:
                self._send()
                due = now + self.interval
            try:
                data, _ = self._sock.recvfrom(4096)
            except (TimeoutError, OSError):
                continue
            self._take(data)

    def _take(self, data: bytes) -> None:
        try:
            m = json.loads(data)
            state = PeerState(
                rank=int(m["r"]),
                pid=int(m["p"]),
                what=m["w"],
                seconds=float(m["s"]),
                busy=bool(m["b"]),
                generation=int(m["g"]),
                heard=time.monotonic(),
                notices=int(m.get("n", 0)),
            )
        except (ValueError, KeyError, TypeError):
            return  # not ours
        if 0 <= state.rank < self.size and state.rank != self.rank:
            with self._news:
                self._heard[state.rank] = state
                self._news.notify_all()


_shared: Liveness | None = None
_shared_lock = threading.Lock()


def shared(on_error: Callable[[str], None] | None = None) -> Liveness | None:
    """The process's heartbeats, started on first use; ``None`` without peers.

    Only one per process: every watchdog of the process reads the same one.
    """
    global _shared
    with _shared_lock:
        if _shared is not None:
            return _shared
        found = addresses()
        rank = os.environ.get("MLX_RANK")
        if found is None or rank is None or len(found) < 2:
            return None
        try:
            _shared = Liveness(int(rank), found)
        except (OSError, ValueError, IndexError) as e:
            say = on_error or log.warning
            say(f"ppwrap: no heartbeats between ranks ({e}); the watchdog times steps only")
            return None
        return _shared
