"""Eviction inside the running mirror: it runs by itself, and evicted blobs come back."""

from __future__ import annotations

import asyncio
import os

from proxy.keys import CACHE, EVICTOR
from tests.fake_upstream.server import FakeUpstream
from tests.mirror import MakeMirror, Mirror

REPO = "library/app"
KiB = 1024
EVICTED = 'pullthrough_evictions_total{reason="size"}'


async def fetch(mirror: Mirror, path: str) -> bytes:
    async with mirror.get(path) as response:
        assert response.status == 200
        return await response.read()


async def test_background_eviction_keeps_the_budget(
    fake_upstream: FakeUpstream, make_mirror: MakeMirror
) -> None:
    mirror = await make_mirror(
        [{"name": "docker.io", "url": fake_upstream.url, "default": True}],
        cache={"max_size": "1000KiB"},
    )
    cache = mirror.app[CACHE]
    # 4 x 250 KiB fit the budget exactly, which crosses the 90 % high watermark.
    blobs = [os.urandom(250 * KiB) for _ in range(4)]
    digests = [fake_upstream.add_blob(REPO, b) for b in blobs]
    for n, (digest, data) in enumerate(zip(digests, blobs, strict=True)):
        assert await fetch(mirror, f"/v2/app/blobs/{digest}") == data
        if n < 3:
            await mirror.wait_committed(digest)
        mirror.clock.advance(1)
    # The evictor unlinks files before it updates the index and the counters: wait for
    # the count of evictions, which moves last.
    async with asyncio.timeout(5):
        while not await mirror.metric(EVICTED) or digests[3] not in mirror.stored_blobs():  # noqa: ASYNC110 - the evictor runs in the background
            await asyncio.sleep(0.01)
    assert mirror.stored_blobs() == set(digests[1:])  # the least recent went first
    assert cache.used == 750 * KiB
    async with mirror.get("/metrics") as response:
        assert 'pullthrough_evictions_total{reason="size"} 1.0' in await response.text()


async def test_a_cached_manifest_whose_blobs_were_evicted_still_pulls(
    fake_upstream: FakeUpstream, make_mirror: MakeMirror
) -> None:
    image = fake_upstream.add_image(REPO, "v1", layers=(os.urandom(50_000), os.urandom(60_000)))
    mirror = await make_mirror([{"name": "docker.io", "url": fake_upstream.url, "default": True}])
    accept = {"Accept": "application/vnd.oci.image.manifest.v1+json"}
    async with mirror.get("/v2/app/manifests/v1", headers=accept) as response:
        assert response.status == 200
    for digest in image.layer_digests:
        await fetch(mirror, f"/v2/app/blobs/{digest}")
    await mirror.wait_committed(*image.layer_digests)

    # Evict the layers the way the evictor does; the manifest stays.
    cache = mirror.app[CACHE]
    await cache.flush_access()
    mirror.clock.advance(31 * 86400)
    async with mirror.get("/v2/app/manifests/v1", headers=accept) as response:
        assert response.status == 200  # touches the manifest: now it's recent
    await mirror.app[EVICTOR].run_once()
    assert set(image.layer_digests).isdisjoint(mirror.stored_blobs())
    assert image.manifest_digest in mirror.stored_blobs()

    fake_upstream.clear()
    for digest in image.layer_digests:
        await fetch(mirror, f"/v2/app/blobs/{digest}")
    assert fake_upstream.count("GET", f"/v2/{REPO}/blobs/{image.layer_digests[0]}") == 1
