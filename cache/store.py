"""The cache: blob files and their index kept consistent, plus the fills in progress.

This is the one storage object the proxy uses. The write order is what makes a crash at
any moment harmless: bytes go to tmp/, are verified and fsynced, are renamed into blobs/,
and only then get an index row. A row therefore always has a complete file behind it; a
file without a row (a crash between rename and insert) is adopted at start-up by
`cache.reconcile`, after its bytes are checked again.

A stored digest is served only to the (upstream, repository) pairs linked to it: the one
it was pulled through, and those upstream has since confirmed hold it too. An adopted
file has no links, so it is served to nobody until upstream confirms one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal

from cachetools import LRUCache

from cache.digests import Digest
from cache.errors import (
    DISK_FULL_ERRNOS,
    DigestMismatch,
    DiskFull,
    InvalidDigest,
    SizeMismatch,
    StoreClosed,
)
from cache.files import BlobFiles
from cache.fill import READ_CHUNK, Fill
from cache.index import INDEX_SUBJECTS, BlobRow, Index, ListingRow, TagAnswer, TagRow
from cache.referrers import Reference, Referrer, reference_of

log = logging.getLogger("pullthrough.cache")

# How a lookup was answered: from a stored file (hit), by joining a download in progress
# (coalesced), by starting one (miss), with cached content upstream failed to confirm
# (stale), or from the cache once upstream confirmed this repository holds it (confirmed).
LookupResult = Literal["hit", "miss", "coalesced", "stale", "confirmed"]
CacheState = Literal["new", "open", "closed"]
Link = tuple[str, str]  # (upstream, repository)
# Digests whose confirmed links are kept in memory, least recent dropped: a linked hit
# then costs a dict lookup, and at most one indexed SQLite read when it was dropped.
LINKS_REMEMBERED = 65536


@dataclass(slots=True)
class OpenBlob:
    """A readable blob: a committed file, or a fill still growing (`fill` is set, and
    `reader` is this blob's place in it).

    The caller owns `fd` and its place in the fill, and must `close()` it.
    """

    fd: int
    size: int | None
    fill: Fill | None = None
    result: LookupResult = "hit"
    reader: int | None = None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.fill is not None and self.reader is not None:
            self.fill.detach(self.reader)
            self.reader = None


@dataclass(frozen=True)
class Budget:
    max_size: int
    high_watermark: float
    low_watermark: float

    @property
    def keeps(self) -> int:
        """Bytes left once eviction has run: where it stops."""
        return int(self.max_size * self.low_watermark)


class Cache:
    """Blob files, their index, and the in-flight fills, under `root`."""

    def __init__(self, root: Path, budget: Budget, clock: Callable[[], float] = time.time) -> None:
        self.root = root
        self.budget = budget
        self.clock = clock
        self.files = BlobFiles(root)
        self.index = Index(root / "index.db", clock)
        self._used = 0  # bytes indexed
        self._count = 0  # blobs indexed
        self.on_disk_full: Callable[[], object] | None = None
        self.over_budget = asyncio.Event()  # wakes the evictor
        self._fills: dict[Digest, Fill] = {}
        self._accessed: dict[str, float] = {}
        self._links: LRUCache[str, set[Link]] = LRUCache(LINKS_REMEMBERED)
        self._removals = 0  # bumped by every removal, so a link read before one is not kept
        self._state: CacheState = "new"

    async def open(self, clear_debris: bool = True) -> None:
        """Open the index. `clear_debris` deletes tmp/ leftovers: only the server may, at
        start-up, since a running server's downloads live there."""
        if self._state != "new":
            raise StoreClosed(f"cache is {self._state}")
        await asyncio.to_thread(self.files.prepare, clear_debris)
        await self.index.open()
        try:
            await self.recount()
        except BaseException:
            await self.index.close()  # its thread would keep the process alive
            raise
        self._state = "open"

    async def index_subjects(self) -> None:
        """Manifests stored before the index kept subjects: read them once (the files
        are small, and Docker's formats, most of a cache, are skipped unread). The server
        runs it in the background after an upgrade, so that it neither delays the start
        nor runs again in every CLI command that opens the cache."""
        if not await self.index.chore_pending(INDEX_SUBJECTS):
            return
        digests = await self.index.manifests_but_docker()
        found = await asyncio.to_thread(self._read_references, digests)
        await self.index.finish_indexing_subjects(found)
        log.info(
            "indexed the subjects of %d stored manifests (of %d read)", len(found), len(digests)
        )

    def _read_references(self, digests: list[str]) -> dict[str, Reference]:
        found = {}
        for digest in digests:
            try:
                data = self.files.read_bytes(Digest.parse(digest))
            except InvalidDigest:  # no file can be named by it: reconciliation drops it
                continue
            reference = reference_of(data) if data is not None else None
            if reference is not None:
                found[digest] = reference
        return found

    @property
    def used(self) -> int:
        """Bytes indexed, as of the last change this process made or `recount`."""
        return self._used

    @property
    def count(self) -> int:
        """Blobs indexed."""
        return self._count

    async def recount(self) -> None:
        """Read usage from the index: another process (`pullthrough evict`, `gc`, `fsck`)
        may have changed it."""
        self._used, self._count = await self.index.usage()

    async def close(self) -> None:
        if self._state == "closed":
            return
        self._state = "closed"
        for fill in list(self._fills.values()):
            self.abandon_fill(fill, StoreClosed("cache closed during download"))
        with contextlib.suppress(StoreClosed):
            await self.flush_access()
        await self.index.close()

    async def readiness_problem(self) -> str | None:
        """Why the cache can't serve now, or None: the index answers, tmp/ takes writes."""
        if self._state != "open":
            return f"cache is {self._state}"
        try:
            await self.index.usage()
            await asyncio.to_thread(self.files.probe_writable)
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"
        return None

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
            fd = os.dup(fill.fd) if fill.fd >= 0 else -1
            # Joined from byte 0 at once: a pass-through download must keep its bytes
            # until this reader starts, however soon the first chunk arrives.
            return OpenBlob(fd, fill.size, fill, "coalesced", reader=fill.attach(0))
        opened = self.files.open(digest)
        if opened is None:
            return None
        self.touch(digest)
        fd, size = opened
        return OpenBlob(fd, size)

    # -- links: which (upstream, repository) may be served a digest ---------------------

    async def is_linked(self, digest: Digest, link: Link) -> bool:
        """Whether `link` may be served this digest without asking upstream first."""
        fill = self._fills.get(digest)
        if fill is not None and link in fill.links:
            return True
        key = str(digest)
        known = self._links.get(key)
        if known is not None and link in known:
            return True
        removals = self._removals
        if not await self.index.has_link(link[0], link[1], key):
            return False
        if removals == self._removals:  # else the row may be gone already: ask again next time
            self._remember(key, link)
        return True

    def stores(self, digest: Digest) -> bool:
        """Whether `open_blob` would find the digest: a file, or a download to join."""
        fill = self._fills.get(digest)
        if fill is not None and fill.error is None:
            return True
        return self.files.path_for(digest).is_file()

    async def link(self, digest: Digest, link: Link) -> None:
        """Upstream confirmed `link` holds this digest: serve it the stored copy from now on."""
        fill = self._fills.get(digest)
        if fill is not None:
            fill.links.add(link)  # indexed when the fill commits
        self._remember(str(digest), link)
        with contextlib.suppress(DiskFull):  # kept in memory; confirmed again after a restart
            await self.index.add_link(link[0], link[1], str(digest))

    def _remember(self, digest: str, link: Link) -> None:
        known = self._links.get(digest)
        if known is None:
            self._links[digest] = known = set()
        known.add(link)

    def _forget_links(self, digests: list[str]) -> None:
        self._removals += 1
        for digest in digests:
            self._links.pop(digest, None)

    def touch(self, digest: Digest | str) -> None:
        """Note an access; written to the index in batches by `flush_access`."""
        self._accessed[str(digest)] = self.clock()

    async def flush_access(self) -> None:
        if self._accessed:
            accessed, self._accessed = self._accessed, {}
            try:
                await self.index.touch(accessed)
            except DiskFull:
                # Keep them for the next flush: eviction must go on when the disk is full.
                for digest, when in accessed.items():
                    self._accessed[digest] = max(when, self._accessed.get(digest, when))

    def begin_fill(
        self, digest: Digest, stall_timeout: float = 30.0, link: Link | None = None
    ) -> Fill:
        """Start a download of `digest` for `link`, the pair that may read it at once."""
        if self._state != "open":
            raise StoreClosed(f"cache is {self._state}")
        if digest in self._fills:
            raise RuntimeError(f"a fill of {digest} is already in progress")
        try:
            fd, temp = self.files.new_temp(digest)
        except OSError as exc:
            if exc.errno not in DISK_FULL_ERRNOS:
                raise
            fd, temp = -1, self.files.tmp / "none"
        fill = Fill(digest, fd, temp, stall_timeout)
        fill.on_passthrough = self._disk_full
        if link is not None:
            fill.links.add(link)
        self._fills[digest] = fill
        if fd < 0:
            fill.go_passthrough()
        return fill

    def reserved(self) -> int:
        """Bytes that fills in progress will add when they commit (a fill's size counts
        from the moment eviction made room for it)."""
        return sum(f.size or 0 for f in self._fills.values())

    def _disk_full(self, fill: Fill) -> None:
        """A fill turned pass-through: no new readers join it, and eviction starts."""
        if self._fills.get(fill.digest) is fill:
            del self._fills[fill.digest]
        with contextlib.suppress(FileNotFoundError):
            fill.temp.unlink()  # readers keep their fds; the space comes back when they close
        self._note_disk_full(str(fill.digest))

    def _note_disk_full(self, what: str) -> None:
        """Something was served but not stored for lack of space: count it, wake eviction."""
        if self.on_disk_full is not None:
            self.on_disk_full()
        log.warning("not caching %s: no space left (disk full or budget spent)", what)
        self.over_budget.set()

    @property
    def fills_in_progress(self) -> int:
        return len(self._fills)

    async def commit_fill(self, fill: Fill, upstream: str, repo: str) -> bool:
        """Verify (raises DigestMismatch/SizeMismatch), then make the blob durable.

        Returns False when the fill was passed through without being cached.
        """
        try:
            fill.verify()
            if fill.passthrough:
                self._forget(fill)
                return False
            await asyncio.to_thread(self.files.commit, fill.fd, fill.temp, fill.digest)
            await self._indexed(str(fill.digest), fill.written, None, upstream, repo)
        except DiskFull:
            # Verified and served, but the index has no room: drop the file it would describe.
            await asyncio.to_thread(self.files.remove, fill.digest)
            self._forget(fill)
            self._note_disk_full(str(fill.digest))
            return False
        except BaseException as exc:
            self.abandon_fill(fill, exc)
            raise
        # In memory before the fill is forgotten, so its readers' pairs stay linked.
        key, extra = str(fill.digest), fill.links - {(upstream, repo)}
        for link in fill.links | {(upstream, repo)}:
            self._remember(key, link)
        self._forget(fill)
        with contextlib.suppress(DiskFull):
            for link in extra:
                await self.index.add_link(link[0], link[1], key)
        return True

    def abandon_fill(self, fill: Fill, error: BaseException) -> None:
        fill.fail(error)
        with contextlib.suppress(FileNotFoundError):
            fill.temp.unlink()
        self._forget(fill)

    def _forget(self, fill: Fill) -> None:
        if self._fills.get(fill.digest) is fill:
            del self._fills[fill.digest]
        fill.close()
        fill.settled.set()

    async def finish_commits(self) -> None:
        """Shutdown: let fills already verified finish committing, rather than lose them.
        Callers bound the wait with asyncio.timeout."""
        await asyncio.gather(*(f.settled.wait() for f in self._fills.values() if f.verified))

    async def _indexed(
        self,
        digest: str,
        size: int,
        media_type: str | None,
        upstream: str,
        repo: str,
        reference: Reference | None = None,
    ) -> None:
        if await self.index.add_blob(digest, size, media_type, upstream, repo, reference):
            self._used += size
            self._count += 1
            if self._used > self.budget.max_size * self.budget.high_watermark:
                self.over_budget.set()

    async def remove(self, rows: list[BlobRow]) -> list[BlobRow]:
        """Evict: files first, then rows. A crash in between leaves rows without files,
        which lookups and reconciliation drop. Open readers keep their fds.

        Returns the rows this call removed from the index: not those that another process
        removed first, so nothing is subtracted or counted twice."""
        await asyncio.to_thread(self._unlink_all, rows)
        removed = await self.unindex([row.digest for row in rows])
        for row in removed:
            self._accessed.pop(row.digest, None)
        self._used -= sum(row.size for row in removed)
        self._count -= len(removed)
        return removed

    async def unindex(self, digests: list[str]) -> list[BlobRow]:
        """Drop these rows and their links, in the index and in memory; return the rows
        that were there."""
        self._forget_links(digests)
        return await self.index.remove_blobs(digests)

    def _unlink_all(self, rows: list[BlobRow]) -> None:
        for row in rows:
            self.files.remove(Digest.parse(row.digest))

    # -- manifests -----------------------------------------------------------------

    async def put_manifest(
        self, digest: Digest, data: bytes, media_type: str, upstream: str, repo: str
    ) -> None:
        """Store verified manifest bytes exactly as upstream sent them; when the disk is
        full, they are served but not stored."""
        try:
            await asyncio.to_thread(self.files.write, digest, data)
            reference = reference_of(data)
            await self._indexed(str(digest), len(data), media_type, upstream, repo, reference)
        except DiskFull:
            await asyncio.to_thread(self.files.remove, digest)
            self._note_disk_full(f"manifest {digest}")

    async def get_manifest(self, digest: Digest) -> tuple[bytes, str] | None:
        row = await self.index.get_blob(str(digest))
        if row is None or row.media_type is None:
            return None
        data = await asyncio.to_thread(self.files.read_bytes, digest)
        if data is None or len(data) != row.size:
            with contextlib.suppress(DiskFull):  # dropped on a later lookup instead
                await self.remove([row])
            return None
        self.touch(digest)
        return data, row.media_type

    # -- tags ----------------------------------------------------------------------

    async def tag_answers(self, upstream: str, repo: str, tag: str) -> list[TagRow]:
        return await self.index.tag_rows(upstream, repo, tag)

    async def set_tag(
        self, upstream: str, repo: str, tag: str, accept: str, media_type: str, digest: Digest
    ) -> None:
        """Remember upstream's answer for a tag and an Accept; when the disk is full, the
        answer was still served, it is just not remembered."""
        try:
            await self.index.set_tag(upstream, repo, tag, accept, media_type, str(digest))
        except DiskFull:
            self._note_disk_full(f"tag {repo}:{tag}")

    async def repositories(self) -> list[tuple[str, str]]:
        return await self.index.repositories()

    # -- listings: tags/list and referrers answers -----------------------------------

    async def listing(
        self, upstream: str, repo: str, endpoint: str, query: str
    ) -> ListingRow | None:
        return await self.index.listing(upstream, repo, endpoint, query)

    async def set_listing(
        self,
        upstream: str,
        repo: str,
        endpoint: str,
        query: str,
        body: bytes,
        headers: dict[str, str],
        keep_for: float,
    ) -> None:
        """Remember upstream's answer, and forget its answers not renewed for `keep_for`;
        on a full disk the answer was served, just not remembered."""
        try:
            await self.index.set_listing(upstream, repo, endpoint, query, body, headers, keep_for)
        except DiskFull:
            self._note_disk_full(f"{repo}/{endpoint}")

    async def drop_listings(self, upstream: str, repo: str, endpoint: str) -> None:
        with contextlib.suppress(DiskFull):  # a later answer replaces them anyway
            await self.index.drop_listings(upstream, repo, endpoint)

    async def referrers(self, upstream: str, repo: str, subject: Digest) -> list[Referrer]:
        """Stored manifests that (upstream, repo) may be served whose subject is `subject`."""
        return await self.index.referrers(upstream, repo, str(subject))

    # -- imports: verified in tmp/ first, then indexed all at once ----------------------

    def stage(
        self,
        digest: Digest,
        source: IO[bytes],
        size: int,
        progress: Callable[[int], object] | None = None,
    ) -> Path:
        """Copy `size` bytes of `source` into a temp file, check them against `digest`,
        and fsync it; `commit_staged` moves it into the store. Blocking: call it from a
        worker thread. Raises SizeMismatch or DigestMismatch (the temp file is deleted),
        DiskFull."""
        with self.files.writing(digest) as (fd, temp):
            hasher, done = digest.hasher(), 0
            while done < size and (chunk := source.read(min(READ_CHUNK, size - done))):
                hasher.update(chunk)
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view) :]
                done += len(chunk)
                if progress is not None:
                    progress(done)
            if done != size or source.read(1):
                raise SizeMismatch(size, done if done != size else size + 1)
            if hasher.hexdigest() != digest.hex:
                raise DigestMismatch(str(digest), f"{digest.algorithm}:{hasher.hexdigest()}")
            os.fsync(fd)
        return temp

    def discard_staged(self, staged: list[Path]) -> None:
        for temp in staged:
            temp.unlink(missing_ok=True)

    async def commit_staged(
        self,
        staged: dict[Digest, Path],
        rows: list[BlobRow],
        links: list[tuple[str, str, str]],
        tags: list[TagAnswer],
        manifests: dict[Digest, bytes],
    ) -> None:
        """Move staged files into the store, then index `rows` (staged or stored already),
        their `links` (upstream, repo, digest), `tags`, and the subjects the `manifests`
        (the import's, by digest) refer to, in one transaction: an import is indexed whole
        or not at all. A crash in between leaves files without rows, which `reconcile`
        adopts unlinked, so they are served to nobody."""
        await asyncio.to_thread(self._place_all, staged)
        # An imported artifact answers referrers of its subject, as a pulled one does.
        references = {
            str(digest): reference
            for digest, data in manifests.items()
            if (reference := reference_of(data)) is not None
        }
        try:
            added = await self.index.add_imported(rows, links, tags, references)
        except BaseException:
            for digest in staged:  # unless a running server indexed it meanwhile
                if await self.index.get_blob(str(digest)) is None:
                    await asyncio.to_thread(self.files.remove, digest)
            raise
        self._used += sum(row.size for row in added)
        self._count += len(added)
        for upstream, repo, linked in links:
            self._remember(linked, (upstream, repo))
        if self._used > self.budget.max_size * self.budget.high_watermark:
            self.over_budget.set()

    def _place_all(self, staged: dict[Digest, Path]) -> None:
        for digest, temp in staged.items():
            self.files.place(temp, digest)  # fsynced by `stage`
