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

import json
import os
import time
from collections import deque
from typing import Literal

__all__ = ["Arrivals", "Pace", "WaitMode", "ranks_on_this_host", "should_pace", "should_wake"]

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


class Arrivals:
    """Wakes a decode loop just before its next stage message, on MLX CUDA.

    MLX CUDA waits for the CPU stream's work (where the ring backend receives)
    by polling with a backoff whose sleeps grow with the time already waited:
    a rank that starts waiting for a message a whole ring round before it
    comes notices it late, by up to about a millisecond, at every hop. The
    probe in ``tests/gpu/hop_probe.py`` measured 1.3-1.5x the links' latency
    per hop at 1 ms on an H200 host, 1.03-1.10x with a prompt wait.

    So the loop sleeps (holding nothing: the watchdog and the heartbeats run)
    until just before the message is due, then waits the rest in MLX, whose
    backoff on so short a wait is short too. Messages come once per step; the
    next is due one step period after the last, the shortest of the recent
    periods (a late one, such as a step the reader of the tokens held up,
    never makes the loop sleep longer).

    How early to wake is a trade: MLX notices a message late by a share of
    the wait left, and a rank that wakes after its message came delays every
    rank. On the H200 host, with ranks sharing one GPU, waking ``share`` (15%)
    of the period early brought a 3-rank pipeline's link cost at 1 ms to
    1.05x the floor of N hops (1.64x without waking, another run); waking
    0.4 ms and 1% early was better at 5 ms but worse at 1 ms (4 ranks:
    1.57x): steps there vary by more than that (docs/benchmarks.md).

    Attributes:
        margin: Seconds before the predicted arrival to stop sleeping, at least.
        share: The share of the period to stop sleeping before it, if more.
        history: How many recent periods the prediction looks at.
    """

    # Below this a sleep costs more than it saves: time.sleep wakes ~0.1 ms late.
    MIN_SLEEP = 5e-4

    def __init__(self, *, margin: float = 3e-4, share: float = 0.15, history: int = 8) -> None:
        self.margin = margin
        self.share = share
        self._periods: deque[float] = deque(maxlen=history)
        self._last: float | None = None

    def reset(self) -> None:
        """Forget the last arrival (a new generation starts; no period yet)."""
        self._last = None

    def sleep(self) -> None:
        """Sleep until a little before the next message is due."""
        if self._last is None or len(self._periods) < 2:
            return
        period = min(self._periods)
        left = self._last + period - max(self.margin, self.share * period) - time.perf_counter()
        if left > self.MIN_SLEEP:
            time.sleep(left)

    def arrived(self) -> None:
        now = time.perf_counter()
        if self._last is not None:
            self._periods.append(now - self._last)
        self._last = now


def should_wake(wait: str, *, size: int) -> bool:
    """Whether a decode loop sleeps until just before each stage message
    (:class:`Arrivals`): with ``wait="wake"``, or ``"auto"`` on MLX CUDA."""
    if wait not in WAIT_MODES:
        raise ValueError(f"wait must be one of {list(WAIT_MODES)}; got {wait!r}.")
    if size == 1 or wait not in ("auto", "wake"):
        return False
    if wait == "wake":
        return True
    import mlx.core as mx

    cuda = getattr(mx, "cuda", None)
    return mx.default_device() == mx.gpu and cuda is not None and bool(cuda.is_available())


def ranks_on_this_host(environ: dict[str, str] | None = None) -> int | None:
    """How many ranks of the ring backend run on this rank's host, if it can tell.

    Reads the host file that ``mlx.launch`` (and ppwrap's local launcher) hands
    to the ring backend: one list of ``ip:port`` addresses per rank.
    """
    env = os.environ if environ is None else environ
    path, rank = env.get("MLX_HOSTFILE"), env.get("MLX_RANK")
    if not path or rank is None:
        return None
    try:
        with open(path) as f:
            hosts = json.load(f)
        ips = [str(addresses[0]).rsplit(":", 1)[0] for addresses in hosts]
        return ips.count(ips[int(rank)])
    except (OSError, ValueError, TypeError, IndexError, KeyError):
        return None


def should_pace(wait: str, *, size: int) -> bool:
    """Whether the ranks of a pipeline pace their waits (see :class:`Pace`).

    ``"auto"`` paces a pipeline on the CPU whose host runs more ranks than it
    has cores; ``"sleep"`` forces it on, ``"spin"`` and ``"wake"`` off.
    """
    if wait not in WAIT_MODES:
        raise ValueError(f"wait must be one of {list(WAIT_MODES)}; got {wait!r}.")
    if size == 1 or wait in ("spin", "wake"):
        return False
    if wait == "sleep":
        return True
    import mlx.core as mx

    if mx.default_device() != mx.cpu:
        return False  # the GPU computes; a polling thread takes no GPU time
    local = ranks_on_this_host()
    return local is not None and local > (os.cpu_count() or 1)
