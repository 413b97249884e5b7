"""The cache: blob files and their index kept consistent, plus the fills in progress.

This is the one storage object the proxy uses. The write order is what makes a crash at
any moment harmless: bytes go to tmp/, are verified and fsynced, are renamed into blobs/,
and only then get an index row. A row therefore always has a complete file behind it; a
file without a row (a crash between rename and insert) is adopted or removed at start-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cache.blobstore import BlobStore, Fill
from cache.digests import Digest
from cache.errors import StoreClosed
from cache.index import Index, TagRow


@dataclass(slots=True)
class OpenBlob:
    """A readable blob: a committed file, or a fill still growing (`fill` is set).

    The caller owns `fd` and must `close()` it.
    """

    fd: int
    size: int | None
    media_type: str | None = None
    fill: Fill | None = None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Cache:
    """Blob files, their index, and the in-flight fills, under `root`."""

    def __init__(self, root: Path, clock: Callable[[], float] = time.time) -> None:
        self.root = root
        self.files = BlobStore(root)
        self.index = Index(root / "index.db", clock)
        self._fills: dict[Digest, Fill] = {}
        self._state = "new"

    async def open(self) -> None:
        if self._state != "new":
            raise StoreClosed(f"cache is {self._state}")
        await asyncio.to_thread(self.files.prepare)
        await self.index.open()
        self._state = "open"

    async def close(self) -> None:
        if self._state == "closed":
            return
        self._state = "closed"
        for fill in list(self._fills.values()):
            self.abandon_fill(fill, StoreClosed("cache closed during download"))
        await self.index.close()

    # -- blobs ---------------------------------------------------------------------

    def open_blob(self, digest: Digest) -> OpenBlob | None:
        """The blob, committed or still filling, or None: the caller may begin a fill.

        Synchronous on purpose: with no await between looking and beginning a fill, two
        requests can never both miss, so one digest is downloaded once. A file under
        blobs/ is complete and verified by construction, so a hit needs no index read.
        """
        fill = self._fills.get(digest)
        if fill is not None and fill.error is None:
            # The fill's own fd is open until it is forgotten, so dup can't race a close.
            return OpenBlob(os.dup(fill.fd), fill.size, fill=fill)
        opened = self.files.open(digest)
        if opened is None:
            return None
        fd, size = opened
        return OpenBlob(fd, size)

    def begin_fill(self, digest: Digest) -> Fill:
        if self._state != "open":
            raise StoreClosed(f"cache is {self._state}")
        if digest in self._fills:
            raise RuntimeError(f"a fill of {digest} is already in progress")
        fd, temp = self.files.new_temp(digest)
        fill = Fill(digest, fd, temp)
        self._fills[digest] = fill
        return fill

    @property
    def fills_in_progress(self) -> int:
        return len(self._fills)

    async def commit_fill(self, fill: Fill, upstream: str, repo: str) -> None:
        """Verify (raises DigestMismatch/SizeMismatch), then make the blob durable."""
        try:
            fill.verify()
            await asyncio.to_thread(self.files.commit, fill.fd, fill.temp, fill.digest)
            await self.index.add_blob(str(fill.digest), fill.written, None, upstream, repo)
        except BaseException as exc:
            self.abandon_fill(fill, exc)
            raise
        self._forget(fill)

    def abandon_fill(self, fill: Fill, error: BaseException) -> None:
        fill.fail(error)
        with contextlib.suppress(FileNotFoundError):
            fill.temp.unlink()
        self._forget(fill)

    def _forget(self, fill: Fill) -> None:
        if self._fills.get(fill.digest) is fill:
            del self._fills[fill.digest]
        fill.close()

    # -- manifests -----------------------------------------------------------------

    async def put_manifest(
        self, digest: Digest, data: bytes, media_type: str, upstream: str, repo: str
    ) -> None:
        """Store verified manifest bytes exactly as upstream sent them."""
        await asyncio.to_thread(self.files.write, digest, data)
        await self.index.add_blob(str(digest), len(data), media_type, upstream, repo)

    async def get_manifest(self, digest: Digest) -> tuple[bytes, str] | None:
        row = await self.index.get_blob(str(digest))
        if row is None or row.media_type is None:
            return None
        data = await asyncio.to_thread(self.files.read_bytes, digest)
        if data is None or len(data) != row.size:
            await self.index.remove_blob(str(digest))
            return None
        return data, row.media_type

    async def link(self, upstream: str, repo: str, digest: Digest) -> None:
        await self.index.link_repo(upstream, repo, str(digest))

    # -- tags ----------------------------------------------------------------------

    async def tag_answers(self, upstream: str, repo: str, tag: str) -> list[TagRow]:
        return await self.index.tag_rows(upstream, repo, tag)

    async def set_tag(
        self, upstream: str, repo: str, tag: str, media_type: str, digest: Digest
    ) -> None:
        await self.index.set_tag(upstream, repo, tag, media_type, str(digest))

    async def repositories(self) -> list[tuple[str, str]]:
        return await self.index.repositories()
