"""Blob files on disk, and fills that grow into them.

    <cache.path>/
    ├── index.db                    SQLite index (cache.index), with -wal and -shm beside it
    ├── blobs/
    │   ├── sha256/
    │   │   └── 3f/
    │   │       └── 3f2a…e9         a committed blob or manifest, named by its digest's hex
    │   └── sha512/…
    └── tmp/
        └── 3f2a…e9.<rand>.part     a fill in progress

A file reaches blobs/ only by an atomic rename of a temp file whose size and digest were
checked and which was fsynced, so every file there is complete and correct. Anything in
tmp/ at start-up is debris of a crash, and is deleted.

Every path is built from a parsed `Digest`, never from a client's string.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from cache.digests import Digest
from cache.errors import DigestMismatch, FillFailed, SizeMismatch

READ_CHUNK = 1 << 20


class BlobStore:
    """The blobs/ and tmp/ trees under one root."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs = root / "blobs"
        self.tmp = root / "tmp"

    def prepare(self) -> None:
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)
        for debris in self.tmp.iterdir():
            with contextlib.suppress(FileNotFoundError):
                debris.unlink()

    def path_for(self, digest: Digest) -> Path:
        return self.blobs / digest.algorithm / digest.hex[:2] / digest.hex

    def open(self, digest: Digest) -> tuple[int, int] | None:
        """An open read-only fd and the file's size, or None if the blob isn't stored."""
        try:
            fd = os.open(self.path_for(digest), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        return fd, os.fstat(fd).st_size

    def read_bytes(self, digest: Digest) -> bytes | None:
        try:
            return self.path_for(digest).read_bytes()
        except FileNotFoundError:
            return None

    def new_temp(self, digest: Digest) -> tuple[int, Path]:
        path = self.tmp / f"{digest.hex}.{secrets.token_hex(4)}.part"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        return fd, path

    def commit(self, fd: int, temp: Path, digest: Digest) -> Path:
        """fsync then rename into place. Blocking: call it from a worker thread."""
        os.fsync(fd)
        final = self.path_for(digest)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(temp, final)
        return final

    def write(self, digest: Digest, data: bytes) -> None:
        """Store small, already verified content (a manifest). Blocking."""
        fd, temp = self.new_temp(digest)
        try:
            os.write(fd, data)
            self.commit(fd, temp, digest)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                temp.unlink()
            raise
        finally:
            os.close(fd)

    def remove(self, digest: Digest) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path_for(digest).unlink()


class Fill:
    """One blob being written into the store, readable by any number of clients as it grows.

    The writer (the app's download task) calls `start`, `append` and then `verify` or
    `fail`. Readers dup the fill's fd and stream with `read_range`, which never hands out
    the final byte of a response until the whole blob verified: a client whose download
    turns out corrupt sees a cut-off body, never a complete-looking wrong one.
    """

    def __init__(self, digest: Digest, fd: int, temp: Path) -> None:
        self.digest = digest
        self.temp = temp
        self.size: int | None = None
        self.written = 0
        self.verified = False
        self.error: BaseException | None = None
        self.fd = fd
        self._hasher: Any = digest.hasher()
        self._recent: tuple[int, bytes] = (0, b"")
        loop = asyncio.get_running_loop()
        self._started: asyncio.Future[None] = loop.create_future()
        self._changed: asyncio.Future[None] = loop.create_future()

    @property
    def done(self) -> bool:
        return self.verified or self.error is not None

    def start(self, size: int | None) -> None:
        """Upstream answered; `size` is its Content-Length (None when it sent none)."""
        self.size = size
        if not self._started.done():
            self._started.set_result(None)
        self._notify()

    async def append(self, chunk: bytes) -> None:
        if self.size is not None and self.written + len(chunk) > self.size:
            raise SizeMismatch(self.size, self.written + len(chunk))
        # Hashing and writing release the GIL, so a worker thread keeps the loop serving.
        await asyncio.get_running_loop().run_in_executor(None, self._write, chunk)
        self._recent = (self.written, chunk)
        self.written += len(chunk)
        self._notify()

    def _write(self, chunk: bytes) -> None:
        view = memoryview(chunk)
        while view:
            view = view[os.write(self.fd, view) :]
        self._hasher.update(chunk)

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
            # Nobody may be waiting; don't let asyncio report an unretrieved exception.
            self._started.exception()
        self._recent = (0, b"")
        self._notify()

    async def wait_started(self) -> None:
        await asyncio.shield(self._started)

    async def wait_verified(self) -> None:
        while not self.done:
            await self.wait_change()
        if self.error is not None:
            raise self.error

    async def wait_change(self) -> None:
        await asyncio.shield(self._changed)

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.get_running_loop().create_future()
        changed.set_result(None)

    def recent(self, pos: int, n: int) -> bytes | None:
        """The bytes at `pos` if they are in the chunk just written: saves a read syscall."""
        offset, chunk = self._recent
        if offset <= pos < offset + len(chunk):
            start = pos - offset
            return chunk[start : start + n]
        return None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


async def read_range(
    fd: int, start: int, stop: int, fill: Fill | None = None
) -> AsyncIterator[bytes]:
    """Yield bytes [start, stop) of an open blob file, waiting on `fill` while it grows.

    While the fill is unverified, the last byte of the range is held back (see `Fill`).
    """
    pos = start
    while pos < stop:
        limit = stop
        if fill is not None and not fill.verified:
            if fill.error is not None:
                raise FillFailed(f"download of {fill.digest} failed: {fill.error}")
            limit = min(stop - 1, fill.written)
            if pos >= limit:
                await fill.wait_change()
                continue
        n = min(READ_CHUNK, limit - pos)
        data = fill.recent(pos, n) if fill is not None else None
        if data is None:
            # Page-cached reads are fast enough to stay on the loop (see FACTS: blocking
            # 1 MiB reads match nginx's sendfile); a thread hop per MiB costs more.
            data = os.pread(fd, n, pos)
        if not data:
            raise FillFailed(f"blob file ended at {pos} of {stop} bytes")
        pos += len(data)
        yield data
