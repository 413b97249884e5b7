"""The index's schema and its migrations, on real SQLite files."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

import pytest

from cache.errors import StoreClosed
from cache.index import SCHEMA_VERSION, Index

# The schema of version 1, as the first releases wrote it: one tag row per media type.
V1 = """
CREATE TABLE blobs (
    digest TEXT PRIMARY KEY, size INTEGER NOT NULL, media_type TEXT,
    created REAL NOT NULL, last_access REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX blobs_by_last_access ON blobs (last_access);
CREATE TABLE repo_blobs (
    upstream TEXT NOT NULL, repo TEXT NOT NULL, digest TEXT NOT NULL,
    PRIMARY KEY (upstream, repo, digest)
) WITHOUT ROWID;
CREATE INDEX repo_blobs_by_digest ON repo_blobs (digest);
CREATE TABLE tags (
    upstream TEXT NOT NULL, repo TEXT NOT NULL, tag TEXT NOT NULL,
    media_type TEXT NOT NULL, digest TEXT NOT NULL, checked REAL NOT NULL,
    PRIMARY KEY (upstream, repo, tag, media_type)
) WITHOUT ROWID;
INSERT INTO blobs VALUES ('sha256:aa', 10, 'application/x-index', 1, 1);
INSERT INTO tags VALUES ('docker.io', 'library/app', 'v1', 'application/x-index', 'sha256:aa', 5);
PRAGMA user_version = 1;
"""


async def test_a_version_1_index_keeps_its_tags_as_fallbacks(tmp_path: Path) -> None:
    path = tmp_path / "index.db"
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.executescript(V1)
    index = Index(path)
    await index.open()
    try:
        rows = await index.tag_rows("docker.io", "library/app", "v1")
        # No client's Accept is spelled "v1:...": the row is never fresh, only a fallback.
        assert [(r.accept, r.media_type, r.digest, r.checked) for r in rows] == [
            ("v1:application/x-index", "application/x-index", "sha256:aa", 5)
        ]
        await index.set_tag("docker.io", "library/app", "v1", "*/*", "x/y", "sha256:bb")
        assert len(await index.tag_rows("docker.io", "library/app", "v1")) == 2
        assert await index.usage() == (10, 1)
    finally:
        await index.close()
    with contextlib.closing(sqlite3.connect(path)) as db:
        assert db.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)


async def test_an_index_newer_than_the_program_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "index.db"
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    index = Index(path)
    with pytest.raises(StoreClosed, match="newer"):
        await index.open()
    await index.close()
