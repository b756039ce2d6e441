"""Let waiting ranks sleep instead of spinning, where ranks share cores.

MLX's ring backend polls its sockets: a rank waiting in a collective or a
receive keeps a core busy for the whole wait. In a pipeline decoding one
sequence, one rank computes at a time and the others wait: with the head
elided, a non-final rank waits for most of every token while the final rank
runs its last layers and the head. On machines of their own that costs
nothing; where several ranks share a machine's cores (local runs, a small
machine) the waiting ranks take cores from the rank that computes.

A rank that paces itself dispatches nothing that would wait on a peer until it
has slept (without holding a core) through part of the wait the previous steps
showed: the wait for the token on non-final ranks, and for the previous
stage's hidden state on ranks that receive one. It then spins for the rest.
The sleep is half the shortest recent wait. Half, not most: the token
broadcast is one collective of all ranks, so a rank that wakes late delays
the token for everyone, and the wait it then measures includes its own lateness;
the shortest recent wait lets the estimate shrink at once when the pipeline
gets faster, and a slow step never makes a rank sleep longer.
"""

from __future__ import annotations

import math
import os
import select
import socket
import stat
import time
from collections import deque
from collections.abc import Sequence
from typing import Any, Literal

from ._hostfile import ring_hosts

__all__ = [
    "Arrivals",
    "Inbox",
    "Pace",
    "Poll",
    "WaitMode",
    "ranks_on_this_host",
    "should_pace",
    "should_wake",
    "waker",
]

WaitMode = Literal["auto", "spin", "sleep", "wake"]
WAIT_MODES: tuple[str, ...] = ("auto", "spin", "sleep", "wake")


class Pace:
    """Sleeps through part of a wait whose length the previous steps showed.

    Call :meth:`issued` when the wait starts (this rank's stage work of a step
    is dispatched, or its token is there), :meth:`sleep` before evaluating
    what it waits for, and :meth:`arrived` once that is there.

    Attributes:
        fraction: The share of the predicted wait to sleep through.
        history: How many recent waits the prediction looks at.
        slept: Seconds slept so far.
    """

    def __init__(self, *, fraction: float = 0.5, history: int = 4) -> None:
        self.fraction = fraction
        self.history = history
        self.slept = 0.0
        self._waits: deque[float] = deque(maxlen=history)
        self._since = time.perf_counter()

    def issued(self) -> None:
        self._since = time.perf_counter()

    def sleep(self, scale: float = 1.0) -> None:
        """Sleep through the predicted part of a wait of ``scale`` units (tokens)."""
        if len(self._waits) < 2:
            return  # no prediction yet
        left = self._since + self.fraction * min(self._waits) * scale - time.perf_counter()
        # Below a millisecond the wake-up would cost more than the spin saves.
        if left > 1e-3:
            time.sleep(left)
            self.slept += left

    def arrived(self, scale: float = 1.0) -> None:
        self._waits.append((time.perf_counter() - self._since) / scale)


class Inbox:
    """The ring backend's sockets, to wait on for a message before MLX does.

    MLX's ring backend reads a socket only once a receive is queued on it;
    until then a message stays in the kernel's buffer, where ``poll(2)`` sees
    it. A loop that polls the sockets (the GIL released) before it evaluates
    its receive wakes as the first bytes come in, and MLX's own wait is then
    microseconds long: too short for MLX CUDA to notice it late.

    Polling only tells when to evaluate: MLX still does the receive, so a
    socket that turns readable for another reason costs nothing but the poll.
    """

    def __init__(self, fds: Sequence[int]) -> None:
        if not fds:
            raise ValueError("an Inbox needs at least one socket.")
        self.fds = tuple(fds)
        self._poll = select.poll()
        for fd in self.fds:
            self._poll.register(fd, select.POLLIN)

    def wait(self, timeout: float) -> bool:
        """Wait until a socket has something to read (or was closed), at most
        ``timeout`` seconds; whether one has."""
        return bool(self._poll.poll(math.ceil(max(timeout, 0.0) * 1000)))

    @classmethod
    def find(cls, environ: dict[str, str] | None = None) -> Inbox | None:
        """This rank's connections to its ring neighbours, if it can tell.

        Matches the process's open TCP sockets against the ring backend's
        host file (``MLX_HOSTFILE``): the backend accepts its previous rank's
        connections on this rank's addresses and connects to the next rank's.
        ``None`` without a host file (another backend) or a match.
        """
        hosts = _hostfile(environ)
        if hosts is None or not hasattr(select, "poll"):
            return None
        entries, rank = hosts
        try:
            mine = _endpoints(tuple(entries[rank]))
            nexts = _endpoints(tuple(entries[(rank + 1) % len(entries)]))
        except IndexError:
            return None
        fds = [
            fd
            for fd, local, peer in _open_tcp_sockets()
            if peer is not None and (local in mine or peer in nexts)
        ]
        return cls(fds) if fds else None


class Poll:
    """Polls an :class:`Inbox` until the next message comes in, before MLX
    receives it; gives the sockets up once they prove blind to the messages.

    Call :meth:`wait` before evaluating a receive and :meth:`done` once MLX
    has it. A message that MLX has at once after a poll found nothing in
    ``LIMIT`` seconds was not the sockets' to see (another backend's, or read
    ahead); twice in a row, and the polls stop. A message later than the
    limit (a stopped peer) is left to MLX and the watchdog.

    Attributes:
        inbox: The sockets, or ``None`` once given up (or none were found).
    """

    LIMIT = 1.0
    STALE = 5e-4

    def __init__(self, inbox: Inbox | None) -> None:
        self.inbox = inbox
        self._gave_up: float | None = None
        self._stale = 0

    def wait(self) -> None:
        if self.inbox is not None:
            found = self.inbox.wait(self.LIMIT)
            self._gave_up = None if found else time.perf_counter()

    def done(self) -> None:
        if self._gave_up is not None:
            quick = time.perf_counter() - self._gave_up < self.STALE
            self._stale = self._stale + 1 if quick else 0
            if self._stale >= 2:
                self.inbox = None
        elif self.inbox is not None:
            self._stale = 0
        self._gave_up = None


def _hostfile(environ: dict[str, str] | None = None) -> tuple[list[list[str]], int] | None:
    """The ring backend's host file (:func:`ring_hosts`) and this rank (``MLX_RANK``)."""
    env = os.environ if environ is None else environ
    hosts, rank = ring_hosts(environ), env.get("MLX_RANK")
    if hosts is None or rank is None:
        return None
    try:
        return hosts, int(rank)
    except ValueError:
        return None


# Addresses of host file entries, once all of an entry's names resolved.
_resolved: dict[tuple[str, ...], frozenset[tuple[str, int]]] = {}


def _endpoints(entries: tuple[str, ...]) -> frozenset[tuple[str, int]]:
    # Kept: every generation looks its sockets up again (a server's every
    # request), and a host name would cost a resolver's round trip each time.
    # A failed lookup is not kept: the next generation tries again.
    if (known := _resolved.get(entries)) is not None:
        return known
    found: set[tuple[str, int]] = set()
    failed = False
    for entry in entries:
        host, _, port = entry.rpartition(":")
        try:
            infos = socket.getaddrinfo(host.strip("[]"), int(port), type=socket.SOCK_STREAM)
        except (OSError, ValueError):
            failed = True
            continue
        found.update((str(info[4][0]), int(info[4][1])) for info in infos)
    if not failed:
        _resolved[entries] = frozenset(found)
    return frozenset(found)


_Address = tuple[str, int]


def _open_tcp_sockets() -> list[tuple[int, _Address, _Address | None]]:
    """``(fd, local address, peer address)`` of this process's TCP sockets."""
    where = "/proc/self/fd" if os.path.isdir("/proc/self/fd") else "/dev/fd"
    try:
        names = os.listdir(where)
    except OSError:
        return []
    found: list[tuple[int, _Address, _Address | None]] = []
    for name in names:
        fd = int(name)
        try:
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                continue
            sock = socket.socket(fileno=fd)
        except OSError:
            continue  # closed since the listing (the listing's own), or not a socket
        try:
            if sock.type != socket.SOCK_STREAM or sock.family not in (
                socket.AF_INET,
                socket.AF_INET6,
            ):
                continue
            local = sock.getsockname()[:2]
            try:
                peer = sock.getpeername()[:2]
            except OSError:
                peer = None  # listening
            found.append(
                (fd, (str(local[0]), int(local[1])), peer and (str(peer[0]), int(peer[1])))
            )
        except OSError:
            continue
        finally:
            sock.detach()  # the socket is MLX's: never close it
    return found


class Arrivals:
    """Wakes a decode loop as its next stage message comes, on MLX CUDA.

    MLX CUDA waits for the CPU stream's work (where the ring backend receives)
    by polling with a backoff whose sleeps grow with the time already waited:
    a rank that starts waiting for a message a whole ring round before it
    comes notices it late, by up to about a millisecond, at every hop. The
    probe in ``tests/gpu/hop_probe.py`` measured 1.3-1.5x the links' latency
    per hop at 1 ms on an H200 host, 1.03-1.10x with a prompt wait.

    So the loop waits on its own first, holding nothing (the watchdog and the
    heartbeats run), and hands the receive to MLX only once its message is
    there or nearly: it sleeps until a little before the message is due, one
    step period after the last (the shortest of the recent periods: a late
    one, such as a step the reader of the tokens held up, never makes the
    loop sleep longer); then, with an :class:`Inbox` (the ring backend), it
    polls the sockets until the message comes in.

    How early to wake is a trade: MLX notices a message late by a share of
    the wait left, and a rank that wakes after its message came delays every
    rank. On the H200 host, with ranks sharing one GPU, waking ``share``
    (15%) of the period early brought a 3-rank pipeline's link cost at 1 ms
    to 1.05x the floor of N hops (docs/benchmarks.md). Polling the rest of
    the way took 0.1-0.8 ms more off each round of a bare ring of 2 and 4
    ranks than either sleeping or polling alone (``tests/gpu/hop_probe.py``);
    the sleep keeps the poll, whose wake-up the threads behind MLX's receive
    follow one by one, short, and the poll keeps MLX's own wait short.

    Attributes:
        poll: Polls the sockets (:class:`Poll`); its ``inbox`` is ``None`` to
            sleep by the prediction alone.
        margin: Seconds before the predicted arrival to stop sleeping, at least.
        share: The share of the period to stop sleeping before it, if more.
        history: How many recent periods the prediction looks at.
    """

    # Below this a sleep costs more than it saves: time.sleep wakes ~0.1 ms late.
    MIN_SLEEP = 5e-4

    def __init__(
        self,
        *,
        inbox: Inbox | None = None,
        margin: float = 3e-4,
        share: float = 0.15,
        history: int = 8,
    ) -> None:
        self.poll = Poll(inbox)
        self.margin = margin
        self.share = share
        self._periods: deque[float] = deque(maxlen=history)
        self._last: float | None = None

    @property
    def inbox(self) -> Inbox | None:
        """The sockets it polls, until it finds they never see the message."""
        return self.poll.inbox

    def sleep(self) -> None:
        """Sleep until a little before the next message is due, then (with an
        inbox) poll until it is there."""
        if self._last is not None and len(self._periods) >= 2:
            period = min(self._periods)
            left = self._last + period - max(self.margin, self.share * period)
            left -= time.perf_counter()
            if left > self.MIN_SLEEP:
                time.sleep(left)
        self.poll.wait()

    def take(self, arrival: Any) -> None:
        """Wait for ``arrival`` (a receive): sleep, poll, then have MLX receive it."""
        import mlx.core as mx

        self.sleep()
        mx.eval(arrival)
        self.arrived()

    def arrived(self) -> None:
        now = time.perf_counter()
        self.poll.done()
        if self._last is not None:
            self._periods.append(now - self._last)
        self._last = now


def waker(wait: str, *, size: int) -> Arrivals | None:
    """What a decode loop waits with before each stage message, if it waits
    on its own first (see :func:`should_wake`): sleeping until the message is
    nearly due, then polling the ring backend's sockets where it finds them.

    With ``"auto"`` on a CPU host that runs more ranks than it has cores, only
    where it finds them: waiting in poll(2) holds no core, which the ranks
    that compute need; without them the loop paces instead (:class:`Pace`).
    """
    if not should_wake(wait, size=size):
        return None
    inbox = Inbox.find()
    if inbox is None and wait == "auto" and not _on_mlx_cuda():
        return None
    return Arrivals(inbox=inbox)


def should_wake(wait: str, *, size: int) -> bool:
    """Whether a decode loop waits on its own for each stage message before
    dispatching its step (:class:`Arrivals`): with ``wait="wake"``, or
    ``"auto"`` on MLX CUDA and on a CPU host that runs more ranks than it has
    cores."""
    if wait not in WAIT_MODES:
        raise ValueError(f"wait must be one of {list(WAIT_MODES)}; got {wait!r}.")
    if size == 1 or wait not in ("auto", "wake"):
        return False
    return wait == "wake" or _on_mlx_cuda() or _crowded_cpu()


def _on_mlx_cuda() -> bool:
    import mlx.core as mx

    cuda = getattr(mx, "cuda", None)
    return mx.default_device() == mx.gpu and cuda is not None and bool(cuda.is_available())


def _crowded_cpu() -> bool:
    """Whether ranks compute on the CPU of a host that runs more of them than
    it has cores."""
    import mlx.core as mx

    if mx.default_device() != mx.cpu:
        return False  # the GPU computes; a polling thread takes no GPU time
    local = ranks_on_this_host()
    return local is not None and local > (os.cpu_count() or 1)


def ranks_on_this_host(environ: dict[str, str] | None = None) -> int | None:
    """How many ranks of the ring backend run on this rank's host, if it can tell.

    Reads the host file that ``mlx.launch`` (and ppwrap's local launcher) hands
    to the ring backend: one list of ``ip:port`` addresses per rank.
    """
    hosts = _hostfile(environ)
    if hosts is None:
        return None
    entries, rank = hosts
    try:
        ips = [addresses[0].rsplit(":", 1)[0] for addresses in entries]
        return ips.count(ips[rank])
    except IndexError:
        return None


def should_pace(wait: str, *, size: int) -> bool:
    """Whether the ranks of a pipeline pace their waits (see :class:`Pace`).

    ``"auto"`` paces a pipeline on the CPU whose host runs more ranks than it
    has cores (its decode loop wakes instead where it can: :func:`waker`);
    ``"sleep"`` forces it on, ``"spin"`` and ``"wake"`` off.
    """
    if wait not in WAIT_MODES:
        raise ValueError(f"wait must be one of {list(WAIT_MODES)}; got {wait!r}.")
    if size == 1 or wait in ("spin", "wake"):
        return False
    return wait == "sleep" or _crowded_cpu()
