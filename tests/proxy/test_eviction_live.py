"""Eviction inside the running mirror: it runs by itself, and evicted blobs come back."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from proxy.keys import CACHE, EVICTOR
from tests.fake_upstream.server import FakeUpstream
from tests.mirror import MakeMirror, Mirror
from tests.proxy.test_cli import run

REPO = "library/app"
KiB = 1024
EVICTED = 'pullthrough_evictions_total{reason="size"}'


async def small_mirror(make_mirror: MakeMirror, upstream: FakeUpstream) -> Mirror:
    """A mirror of the fake upstream with a 1000 KiB cache."""
    return await make_mirror(
        [{"name": "docker.io", "url": upstream.url, "default": True}],
        cache={"max_size": "1000KiB"},
    )


async def test_background_eviction_keeps_the_budget(
    fake_upstream: FakeUpstream, make_mirror: MakeMirror
) -> None:
    mirror = await small_mirror(make_mirror, fake_upstream)
    cache = mirror.app[CACHE]
    # 4 x 250 KiB fit the budget exactly, which crosses the 90 % high watermark.
    blobs = [os.urandom(250 * KiB) for _ in range(4)]
    digests = [fake_upstream.add_blob(REPO, b) for b in blobs]
    for n, (digest, data) in enumerate(zip(digests, blobs, strict=True)):
        assert await mirror.fetch(f"/v2/app/blobs/{digest}") == data
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
        await mirror.fetch(f"/v2/app/blobs/{digest}")
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
        await mirror.fetch(f"/v2/app/blobs/{digest}")
    assert fake_upstream.count("GET", f"/v2/{REPO}/blobs/{image.layer_digests[0]}") == 1


def bytes_on_disk(mirror: Mirror) -> int:
    return sum(p.stat().st_size for p in (mirror.cache_dir / "blobs").glob("*/*/*"))


async def test_layers_pulled_together_stay_within_max_size_and_are_counted_once(
    fake_upstream: FakeUpstream, make_mirror: MakeMirror
) -> None:
    mirror = await small_mirror(make_mirror, fake_upstream)
    cache = mirror.app[CACHE]
    fetched = 0
    for _ in range(3):  # three images of four layers, each image's layers in parallel
        layers = [os.urandom(200 * KiB) for _ in range(4)]
        digests = [fake_upstream.add_blob(REPO, layer) for layer in layers]
        paths = [f"/v2/app/blobs/{digest}" for digest in digests]
        assert await asyncio.gather(*(mirror.fetch(path) for path in paths)) == layers
        fetched += sum(map(len, layers))
        await mirror.fills_ended()
        indexed, _ = await cache.index.usage()
        assert indexed <= 1000 * KiB
        assert bytes_on_disk(mirror) <= 1000 * KiB
        mirror.clock.advance(1)

    await mirror.app[EVICTOR].run_once()  # waits for a pass in the background to finish
    indexed, count = await cache.index.usage()
    assert (cache.used, cache.count) == (indexed, count)
    assert bytes_on_disk(mirror) == indexed
    assert await mirror.metric("pullthrough_cache_size_bytes") == indexed
    evicted = await mirror.metric('pullthrough_evicted_bytes_total{reason="size"}')
    assert evicted == fetched - indexed  # every evicted blob counted once


async def test_an_eviction_by_the_cli_is_seen_by_the_running_server(
    fake_upstream: FakeUpstream, make_mirror: MakeMirror, tmp_path: Path
) -> None:
    mirror = await small_mirror(make_mirror, fake_upstream)
    blobs = [os.urandom(300 * KiB) for _ in range(3)]
    for blob in blobs:
        digest = fake_upstream.add_blob(REPO, blob)
        assert await mirror.fetch(f"/v2/app/blobs/{digest}") == blob
        await mirror.wait_committed(digest)

    (tmp_path / "cli.yaml").write_text(
        f"cache: {{path: '{mirror.cache_dir}', max_size: 1000KiB}}\n"
        f"upstreams: [{{name: docker.io, url: '{fake_upstream.url}', default: true}}]\n"
    )
    code, out = await run("evict", "--to", "0", "--config", "cli.yaml", cwd=tmp_path)
    assert code == 0, out

    # 500 KiB fits only if the server sees the room the CLI made.
    big = os.urandom(500 * KiB)
    digest = fake_upstream.add_blob(REPO, big)
    assert await mirror.fetch(f"/v2/app/blobs/{digest}") == big
    await mirror.wait_committed(digest)
    assert await mirror.metric("pullthrough_disk_full_total") == 0
    assert await mirror.metric("pullthrough_cache_size_bytes") == 500 * KiB
