"""How long one hop takes: a token-sized message round a ring of local ranks.

    python tests/gpu/hop_probe.py RANKS DELAY_MS [DELAY_MS ...]

For each way of waiting and each delay (and 0), RANKS local ranks talk through
ppwrap's delaying relay, as ``ppwrap bench --link-delay`` runs them, and pass
a 128-byte message round the ring; rank 0 times the rounds. It prints the
median round and the hops it implies: (round - round without delay) / delay,
whose floor is RANKS. The ways of waiting (``PROBE_MODES``, all by default):

- ``sock``: plain Python sockets, no MLX: the relay and the kernel alone.
- ``cpu``: MLX send and receive, everything on the CPU device.
- ``gpu``: each rank adds 1 on the GPU between its receive and its send, in
  one evaluation, as stock mlx-lm's and ppwrap's steps (``wait="spin"``) do:
  MLX waits for the receive inside the evaluation, from the moment it starts.
- ``wake``: as ``gpu``, but each rank sleeps until just before the message is
  due and waits for the receive on its own first (``ppwrap._pace.Arrivals``,
  what ``wait="auto"`` does on MLX CUDA).
- ``inbox``: as ``wake``, but each rank polls the ring backend's sockets
  until the message is there (``ppwrap._pace.Inbox``), then has MLX receive it.
- ``sync``: as ``gpu``, but waiting for the receive with ``mx.synchronize``
  on the CPU stream first (a future: noticed at once; it holds the GIL, so
  ppwrap cannot use it). The floor of what a better wait could reach.

On the H200 host (docs/gpu.md) ``gpu`` measured 1.4-1.5x RANKS hops at 1 ms,
``sync`` 1.03-1.10x: MLX CUDA notices a long wait late.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import sys
import time
from typing import Any

ROUNDS = 60
WARMUP = 5
MODES = ("sock", "cpu", "gpu", "wake", "inbox", "sync")


def ring_sockets(hosts: list[list[str]], me: int) -> tuple[socket.socket, socket.socket]:
    """Connections to the next rank (through the relay) and from the previous one."""
    host, port = hosts[me][0].rsplit(":", 1)
    server = socket.create_server((host, int(port)))
    next_host, next_port = hosts[(me + 1) % len(hosts)][0].rsplit(":", 1)
    deadline = time.monotonic() + 60
    while True:
        try:
            out = socket.create_connection((next_host, int(next_port)))
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)
    inc, _ = server.accept()
    for s in (out, inc):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return out, inc


def rounds_with_sockets(hosts: list[list[str]], me: int) -> list[float]:
    out, inc = ring_sockets(hosts, me)
    message = b"x" * 128

    def read() -> None:
        got = 0
        while got < len(message):
            got += len(inc.recv(len(message) - got))

    times = []
    for _ in range(ROUNDS + WARMUP):
        tic = time.perf_counter()
        if me == 0:
            out.sendall(message)
            read()
        else:
            read()
            out.sendall(message)
        times.append(time.perf_counter() - tic)
    time.sleep(0.2)  # let the last message through before closing
    return times[WARMUP:]


def rounds_with_mlx(mode: str, me: int, size: int) -> list[float]:
    import mlx.core as mx

    from ppwrap._pace import Arrivals, Inbox

    if mode == "cpu":
        mx.set_default_device(mx.cpu)
    mx.distributed.init()
    prev, nxt = (me - 1) % size, (me + 1) % size
    x = mx.zeros((1, 1, 64), dtype=mx.float16)
    mx.eval(x, mx.distributed.all_sum(mx.array(1.0), stream=mx.cpu))
    cpu = mx.default_stream(mx.cpu)
    arrivals = Arrivals(inbox=Inbox.find() if mode == "inbox" else None)
    if mode == "inbox" and arrivals.inbox is None:
        raise SystemExit("no ring sockets found")

    def receive() -> mx.array:
        y = mx.distributed.recv_like(x, prev, stream=mx.cpu)
        if mode in ("wake", "inbox"):
            arrivals.sleep()
            mx.eval(y)
            arrivals.arrived()
        elif mode == "sync":
            mx.async_eval(y)
            mx.synchronize(cpu)
        return y

    times = []
    for _ in range(ROUNDS + WARMUP):
        tic = time.perf_counter()
        if me == 0:
            mx.eval(mx.distributed.send(x + 1, nxt, stream=mx.cpu))
            mx.eval(receive())
        else:
            mx.eval(mx.distributed.send(receive() + 1, nxt, stream=mx.cpu))
        times.append(time.perf_counter() - tic)
    return times[WARMUP:]


def rank_main(mode: str) -> None:
    with open(os.environ["MLX_HOSTFILE"]) as f:
        hosts = json.load(f)
    me = int(os.environ["MLX_RANK"])
    if mode == "sock":
        times = rounds_with_sockets(hosts, me)
    else:
        times = rounds_with_mlx(mode, me, len(hosts))
    if me == 0:
        result = {"median_ms": 1000 * statistics.median(times), "min_ms": 1000 * min(times)}
        print("RESULT", json.dumps(result), flush=True)


def main() -> None:
    from ppwrap._launch import run_local

    n = int(sys.argv[1])
    delays = [0.0] + [float(d) for d in sys.argv[2:]]
    modes = os.environ.get("PROBE_MODES", " ".join(MODES)).split()
    base: dict[str, float] = {}
    for mode in modes:
        for delay in delays:
            run = run_local(
                n, [__file__, "--rank", mode], timeout=120, capture=True, link_delay=delay / 1000
            )
            found = [s for s in run.stdout[0].splitlines() if s.startswith("RESULT ")]
            if not found:
                print(f"{n} ranks {mode} {delay:g} ms: failed\n{run.stderr[0][-1500:]}")
                continue
            r: dict[str, Any] = json.loads(found[0].removeprefix("RESULT "))
            line = f"{n} ranks {mode:<5} delay {delay:g} ms: {r['median_ms']:.3f} ms per round"
            if delay == 0:
                base[mode] = r["median_ms"]
            elif mode in base:
                line += f"; {(r['median_ms'] - base[mode]) / delay:.2f} hops (floor {n})"
            print(line, flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "--rank":
        rank_main(sys.argv[2])
    else:
        main()
