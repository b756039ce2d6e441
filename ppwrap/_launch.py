"""Start local ranks on loopback over MLX's ring backend, and never leave one behind.

``mlx.launch`` reports a rank's failure only as a warning and exits 0, and it
hides which process is which rank. Local runs (tests, ``--ranks N``) start the
ranks here instead, the way ``mlx.launch --backend ring`` does (a host file and
``MLX_RANK``), so exit codes, process ids and timeouts are exact.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import attrs

from ._liveness import ENV as LIVENESS_ENV
from ._relay import CONTROL_ENV as RELAY_CONTROL_ENV

__all__ = ["LocalRun", "free_port_base", "run_local"]


def free_port_base(n: int) -> int:
    """A port ``p`` such that ``p`` ... ``p + n - 1`` are free on 127.0.0.1 now,
    for TCP (MLX's ring) and UDP (ppwrap's heartbeats) alike."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = int(s.getsockname()[1])
        if base + n >= 65535:
            continue
        socks: list[socket.socket] = []
        try:
            for port in range(base, base + n):
                for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
                    s = socket.socket(socket.AF_INET, kind)
                    socks.append(s)
                    s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("found no run of free ports on 127.0.0.1")


@attrs.frozen
class LocalRun:
    """How a local multi-rank run ended.

    Attributes:
        returncodes: Each rank's exit code (negative: killed by that signal).
        stdout: Each rank's standard output ("" unless captured).
        stderr: Each rank's standard error ("" unless captured).
        timed_out: Whether the run was killed for taking too long.
        first_failure: The rank that failed first, or ``None``.
        seconds: Wall time of the run.
    """

    returncodes: list[int]
    stdout: list[str]
    stderr: list[str]
    timed_out: bool
    first_failure: int | None
    seconds: float

    @property
    def returncode(self) -> int:
        """0 when every rank succeeded; else the first failing rank's code (or 1)."""
        if self.first_failure is None and not self.timed_out:
            return 0
        if self.first_failure is not None:
            return self.returncodes[self.first_failure] or 1
        return 124


# Seconds a rank that timed out has to write its stacks before it is killed.
DUMP_SECONDS = 3.0


def _dump_stacks(procs: list[subprocess.Popen[bytes]]) -> None:
    """Have every rank still running write its Python threads' stacks
    (``PYTHONFAULTHANDLER`` makes SIGABRT do that), so a run that timed out
    says where each rank waited, instead of ending without a word."""
    running = [p for p in procs if p.poll() is None]
    for p in running:
        try:
            if hasattr(resource, "prlimit"):
                # SIGABRT dumps core after the stacks: not a rank's gigabytes of weights.
                resource.prlimit(p.pid, resource.RLIMIT_CORE, (0, 0))
            os.kill(p.pid, signal.SIGABRT)
        except OSError:
            pass  # exited meanwhile
    deadline = time.monotonic() + DUMP_SECONDS
    # A suspended rank cannot answer: it is killed with the rest.
    while any(p.poll() is None for p in running) and time.monotonic() < deadline:
        time.sleep(0.05)


def _kill(proc: subprocess.Popen[bytes]) -> None:
    try:
        # SIGCONT too, so a suspended rank is not left behind stopped.
        os.killpg(proc.pid, signal.SIGKILL)
        os.killpg(proc.pid, signal.SIGCONT)
    except (ProcessLookupError, PermissionError):
        pass


def run_local(
    n: int,
    argv: Sequence[str],
    *,
    timeout: float | None = None,
    capture: bool = False,
    env: dict[str, str] | None = None,
    on_start: Callable[[list[int]], None] | None = None,
    quiet_ring: bool = False,
    grace: float = 0.0,
    link_delay: float | None = None,
) -> LocalRun:
    """Run ``argv`` (a Python script and its arguments) on ``n`` local ranks.

    As with ``mlx.launch``, a rank that fails ends the run: the others are
    killed. Each rank runs in its own process group, and every rank still
    running when the run ends, times out or is interrupted is killed.

    Args:
        n: Number of ranks.
        argv: The script path and its arguments, run with this Python.
        timeout: Seconds before the whole run is killed; ``None`` waits.
            Ranks still running then first write their Python stacks to
            their standard error (SIGABRT, with ``PYTHONFAULTHANDLER``).
        capture: Keep each rank's output instead of passing it through.
        env: Extra environment variables for every rank.
        on_start: Called with the ranks' process ids once all have started.
        quiet_ring: Without ``capture``, drop the ring backend's own "[ring] ..."
            lines from the ranks' standard error: ranks that finish a moment
            apart print them as their peers close, and they say nothing a
            failure's own message does not.
        grace: Seconds the other ranks may still run after one has failed,
            to fail on their own (and say why) before they are killed.
        link_delay: Seconds every byte between two ranks takes, each way: the
            ranks talk through a delaying relay (:class:`ppwrap._relay.DelayRelay`),
            whose control address the ranks find in ``PPWRAP_RELAY_CONTROL``
            (to change the delay: :func:`ppwrap._relay.set_delay`); 0 still puts
            the relay between them (a baseline with its own overhead), ``None``
            connects them directly.

    Returns:
        How each rank ended.
    """
    if n < 1:
        raise ValueError(f"the number of ranks must be at least 1; got {n}")
    base = free_port_base(n)
    relay = None
    if link_delay is not None and n > 1:
        from ._relay import DelayRelay

        relay = DelayRelay([base + r for r in range(n)], link_delay)
    with tempfile.TemporaryDirectory(prefix="ppwrap-ranks-") as tmp:
        # Each rank's own host file: its own address, and its peers at the
        # relay's ports when there is one.
        hostfiles = []
        for me in range(n):
            ports = [base + r if relay is None or r == me else relay.ports[r] for r in range(n)]
            hostfile = Path(tmp) / f"hosts{me}.json"
            hostfile.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in ports]))
            hostfiles.append(hostfile)
        outs = []
        procs: list[subprocess.Popen[bytes]] = []
        forwarders: list[threading.Thread] = []
        start = time.monotonic()
        try:
            for rank in range(n):
                rank_env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
                # A crash, or the SIGABRT of a timeout, prints the rank's stacks.
                rank_env.setdefault("PYTHONFAULTHANDLER", "1")
                if n > 1:
                    rank_env.update(MLX_RANK=str(rank), MLX_HOSTFILE=str(hostfiles[rank]))
                    if relay is not None:
                        # Heartbeats go straight to the ranks, not through the relay.
                        rank_env[LIVENESS_ENV] = ",".join(f"127.0.0.1:{base + r}" for r in range(n))
                        rank_env[RELAY_CONTROL_ENV] = f"127.0.0.1:{relay.control_port}"
                if capture:
                    files = (
                        open(Path(tmp) / f"out{rank}", "w+b"),
                        open(Path(tmp) / f"err{rank}", "w+b"),
                    )
                    outs.append(files)
                filtered = quiet_ring and not capture
                procs.append(
                    subprocess.Popen(
                        [sys.executable, *argv],
                        env=rank_env,
                        stdout=outs[rank][0] if capture else None,
                        stderr=outs[rank][1]
                        if capture
                        else (subprocess.PIPE if filtered else None),
                        start_new_session=True,
                    )
                )
                if filtered:
                    forwarders.append(_forward_without_ring_lines(procs[-1]))
            if on_start is not None:
                on_start([p.pid for p in procs])
            first_failure, timed_out = _wait(procs, timeout, start, grace)
            if timed_out:
                _dump_stacks(procs)
        finally:
            for p in procs:
                _kill(p)
                p.wait()
            for t in forwarders:
                t.join(timeout=5)  # the last lines, a traceback among them
            if relay is not None:
                relay.close()
        seconds = time.monotonic() - start

        def read(i: int) -> tuple[str, str]:
            if not capture:
                return "", ""
            out, err = outs[i]
            out.seek(0)
            err.seek(0)
            text = out.read().decode(errors="replace"), err.read().decode(errors="replace")
            out.close()
            err.close()
            return text

        texts = [read(i) for i in range(n)]
    return LocalRun(
        returncodes=[p.returncode for p in procs],
        stdout=[t[0] for t in texts],
        stderr=[t[1] for t in texts],
        timed_out=timed_out,
        first_failure=first_failure,
        seconds=seconds,
    )


def _forward_without_ring_lines(proc: subprocess.Popen[bytes]) -> threading.Thread:
    def forward() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            if not line.startswith(b"[ring] "):
                sys.stderr.buffer.write(line)
                sys.stderr.flush()

    thread = threading.Thread(target=forward, daemon=True)
    thread.start()
    return thread


def _wait(
    procs: list[subprocess.Popen[bytes]], timeout: float | None, start: float, grace: float
) -> tuple[int | None, bool]:
    first: int | None = None
    failed_at = 0.0
    while True:
        now = time.monotonic()
        codes = [p.poll() for p in procs]
        failed = [r for r, c in enumerate(codes) if c not in (None, 0)]
        if failed and first is None:
            first, failed_at = failed[0], now
        if first is not None and (now - failed_at >= grace or None not in codes):
            return first, False
        if first is None and all(c == 0 for c in codes):
            return None, False
        if timeout is not None and now - start > timeout:
            return first, first is None
        time.sleep(0.05)
