"""How long one hop takes: a token-sized message round a ring of local ranks.

    python tests/gpu/hop_probe.py RANKS DELAY_MS [DELAY_MS ...]

For each way of waiting and each delay (and 0), RANKS local ranks talk through
ppwrap's delaying relay, as ``ppwrap bench --link-delay`` runs them, and pass
a 128-byte message round the ring; rank 0 times the rounds. All ways of
waiting run in one launch per delay, taking turns (3 passes). It prints the
median round, what it takes over the links' own RANKS x delay, and the hops
it implies: (round - round without delay) / delay, whose floor is RANKS
(noisier: two launches' figures). The ways of waiting (``PROBE_MODES``, all by default):

- ``sock``: plain Python sockets, no MLX: the relay and the kernel alone.
- ``cpu``: MLX send and receive, everything on the CPU device.
- ``gpu``: each rank adds 1 on the GPU between its receive and its send, in
  one evaluation, as stock mlx-lm's and ppwrap's steps (``wait="spin"``) do:
  MLX waits for the receive inside the evaluation, from the moment it starts.
- ``wake``: as ``gpu``, but each rank sleeps until just before the message is
  due and waits for the receive on its own first (``ppwrap._pace.Arrivals``
  without an inbox: what ``wait="auto"`` does on MLX CUDA without the ring
  backend).
- ``inbox``: as ``wake``, but each rank polls the ring backend's sockets
  until the message is there (``ppwrap._pace.Inbox``), then has MLX receive it.
- ``both``: sleeps as ``wake``, then polls as ``inbox``: what ``wait="auto"``
  does on MLX CUDA with the ring backend.
- ``sync``: as ``gpu``, but waiting for the receive with ``mx.synchronize``
  on the CPU stream first (a future: noticed at once; the GIL is released
  meanwhile), from the start.
- ``fwake``: sleeps as ``wake``, then waits for the receive on a future.
- ``fboth``: sleeps, polls, then waits on a future: what ``wait="auto"``
  would do on MLX CUDA with a future.

On the H200 host (docs/gpu.md) ``gpu`` measured 1.4-1.5x RANKS hops at 1 ms,
``sync`` 1.03-1.10x: MLX CUDA notices a long wait late; over the links,
``both`` took 0.1-0.8 ms less per round than ``wake`` or ``inbox`` alone, and
``fwake`` 0.5-1.4 ms less than ``both`` (session 10); in the whole pipeline
that future did not pay (docs/benchmarks.md).
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import sys
import time

ROUNDS = 60
WARMUP = 5
PASSES = 3
MODES = ("sock", "cpu", "gpu", "wake", "inbox", "both", "sync", "fwake", "fboth")


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


def rounds_with_mlx(modes: list[str], me: int, size: int) -> dict[str, list[float]]:
    """Rounds of each way of waiting, the modes taking turns (``PASSES`` times)."""
    import mlx.core as mx

    from ppwrap._pace import Arrivals, Inbox

    mx.distributed.init()
    device = mx.default_device()
    prev, nxt = (me - 1) % size, (me + 1) % size
    cpu = mx.default_stream(mx.cpu)
    inbox = Inbox.find()
    if inbox is None:
        raise SystemExit("no ring sockets found")

    def rounds(mode: str) -> list[float]:
        mx.set_default_device(mx.cpu if mode == "cpu" else device)
        x = mx.zeros((1, 1, 64), dtype=mx.float16)
        mx.eval(x, mx.distributed.all_sum(mx.array(1.0), stream=mx.cpu))
        # What ppwrap's loops do ("both"), or half of it.
        arrivals = Arrivals(inbox=inbox if mode in ("both", "fboth") else None)

        def receive() -> mx.array:
            y = mx.distributed.recv_like(x, prev, stream=mx.cpu)
            if mode in ("fwake", "fboth"):
                arrivals.sleep()
                mx.async_eval(y)
                mx.synchronize(cpu)
                arrivals.arrived()
            elif mode in ("wake", "both"):
                arrivals.sleep()
                mx.eval(y)
                arrivals.arrived()
            elif mode == "inbox":
                inbox.wait(1.0)
                mx.eval(y)
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

    found: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(PASSES):
        for mode in modes:
            found[mode].append(statistics.median(rounds(mode)))
    return found


def rank_main(modes: list[str]) -> None:
    with open(os.environ["MLX_HOSTFILE"]) as f:
        hosts = json.load(f)
    me = int(os.environ["MLX_RANK"])
    if modes == ["sock"]:
        found = {"sock": [statistics.median(rounds_with_sockets(hosts, me))]}
    else:
        found = rounds_with_mlx(modes, me, len(hosts))
    if me == 0:
        print(
            "RESULT", json.dumps({m: [1000 * t for t in ts] for m, ts in found.items()}), flush=True
        )


def main() -> None:
    from ppwrap._launch import run_local

    n = int(sys.argv[1])
    delays = [0.0] + [float(d) for d in sys.argv[2:]]
    modes = os.environ.get("PROBE_MODES", " ".join(MODES)).split()
    launches = [["sock"]] if "sock" in modes else []
    if mlx_modes := [m for m in modes if m != "sock"]:
        launches.append(mlx_modes)
    base: dict[str, float] = {}
    for delay in delays:
        for group in launches:
            run = run_local(
                n,
                [__file__, "--rank", *group],
                timeout=240,
                capture=True,
                link_delay=delay / 1000,
            )
            found = [s for s in run.stdout[0].splitlines() if s.startswith("RESULT ")]
            if not found:
                print(f"{n} ranks {group} {delay:g} ms: failed\n{run.stderr[0][-1500:]}")
                continue
            result: dict[str, list[float]] = json.loads(found[0].removeprefix("RESULT "))
            for mode, rounds in result.items():
                median = statistics.median(rounds)
                line = (
                    f"{n} ranks {mode:<5} delay {delay:g} ms: {median:.3f} ms per round "
                    f"(passes {' '.join(f'{r:.3f}' for r in rounds)}); "
                    f"{median - n * delay:.3f} ms over the links' {n * delay:g}"
                )
                if delay == 0:
                    base[mode] = median
                elif mode in base:
                    line += f"; {(median - base[mode]) / delay:.2f} hops (floor {n})"
                print(line, flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "--rank":
        rank_main(sys.argv[2:])
    else:
        main()
