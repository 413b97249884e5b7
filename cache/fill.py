"""A blob being downloaded into the store, readable by many clients while it grows.

The writer (the app's download task) calls `start`, `append`, then `verify` or `fail`.
Readers stream from their own dup of the temp file's fd (`spans`, `read_range`).

Three rules keep clients safe:
- the last byte of every response is held back until the whole blob has verified, so a
  corrupt download ends in a cut-off body, never a complete-looking wrong one;
- when the disk fills up (ENOSPC, or no room in the budget), the fill turns pass-through:
  what is on disk stays readable through the fds, later chunks are kept in memory until
  every reader has taken them, and nothing is committed. Clients still get the full,
  verified response;
- a pass-through download runs at most PASSTHROUGH_BUFFER ahead of its slowest reader,
  and a reader that takes nothing for `stall_timeout` is dropped (its response is cut
  off), so a client that stops reading can hold neither memory nor the download.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

from cache.digests import Digest
from cache.errors import DISK_FULL_ERRNOS, DigestMismatch, FillFailed, SizeMismatch
from cache.files import WRITEBACK_STEP, start_writeback

READ_CHUNK = 1 << 20
PASSTHROUGH_BUFFER = 4 << 20  # bytes held for slow readers before the download waits


class Fill:
    def __init__(self, digest: Digest, fd: int, temp: Path, stall_timeout: float = 30.0) -> None:
        self.digest = digest
        self.stall_timeout = stall_timeout
        self.temp = temp
        self.fd = fd
        self.size: int | None = None
        self.written = 0
        self.on_disk = 0  # bytes [0, on_disk) are in the temp file
        self._writeback_from = 0  # bytes before it are handed to the disk (start_writeback)
        self.verified = False
        self.error: BaseException | None = None
        self.passthrough = False
        self.settled = asyncio.Event()  # committed, passed through or abandoned: all done
        self.on_passthrough: Callable[[Fill], None] | None = None
        # The (upstream, repository) pairs that may read this fill: the one it downloads
        # for, and any that upstream confirmed holds the digest too (Cache.link).
        self.links: set[tuple[str, str]] = set()
        self._hasher: Any = digest.hasher()
        # Pass-through only: (offset, bytes) not on disk, until every reader has taken them.
        self._chunks: deque[tuple[int, bytes]] = deque()
        self._cursors: dict[int, int] = {}
        self._dropped: set[int] = set()  # readers cut off for taking nothing
        self._ids = itertools.count()
        loop = asyncio.get_running_loop()
        self._started: asyncio.Future[None] = loop.create_future()
        self._changed: asyncio.Future[None] = loop.create_future()

    @property
    def done(self) -> bool:
        return self.verified or self.error is not None

    # -- writer --------------------------------------------------------------------

    def start(self, size: int | None) -> None:
        """Upstream answered; `size` is its Content-Length (None when it sent none)."""
        self.size = size
        if not self._started.done():
            self._started.set_result(None)
        self._notify()

    async def append(self, chunk: bytes) -> None:
        if self.size is not None and self.written + len(chunk) > self.size:
            raise SizeMismatch(self.size, self.written + len(chunk))
        loop = asyncio.get_running_loop()
        if not self.passthrough:
            try:
                # Hashing and writing release the GIL: a worker thread keeps the loop free.
                await loop.run_in_executor(None, self._write, chunk, self.on_disk)
                self.on_disk += len(chunk)
            except OSError as exc:
                if exc.errno not in DISK_FULL_ERRNOS:
                    raise
                self.go_passthrough()
        if self.passthrough:
            await loop.run_in_executor(None, self._hasher.update, chunk)
            self._chunks.append((self.written, chunk))
        self.written += len(chunk)
        self._notify()
        if self.passthrough:
            await self._wait_for_readers()

    def _write(self, chunk: bytes, offset: int) -> None:
        # pwrite at an explicit offset: readers share this file description (dup), so
        # its position must never matter.
        view = memoryview(chunk)
        while view:
            written = os.pwrite(self.fd, view, offset)
            view, offset = view[written:], offset + written
        self._hasher.update(chunk)
        if offset - self._writeback_from >= WRITEBACK_STEP:
            start_writeback(self.fd, self._writeback_from, offset - self._writeback_from)
            self._writeback_from = offset

    def go_passthrough(self) -> None:
        """Stop writing to disk; serve the readers already here from memory."""
        if self.passthrough:
            return
        self.passthrough = True
        if self.on_passthrough is not None:
            self.on_passthrough(self)

    async def _wait_for_readers(self) -> None:
        """Pass-through: wait until the slowest reader is within PASSTHROUGH_BUFFER. The
        readers that take nothing for `stall_timeout` are dropped instead."""
        while self._cursors:
            slowest = min(self._cursors.values())
            if self.written - slowest <= PASSTHROUGH_BUFFER:
                return
            try:
                async with asyncio.timeout(self.stall_timeout):
                    while min(self._cursors.values(), default=None) == slowest:
                        await self.wait_change()
            except TimeoutError:
                self._drop_readers_at(slowest)
        raise FillFailed("disk full and no client left to pass the download through to")

    def _drop_readers_at(self, pos: int) -> None:
        for reader in [r for r, at in self._cursors.items() if at == pos]:
            del self._cursors[reader]
            self._dropped.add(reader)
        self._trim()
        self._notify()

    def verify(self) -> None:
        """All bytes are in: check size and digest, and release the held-back bytes."""
        if self.size is not None and self.written != self.size:
            raise SizeMismatch(self.size, self.written)
        actual = self._hasher.hexdigest()
        if actual != self.digest.hex:
            raise DigestMismatch(str(self.digest), f"{self.digest.algorithm}:{actual}")
        self.size = self.written
        self.verified = True
        self._notify()

    def fail(self, error: BaseException) -> None:
        if self.verified:
            return
        self.error = error
        if not self._started.done():
            self._started.set_exception(error)
            self._started.exception()  # nobody may be waiting: mark it retrieved
        self._chunks.clear()
        self._notify()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # -- readers -------------------------------------------------------------------

    async def wait_started(self) -> None:
        await asyncio.shield(self._started)

    async def wait_change(self) -> None:
        await asyncio.shield(self._changed)

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.get_running_loop().create_future()
        changed.set_result(None)

    def attach(self, pos: int) -> int:
        reader = next(self._ids)
        self._cursors[reader] = pos
        return reader

    def advance(self, reader: int, pos: int) -> None:
        if reader in self._dropped:
            raise FillFailed(
                f"the client took nothing for {self.stall_timeout:g}s of a pass-through"
                f" download of {self.digest}"
            )
        self._cursors[reader] = pos
        if self.passthrough:
            self._trim()
            self._notify()

    def detach(self, reader: int) -> None:
        self._cursors.pop(reader, None)
        self._dropped.discard(reader)
        self._notify()

    def _trim(self) -> None:
        """Forget the chunks in memory that every reader has taken."""
        low = min(self._cursors.values(), default=self.written)
        while self._chunks and self._chunks[0][0] + len(self._chunks[0][1]) <= low:
            self._chunks.popleft()

    def in_memory(self, pos: int, n: int) -> bytes | None:
        """The bytes at `pos` if a chunk in memory holds them: saves a read syscall."""
        for offset, chunk in self._chunks:
            if offset <= pos < offset + len(chunk):
                start = pos - offset
                return chunk[start : start + n]
        return None


Span = tuple[int, int] | bytes  # (offset, length) in the blob file, or bytes held in memory


async def spans(
    start: int, stop: int, fill: Fill | None = None, reader: int | None = None
) -> AsyncIterator[Span]:
    """What to send of bytes [start, stop), in order, as soon as it may be sent: ranges of
    the file (which a caller sends from the file itself) or, for a pass-through fill, bytes in
    memory. While the fill is unverified, the last byte is held back (see module doc).

    `reader` is the caller's place in the fill, taken when it joined (`Fill.attach`), so
    that a pass-through download keeps its bytes until the caller gets here; the caller
    gives it up (`Fill.detach`)."""
    if fill is None:
        if start < stop:
            yield (start, stop - start)
        return
    if reader is None:
        raise TypeError("follow a fill from the place taken when joining it (Fill.attach)")
    fill.advance(reader, start)
    pos = start
    while pos < stop:
        limit = stop
        if not fill.verified:
            if fill.error is not None:
                raise FillFailed(f"download of {fill.digest} failed: {fill.error}")
            limit = min(stop - 1, fill.written)
            if pos >= limit:
                await fill.wait_change()
                continue
        span: Span
        if pos < fill.on_disk:
            span = (pos, min(limit, fill.on_disk) - pos)
            pos += span[1]
        else:
            data = fill.in_memory(pos, limit - pos)
            if not data:
                raise FillFailed(f"lost bytes at {pos} of {fill.digest}")
            span, pos = data, pos + len(data)
        yield span
        fill.advance(reader, pos)


async def read_range(
    fd: int, start: int, stop: int, fill: Fill | None = None, reader: int | None = None
) -> AsyncIterator[bytes]:
    """Bytes [start, stop) of an open blob file, following `fill` while it grows."""
    async for span in spans(start, stop, fill, reader):
        if isinstance(span, bytes):
            yield span
        else:
            for data in read_span(fd, span):
                yield data


def read_span(fd: int, span: tuple[int, int]) -> Iterator[bytes]:
    """The bytes of a file span, READ_CHUNK at a time.

    Page-cached reads are fast enough to stay on the loop (blocking 1 MiB reads were
    measured as fast as nginx's sendfile, tests/bench/README.md); a thread hop per MiB
    would cost more.
    """
    pos, end = span[0], span[0] + span[1]
    while pos < end:
        data = os.pread(fd, min(READ_CHUNK, end - pos), pos)
        if not data:
            raise FillFailed(f"blob file ended at {pos} of {end} bytes")
        pos += len(data)
        yield data
