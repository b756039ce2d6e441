"""A TCP relay that delays every byte by a fixed time each way: a slow link on loopback.

The kernel here has no traffic shaping, so ``ppwrap bench --link-delay`` puts
one of these between local ranks instead: each rank's MLX host file lists its
own real address and every peer at the relay's port for that peer, so all
traffic between ranks crosses the relay. Bytes keep their order; each chunk
leaves ``delay`` seconds after it came in, whatever else is in flight, as on
a link with that one-way latency and ample bandwidth.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Sequence

__all__ = ["DelayRelay"]

# Seconds the relay keeps trying to reach a rank that does not listen yet.
CONNECT_TIMEOUT = 120.0


class DelayRelay:
    """Forward ``127.0.0.1:relay_port[i]`` to ``127.0.0.1:targets[i]``, delayed.

    Runs an asyncio loop in a daemon thread; use it as a context manager, or
    call :meth:`close`.

    Attributes:
        delay: Seconds each chunk is held, in each direction.
        ports: The relay's listening port for each target, in order.
    """

    def __init__(self, targets: Sequence[int], delay: float) -> None:
        if delay < 0:
            raise ValueError(f"the link delay must be at least 0 s; got {delay}")
        self.delay = delay
        self._loop = asyncio.new_event_loop()
        self._servers: list[asyncio.base_events.Server] = []
        started = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(started,), daemon=True)
        self._thread.start()
        started.wait()
        future = asyncio.run_coroutine_threadsafe(self._listen(list(targets)), self._loop)
        self.ports: list[int] = future.result(timeout=30)

    def _run(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.call_soon(started.set)
        self._loop.run_forever()

    async def _listen(self, targets: list[int]) -> list[int]:
        ports = []
        for target in targets:

            async def accept(
                reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _t: int = target
            ) -> None:
                try:
                    await self._connect(reader, writer, _t)
                except asyncio.CancelledError:
                    writer.close()  # closing the relay: end quietly

            server = await asyncio.start_server(accept, "127.0.0.1", 0)
            self._servers.append(server)
            ports.append(int(server.sockets[0].getsockname()[1]))
        return ports

    async def _connect(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, target: int
    ) -> None:
        # The peer may not listen yet (ranks start together): keep trying, as
        # the connecting rank would, rather than hand it a dead connection.
        deadline = asyncio.get_running_loop().time() + CONNECT_TIMEOUT
        while True:
            try:
                up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target)
                break
            except OSError:
                if asyncio.get_running_loop().time() > deadline:
                    writer.close()
                    return
                await asyncio.sleep(0.05)
        for w in (writer, up_writer):
            sock = w.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await asyncio.gather(
            self._pump(reader, up_writer), self._pump(up_reader, writer), return_exceptions=True
        )

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()

        async def feed() -> None:
            try:
                while data := await src.read(1 << 16):
                    queue.put_nowait((loop.time() + self.delay, data))
            finally:
                queue.put_nowait(None)

        async def drain() -> None:
            try:
                while (item := await queue.get()) is not None:
                    due, data = item
                    if (wait := due - loop.time()) > 0:
                        await asyncio.sleep(wait)
                    dst.write(data)
                    await dst.drain()
            finally:
                dst.close()

        await asyncio.gather(feed(), drain(), return_exceptions=True)

    def close(self) -> None:
        """Stop listening, drop every connection and end the thread."""

        async def stop() -> None:
            for server in self._servers:
                server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            # Let them finish here: a task left pending would run its cleanup
            # whenever the garbage collector reaches it, in any thread.
            await asyncio.gather(*tasks, return_exceptions=True)

        if self._loop.is_running():
            asyncio.run_coroutine_threadsafe(stop(), self._loop).result(timeout=10)
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        if not self._loop.is_closed() and not self._thread.is_alive():
            self._loop.close()

    def __enter__(self) -> DelayRelay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
