"""A TCP relay that delays every byte by a fixed time each way: a slow link on loopback.

The kernel here has no traffic shaping, so ``ppwrap bench --link-delay`` puts
one of these between local ranks instead: each rank's MLX host file lists its
own real address and every peer at the relay's port for that peer, so all
traffic between ranks crosses the relay. Bytes keep their order; each chunk
leaves ``delay`` seconds after it came in, whatever else is in flight, as on
a link with that one-way latency and ample bandwidth. With a ``rate`` the
link also has that bandwidth each way: a chunk first waits for the chunks
before it to go out, then takes its length over the rate to go out itself,
and arrives ``delay`` after that.

Each direction of a connection has a reader thread, which stamps every chunk
as it arrives, and a writer thread, which sends each one at its stamp plus
``delay``. The writer sleeps until just before that moment and spins the
rest: an event loop's timers, or a plain sleep, wake up to a millisecond or a
tenth of one late, which at millisecond delays is a large part of the link.

The delay can change while the ranks run (:func:`set_delay`, through the
relay's control port), and so can the rate, so that one launch measures
several links: between launches on a shared host the same run moves by more
than a short hop costs. A change applies to the chunks that come in after it.
"""

from __future__ import annotations

import math
import os
import queue
import socket
import threading
import time
from collections.abc import Sequence

__all__ = ["CONTROL_ENV", "DelayRelay", "set_delay"]

# Where ``run_local`` tells ranks behind a relay its control address (host:port).
CONTROL_ENV = "PPWRAP_RELAY_CONTROL"

# Seconds the relay keeps trying to reach a rank that does not listen yet.
CONNECT_TIMEOUT = 120.0

# time.sleep wakes up to ~0.2 ms late (timer slack, scheduling), so a writer
# sleeps until this many seconds before a chunk is due and spins the rest.
SPIN = 0.0002


def wait_until(due: float) -> None:
    """Return at ``time.perf_counter() == due``, give or take a few microseconds."""
    if (left := due - time.perf_counter() - SPIN) > 0:
        time.sleep(left)
    # sched_yield lets go of the GIL: the other threads' reads and writes go on
    # during the spin instead of waiting the interpreter's 5 ms switch interval.
    while time.perf_counter() < due:
        os.sched_yield()


def shutdown(sock: socket.socket, how: int = socket.SHUT_RDWR) -> None:
    # Wakes any thread blocked on the socket (closing it would not), and keeps
    # the descriptor until its owner closes it, so no thread uses a reused one.
    try:
        sock.shutdown(how)
    except OSError:
        pass  # already shut, or the peer is gone


class DelayRelay:
    """Forward ``127.0.0.1:relay_port[i]`` to ``127.0.0.1:targets[i]``, delayed.

    Runs on daemon threads: one per listening port, plus a few per connection.
    Use it as a context manager, or call :meth:`close`.

    Attributes:
        delay: Seconds each chunk is held, in each direction.
        rate: Bytes per second each way, or ``None`` for no limit.
        ports: The relay's listening port for each target, in order.
        control_port: Where :func:`set_delay` reaches this relay.
    """

    def __init__(self, targets: Sequence[int], delay: float, rate: float | None = None) -> None:
        if (problem := _check(delay, rate)) is not None:
            raise ValueError(problem)
        self.delay = delay
        self.rate = rate
        self._closing = threading.Event()
        self._lock = threading.Lock()
        self._socks: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._listeners = [socket.create_server(("127.0.0.1", 0)) for _ in targets]
        self.ports: list[int] = [int(s.getsockname()[1]) for s in self._listeners]
        self._control = socket.create_server(("127.0.0.1", 0))
        self.control_port = int(self._control.getsockname()[1])
        self._acceptors = [
            threading.Thread(target=self._accept, args=(s, t), daemon=True)
            for s, t in zip(self._listeners, targets, strict=True)
        ]
        self._acceptors.append(threading.Thread(target=self._serve_control, daemon=True))
        for thread in self._acceptors:
            thread.start()

    def _accept(self, listener: socket.socket, target: int) -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            if self._closing.is_set():
                conn.close()  # close()'s own connection, sent to wake us
                return
            thread = threading.Thread(target=self._serve, args=(conn, target), daemon=True)
            with self._lock:
                self._threads.append(thread)
            thread.start()

    def _serve_control(self) -> None:
        # One request per connection: a delay in seconds and optionally a
        # rate in bytes per second, answered "ok" once they apply, or an error.
        while True:
            try:
                conn, _ = self._control.accept()
            except OSError:
                return
            with conn:
                if self._closing.is_set():
                    return
                conn.settimeout(5)
                try:
                    text = conn.makefile("r").readline().strip()
                    try:
                        delay, *rest = (float(word) for word in text.split())
                        rate = rest[0] if rest else None
                        problem = None if len(rest) < 2 else "too many words"
                    except ValueError:
                        delay, rate, problem = 0.0, None, "not numbers"
                    if (problem := problem or _check(delay, rate)) is not None:
                        conn.sendall(f"error: {problem}: {text!r}\n".encode())
                        continue
                    self.delay, self.rate = delay, rate
                    conn.sendall(b"ok\n")
                except OSError:
                    continue  # the client went away; the delay stands or not

    def _track(self, sock: socket.socket) -> bool:
        # Under the lock, so close() either sees the socket or we see closing.
        with self._lock:
            if self._closing.is_set():
                sock.close()
                return False
            self._socks.add(sock)
            return True

    def _drop(self, sock: socket.socket) -> None:
        with self._lock:
            self._socks.discard(sock)
        sock.close()

    def _connect(self, target: int) -> socket.socket | None:
        # The peer may not listen yet (ranks start together): keep trying, as
        # the connecting rank would, rather than hand it a dead connection.
        deadline = time.monotonic() + CONNECT_TIMEOUT
        while not self._closing.is_set():
            try:
                return socket.create_connection(("127.0.0.1", target))
            except OSError:
                if time.monotonic() > deadline:
                    return None
                self._closing.wait(0.05)
        return None

    def _serve(self, conn: socket.socket, target: int) -> None:
        if not self._track(conn):
            return
        up = self._connect(target)
        if up is None or not self._track(up):
            self._drop(conn)
            return
        for sock in (conn, up):
            # Small messages (a token's activations) must not wait for Nagle.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        writers = [self._pump(conn, up), self._pump(up, conn)]
        for thread in writers:
            thread.join()
        for sock in (conn, up):
            self._drop(sock)

    def _pump(self, src: socket.socket, dst: socket.socket) -> threading.Thread:
        """Start copying ``src`` to ``dst``, each chunk ``delay`` late; return the writer."""
        chunks: queue.SimpleQueue[tuple[float, bytes] | None] = queue.SimpleQueue()

        def read() -> None:
            free = 0.0  # when the link has sent what came before
            try:
                while data := src.recv(1 << 16):
                    now = time.perf_counter()
                    if (rate := self.rate) is not None:
                        free = max(now, free) + len(data) / rate
                        now = free
                    chunks.put((now + self.delay, data))
            except OSError:
                # A reset: break the whole link, as the peers would see it.
                shutdown(src)
                shutdown(dst)
            chunks.put(None)

        def write() -> None:
            try:
                while (item := chunks.get()) is not None:
                    due, data = item
                    wait_until(due)
                    dst.sendall(data)
                # Pass the end of the stream on, as late as the bytes before it.
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                shutdown(src)
                shutdown(dst)

        threading.Thread(target=read, daemon=True).start()
        writer = threading.Thread(target=write, daemon=True)
        writer.start()
        return writer

    def close(self) -> None:
        """Stop listening, drop every connection and end the threads."""
        with self._lock:
            self._closing.set()
            socks = list(self._socks)
            threads = list(self._threads)
        for port in [*self.ports, self.control_port]:
            # Wakes accept(); shutting the listener down would on Linux only.
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
            except OSError:
                pass
        for thread in self._acceptors:
            thread.join(timeout=10)
        for listener in [*self._listeners, self._control]:
            listener.close()
        for sock in socks:
            shutdown(sock)
        # Each connection's thread closes its sockets once its writers end; a
        # writer holding a chunk ends within ``delay``.
        for thread in threads:
            thread.join(timeout=10)

    def __enter__(self) -> DelayRelay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _check(delay: float, rate: float | None) -> str | None:
    if not (math.isfinite(delay) and delay >= 0):
        return f"the link delay must be a number of seconds >= 0; got {delay}"
    if rate is not None and not (math.isfinite(rate) and rate > 0):
        return f"the link rate must be a number of bytes per second > 0; got {rate}"
    return None


def set_delay(
    address: str, delay: float, rate: float | None = None, *, timeout: float = 10.0
) -> None:
    """Have the relay whose control address is ``address`` ("host:port") hold
    chunks ``delay`` seconds from now on, and send ``rate`` bytes per second
    each way (``None``: no limit); return once it does.

    Raises:
        ValueError: The relay refused the delay or the rate.
        OSError: The relay could not be reached.
    """
    host, _, port = address.rpartition(":")
    request = f"{delay!r}" if rate is None else f"{delay!r} {rate!r}"
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(f"{request}\n".encode())
        answer = sock.makefile("r").readline().strip()
    if answer != "ok":
        raise ValueError(
            f"the relay at {address} refused a delay of {delay} s"
            + ("" if rate is None else f" at {rate:g} B/s")
            + f": {answer or 'no answer'}"
        )
