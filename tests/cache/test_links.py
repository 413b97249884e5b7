"""Links between (upstream, repository) and stored digests stay with their blobs: made by
a fill or a confirmation, gone with eviction, reconcile and fsck, never made ahead."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from cache.digests import Digest
from cache.errors import FillFailed
from cache.eviction import Evictor
from cache.integrity import fsck, reconcile
from cache.store import Budget, Cache
from tests.cache.helpers import random_blob, store_blob

SECRET = ("docker.io", "acme/secret")
OTHER = ("docker.io", "library/alpine")
ELSEWHERE = ("ghcr.io", "acme/secret")


@pytest.fixture
async def cache(tmp_path: Path) -> AsyncIterator[Cache]:
    store = Cache(tmp_path / "cache", Budget(1 << 30, 0.9, 0.8))
    await store.open()
    yield store
    await store.close()


def blob_path(cache: Cache, digest: Digest) -> Path:
    return cache.files.path_for(digest)


async def test_a_stored_blob_is_linked_to_its_own_pair_only(cache: Cache) -> None:
    digest = await store_blob(cache, random_blob(3000), repo="acme/secret")
    assert await cache.is_linked(digest, SECRET)
    assert not await cache.is_linked(digest, OTHER)
    assert not await cache.is_linked(digest, ELSEWHERE)


async def test_a_confirmed_link_is_indexed_and_outlives_the_process(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "cache", Budget(1 << 30, 0.9, 0.8))
    await cache.open()
    digest = await store_blob(cache, random_blob(3000), repo="acme/secret")
    await cache.link(digest, OTHER)
    await cache.close()

    reopened = Cache(tmp_path / "cache", Budget(1 << 30, 0.9, 0.8))
    await reopened.open()
    try:
        assert await reopened.is_linked(digest, OTHER)
        assert not await reopened.is_linked(digest, ELSEWHERE)
    finally:
        await reopened.close()


async def test_a_link_is_never_indexed_ahead_of_its_blob(cache: Cache) -> None:
    digest = Digest.of(b"not stored")
    await cache.index.add_link(OTHER[0], OTHER[1], str(digest))
    assert not await cache.index.has_link(OTHER[0], OTHER[1], str(digest))
    assert await cache.repositories() == []


async def test_pairs_confirmed_during_a_download_are_indexed_when_it_commits(
    cache: Cache,
) -> None:
    data = random_blob(4000)
    fill = cache.begin_fill(Digest.of(data), link=SECRET)
    assert await cache.is_linked(fill.digest, SECRET)
    assert not await cache.is_linked(fill.digest, OTHER)
    await cache.link(fill.digest, OTHER)
    assert await cache.is_linked(fill.digest, OTHER)
    fill.start(len(data))
    await fill.append(data)
    assert await cache.commit_fill(fill, *SECRET)
    for upstream, repo in (SECRET, OTHER):
        assert await cache.index.has_link(upstream, repo, str(fill.digest))


async def test_a_failed_download_leaves_no_link(cache: Cache) -> None:
    fill = cache.begin_fill(Digest.of(b"never arrives"), link=SECRET)
    await cache.link(fill.digest, OTHER)
    cache.abandon_fill(fill, FillFailed("upstream went away"))
    # OTHER was confirmed by upstream, so it stays remembered; SECRET only started it.
    assert not await cache.is_linked(fill.digest, SECRET)
    assert await cache.repositories() == []


async def test_eviction_takes_the_links_with_the_blob(cache: Cache) -> None:
    digest = await store_blob(cache, random_blob(3000), repo="acme/secret")
    await cache.link(digest, OTHER)
    assert await cache.is_linked(digest, OTHER)  # remembered in memory too
    assert await Evictor(cache, blob_ttl=1e9).shrink_to(0) == 1
    for pair in (SECRET, OTHER):
        assert not await cache.is_linked(digest, pair)
        assert not await cache.index.has_link(pair[0], pair[1], str(digest))
    assert await cache.repositories() == []


async def test_reconcile_drops_the_links_of_lost_files_and_adopts_files_unlinked(
    cache: Cache,
) -> None:
    lost = await store_blob(cache, random_blob(3000), repo="acme/secret")
    assert await cache.is_linked(lost, SECRET)
    blob_path(cache, lost).unlink()
    orphan_data = random_blob(2000)
    orphan = Digest.of(orphan_data)
    blob_path(cache, orphan).parent.mkdir(parents=True, exist_ok=True)
    blob_path(cache, orphan).write_bytes(orphan_data)

    report = await reconcile(cache)
    assert (report.missing, report.adopted) == ([str(lost)], [str(orphan)])
    assert not await cache.is_linked(lost, SECRET)
    assert cache.stores(orphan)
    for pair in (SECRET, OTHER, ELSEWHERE):
        assert not await cache.is_linked(orphan, pair)  # served to nobody until confirmed
    assert await cache.repositories() == []


async def test_fsck_repair_drops_the_links_of_corrupt_blobs(cache: Cache) -> None:
    digest = await store_blob(cache, random_blob(3000), repo="acme/secret")
    kept = await store_blob(cache, random_blob(3000), repo="acme/secret")
    assert await cache.is_linked(digest, SECRET)
    blob_path(cache, digest).write_bytes(b"rotten")

    report = await fsck(cache, repair=True)
    assert report.removed == [str(digest)]
    assert not await cache.is_linked(digest, SECRET)
    assert await cache.is_linked(kept, SECRET)
