"""The index's schema and its migrations, on real SQLite files."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

import pytest

from cache.errors import StoreClosed
from cache.index import INDEX_SUBJECTS, SCHEMA_VERSION, Index
from cache.referrers import Reference

# The blob tables, unchanged from version 1 to 2.
BLOBS_V1 = """
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
"""
# The schema of version 1, as the first releases wrote it: one tag row per media type.
V1 = (
    BLOBS_V1
    + """
CREATE TABLE tags (
    upstream TEXT NOT NULL, repo TEXT NOT NULL, tag TEXT NOT NULL,
    media_type TEXT NOT NULL, digest TEXT NOT NULL, checked REAL NOT NULL,
    PRIMARY KEY (upstream, repo, tag, media_type)
) WITHOUT ROWID;
INSERT INTO blobs VALUES ('sha256:aa', 10, 'application/x-index', 1, 1);
INSERT INTO tags VALUES ('docker.io', 'library/app', 'v1', 'application/x-index', 'sha256:aa', 5);
PRAGMA user_version = 1;
"""
)


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


# The schema of version 2: tags per Accept, no listings, no subjects.
V2 = (
    BLOBS_V1
    + """
CREATE TABLE tags (
    upstream TEXT NOT NULL, repo TEXT NOT NULL, tag TEXT NOT NULL, accept TEXT NOT NULL,
    media_type TEXT NOT NULL, digest TEXT NOT NULL, checked REAL NOT NULL,
    PRIMARY KEY (upstream, repo, tag, accept)
) WITHOUT ROWID;
INSERT INTO blobs VALUES ('sha256:aa', 10, 'application/vnd.oci.image.manifest.v1+json', 1, 1);
INSERT INTO blobs VALUES ('sha256:bb', 20, 'application/vnd.docker.container.image.v1+json', 1, 1);
INSERT INTO blobs VALUES ('sha256:cc', 30, NULL, 1, 1);
INSERT INTO repo_blobs VALUES ('docker.io', 'library/app', 'sha256:aa');
INSERT INTO tags VALUES ('docker.io', 'library/app', 'v1', '*/*', 'x/y', 'sha256:aa', 5);
PRAGMA user_version = 2;
"""
)


async def test_a_version_2_index_gains_listings_and_subjects_to_be_read(tmp_path: Path) -> None:
    path = tmp_path / "index.db"
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.executescript(V2)
    index = Index(path)
    await index.open()
    try:
        assert len(await index.tag_rows("docker.io", "library/app", "v1")) == 1
        # The manifests stored before are read at the next open (Cache.open), Docker's
        # formats and plain blobs excepted: they can have no subject.
        assert await index.chore_pending(INDEX_SUBJECTS)
        assert await index.manifests_but_docker() == ["sha256:aa"]
        reference = Reference("sha256:ff", "x/sbom", '{"a": "b"}')
        await index.finish_indexing_subjects({"sha256:aa": reference, "sha256:gone": reference})
        assert not await index.chore_pending(INDEX_SUBJECTS)
        found = await index.referrers("docker.io", "library/app", "sha256:ff")
        assert [r.descriptor() for r in found] == [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": "sha256:aa",
                "size": 10,
                "artifactType": "x/sbom",
                "annotations": {"a": "b"},
            }
        ]
        assert await index.referrers("docker.io", "library/other", "sha256:ff") == []
        await index.set_listing(
            "docker.io", "library/app", "tags/list", "", b"{}", {"Link": "<x>"}, keep_for=60
        )
        row = await index.listing("docker.io", "library/app", "tags/list", "")
        assert row is not None and (row.body, row.headers) == (b"{}", {"Link": "<x>"})
        # A referrer goes with its blob.
        await index.remove_blobs(["sha256:aa"])
        assert await index.referrers("docker.io", "library/app", "sha256:ff") == []
    finally:
        await index.close()
    with contextlib.closing(sqlite3.connect(path)) as db:
        assert db.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
        # Only subjects of rows still indexed were recorded.
        assert db.execute("SELECT count(*) FROM subjects").fetchone() == (0,)


async def test_listings_not_renewed_are_dropped_when_their_upstream_answers_again(
    tmp_path: Path,
) -> None:
    now = [1000.0]
    index = Index(tmp_path / "index.db", clock=lambda: now[0])
    await index.open()
    try:
        for upstream, repo in (("a.io", "old"), ("b.io", "down")):
            await index.set_listing(upstream, repo, "tags/list", "", b"1", {}, keep_for=60)
        now[0] += 61
        await index.set_listing("a.io", "new", "tags/list", "", b"2", {}, keep_for=60)
        assert await index.listing("a.io", "old", "tags/list", "") is None
        # b.io gave no answer since (it may be down): its answers stay for its outage.
        assert await index.listing("b.io", "down", "tags/list", "") is not None
        assert await index.listing("a.io", "new", "tags/list", "") is not None
    finally:
        await index.close()


async def test_a_new_index_has_no_chores(tmp_path: Path) -> None:
    index = Index(tmp_path / "index.db")
    await index.open()
    try:
        assert not await index.chore_pending(INDEX_SUBJECTS)
    finally:
        await index.close()


async def test_an_index_newer_than_the_program_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "index.db"
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    index = Index(path)
    with pytest.raises(StoreClosed, match="newer"):
        await index.open()
    await index.close()
