"""Blob files on disk.

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

import contextlib
import ctypes
import errno
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

from cache.digests import Digest
from cache.errors import DISK_FULL_ERRNOS, DiskFull

# Bytes of a fill handed to the disk at a time while its download goes on.
WRITEBACK_STEP = 8 << 20
_SYNC_FILE_RANGE_WRITE = 2


def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    with contextlib.suppress(OSError, AttributeError):
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
        function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
        function.restype = ctypes.c_int
        return function
    return None


_SYNC_RANGE = _sync_file_range()


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing a range of a file to disk, without waiting for it.

    Otherwise a fill's bytes stay dirty until the commit's fsync flushes the whole blob
    at once, just when its client, done with that blob, fsyncs its own copy, and both
    wait on the disk together (figures in tests/bench/README.md). Linux only
    (sync_file_range(2)); elsewhere, and on any error, nothing happens: the commit's
    fsync still makes the file durable."""
    if _SYNC_RANGE is not None:
        _SYNC_RANGE(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


class BlobFiles:
    """The blobs/ and tmp/ trees under one root."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs = root / "blobs"
        self.tmp = root / "tmp"

    def prepare(self, clear_debris: bool = True) -> None:
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)
        for debris in self.tmp.iterdir() if clear_debris else ():
            with contextlib.suppress(FileNotFoundError):
                debris.unlink()

    def probe_writable(self) -> None:
        probe = self.tmp / f"ready.{secrets.token_hex(4)}.probe"
        probe.write_bytes(b"ok")
        probe.unlink()

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
        return self.place(temp, digest)

    def place(self, temp: Path, digest: Digest) -> Path:
        """Rename a temp file, fsynced already, into place. Blocking."""
        final = self.path_for(digest)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(temp, final)
        return final

    @contextlib.contextmanager
    def writing(self, digest: Digest) -> Iterator[tuple[int, Path]]:
        """A new temp file for `digest`, closed at the end and removed if the block
        fails; a full disk's OSError becomes DiskFull. Blocking."""
        try:
            fd, temp = self.new_temp(digest)
            try:
                yield fd, temp
            except BaseException:
                temp.unlink(missing_ok=True)
                raise
            finally:
                os.close(fd)
        except OSError as exc:
            if exc.errno in DISK_FULL_ERRNOS:
                raise DiskFull(str(exc)) from exc
            raise

    def write(self, digest: Digest, data: bytes) -> None:
        """Store small, already verified content (a manifest). Blocking.

        Raises DiskFull when there is no room for it."""
        with self.writing(digest) as (fd, temp):
            if os.write(fd, data) != len(data):  # short: only a full disk does that
                raise OSError(errno.ENOSPC, "short write")
            self.commit(fd, temp, digest)

    def remove(self, digest: Digest) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path_for(digest).unlink()
