"""What the cache records of a manifest's subject, and how it reads those of manifests
stored before it kept them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from cache.digests import Digest
from cache.files import BlobFiles
from cache.index import INDEX_SUBJECTS
from cache.referrers import Reference, reference_of
from cache.store import Budget, Cache
from proxy.keys import CACHE
from tests.cache.test_index import V2
from tests.mirror import MakeMirror

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
SUBJECT = {"mediaType": OCI_MANIFEST, "digest": "sha256:" + "5" * 64, "size": 9}


def manifest(**fields: Any) -> bytes:
    return json.dumps({"schemaVersion": 2, **fields}).encode()


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (manifest(config={"mediaType": "x/config"}), None),  # no subject
        (b'{"subject": ', None),  # not JSON
        (b'["subject"]', None),
        (manifest(subject={"digest": 5}), None),
        (
            manifest(artifactType="x/sbom", config={"mediaType": "x/c"}, subject=SUBJECT),
            Reference(str(SUBJECT["digest"]), "x/sbom", None),
        ),
        (  # no artifactType: the config's mediaType stands for it
            manifest(config={"mediaType": "x/c"}, subject=SUBJECT, annotations={"k": "v"}),
            Reference(str(SUBJECT["digest"]), "x/c", '{"k": "v"}'),
        ),
        (  # an index without artifactType has none
            manifest(mediaType=OCI_INDEX, manifests=[], subject=SUBJECT, annotations={}),
            Reference(str(SUBJECT["digest"]), None, None),
        ),
    ],
)
def test_reference_of(data: bytes, expected: Reference | None) -> None:
    assert reference_of(data) == expected


def new_cache(root: Path) -> Cache:
    return Cache(root, Budget(1 << 30, 0.9, 0.8))


async def test_a_stored_manifest_with_a_subject_is_listed_for_its_repository(
    tmp_path: Path,
) -> None:
    cache = new_cache(tmp_path / "cache")
    await cache.open()
    try:
        data = manifest(artifactType="x/sig", subject=SUBJECT, config={"mediaType": "x/c"})
        digest = Digest.of(data)
        await cache.put_manifest(digest, data, OCI_MANIFEST, "docker.io", "library/app")
        subject = Digest.parse(str(SUBJECT["digest"]))
        found = await cache.referrers("docker.io", "library/app", subject)
        assert [r.descriptor() for r in found] == [
            {
                "mediaType": OCI_MANIFEST,
                "digest": str(digest),
                "size": len(data),
                "artifactType": "x/sig",
            }
        ]
        assert await cache.referrers("ghcr.io", "library/app", subject) == []
    finally:
        await cache.close()


REFERRING = manifest(artifactType="x/sbom", subject=SUBJECT, config={"mediaType": "x/c"})


def version_2_cache(root: Path) -> None:
    """A cache as version 2 left it: a referring and a plain manifest, their files, and
    rows that don't say what they refer to."""
    files = BlobFiles(root)
    files.prepare()
    plain = manifest(config={"mediaType": "x/c"})
    rows = []
    for data in (REFERRING, plain):
        digest = Digest.of(data)
        files.write(digest, data)
        rows.append(
            f"INSERT INTO blobs VALUES ('{digest}', {len(data)}, '{OCI_MANIFEST}', 1, 1);"
            f"INSERT INTO repo_blobs VALUES ('docker.io', 'library/app', '{digest}');"
        )
    with contextlib.closing(sqlite3.connect(root / "index.db")) as db:
        # The fixture's own rows name files that don't exist: they are skipped.
        db.executescript(V2.replace("PRAGMA user_version = 2;", "".join(rows)))
        db.execute("PRAGMA user_version = 2")


async def test_manifests_stored_before_version_3_are_read_once(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    version_2_cache(root)
    cache = new_cache(root)
    await cache.open()
    try:
        assert await cache.index.chore_pending(INDEX_SUBJECTS)
        await cache.index_subjects()  # what the server runs in the background
        subject = Digest.parse(str(SUBJECT["digest"]))
        found = await cache.referrers("docker.io", "library/app", subject)
        assert [r.digest for r in found] == [str(Digest.of(REFERRING))]
        assert not await cache.index.chore_pending(INDEX_SUBJECTS)
    finally:
        await cache.close()


async def test_the_server_reads_them_in_the_background(
    tmp_path: Path, make_mirror: MakeMirror
) -> None:
    """Not in `Cache.open`: the server starts at once, and CLI commands never read them."""
    root = tmp_path / "old"
    version_2_cache(root)
    mirror = await make_mirror(
        [{"name": "docker.io", "url": "http://127.0.0.1:9", "default": True}],
        cache={"path": str(root)},
    )
    cache = mirror.app[CACHE]
    for _ in range(500):  # 10 s at most
        if not await cache.index.chore_pending(INDEX_SUBJECTS):
            break
        await asyncio.sleep(0.02)
    assert not await cache.index.chore_pending(INDEX_SUBJECTS)
    subject = Digest.parse(str(SUBJECT["digest"]))
    found = await cache.referrers("docker.io", "library/app", subject)
    assert [r.digest for r in found] == [str(Digest.of(REFERRING))]
