"""FileSender over real loopback TCP connections: the bytes, hang-ups, short files,
cancellation, and the descriptors it dups."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from cache.errors import FillFailed
from proxy.file_sender import FileSender

MiB = 1 << 20


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def assert_fds_back_to(count: int) -> None:
    """Transports and worker threads close their fds a moment later: allow them that."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(2):
            while open_fds() != count:  # noqa: ASYNC110 - no event tells when an fd closes
                await asyncio.sleep(0.01)
    assert open_fds() == count


@contextlib.asynccontextmanager
async def connection(
    rcvbuf: int | None = None,
) -> AsyncIterator[tuple[asyncio.Transport, asyncio.StreamReader, socket.socket]]:
    """A server-side transport and the client end of one loopback connection."""
    accepted: asyncio.Queue[asyncio.StreamWriter] = asyncio.Queue()
    server = await asyncio.start_server(lambda _r, w: accepted.put_nowait(w), "127.0.0.1", 0)
    client = socket.socket()
    if rcvbuf is not None:  # before connect, so the window starts small
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    client.setblocking(False)
    await asyncio.get_running_loop().sock_connect(client, server.sockets[0].getsockname())
    reader, writer = await asyncio.open_connection(sock=client)
    served = await accepted.get()
    transport = served.transport
    assert isinstance(transport, asyncio.Transport)
    try:
        yield transport, reader, client
    finally:
        writer.close()
        served.close()
        server.close()
        await server.wait_closed()


STALL = 30.0  # seconds a client may take nothing: longer than any of these tests


@pytest.fixture
def sender() -> Iterator[FileSender]:
    sender = FileSender()
    yield sender
    sender.close()


@pytest.fixture
def blob(tmp_path: Path) -> Iterator[tuple[int, bytes]]:
    data = os.urandom(11 * MiB)  # many times what a loopback socket holds
    path = tmp_path / "blob"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    yield fd, data
    os.close(fd)


async def test_sends_exactly_the_span(sender: FileSender, blob: tuple[int, bytes]) -> None:
    fd, data = blob
    async with connection() as (transport, reader, _):
        start, count = 12_345, len(data) - 20_000
        sent, got = await asyncio.gather(
            sender.send(transport, fd, (start, count), STALL), reader.readexactly(count)
        )
        assert sent == count
        assert got == data[start : start + count]
        assert transport.is_reading()  # paused while sending, resumed after


async def test_a_slow_reader_gets_every_byte(sender: FileSender, blob: tuple[int, bytes]) -> None:
    fd, data = blob
    async with connection(rcvbuf=16 * 1024) as (transport, reader, _):

        async def read_slowly() -> bytes:
            chunks: list[bytes] = []
            while sum(map(len, chunks)) < len(data):
                chunks.append(await reader.read(256 * 1024))
                await asyncio.sleep(0.002)  # the socket fills; the sender waits on the loop
            return b"".join(chunks)

        sent, got = await asyncio.gather(
            sender.send(transport, fd, (0, len(data)), STALL), read_slowly()
        )
        assert sent == len(data)
        assert got == data


async def test_a_client_hanging_up_is_a_connection_error(
    sender: FileSender, blob: tuple[int, bytes]
) -> None:
    fd, data = blob
    before = open_fds()
    async with connection(rcvbuf=16 * 1024) as (transport, reader, client):
        sending = asyncio.create_task(sender.send(transport, fd, (0, len(data)), STALL))
        await reader.readexactly(64 * 1024)
        # SO_LINGER 0: close with a reset, the way a killed client's kernel does.
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()
        with pytest.raises(ConnectionError):
            await sending
    await assert_fds_back_to(before)  # the dup of the socket's fd too


async def test_a_file_shorter_than_the_span_fails(
    sender: FileSender, blob: tuple[int, bytes]
) -> None:
    fd, data = blob
    async with connection() as (transport, reader, _):
        sending = asyncio.create_task(sender.send(transport, fd, (0, len(data) + 1), STALL))
        got = await reader.readexactly(len(data))  # everything the file has goes out
        with pytest.raises(FillFailed, match="ended at"):
            await sending
        assert got == data


@pytest.mark.parametrize("after", [0, 0.001, 0.003, 0.1])
async def test_a_cancelled_send_closes_its_descriptor_and_resumes_reading(
    sender: FileSender, blob: tuple[int, bytes], after: float
) -> None:
    """Cancelled queued, mid-burst (the burst then owns the dup) or waiting on the loop."""
    fd, data = blob
    async with connection(rcvbuf=16 * 1024) as (transport, _reader, _):
        connected = open_fds()
        sending = asyncio.create_task(sender.send(transport, fd, (0, len(data)), STALL))
        await asyncio.sleep(after)  # the client reads nothing: the sender gets stuck
        if after:
            assert not transport.is_reading()
            assert open_fds() == connected + 1  # its dup of the socket
        sending.cancel()
        with pytest.raises(asyncio.CancelledError):
            await sending
        await assert_fds_back_to(connected)
        assert transport.is_reading()


async def test_a_closed_sender_refuses_work(blob: tuple[int, bytes]) -> None:
    sender = FileSender()
    sender.close()
    sender.close()  # idempotent
    async with connection() as (transport, _reader, _):
        with pytest.raises(RuntimeError, match="closed"):
            await sender.send(transport, blob[0], (0, 1), STALL)
