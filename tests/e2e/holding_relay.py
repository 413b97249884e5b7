"""A TCP relay on 127.0.0.1 that can stop one download half-way, for as long as a test needs.

On loopback even a large layer arrives in a fraction of a second, so "kill the replica while
it fills that layer" cannot be timed from outside. Put this relay between the replicas and
their upstream, `arm(after=N)` it, and the first connection to carry N bytes from the
upstream after that is held with exactly N bytes delivered: `held` is set, and the
download stays half-done until `release()`, which also disarms the relay.
"""

from __future__ import annotations

import asyncio
import contextlib

CHUNK = 64 * 1024


class HoldingRelay:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.held = asyncio.Event()
        self._released = asyncio.Event()
        self._after: int | None = None
        self._arming = 0  # bumped by arm(): byte counts restart from there
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def arm(self, after: int) -> None:
        self._after = after
        self._arming += 1
        self.held.clear()
        self._released.clear()

    def release(self) -> None:
        self._after = None
        self._released.set()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in self._connections:
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            target_r, target_w = await asyncio.open_connection(*self.target)
            try:
                async with asyncio.TaskGroup() as pumps:
                    pumps.create_task(self._pump(client_r, target_w, count=False))
                    pumps.create_task(self._pump(target_r, client_w, count=True))
            finally:
                target_w.close()
        except* OSError:  # ConnectionError too
            pass  # one side went away (a killed replica): the relay stays up for the others
        finally:
            client_w.close()
            self._connections.discard(task)

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, count: bool
    ) -> None:
        arming, carried = self._arming, 0
        while data := await reader.read(CHUNK):
            if count and self._after is not None:
                if arming != self._arming:
                    arming, carried = self._arming, 0
                room = self._after - carried
                carried += len(data)
                if 0 <= room < len(data) and not self.held.is_set():
                    writer.write(data[:room])
                    await writer.drain()
                    data = data[room:]
                    self.held.set()
                    await self._released.wait()
            writer.write(data)
            await writer.drain()
        with contextlib.suppress(OSError):
            writer.write_eof()
