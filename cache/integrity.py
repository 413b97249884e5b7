"""Checking the store against its index: at start-up (`reconcile`) and on demand (`fsck`).

found                                   reconcile                 fsck
debris in tmp/                          deleted (BlobFiles.prepare, before serving)
a row whose file is gone                row dropped               reported; --repair drops
a file without a row (crash between     re-hashed, then adopted   reported
  rename and insert)                      or deleted
a file whose bytes don't match its name only if it has no row     re-hashed, reported;
                                                                    --repair deletes

Links go with their rows: a dropped row takes its repositories' links along, and an
adopted file has none, so it is served to no repository until upstream confirms one.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from cache.digests import Digest
from cache.errors import InvalidDigest
from cache.store import Cache

log = logging.getLogger("pullthrough.integrity")


@dataclass
class Report:
    checked: int = 0
    bad: list[str] = field(default_factory=list)  # bytes don't match the digest
    missing: list[str] = field(default_factory=list)  # indexed, no file
    adopted: list[str] = field(default_factory=list)  # file without row, verified, indexed
    removed: list[str] = field(default_factory=list)  # deleted from disk and index

    @property
    def clean(self) -> bool:
        return not self.bad and not self.missing


def stored_files(blobs: Path) -> Iterator[tuple[Digest, Path]]:
    """Every well-named file under blobs/; stray names are skipped, never parsed into paths."""
    for algorithm in ("sha256", "sha512"):
        root = blobs / algorithm
        if not root.is_dir():
            continue
        for shard in os.scandir(root):
            if not shard.is_dir():
                continue
            for entry in os.scandir(shard.path):
                try:
                    digest = Digest.parse(f"{algorithm}:{entry.name}")
                except InvalidDigest:
                    continue
                if entry.name[:2] == shard.name and entry.is_file():
                    yield digest, Path(entry.path)


def hashes_to(path: Path, digest: Digest) -> bool:
    with path.open("rb") as file:
        return bool(hashlib.file_digest(file, digest.algorithm).hexdigest() == digest.hex)


async def reconcile(cache: Cache) -> Report:
    """Make the index and the files agree after a crash. Safe while serving."""
    report = Report()
    on_disk = dict(await asyncio.to_thread(lambda: list(stored_files(cache.files.blobs))))
    indexed = await cache.index.digests()
    report.missing = sorted(indexed - {str(d) for d in on_disk})
    if report.missing:
        await cache.unindex(report.missing)
    for digest, path in on_disk.items():
        if str(digest) in indexed:
            continue
        report.checked += 1
        if await asyncio.to_thread(hashes_to, path, digest):
            await cache.index.adopt(str(digest), path.stat().st_size)
            report.adopted.append(str(digest))
        else:
            path.unlink(missing_ok=True)
            report.bad.append(str(digest))
            report.removed.append(str(digest))
    await cache.recount()
    if report.missing or report.adopted or report.bad:
        log.warning(
            "reconciled the cache: %d rows without files dropped, %d files adopted,"
            " %d corrupt files removed",
            len(report.missing),
            len(report.adopted),
            len(report.bad),
        )
    return report


async def fsck(cache: Cache, repair: bool = False) -> Report:
    """Re-hash every stored blob; with `repair`, remove the bad ones and stale rows."""
    report = Report()
    indexed = await cache.index.digests()
    seen: set[str] = set()
    for digest, path in await asyncio.to_thread(lambda: list(stored_files(cache.files.blobs))):
        seen.add(str(digest))
        report.checked += 1
        if not await asyncio.to_thread(hashes_to, path, digest):
            report.bad.append(str(digest))
    report.missing = sorted(indexed - seen)
    if repair:
        for text in report.bad:
            cache.files.remove(Digest.parse(text))
        doomed = report.bad + report.missing
        await cache.unindex(doomed)
        report.removed = doomed
        await cache.recount()
    return report
