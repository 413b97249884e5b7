"""Sending file spans to clients from worker threads: `pread` into a buffer, `write` to
the socket.

Why threads, rather than reads on the event loop or asyncio's own `loop.sendfile`
(figures in tests/bench/README.md): the syscalls run on threads, so the kernel's work
for several clients (on loopback, the receiver's TCP processing too) is spread over
every core instead of queueing on the loop's. Why copies of `CHUNK` bytes rather than
sendfile(2), which hands page-cache pages to the socket without a copy: in alternating
runs on loopback, copies fed one stream faster (curl 1.15-1.36x, skopeo, which reads at
its own pace, 1.06-1.17x), and 4 parallel streams 1.07x; sendfile saves a copy per
byte, which a network card (not measured here) might turn into a win again.

A job is a short burst on one connection: it sends until the span is done, `BURST`
bytes went, `BURST_SECONDS` passed or the socket stayed full for `STALL_MS`. A slow
client then waits on the event loop, not on a thread, and the pool stays free for the
others. A client that takes nothing for the caller's `stall_timeout` (`proxy.stall`) gets
TimeoutError.

Safety: the transport's socket is used by two threads at once only in a way asyncio
itself allows for `loop.sendfile`: its write buffer is empty and its reading paused, so
the loop neither writes nor notices a hang-up (and closes the fd) mid-send. Each send
works on its own `dup` of the fd, closed only once no job can still be using it, so a
fd number reused by a new file is never written to.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import select
import socket
import threading
import time

from cache.errors import FillFailed
from proxy.stall import unsent, unsent_in_kernel, while_taking

BURST = 64 << 20
BURST_SECONDS = 0.05
STALL_MS = 5
# Bytes per read: with 256 KiB skopeo was fed about 7 % slower, and 4 curls got 0.88x
# sendfile's pace instead of 1.07x.
CHUNK = 1 << 20
# One read buffer per worker thread, reused: a new 1 MiB bytes object per read left
# glibc's per-thread arenas holding ~10 MB more at the peak.
_buffers = threading.local()
# More threads than cores, so that a burst waiting up to STALL_MS for room idles no core.
WORKERS = 2 * (os.cpu_count() or 1)
_FULL = -1  # a job that found the socket full and sent nothing


def _burst(out: int, fd: int, offset: int, count: int) -> int:
    """Runs on a worker: copies from `fd` to the socket `out` (non-blocking). Bytes read
    but not taken by a full socket are read again by the next burst."""
    sent, limit = 0, min(count, BURST)
    deadline = time.monotonic() + BURST_SECONDS
    poller = select.poll()
    poller.register(out, select.POLLOUT)
    buffer = _buffer()
    while sent < limit:
        read = os.preadv(fd, [buffer[: min(CHUNK, limit - sent)]], offset + sent)
        if not read:
            raise FillFailed(f"blob file ended at {offset + sent} of {offset + count} bytes")
        view = buffer[:read]
        while view:
            try:
                view = view[os.write(out, view) :]
            except BlockingIOError:
                if time.monotonic() > deadline or not poller.poll(STALL_MS):
                    sent += read - len(view)
                    return sent if sent else _FULL
        sent += read
    return sent


def _buffer() -> memoryview:
    """This worker thread's read buffer."""
    buffer: memoryview | None = getattr(_buffers, "view", None)
    if buffer is None:
        buffer = _buffers.view = memoryview(bytearray(CHUNK))
    return buffer


class FileSender:
    """The worker threads every plain-HTTP blob response sends its file spans from.

    One per app, closed at cleanup after the handlers are done; a closed sender refuses
    work. Over TLS there is no plain socket to write into: callers write the bytes through
    the TLS transport instead.
    """

    def __init__(self, workers: int = WORKERS) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(workers, "file-sender")
        self._closed = False

    async def send(
        self, transport: asyncio.Transport, fd: int, span: tuple[int, int], stall_timeout: float
    ) -> int:
        """Send bytes [span[0], span[0] + span[1]) of file `fd`; return how many went.

        Raises ConnectionError when the client hangs up, TimeoutError when it takes
        nothing for `stall_timeout` seconds, FillFailed when the file is shorter than
        the span."""
        if self._closed:
            raise RuntimeError("FileSender is closed")
        sock = await while_taking(
            _quiet_socket(transport), lambda: unsent(transport), stall_timeout
        )
        out = os.dup(sock.fileno())
        reading = transport.is_reading()
        if reading:
            transport.pause_reading()
        job: concurrent.futures.Future[int] | None = None
        sent, (offset, count) = 0, span
        try:
            while sent < count:
                job = self._pool.submit(_burst, out, fd, offset + sent, count - sent)
                n = await asyncio.wrap_future(job)
                if n == _FULL:
                    await while_taking(_writable(out), lambda: unsent_in_kernel(out), stall_timeout)
                else:
                    sent += n
            return sent
        finally:
            if job is not None and not job.done():  # cancelled mid-burst: the job owns `out`
                job.add_done_callback(lambda _: os.close(out))
            else:
                os.close(out)
            if reading:
                transport.resume_reading()

    def close(self) -> None:
        """Wait for the bursts in flight (each is short) and stop the threads."""
        self._closed = True
        self._pool.shutdown(wait=True, cancel_futures=True)


async def _quiet_socket(transport: asyncio.Transport) -> socket.socket:
    """The transport's socket, once nothing the transport holds is waiting to go out
    (in practice the response's headers, which fit in the socket at once)."""
    delay = 0.001
    while True:
        sock = transport.get_extra_info("socket")
        if sock is None or transport.is_closing():
            raise ConnectionResetError("the client closed the connection")
        if not transport.get_write_buffer_size():
            return sock  # type: ignore[no-any-return]
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.1)  # a client that reads nothing costs little to watch


async def _writable(out: int) -> None:
    """Until the socket `out` has room (or an error for the next write to raise)."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_writer(out, wake)
    try:
        await ready
    finally:
        loop.remove_writer(out)
