"""Blob serving against the fake upstream: misses, hits, coalescing, ranges, bad bytes."""

from __future__ import annotations

import asyncio
import hashlib
import os

import aiohttp
import pytest

from tests.fake_upstream.server import FakeUpstream, Fault
from tests.mirror import MakeMirror, Mirror

REPO = "library/app"


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


async def mirror_for(make_mirror: MakeMirror, upstream: FakeUpstream, **extra: object) -> Mirror:
    return await make_mirror([{"name": "docker.io", "url": upstream.url, "default": True, **extra}])


async def fetch(mirror: Mirror, path: str, **kwargs: object) -> tuple[int, bytes]:
    async with mirror.get(path, **kwargs) as response:
        return response.status, await response.read()


async def test_miss_streams_and_caches_then_hit_never_asks_upstream(
    fake_upstream: FakeUpstream, make_mirror: MakeMirror
) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)
    digest = fake_upstream.add_blob(REPO, data)
    mirror = await mirror_for(make_mirror, fake_upstream)
    path = f"/v2/app/blobs/{digest}"

    async with mirror.get(path) as response:
        assert response.status == 200
        assert response.headers["Docker-Content-Digest"] == digest
        assert response.headers["Content-Length"] == str(len(data))
        assert await response.read() == data
    await wait_stored(mirror, digest)

    fake_upstream.clear()
    assert await fetch(mirror, path) == (200, data)
    assert fake_upstream.requests == []
    assert mirror.temp_files() == []


async def test_head_of_cached_and_uncached_blob(
    fake_upstream: FakeUpstream, make_mirror: MakeMirror
) -> None:
    data = b"x" * 1000
    digest = fake_upstream.add_blob(REPO, data)
    mirror = await mirror_for(make_mirror, fake_upstream)
    async with mirror.head(f"/v2/app/blobs/{digest}") as response:
        assert response.status == 200
        assert response.headers["Content-Length"] == "1000"
        assert response.headers["Docker-Content-Digest"] == digest
    assert fake_upstream.count("GET", f"/v2/{REPO}/blobs/{digest}") == 0
    assert digest not in mirror.stored_blobs()


async def test_unknown_blob_is_404_blob_unknown(
    fake_upstream: FakeUpstream, make_mirror: MakeMirror
) -> None:
    mirror = await mirror_for(make_mirror, fake_upstream)
    missing = digest_of(b"nope")
    async with mirror.get(f"/v2/app/blobs/{missing}") as response:
        assert response.status == 404
        assert (await response.json())["errors"][0]["code"] == "BLOB_UNKNOWN"
    assert mirror.temp_files() == []


async def test_concurrent_clients_share_one_upstream_download(
    fake_upstream: FakeUpstream, make_mirror: MakeMirror
) -> None:
    data = os.urandom(4 * 1024 * 1024)
    digest = fake_upstream.add_blob(REPO, data)
    gate = fake_upstream.set_fault(digest, Fault(gate_after=1024 * 1024))
    mirror = await mirror_for(make_mirror, fake_upstream)
    path = f"/v2/app/blobs/{digest}"

    first = asyncio.create_task(fetch(mirror, path))
    await asyncio.wait_for(gate.gate_reached.wait(), 5)
    # Followers arrive while the download is parked half way: they must join it.
    followers = [asyncio.create_task(fetch(mirror, path)) for _ in range(7)]
    await asyncio.sleep(0.2)
    gate.gate.set()
    results = await asyncio.gather(first, *followers)

    assert all(result == (200, data) for result in results)
    assert fake_upstream.count("GET", f"/v2/{REPO}/blobs/{digest}") == 1


async def test_followers_stream_bytes_before_the_download_completes(
    fake_upstream: FakeUpstream, make_mirror: MakeMirror
) -> None:
    data = os.urandom(2 * 1024 * 1024)
    digest = fake_upstream.add_blob(REPO, data)
    gate = fake_upstream.set_fault(digest, Fault(gate_after=1024 * 1024))
    mirror = await mirror_for(make_mirror, fake_upstream)
    path = f"/v2/app/blobs/{digest}"

    leader = asyncio.create_task(fetch(mirror, path))
    await asyncio.wait_for(gate.gate_reached.wait(), 5)
    async with mirror.get(path) as follower:
        assert follower.status == 200
        # Upstream is parked after 1 MiB, yet the follower already gets (most of) it.
        head = await asyncio.wait_for(follower.content.readexactly(512 * 1024), 5)
        assert head == data[: 512 * 1024]
        gate.gate.set()
        assert head + await follower.read() == data
    assert await leader == (200, data)


async def test_range_on_hit_and_on_download_in_progress(
    fake_upstream: FakeUpstream, make_mirror: MakeMirror
) -> None:
    data = os.urandom(2 * 1024 * 1024)
    digest = fake_upstream.add_blob(REPO, data)
    gate = fake_upstream.set_fault(digest, Fault(gate_after=1024 * 1024))
    mirror = await mirror_for(make_mirror, fake_upstream)
    path = f"/v2/app/blobs/{digest}"

    leader = asyncio.create_task(fetch(mirror, path))
    await asyncio.wait_for(gate.gate_reached.wait(), 5)
    ranged = asyncio.create_task(fetch_range(mirror, path, "bytes=1500000-1600000"))
    await asyncio.sleep(0.1)
    gate.gate.set()
    status, headers, body = await ranged
    assert status == 206
    assert headers["Content-Range"] == f"bytes 1500000-1600000/{len(data)}"
    assert body == data[1500000:1600001]
    await leader
    await wait_stored(mirror, digest)

    assert await fetch_range(mirror, path, "bytes=-10") == (
        206,
        {"Content-Range": f"bytes {len(data) - 10}-{len(data) - 1}/{len(data)}"},
        data[-10:],
    )
    status, headers, body = await fetch_range(mirror, path, f"bytes={len(data)}-")
    assert status == 416
    assert headers["Content-Range"] == f"bytes */{len(data)}"
    # A multi-range request is answered with the whole blob.
    status, _, body = await fetch_range(mirror, path, "bytes=0-1,5-6")
    assert (status, body) == (200, data)


async def fetch_range(mirror: Mirror, path: str, spec: str) -> tuple[int, dict[str, str], bytes]:
    async with mirror.get(path, headers={"Range": spec}) as response:
        body = await response.read()
        picked = {k: response.headers[k] for k in ("Content-Range",) if k in response.headers}
        return response.status, picked, body


@pytest.mark.parametrize(
    ("fault", "mismatches"),
    [(Fault(corrupt=True), 1), (Fault(reset_after=300_000), 0), (Fault(wrong_length=-1000), 1)],
    ids=["corrupt", "reset", "short-length"],
)
async def test_bad_upstream_bytes_are_never_cached_or_served_whole(
    fake_upstream: FakeUpstream, make_mirror: MakeMirror, fault: Fault, mismatches: int
) -> None:
    data = os.urandom(1024 * 1024)
    digest = fake_upstream.add_blob(REPO, data)
    fake_upstream.set_fault(digest, fault)
    mirror = await mirror_for(make_mirror, fake_upstream)

    with pytest.raises(aiohttp.ClientPayloadError):
        async with mirror.get(f"/v2/app/blobs/{digest}") as response:
            await response.read()
    await mirror.fills_ended()
    assert digest not in mirror.stored_blobs()
    assert mirror.temp_files() == []
    assert await digest_mismatches(mirror) == mismatches


async def digest_mismatches(mirror: Mirror) -> float:
    async with mirror.get("/metrics") as response:
        text = await response.text()
    for line in text.splitlines():
        if line.startswith('pullthrough_digest_mismatches_total{kind="blob"'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_download_recovers_after_a_reset(
    fake_upstream: FakeUpstream, make_mirror: MakeMirror
) -> None:
    data = os.urandom(1024 * 1024)
    digest = fake_upstream.add_blob(REPO, data)
    fake_upstream.set_fault(digest, Fault(reset_after=1000, times=1))
    mirror = await mirror_for(make_mirror, fake_upstream)
    path = f"/v2/app/blobs/{digest}"
    with pytest.raises(aiohttp.ClientPayloadError):
        await fetch(mirror, path)
    assert await fetch(mirror, path) == (200, data)
    await wait_stored(mirror, digest)


async def test_client_disconnect_does_not_cancel_the_fill(
    fake_upstream: FakeUpstream, make_mirror: MakeMirror
) -> None:
    data = os.urandom(2 * 1024 * 1024)
    digest = fake_upstream.add_blob(REPO, data)
    gate = fake_upstream.set_fault(digest, Fault(gate_after=1024 * 1024))
    mirror = await mirror_for(make_mirror, fake_upstream)
    async with mirror.get(f"/v2/app/blobs/{digest}") as response:
        await response.content.readexactly(1024)
        await asyncio.wait_for(gate.gate_reached.wait(), 5)
        response.close()  # the client goes away mid-download
    gate.gate.set()
    await wait_stored(mirror, digest)
    fake_upstream.clear()
    assert await fetch(mirror, f"/v2/app/blobs/{digest}") == (200, data)
    assert fake_upstream.requests == []


async def wait_stored(mirror: Mirror, digest: str) -> None:
    await mirror.wait_committed(digest)
