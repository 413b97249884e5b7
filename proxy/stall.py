"""Telling a client that stopped reading from one that reads slowly.

A response is cut off once its client has taken no bytes for `client_timeout`. Whether the
socket is writable is no sign of that: Linux reports it writable only once a third of
its send buffer (up to 4 MiB) is free, so a client reading at a few KB/s can look stalled
for minutes. What counts is the bytes still waiting for the client: in the transport's
buffer and in the kernel's send queue (SIOCOUTQ), which shrinks with every byte the
client acknowledges.
"""

from __future__ import annotations

import asyncio
import fcntl
import socket
import struct
import termios
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


def unsent_in_kernel(fd: int) -> int:
    """Bytes in a TCP socket's send queue the peer has not acknowledged (0 if unknown)."""
    try:
        raw = fcntl.ioctl(fd, termios.TIOCOUTQ, b"\0\0\0\0")  # SIOCOUTQ on a socket
    except OSError:
        return 0
    return int(struct.unpack("i", raw)[0])


def unsent(transport: asyncio.BaseTransport | None) -> int:
    """Bytes written to a transport that its client has not taken yet."""
    if not isinstance(transport, asyncio.WriteTransport) or transport.is_closing():
        return 0
    sock: socket.socket | None = transport.get_extra_info("socket")
    queued = unsent_in_kernel(sock.fileno()) if sock is not None else 0
    return transport.get_write_buffer_size() + queued


async def while_taking(work: Awaitable[T], pending: Callable[[], int], stall_timeout: float) -> T:
    """Await `work`, but raise TimeoutError once `pending()` (the bytes the client has
    yet to take) has not gone down for `stall_timeout` seconds."""
    future = asyncio.ensure_future(work)
    try:
        await asyncio.sleep(0)  # let it begin: what it writes is pending from here on
        if future.done():  # most writes: no need to watch the client at all
            return future.result()
        last = pending()
        while not (await asyncio.wait({future}, timeout=stall_timeout))[0]:
            now = pending()
            if now >= last:
                raise TimeoutError
            last = now
    finally:
        future.cancel()
    return future.result()
