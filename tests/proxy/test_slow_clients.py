"""Clients that stop reading: they are cut off, and they starve nobody else."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import AsyncIterator

from tests.fake_upstream.server import FakeUpstream
from tests.mirror import MakeMirror, Mirror

REPO = "library/app"
MiB = 1 << 20
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@contextlib.asynccontextmanager
async def stalled_clients(
    mirror: Mirror, paths: list[str], rcvbuf: int = 4096
) -> AsyncIterator[list[socket.socket]]:
    """Clients that send a GET each, then read nothing: a tiny receive buffer fills at once."""
    loop = asyncio.get_running_loop()
    host, port = mirror.host.rsplit(":", 1)
    clients: list[socket.socket] = []
    try:
        for path in paths:
            client = socket.socket()
            clients.append(client)
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            client.setblocking(False)
            await loop.sock_connect(client, (host, int(port)))
            request = f"GET {path} HTTP/1.1\r\nHost: {mirror.host}\r\n\r\n"
            await loop.sock_sendall(client, request.encode())
        yield clients
    finally:
        for client in clients:
            client.close()


async def read_until_closed(client: socket.socket) -> int:
    """Read what the mirror sent before it closed the connection; the byte count."""
    loop = asyncio.get_running_loop()
    total = 0
    with contextlib.suppress(ConnectionResetError):
        while data := await loop.sock_recv(client, 1 << 20):
            total += len(data)
    return total


async def test_a_client_that_takes_nothing_is_cut_off_after_client_timeout(
    fake_upstream: FakeUpstream, make_mirror: MakeMirror
) -> None:
    data = os.urandom(32 * MiB)  # far more than the socket buffers between the two hold
    digest = fake_upstream.add_blob(REPO, data)
    mirror = await make_mirror(
        [{"name": "docker.io", "url": fake_upstream.url, "default": True}], client_timeout="1s"
    )
    path = f"/v2/app/blobs/{digest}"
    assert await mirror.fetch(path) == data
    await mirror.wait_committed(digest)

    before = open_fds()
    async with stalled_clients(mirror, [path] * 5) as clients:
        async with asyncio.timeout(5):  # each costs the mirror a socket and the blob file
            while open_fds() < before + 5 * 3:  # noqa: ASYNC110 - watching /proc
                await asyncio.sleep(0.01)
        stalled_at = time.monotonic()
        async with asyncio.timeout(10):  # then only the test's own sockets are left
            while open_fds() > before + 5:  # noqa: ASYNC110 - watching /proc
                await asyncio.sleep(0.05)
        assert time.monotonic() - stalled_at > 0.8  # not before client_timeout
        for client in clients:
            async with asyncio.timeout(10):
                assert await read_until_closed(client) < len(data)  # a cut body, not a whole one
    assert open_fds() <= before  # (the keep-alive connection of the first fetch may be gone)

    # A client that reads, however slowly, is never cut off.
    assert await mirror.fetch(path) == data


async def test_a_slow_client_that_keeps_reading_gets_the_whole_passthrough_blob(
    fake_upstream: FakeUpstream, make_mirror: MakeMirror
) -> None:
    """It takes longer than client_timeout to take one write, but is never idle that long."""
    data = os.urandom(6 * MiB)  # more than the socket buffers between the two hold
    digest = fake_upstream.add_blob(REPO, data)
    mirror = await make_mirror(
        [{"name": "docker.io", "url": fake_upstream.url, "default": True}],
        cache={"max_size": "1MiB"},  # passed through: written from memory, 512 KiB a write
        client_timeout="0.3s",
    )
    loop = asyncio.get_running_loop()
    path = f"/v2/app/blobs/{digest}"
    async with stalled_clients(mirror, [path], rcvbuf=128 * 1024) as (client,):
        received = bytearray()
        async with asyncio.timeout(30):
            while not received.endswith(data):  # about 1.3 MB/s: 0.4 s a write
                await asyncio.sleep(0.1)
                chunk = await loop.sock_recv(client, 128 * 1024)
                assert chunk, f"cut off after {len(received)} bytes"
                received += chunk
    assert received.split(b"\r\n\r\n", 1)[1] == data


async def test_clients_that_stop_reading_passthrough_downloads_starve_nobody(
    fake_upstream: FakeUpstream, make_mirror: MakeMirror
) -> None:
    """Cold blobs too big to cache, asked for by clients that read nothing: they must not
    hold every upstream connection (manifests go on) nor hold them for long (a deadline)."""
    base = os.urandom(40 * MiB)  # more than a whole blob held in memory would be bounded by
    digests = [fake_upstream.add_blob(REPO, base + bytes([n])) for n in range(4)]
    image = fake_upstream.add_image(REPO, "v1", layers=(os.urandom(1000),))
    mirror = await make_mirror(
        [
            {
                "name": "docker.io",
                "url": fake_upstream.url,
                "default": True,
                "read_timeout": "1s",
            }
        ],
        cache={"max_size": "1MiB"},
        upstream_connections=4,
    )
    paths = [f"/v2/app/blobs/{digest}" for digest in digests]
    async with stalled_clients(mirror, paths):
        async with asyncio.timeout(5):  # the downloads are under way and held up
            while len({r.path for r in fake_upstream.requests if "/blobs/" in r.path}) < 3:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        async with asyncio.timeout(2):
            async with mirror.get(
                "/v2/app/manifests/v1", headers={"Accept": OCI_MANIFEST}
            ) as response:
                assert response.status == 200
                assert await response.read() == image.manifest
        # Within the stall deadline (read_timeout) and a margin, a cold blob goes through.
        fresh = os.urandom(2 * MiB)
        digest = fake_upstream.add_blob(REPO, fresh)
        async with asyncio.timeout(6):
            assert await mirror.fetch(f"/v2/app/blobs/{digest}") == fresh
