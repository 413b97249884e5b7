"""Eviction on a real store and index, with an injected clock: LRU, TTL, watermarks."""

from __future__ import annotations

import asyncio
import os
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from cache.digests import Digest
from cache.eviction import Evictor
from cache.fill import Fill
from cache.index import LEAST_RECENT, LEAST_RECENT_BEFORE
from cache.store import Budget, Cache
from tests.cache.helpers import random_blob, store_blob
from tests.mirror import FakeClock

KB = 1024
DAY = 86400.0


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def cache(tmp_path: Path, clock: FakeClock) -> AsyncIterator[Cache]:
    store = Cache(tmp_path / "cache", Budget(100 * KB, 0.9, 0.8), clock)
    await store.open()
    yield store
    await store.close()


def on_disk(cache: Cache) -> set[str]:
    return {f"sha256:{p.name}" for p in (cache.root / "blobs").glob("*/*/*")}


async def test_lru_evicts_least_recently_used_down_to_the_low_watermark(
    cache: Cache, clock: FakeClock
) -> None:
    evictor = Evictor(cache, blob_ttl=30 * DAY, clock=clock)
    digests = []
    for _ in range(9):  # 9 x 10 KiB = 90 KiB: at the high watermark, not above it
        digests.append(await store_blob(cache, random_blob(10 * KB)))
        clock.advance(1)
    assert await evictor.run_once() == {"ttl": 0, "size": 0}

    # Touch the oldest blob: it becomes the most recently used and must survive.
    opened = cache.open_blob(digests[0])
    assert opened is not None
    opened.close()
    clock.advance(1)
    digests.append(await store_blob(cache, random_blob(10 * KB)))  # 100 KiB > 90 KiB
    assert cache.over_budget.is_set()

    assert await evictor.run_once() == {"ttl": 0, "size": 2}
    assert cache.used == 80 * KB
    survivors = {str(d) for d in digests} - {str(digests[1]), str(digests[2])}
    assert on_disk(cache) == survivors
    assert await cache.index.digests() == survivors


async def test_ttl_evicts_whatever_the_size(cache: Cache, clock: FakeClock) -> None:
    evictor = Evictor(cache, blob_ttl=30 * DAY, clock=clock)
    old = await store_blob(cache, random_blob(KB))
    clock.advance(20 * DAY)
    recent = await store_blob(cache, random_blob(KB))
    clock.advance(11 * DAY)
    assert await evictor.run_once() == {"ttl": 1, "size": 0}
    assert on_disk(cache) == {str(recent)}
    assert str(old) not in await cache.index.digests()


async def test_access_times_are_batched_not_written_per_hit(cache: Cache, clock: FakeClock) -> None:
    digest = await store_blob(cache, random_blob(KB))
    db = sqlite3.connect(cache.root / "index.db")
    before = db.execute("SELECT last_access FROM blobs").fetchone()[0]
    for _ in range(100):
        clock.advance(1)
        blob = cache.open_blob(digest)
        assert blob is not None
        blob.close()
    # A hundred hits, no write yet: the time sits in memory until a flush.
    assert db.execute("SELECT last_access FROM blobs").fetchone()[0] == before
    await cache.flush_access()
    assert db.execute("SELECT last_access FROM blobs").fetchone()[0] == before + 100
    db.close()


async def test_a_blob_being_read_survives_its_eviction(cache: Cache, clock: FakeClock) -> None:
    data = random_blob(60 * KB)
    digest = await store_blob(cache, data)
    reader = cache.open_blob(digest)
    assert reader is not None
    clock.advance(1)
    await store_blob(cache, random_blob(40 * KB))  # over budget: the first one must go
    await Evictor(cache, blob_ttl=30 * DAY, clock=clock).run_once()
    assert str(digest) not in on_disk(cache)
    assert os.pread(reader.fd, len(data), 0) == data  # the open fd still reads it all
    reader.close()


async def test_make_room_evicts_or_passes_through(cache: Cache, clock: FakeClock) -> None:
    evictor = Evictor(cache, blob_ttl=30 * DAY, clock=clock)
    for _ in range(8):
        await store_blob(cache, random_blob(10 * KB))
        clock.advance(1)
    fits = cache.begin_fill(Digest.of(b"a" * 30 * KB))
    await evictor.make_room(fits, 30 * KB)
    assert not fits.passthrough and cache.used + 30 * KB <= 100 * KB
    cache.abandon_fill(fits, RuntimeError("test over"))

    used = cache.used
    too_big = cache.begin_fill(Digest.of(b"b" * 200 * KB))
    await evictor.make_room(too_big, 200 * KB)
    assert too_big.passthrough
    assert cache.used == used  # emptying the cache would not have made it fit
    cache.abandon_fill(too_big, RuntimeError("test over"))


async def test_downloads_starting_together_stay_within_the_budget(
    cache: Cache, clock: FakeClock
) -> None:
    """Four downloads ask for room at once, as the layers of one image do. Each must count
    the others' room as taken, and no blob may be evicted, or counted, twice."""
    evicted: list[int] = []
    evictor = Evictor(cache, 30 * DAY, clock, on_evict=lambda _r, _n, size: evicted.append(size))
    for _ in range(8):
        await store_blob(cache, random_blob(10 * KB))
        clock.advance(1)
    layers = [random_blob(20 * KB) for _ in range(4)]
    fills = [cache.begin_fill(Digest.of(layer)) for layer in layers]

    async def download(fill: Fill, data: bytes) -> None:
        await evictor.make_room(fill, len(data))  # as BlobService does: room, then start
        fill.start(len(data))
        await fill.append(data)
        await cache.commit_fill(fill, "docker.io", "library/app")

    await asyncio.gather(*(download(f, layer) for f, layer in zip(fills, layers, strict=True)))
    indexed = await cache.index.usage()
    assert indexed[0] <= 100 * KB
    assert (cache.used, cache.count) == indexed
    assert sum(evicted) == 80 * KB + 80 * KB - indexed[0]  # each evicted blob counted once
    assert all(str(Digest.of(layer)) in on_disk(cache) for layer in layers)


async def test_rows_another_process_evicted_are_not_subtracted_twice(
    cache: Cache, clock: FakeClock
) -> None:
    for _ in range(5):
        await store_blob(cache, random_blob(10 * KB))
    chosen = await cache.index.least_recent(10)  # a pass chose its victims...
    other = Cache(cache.root, cache.budget, clock)  # ...then `pullthrough evict --to 0` ran
    await other.open(clear_debris=False)
    try:
        await Evictor(other, 30 * DAY, clock).shrink_to(0, "manual")
    finally:
        await other.close()
    await cache.recount()
    assert (cache.used, cache.count) == (0, 0)
    assert await cache.remove(chosen) == []  # nothing left for this pass to remove
    assert (cache.used, cache.count) == (0, 0)


async def test_choosing_victims_uses_the_index_with_a_million_blobs(tmp_path: Path) -> None:
    path = tmp_path / "big"
    store = Cache(path, Budget(1 << 40, 0.9, 0.8), FakeClock())
    await store.open()
    await store.close()
    db = sqlite3.connect(path / "index.db")
    db.execute("PRAGMA synchronous=OFF")  # building test data: durability is not the point
    with db:
        db.executemany(
            "INSERT INTO blobs (digest, size, media_type, created, last_access)"
            " VALUES (?, 1000, NULL, 0, ?)",
            ((f"sha256:{n:064x}", (n * 7919) % 1_000_003) for n in range(1_000_000)),
        )
    db.close()

    store = Cache(path, Budget(1 << 40, 0.9, 0.8), FakeClock())
    await store.open()
    try:
        # The plan, not a stopwatch, is the check: an index walk costs the same with a
        # million rows as with ten, a table scan does not (and would read "SCAN blobs").
        victims = await store.index.least_recent(500, before=10_000)
    finally:
        await store.close()
    db = sqlite3.connect(path / "index.db")
    for sql, params in ((LEAST_RECENT, (500,)), (LEAST_RECENT_BEFORE, (10_000, 500))):
        plan = " ".join(str(row[-1]) for row in db.execute(f"EXPLAIN QUERY PLAN {sql}", params))
        assert "blobs_by_last_access" in plan, plan
        assert "TEMP B-TREE" not in plan, plan  # no sort of the whole table
    oldest = db.execute("SELECT digest FROM blobs ORDER BY last_access, digest LIMIT 500")
    assert {v.digest for v in victims} == {row[0] for row in oldest}
    db.close()


async def test_concurrent_index_writes_do_not_interleave(cache: Cache) -> None:
    # Many coroutines writing at once share one connection; each transaction must be whole.
    blobs = [random_blob(100) for _ in range(50)]
    digests = await asyncio.gather(*(store_blob(cache, b) for b in blobs))
    await asyncio.gather(
        *(
            cache.set_tag("docker.io", "library/app", f"t{n}", "*/*", "x/y", d)
            for n, d in enumerate(digests)
        )
    )
    assert len(await cache.index.digests()) == 50
    assert cache.used == 5000
    rows = await asyncio.gather(
        *(cache.tag_answers("docker.io", "library/app", f"t{n}") for n in range(50))
    )
    assert [r[0].digest for r in rows] == [str(d) for d in digests]


async def test_the_evictor_stops_when_cancelled_just_as_it_is_woken(cache: Cache) -> None:
    """Shutdown cancels the evictor; a wake-up in the same moment must not swallow that
    (asyncio.wait_for on Python 3.11 does, and the app's shutdown then waits forever)."""
    evictor = Evictor(cache, 30 * DAY)
    running = asyncio.create_task(evictor.run_forever(interval=60))
    await asyncio.sleep(0.01)  # waiting for a wake-up
    cache.over_budget.set()
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        async with asyncio.timeout(2):
            await running
