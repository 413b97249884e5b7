"""Manifest lookups against the fake upstream, on an injected clock."""

from __future__ import annotations

import json
from typing import Any

from tests.fake_upstream.server import FakeUpstream, Fault
from tests.mirror import MakeMirror, Mirror

REPO = "library/app"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
TTL = 300


def manifest_bytes(n: int) -> bytes:
    # Odd spacing on purpose: bytes must come back exactly, never re-serialized.
    doc = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "annotations": {"n": str(n)}}
    return json.dumps(doc, indent=3).encode() + b"\n"


async def mirror_for(make_mirror: MakeMirror, upstream: FakeUpstream) -> Mirror:
    return await make_mirror(
        [{"name": "docker.io", "url": upstream.url, "default": True, "manifest_ttl": TTL}]
    )


async def get(mirror: Mirror, ref: str, method: str = "GET") -> tuple[int, Any, bytes]:
    request = mirror.get if method == "GET" else mirror.head
    async with request(f"/v2/app/manifests/{ref}", headers={"Accept": OCI_MANIFEST}) as response:
        return response.status, response.headers.copy(), await response.read()


def upstream_manifest_requests(upstream: FakeUpstream) -> list[str]:
    return [r.method for r in upstream.requests if "/manifests/" in r.path]


async def test_tag_then_digest_served_with_exact_bytes_and_headers(
    fake_upstream: FakeUpstream, make_mirror: MakeMirror
) -> None:
    data = manifest_bytes(1)
    digest = fake_upstream.add_manifest(REPO, "v1", data, OCI_MANIFEST)
    mirror = await mirror_for(make_mirror, fake_upstream)

    status, headers, body = await get(mirror, "v1")
    assert (status, body) == (200, data)
    assert headers["Content-Type"] == OCI_MANIFEST
    assert headers["Docker-Content-Digest"] == digest
    assert headers["Content-Length"] == str(len(data))
    assert headers["ETag"] == f'"{digest}"'

    fake_upstream.clear()
    assert (await get(mirror, digest))[2] == data
    status, headers, body = await get(mirror, digest, "HEAD")
    assert (status, body, headers["Content-Length"]) == (200, b"", str(len(data)))
    assert fake_upstream.requests == []  # by digest: from the cache, never revalidated


async def test_tag_within_ttl_asks_nothing_then_revalidates_with_head(
    fake_upstream: FakeUpstream, make_mirror: MakeMirror
) -> None:
    data = manifest_bytes(1)
    fake_upstream.add_manifest(REPO, "v1", data, OCI_MANIFEST)
    mirror = await mirror_for(make_mirror, fake_upstream)
    await get(mirror, "v1")

    fake_upstream.clear()
    mirror.clock.advance(TTL - 1)
    assert (await get(mirror, "v1"))[2] == data
    assert upstream_manifest_requests(fake_upstream) == []

    mirror.clock.advance(2)
    assert (await get(mirror, "v1"))[2] == data
    assert upstream_manifest_requests(fake_upstream) == ["HEAD"]


async def test_moved_tag_is_fetched_anew(
    fake_upstream: FakeUpstream, make_mirror: MakeMirror
) -> None:
    fake_upstream.add_manifest(REPO, "v1", manifest_bytes(1), OCI_MANIFEST)
    mirror = await mirror_for(make_mirror, fake_upstream)
    await get(mirror, "v1")
    new_digest = fake_upstream.add_manifest(REPO, "v1", manifest_bytes(2), OCI_MANIFEST)
    mirror.clock.advance(TTL + 1)
    status, headers, body = await get(mirror, "v1")
    assert (status, body, headers["Docker-Content-Digest"]) == (200, manifest_bytes(2), new_digest)


async def test_upstream_failure_serves_the_cached_tag(
    fake_upstream: FakeUpstream, make_mirror: MakeMirror
) -> None:
    data = manifest_bytes(1)
    fake_upstream.add_manifest(REPO, "v1", data, OCI_MANIFEST)
    mirror = await mirror_for(make_mirror, fake_upstream)
    await get(mirror, "v1")
    fake_upstream.set_fault("v1", Fault(status=503, methods=("GET", "HEAD")))
    mirror.clock.advance(TTL + 1)
    assert (await get(mirror, "v1"))[:3:2] == (200, data)


OCI_INDEX = "application/vnd.oci.image.index.v1+json"
BOTH = f"{OCI_INDEX}, {OCI_MANIFEST}"  # what a multi-platform client sends


async def get_accepting(mirror: Mirror, accept: str) -> tuple[int, str]:
    async with mirror.get("/v2/app/manifests/v1", headers={"Accept": accept}) as response:
        await response.read()
        return response.status, response.headers.get("Docker-Content-Digest", "")


async def test_a_tag_that_turns_from_index_to_manifest_is_fresh_and_its_fallback(
    fake_upstream: FakeUpstream, make_mirror: MakeMirror
) -> None:
    index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}).encode()
    fake_upstream.add_manifest(REPO, "v1", index, OCI_INDEX)
    mirror = await mirror_for(make_mirror, fake_upstream)
    await get_accepting(mirror, BOTH)
    single = fake_upstream.add_manifest(REPO, "v1", manifest_bytes(1), OCI_MANIFEST)
    mirror.clock.advance(TTL + 1)
    assert await get_accepting(mirror, BOTH) == (200, single)  # HEAD, then GET

    # The newest answer is the one whose age counts: within the TTL, upstream is not asked.
    fake_upstream.clear()
    for _ in range(5):
        mirror.clock.advance(TTL / 10)
        assert await get_accepting(mirror, BOTH) == (200, single)
    assert upstream_manifest_requests(fake_upstream) == []

    # And it is the one served when upstream fails: never a rollback to the index.
    fake_upstream.set_fault("v1", Fault(status=503, methods=("GET", "HEAD")))
    mirror.clock.advance(TTL + 1)
    assert await get_accepting(mirror, BOTH) == (200, single)
    assert upstream_manifest_requests(fake_upstream) == ["HEAD"]


async def test_clients_with_different_accepts_each_get_their_own_answer(
    fake_upstream: FakeUpstream, make_mirror: MakeMirror
) -> None:
    """Upstream may answer one tag with an index to one client and with one platform's
    manifest to a client that takes no index: neither answer is served to the other."""
    index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}).encode()
    index_digest = fake_upstream.add_manifest(REPO, "v1", index, OCI_INDEX)
    mirror = await mirror_for(make_mirror, fake_upstream)
    assert await get_accepting(mirror, BOTH) == (200, index_digest)
    # Played by hand: the upstream now answers the single-manifest client differently.
    single = fake_upstream.add_manifest(REPO, "v1", manifest_bytes(1), OCI_MANIFEST)
    assert await get_accepting(mirror, OCI_MANIFEST) == (200, single)
    fake_upstream.add_manifest(REPO, "v1", index, OCI_INDEX)

    fake_upstream.clear()
    assert await get_accepting(mirror, BOTH) == (200, index_digest)
    assert await get_accepting(mirror, f"{OCI_MANIFEST}, {OCI_INDEX}") == (200, index_digest)
    assert await get_accepting(mirror, OCI_MANIFEST) == (200, single)
    assert upstream_manifest_requests(fake_upstream) == []

    # Upstream down and a client with an Accept never seen: the newest answer it accepts.
    fake_upstream.set_fault("v1", Fault(status=503, methods=("GET", "HEAD")))
    assert await get_accepting(mirror, f"{OCI_MANIFEST}, text/plain") == (200, single)


async def test_failures_with_nothing_cached(
    fake_upstream: FakeUpstream, make_mirror: MakeMirror
) -> None:
    fake_upstream.add_manifest(REPO, "down", manifest_bytes(1), OCI_MANIFEST)
    fake_upstream.add_manifest(REPO, "limited", manifest_bytes(2), OCI_MANIFEST)
    fake_upstream.set_fault("down", Fault(status=502))
    fake_upstream.set_fault("limited", Fault(status=429, retry_after=17))
    mirror = await mirror_for(make_mirror, fake_upstream)

    status, _, body = await get(mirror, "down")
    assert (status, json.loads(body)["errors"][0]["code"]) == (503, "UNAVAILABLE")
    status, headers, body = await get(mirror, "limited")
    assert (status, json.loads(body)["errors"][0]["code"]) == (429, "TOOMANYREQUESTS")
    assert headers["Retry-After"] == "17"
    status, _, body = await get(mirror, "absent")
    assert (status, json.loads(body)["errors"][0]["code"]) == (404, "MANIFEST_UNKNOWN")


async def test_manifest_whose_bytes_do_not_match_the_digest_is_refused(
    fake_upstream: FakeUpstream, make_mirror: MakeMirror
) -> None:
    good = manifest_bytes(1)
    digest = fake_upstream.add_manifest(REPO, "v1", good, OCI_MANIFEST)
    fake_upstream.set_fault(digest, Fault(corrupt=True))
    mirror = await mirror_for(make_mirror, fake_upstream)
    status, _, body = await get(mirror, digest)
    assert status == 502
    assert json.loads(body)["errors"][0]["code"] == "UNKNOWN"
    assert digest not in mirror.stored_blobs()


async def test_oversized_manifest_is_rejected_and_not_cached(
    fake_upstream: FakeUpstream, make_mirror: MakeMirror
) -> None:
    huge = b'{"schemaVersion":2,"x":"' + b"a" * (4 * 1024 * 1024) + b'"}'
    digest = fake_upstream.add_manifest(REPO, "huge", huge, OCI_MANIFEST)
    mirror = await mirror_for(make_mirror, fake_upstream)
    status, _, body = await get(mirror, "huge")
    assert status == 502
    assert json.loads(body)["errors"][0]["code"] == "MANIFEST_INVALID"
    assert digest not in mirror.stored_blobs()


async def test_concurrent_misses_share_one_upstream_get(
    fake_upstream: FakeUpstream, make_mirror: MakeMirror
) -> None:
    import asyncio

    data = manifest_bytes(7)
    fake_upstream.add_manifest(REPO, "v1", data, OCI_MANIFEST)
    gate = fake_upstream.set_fault("v1", Fault(gate_after=10))
    mirror = await mirror_for(make_mirror, fake_upstream)
    clients = [asyncio.create_task(get(mirror, "v1")) for _ in range(8)]
    await asyncio.wait_for(gate.gate_reached.wait(), 5)
    await asyncio.sleep(0.1)
    gate.gate.set()
    results = await asyncio.gather(*clients)
    assert [(status, body) for status, _, body in results] == [(200, data)] * 8
    assert upstream_manifest_requests(fake_upstream) == ["GET"]
