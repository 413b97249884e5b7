"""The SQLite index of what the store holds. All SQL lives in this module.

One connection (aiosqlite runs it on its own thread) does every read and write, in WAL
mode, with short `BEGIN IMMEDIATE` transactions. The schema is one string, migrated by
`PRAGMA user_version`. Timestamps are wall-clock seconds because they outlive the process.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiosqlite

from cache.errors import DiskFull, StoreClosed
from cache.referrers import Reference, Referrer

SCHEMA_VERSION = 3
# Upstream's latest answer for a tag, one row per set of media types a client accepted:
# a client that takes an index and one that takes only image manifests may be given
# different manifests for one tag, and each answer has its own age.
_TAGS = """
CREATE TABLE tags (
    upstream   TEXT NOT NULL,
    repo       TEXT NOT NULL,
    tag        TEXT NOT NULL,
    accept     TEXT NOT NULL,       -- the accepted media types, sorted; '*/*' for any
    media_type TEXT NOT NULL,
    digest     TEXT NOT NULL,
    checked    REAL NOT NULL,       -- when upstream last confirmed this answer
    PRIMARY KEY (upstream, repo, tag, accept)
) WITHOUT ROWID;
"""
# Upstream's latest answer to a tags/list or referrers request, per query string (each
# page of a paginated list is its own answer), with the headers passed on to clients
# (Link as upstream sent it: the proxy rewrites it for each client's spelling of the name).
# Served within listing_ttl, and when upstream fails. Not blobs: they count against no
# budget; an answer upstream has not renewed for blob_ttl is dropped when that upstream
# next gives one (so never during its outage).
_LISTINGS = """
CREATE TABLE listings (
    upstream TEXT NOT NULL,
    repo     TEXT NOT NULL,
    endpoint TEXT NOT NULL,         -- 'tags/list' or 'referrers/<digest>'
    query    TEXT NOT NULL,         -- the query sent upstream, sorted and encoded
    body     BLOB NOT NULL,
    headers  TEXT NOT NULL,         -- JSON object of the headers passed on
    checked  REAL NOT NULL,         -- when upstream gave this answer
    PRIMARY KEY (upstream, repo, endpoint, query)
);
CREATE INDEX listings_by_checked ON listings (upstream, checked);
"""
# For each stored manifest that has an OCI 1.1 `subject`: the digest it refers to, and
# what a referrers index says of it (cache/referrers.py). Rows go with their blob.
_SUBJECTS = """
CREATE TABLE subjects (
    digest        TEXT PRIMARY KEY, -- the manifest that refers
    subject       TEXT NOT NULL,    -- the digest it refers to
    artifact_type TEXT,
    annotations   TEXT              -- JSON object
) WITHOUT ROWID;
CREATE INDEX subjects_by_subject ON subjects (subject);
"""
# Work a migration leaves for `cache.store.Cache.open`, which can read the blob files
# that SQL can't: a row stays until that work is done, so a crash in between redoes it.
_CHORES = """
CREATE TABLE chores (name TEXT PRIMARY KEY) WITHOUT ROWID;
"""
# The chore of indexing the subjects of manifests stored before version 3.
INDEX_SUBJECTS = "index_subjects"
SCHEMA = f"""
CREATE TABLE blobs (
    digest      TEXT PRIMARY KEY,
    size        INTEGER NOT NULL,
    media_type  TEXT,               -- set for manifests, NULL for layers and configs
    created     REAL NOT NULL,
    last_access REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX blobs_by_last_access ON blobs (last_access);

-- Which repositories a blob may be served under (pulled through, or confirmed upstream
-- since): the scoping rule, the catalog, and stats by repository.
CREATE TABLE repo_blobs (
    upstream TEXT NOT NULL,
    repo     TEXT NOT NULL,
    digest   TEXT NOT NULL,
    PRIMARY KEY (upstream, repo, digest)
) WITHOUT ROWID;
CREATE INDEX repo_blobs_by_digest ON repo_blobs (digest);
{_TAGS}{_LISTINGS}{_SUBJECTS}{_CHORES}"""
# Scripts that bring an index of version N to N + 1.
MIGRATIONS = {
    # Version 1 kept one tag row per media type, not per Accept. Those rows can't say
    # which clients they answered, so they stay only as stale-if-error fallbacks.
    1: f"""
ALTER TABLE tags RENAME TO tags_v1;
{_TAGS}
INSERT INTO tags SELECT upstream, repo, tag, 'v1:' || media_type, media_type, digest, checked
    FROM tags_v1;
DROP TABLE tags_v1;
""",
    # Version 2 did not keep listings or subjects. The subjects of the manifests already
    # stored are read from their files at the next open (the chore).
    2: f"""
{_LISTINGS}{_SUBJECTS}{_CHORES}
INSERT INTO chores (name) VALUES ('{INDEX_SUBJECTS}');
""",
}
# The eviction queries: they must walk blobs_by_last_access, never sort the whole table
# (a test reads their query plan).
LEAST_RECENT = "SELECT digest, size, media_type FROM blobs ORDER BY last_access LIMIT ?"
LEAST_RECENT_BEFORE = (
    "SELECT digest, size, media_type FROM blobs WHERE last_access < ? ORDER BY last_access LIMIT ?"
)
SQLITE_FULL = 13  # "database or disk is full"


@dataclass(frozen=True, slots=True)
class BlobRow:
    digest: str
    size: int
    media_type: str | None


@dataclass(frozen=True, slots=True)
class ListingRow:
    body: bytes
    headers: dict[str, str]
    checked: float


@dataclass(frozen=True, slots=True)
class TagRow:
    accept: str
    media_type: str
    digest: str
    checked: float


@dataclass(frozen=True, slots=True)
class TagAnswer:
    """A tag's answer to record (`Index.add_imported`); `checked` is the time of writing."""

    upstream: str
    repo: str
    tag: str
    accept: str
    media_type: str
    digest: str


class Index:
    """Named async queries over the index database. Owns its one connection."""

    def __init__(self, path: Path, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.clock = clock
        self._db: aiosqlite.Connection | None = None
        self._closed = False
        # One connection serves every coroutine: without this lock, two transactions would
        # interleave on it ("cannot start a transaction within a transaction", or worse,
        # one coroutine's statements landing in another's transaction).
        self._write_lock = asyncio.Lock()

    async def open(self) -> None:
        if self._closed:
            raise StoreClosed("index was closed")
        db = await aiosqlite.connect(self.path, isolation_level=None)
        await db.execute("PRAGMA journal_mode=WAL")
        # NORMAL is durable across process crashes in WAL mode; only power loss may drop
        # the last commits, and start-up reconciliation re-adopts files that lost rows.
        await db.execute("PRAGMA synchronous=NORMAL")
        await db.execute("PRAGMA busy_timeout=5000")
        self._db = db
        await self._migrate()

    async def close(self) -> None:
        self._closed = True
        if self._db is not None:
            db, self._db = self._db, None
            await db.close()

    @property
    def db(self) -> aiosqlite.Connection:
        if self._db is None:
            raise StoreClosed("index is not open")
        return self._db

    async def _migrate(self) -> None:
        async with self.db.execute("PRAGMA user_version") as cursor:
            row = await cursor.fetchone()
        version = row[0] if row else 0
        if version > SCHEMA_VERSION:
            raise StoreClosed(f"index schema {version} is newer than this program's")
        if version == 0:
            await self._run_script(SCHEMA, SCHEMA_VERSION)
            return
        for step in range(version, SCHEMA_VERSION):
            await self._run_script(MIGRATIONS[step], step + 1)

    async def _run_script(self, script: str, version: int) -> None:
        await self.db.executescript(
            f"BEGIN IMMEDIATE; {script} PRAGMA user_version={version}; COMMIT;"
        )

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        async with self._write_lock:
            db = self.db
            try:
                await db.execute("BEGIN IMMEDIATE")
                yield db
                await db.execute("COMMIT")
            except BaseException as exc:
                # Also when cancelled while BEGIN was queued: aiosqlite runs statements in
                # order, so this ROLLBACK lands after it and no transaction stays open.
                with contextlib.suppress(sqlite3.OperationalError):
                    await asyncio.shield(db.execute("ROLLBACK"))
                if getattr(exc, "sqlite_errorcode", None) == SQLITE_FULL:
                    raise DiskFull(f"the index could not grow: {exc}") from exc
                raise

    async def _write(self, statements: Iterable[tuple[str, tuple[object, ...]]]) -> None:
        async with self._transaction() as db:
            for sql, params in statements:
                await db.execute(sql, params)

    async def add_blob(
        self,
        digest: str,
        size: int,
        media_type: str | None,
        upstream: str,
        repo: str,
        reference: Reference | None = None,
    ) -> bool:
        """Index a stored blob (with the subject it refers to, for a manifest that has
        one); True if it is new (and so adds to the cache's size)."""
        async with self._transaction() as db:
            added = await _upsert_blob(db, BlobRow(digest, size, media_type), self.clock())
            await db.execute(_ADD_LINK, (upstream, repo, digest))
            if reference is not None:
                await db.execute(_ADD_SUBJECT, _subject_row(digest, reference))
        return added

    async def adopt(self, digest: str, size: int) -> None:
        """Index a verified file found without a row (its repository is not known)."""
        now = self.clock()
        await self._write(
            [
                (
                    "INSERT OR IGNORE INTO blobs (digest, size, media_type, created, last_access)"
                    " VALUES (?, ?, NULL, ?, ?)",
                    (digest, size, now, now),
                )
            ]
        )

    async def has_link(self, upstream: str, repo: str, digest: str) -> bool:
        """Whether (upstream, repo) may be served this stored digest (its primary key)."""
        async with self.db.execute(
            "SELECT 1 FROM repo_blobs WHERE upstream = ? AND repo = ? AND digest = ?",
            (upstream, repo, digest),
        ) as cursor:
            return await cursor.fetchone() is not None

    async def add_link(self, upstream: str, repo: str, digest: str) -> None:
        """Link (upstream, repo) to a digest, if it is indexed: a link never outlives its
        blob, and is never made ahead of it."""
        await self._write(
            [
                (
                    "INSERT OR IGNORE INTO repo_blobs (upstream, repo, digest)"
                    " SELECT ?, ?, digest FROM blobs WHERE digest = ?",
                    (upstream, repo, digest),
                )
            ]
        )

    async def add_imported(
        self,
        rows: list[BlobRow],
        links: list[tuple[str, str, str]],
        tags: list[TagAnswer],
        references: dict[str, Reference],
    ) -> list[BlobRow]:
        """Index an import in one transaction, so it is all there or none of it: the blob
        rows, their (upstream, repo, digest) links, the subjects of its manifests (by
        digest), and each tag's answer, which replaces every answer that tag had. Returns
        the rows that are new."""
        now = self.clock()
        added = []
        async with self._transaction() as db:
            for row in rows:
                if await _upsert_blob(db, row, now):
                    added.append(row)
            await db.executemany(_ADD_LINK, links)
            await db.executemany(
                _ADD_SUBJECT, [_subject_row(d, ref) for d, ref in references.items()]
            )
            for tag in tags:
                await db.execute(
                    "DELETE FROM tags WHERE upstream = ? AND repo = ? AND tag = ?",
                    (tag.upstream, tag.repo, tag.tag),
                )
                await db.execute(
                    "INSERT INTO tags (upstream, repo, tag, accept, media_type, digest, checked)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (tag.upstream, tag.repo, tag.tag, tag.accept, tag.media_type, tag.digest, now),
                )
        return added

    async def get_blob(self, digest: str) -> BlobRow | None:
        async with self.db.execute(
            "SELECT digest, size, media_type FROM blobs WHERE digest = ?", (digest,)
        ) as cursor:
            row = await cursor.fetchone()
        return BlobRow(row[0], row[1], row[2]) if row else None

    async def remove_blobs(self, digests: list[str]) -> list[BlobRow]:
        """Delete these rows; return those that were there. Another process (`pullthrough
        evict`) may have deleted some already, and their sizes must not count twice."""
        rows = [(digest,) for digest in digests]
        async with self._transaction() as db:
            removed = []
            for batch in _batches(digests, 500):  # SQLite caps the parameters per statement
                marks = ",".join("?" * len(batch))
                async with db.execute(
                    f"SELECT digest, size, media_type FROM blobs WHERE digest IN ({marks})", batch
                ) as cursor:
                    removed += [BlobRow(r[0], r[1], r[2]) for r in await cursor.fetchall()]
            await db.executemany("DELETE FROM blobs WHERE digest = ?", rows)
            await db.executemany("DELETE FROM repo_blobs WHERE digest = ?", rows)
            await db.executemany("DELETE FROM tags WHERE digest = ?", rows)
            await db.executemany("DELETE FROM subjects WHERE digest = ?", rows)
        return removed

    async def usage(self) -> tuple[int, int]:
        """(bytes, count) of everything indexed."""
        # Under the write lock: on the one shared connection, a read between another
        # coroutine's INSERT and COMMIT would see a row its writer hasn't counted yet.
        async with (
            self._write_lock,
            self.db.execute("SELECT coalesce(sum(size), 0), count(*) FROM blobs") as cursor,
        ):
            row = await cursor.fetchone()
        return (row[0], row[1]) if row else (0, 0)

    async def touch(self, accessed: dict[str, float]) -> None:
        """Record last-access times in one transaction (they are batched in memory)."""
        rows = [(when, digest) for digest, when in accessed.items()]
        async with self._transaction() as db:
            await db.executemany(
                "UPDATE blobs SET last_access = max(last_access, ?) WHERE digest = ?", rows
            )

    async def least_recent(self, limit: int, before: float | None = None) -> list[BlobRow]:
        """Eviction candidates, least recently used first (walks blobs_by_last_access)."""
        sql, params = (
            (LEAST_RECENT, (limit,)) if before is None else (LEAST_RECENT_BEFORE, (before, limit))
        )
        async with self.db.execute(sql, params) as cursor:
            rows = await cursor.fetchall()
        return [BlobRow(r[0], r[1], r[2]) for r in rows]

    async def top_repositories(self, limit: int) -> list[tuple[str, str, int]]:
        """(upstream, repo, bytes) of the repositories holding the most cached bytes."""
        async with self.db.execute(
            "SELECT r.upstream, r.repo, sum(b.size) AS total FROM repo_blobs r"
            " JOIN blobs b ON b.digest = r.digest GROUP BY r.upstream, r.repo"
            " ORDER BY total DESC LIMIT ?",
            (limit,),
        ) as cursor:
            return [(r[0], r[1], r[2]) for r in await cursor.fetchall()]

    async def digests(self) -> set[str]:
        async with self.db.execute("SELECT digest FROM blobs") as cursor:
            return {row[0] for row in await cursor.fetchall()}

    async def tag_rows(self, upstream: str, repo: str, tag: str) -> list[TagRow]:
        async with self.db.execute(
            "SELECT accept, media_type, digest, checked FROM tags"
            " WHERE upstream = ? AND repo = ? AND tag = ? ORDER BY checked DESC",
            (upstream, repo, tag),
        ) as cursor:
            rows = await cursor.fetchall()
        return [TagRow(r[0], r[1], r[2], r[3]) for r in rows]

    async def set_tag(
        self, upstream: str, repo: str, tag: str, accept: str, media_type: str, digest: str
    ) -> None:
        await self._write(
            [
                (
                    "INSERT OR REPLACE INTO tags"
                    " (upstream, repo, tag, accept, media_type, digest, checked)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (upstream, repo, tag, accept, media_type, digest, self.clock()),
                )
            ]
        )

    async def repositories(self) -> list[tuple[str, str]]:
        """Every (upstream, repo) that has content in the cache."""
        async with self.db.execute(
            "SELECT DISTINCT upstream, repo FROM repo_blobs ORDER BY upstream, repo"
        ) as cursor:
            rows = await cursor.fetchall()
        return [(r[0], r[1]) for r in rows]

    # -- listings and referrers ---------------------------------------------------

    async def listing(
        self, upstream: str, repo: str, endpoint: str, query: str
    ) -> ListingRow | None:
        async with self.db.execute(
            "SELECT body, headers, checked FROM listings"
            " WHERE upstream = ? AND repo = ? AND endpoint = ? AND query = ?",
            (upstream, repo, endpoint, query),
        ) as cursor:
            row = await cursor.fetchone()
        return ListingRow(row[0], json.loads(row[1]), row[2]) if row else None

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
        """Store an answer, and drop this upstream's answers older than `keep_for`."""
        now = self.clock()
        await self._write(
            [
                (
                    "INSERT OR REPLACE INTO listings"
                    " (upstream, repo, endpoint, query, body, headers, checked)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (upstream, repo, endpoint, query, body, json.dumps(headers), now),
                ),
                (
                    "DELETE FROM listings WHERE upstream = ? AND checked < ?",
                    (upstream, now - keep_for),
                ),
            ]
        )

    async def drop_listings(self, upstream: str, repo: str, endpoint: str) -> None:
        """Forget every page of an endpoint's answers (upstream says there is no such thing)."""
        await self._write(
            [
                (
                    "DELETE FROM listings WHERE upstream = ? AND repo = ? AND endpoint = ?",
                    (upstream, repo, endpoint),
                )
            ]
        )

    async def referrers(self, upstream: str, repo: str, subject: str) -> list[Referrer]:
        """Stored manifests linked to (upstream, repo) whose subject is `subject`."""
        async with self.db.execute(
            "SELECT s.digest, b.media_type, b.size, s.artifact_type, s.annotations"
            " FROM subjects s JOIN blobs b ON b.digest = s.digest"
            " JOIN repo_blobs r ON r.digest = s.digest AND r.upstream = ? AND r.repo = ?"
            " WHERE s.subject = ? AND b.media_type IS NOT NULL ORDER BY s.digest",
            (upstream, repo, subject),
        ) as cursor:
            rows = await cursor.fetchall()
        return [Referrer(r[0], r[1], r[2], r[3], r[4]) for r in rows]

    async def chore_pending(self, name: str) -> bool:
        async with self.db.execute("SELECT 1 FROM chores WHERE name = ?", (name,)) as cursor:
            return await cursor.fetchone() is not None

    async def manifests_but_docker(self) -> list[str]:
        """Digests of stored manifests that may have a subject: Docker's formats can't."""
        async with self.db.execute(
            "SELECT digest FROM blobs WHERE media_type IS NOT NULL"
            " AND media_type NOT LIKE 'application/vnd.docker.%'"
        ) as cursor:
            return [row[0] for row in await cursor.fetchall()]

    async def finish_indexing_subjects(self, found: dict[str, Reference]) -> None:
        """Record the subjects read from stored manifests, and that the chore is done."""
        async with self._transaction() as db:
            await db.executemany(
                # Only for rows still there: eviction may have run while the files were read.
                "INSERT OR IGNORE INTO subjects (digest, subject, artifact_type, annotations)"
                " SELECT ?1, ?2, ?3, ?4 WHERE EXISTS (SELECT 1 FROM blobs WHERE digest = ?1)",
                [_subject_row(digest, reference) for digest, reference in found.items()],
            )
            await db.execute("DELETE FROM chores WHERE name = ?", (INDEX_SUBJECTS,))


_ADD_LINK = "INSERT OR IGNORE INTO repo_blobs (upstream, repo, digest) VALUES (?, ?, ?)"


async def _upsert_blob(db: aiosqlite.Connection, row: BlobRow, now: float) -> bool:
    """Index a blob; True if it is new. One stored already (maybe adopted without its
    media type) is touched, and given the media type it lacked."""
    cursor = await db.execute(
        "INSERT OR IGNORE INTO blobs (digest, size, media_type, created, last_access)"
        " VALUES (?, ?, ?, ?, ?)",
        (row.digest, row.size, row.media_type, now, now),
    )
    if cursor.rowcount == 1:
        return True
    await db.execute(
        "UPDATE blobs SET last_access = ?, media_type = coalesce(media_type, ?) WHERE digest = ?",
        (now, row.media_type, row.digest),
    )
    return False


_ADD_SUBJECT = (
    "INSERT OR IGNORE INTO subjects (digest, subject, artifact_type, annotations)"
    " VALUES (?, ?, ?, ?)"
)


def _subject_row(digest: str, reference: Reference) -> tuple[str, str, str | None, str | None]:
    return (digest, reference.subject, reference.artifact_type, reference.annotations)


def _batches(items: list[str], size: int) -> Iterator[list[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
