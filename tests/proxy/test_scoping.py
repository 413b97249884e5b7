"""Scoping: a stored digest is served to another repository or upstream only when that
upstream confirms it holds it there (one HEAD, never a second download)."""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any

import pytest

from tests.fake_upstream.fixtures import MakeFakeUpstream
from tests.fake_upstream.server import FakeUpstream, Fault
from tests.mirror import MakeMirror, Mirror

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
SECRET = "acme/secret"  # where the mirror first pulled the content
OTHER = "library/alpine"  # another repository asking for the same digest


async def mirror_for(make_mirror: MakeMirror, upstream: FakeUpstream) -> Mirror:
    return await make_mirror([{"name": "docker.io", "url": upstream.url, "default": True}])


async def answer(mirror: Mirror, path: str, method: str = "GET") -> tuple[int, Any, bytes]:
    request = mirror.get if method == "GET" else mirror.head
    async with request(path, headers={"Accept": OCI_MANIFEST}) as response:
        body = await response.read()
        code = json.loads(body)["errors"][0]["code"] if response.status >= 400 and body else None
        return response.status, code, body


async def cached_blob(mirror: Mirror, upstream: FakeUpstream, data: bytes) -> str:
    digest = upstream.add_blob(SECRET, data)
    assert await mirror.fetch(f"/v2/{SECRET}/blobs/{digest}") == data
    await mirror.wait_committed(digest)
    upstream.clear()
    return digest


def gets(upstream: FakeUpstream) -> list[str]:
    return [r.path for r in upstream.requests if r.method == "GET"]


async def served_as_linked(mirror: Mirror, upstream: FakeUpstream, path: str, data: bytes) -> None:
    """Once confirmed, the pair is linked: a plain hit, upstream not asked again."""
    upstream.clear()
    assert await answer(mirror, path) == (200, None, data)
    assert upstream.requests == []


@pytest.mark.parametrize("method", ["GET", "HEAD"])
async def test_a_blob_upstream_does_not_hold_for_the_other_repository_is_unknown(
    fake_upstream: FakeUpstream, make_mirror: MakeMirror, method: str
) -> None:
    mirror = await mirror_for(make_mirror, fake_upstream)
    digest = await cached_blob(mirror, fake_upstream, os.urandom(5000))

    status, code, _ = await answer(mirror, f"/v2/{OTHER}/blobs/{digest}", method)
    assert (status, code) == (404, "BLOB_UNKNOWN" if method == "GET" else None)
    assert fake_upstream.count("HEAD", f"/v2/{OTHER}/blobs/{digest}") == 1
    assert gets(fake_upstream) == []


@pytest.mark.parametrize("refused", [401, 403])
async def test_a_blob_upstream_refuses_to_the_other_repository_is_denied(
    fake_upstream: FakeUpstream, make_mirror: MakeMirror, refused: int
) -> None:
    mirror = await mirror_for(make_mirror, fake_upstream)
    data = os.urandom(5000)
    digest = await cached_blob(mirror, fake_upstream, data)
    fake_upstream.add_blob(OTHER, data)  # held there, yet refused to the mirror
    path = f"/v2/{OTHER}/blobs/{digest}"
    fake_upstream.set_fault(path, Fault(status=refused, methods=("GET", "HEAD")))

    status, code, body = await answer(mirror, path)
    assert (status, code) == (403, "DENIED")
    assert data not in body


async def test_upstream_confirms_and_the_stored_blob_is_served_without_a_download(
    fake_upstream: FakeUpstream, make_mirror: MakeMirror
) -> None:
    mirror = await mirror_for(make_mirror, fake_upstream)
    data = os.urandom(200_000)
    digest = await cached_blob(mirror, fake_upstream, data)
    fake_upstream.add_blob(OTHER, data)
    path = f"/v2/{OTHER}/blobs/{digest}"

    results = await asyncio.gather(*(answer(mirror, path) for _ in range(5)))
    assert all(result == (200, None, data) for result in results)
    assert fake_upstream.count("HEAD", path) == 1  # shared by the concurrent requesters
    assert gets(fake_upstream) == []
    assert await mirror.lookups("blob", "confirmed") == 5
    await served_as_linked(mirror, fake_upstream, path, data)


async def test_joining_another_repositorys_download_needs_the_same_confirmation(
    fake_upstream: FakeUpstream, make_mirror: MakeMirror
) -> None:
    mirror = await mirror_for(make_mirror, fake_upstream)
    data = os.urandom(2 * 1024 * 1024)
    digest = fake_upstream.add_blob(SECRET, data)
    gate = fake_upstream.set_fault(digest, Fault(gate_after=1024 * 1024))
    leader = asyncio.create_task(answer(mirror, f"/v2/{SECRET}/blobs/{digest}"))
    await asyncio.wait_for(gate.gate_reached.wait(), 5)

    other = f"/v2/{OTHER}/blobs/{digest}"
    assert (await answer(mirror, other))[:2] == (404, "BLOB_UNKNOWN")
    fake_upstream.add_blob(OTHER, data)
    follower = asyncio.create_task(answer(mirror, other))
    await asyncio.sleep(0.2)
    gate.gate.set()
    assert await leader == (200, None, data)
    assert await follower == (200, None, data)
    assert gets(fake_upstream) == [f"/v2/{SECRET}/blobs/{digest}"]


async def test_upstream_down_serves_linked_pairs_only(make_mirror: MakeMirror) -> None:
    async with FakeUpstream() as upstream:
        mirror = await mirror_for(make_mirror, upstream)
        layer = os.urandom(5000)
        blob = await cached_blob(mirror, upstream, layer)
        manifest = manifest_bytes()
        digest = await cached_manifest(mirror, upstream, manifest)
    # The upstream is gone: connections to it are refused.

    assert await answer(mirror, f"/v2/{SECRET}/blobs/{blob}") == (200, None, layer)
    assert await answer(mirror, f"/v2/{SECRET}/manifests/{digest}") == (200, None, manifest)
    for path in (f"/v2/{OTHER}/blobs/{blob}", f"/v2/{OTHER}/manifests/{digest}"):
        status, code, body = await answer(mirror, path)
        assert (status, code) == (503, "UNAVAILABLE")
        assert layer not in body and manifest not in body


async def test_share_when_down_serves_a_public_upstreams_content_to_any_repository(
    make_mirror: MakeMirror,
) -> None:
    """An upstream without credentials only ever gave the mirror public content: with
    `share_when_down`, an outage serves it to any repository, counted as stale, unlinked."""
    async with FakeUpstream() as upstream:
        mirror = await make_mirror(
            [{"name": "docker.io", "url": upstream.url, "default": True, "share_when_down": True}]
        )
        layer = os.urandom(5000)
        blob = await cached_blob(mirror, upstream, layer)
        manifest = manifest_bytes()
        digest = await cached_manifest(mirror, upstream, manifest)
        # Up, upstream still decides: a repository it doesn't hold the blob in gets 404.
        assert (await answer(mirror, f"/v2/nothere/blobs/{blob}"))[:2] == (404, "BLOB_UNKNOWN")

    assert await answer(mirror, f"/v2/{OTHER}/blobs/{blob}") == (200, None, layer)
    assert await answer(mirror, f"/v2/{OTHER}/manifests/{digest}") == (200, None, manifest)
    assert await mirror.lookups("blob", "stale") == 1
    assert await mirror.lookups("blob", "confirmed") == 0


def manifest_bytes() -> bytes:
    doc = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "annotations": {"n": os.urandom(4).hex()}}
    return json.dumps(doc).encode()


async def cached_manifest(mirror: Mirror, upstream: FakeUpstream, data: bytes) -> str:
    digest = upstream.add_manifest(SECRET, "v1", data, OCI_MANIFEST)
    assert (await answer(mirror, f"/v2/{SECRET}/manifests/v1"))[2] == data
    upstream.clear()
    return digest


@pytest.mark.parametrize(
    ("holds", "fault", "expected"),
    [
        (False, None, (404, "MANIFEST_UNKNOWN")),
        (True, 401, (403, "DENIED")),
        (True, 403, (403, "DENIED")),
    ],
    ids=["not-held", "401", "403"],
)
async def test_a_manifest_by_digest_is_not_served_to_the_other_repository_unconfirmed(
    fake_upstream: FakeUpstream,
    make_mirror: MakeMirror,
    holds: bool,
    fault: int | None,
    expected: tuple[int, str],
) -> None:
    mirror = await mirror_for(make_mirror, fake_upstream)
    data = manifest_bytes()
    digest = await cached_manifest(mirror, fake_upstream, data)
    path = f"/v2/{OTHER}/manifests/{digest}"
    if holds:
        fake_upstream.add_manifest(OTHER, digest, data, OCI_MANIFEST)
    if fault:
        fake_upstream.set_fault(path, Fault(status=fault, methods=("GET", "HEAD")))

    status, code, body = await answer(mirror, path)
    assert (status, code) == expected
    assert data not in body
    assert gets(fake_upstream) == []


async def test_upstream_confirms_a_manifest_by_digest_with_one_head(
    fake_upstream: FakeUpstream, make_mirror: MakeMirror
) -> None:
    mirror = await mirror_for(make_mirror, fake_upstream)
    data = manifest_bytes()
    digest = await cached_manifest(mirror, fake_upstream, data)
    fake_upstream.add_manifest(OTHER, digest, data, OCI_MANIFEST)
    path = f"/v2/{OTHER}/manifests/{digest}"

    assert await answer(mirror, path) == (200, None, data)
    assert [r.method for r in fake_upstream.requests if r.path == path] == ["HEAD"]
    assert await mirror.lookups("manifest", "confirmed") == 1
    await served_as_linked(mirror, fake_upstream, path, data)


async def test_another_upstream_is_a_pair_of_its_own(
    make_fake_upstream: MakeFakeUpstream, make_mirror: MakeMirror
) -> None:
    first, second = await make_fake_upstream(), await make_fake_upstream()
    mirror = await make_mirror(
        [
            {"name": "docker.io", "url": first.url, "default": True},
            {"name": "ghcr.io", "url": second.url},
        ]
    )
    digest = await cached_blob(mirror, first, os.urandom(3000))
    status, code, _ = await answer(mirror, f"/v2/{SECRET}/blobs/{digest}?ns=ghcr.io")
    assert (status, code) == (404, "BLOB_UNKNOWN")
    assert second.count("HEAD", f"/v2/{SECRET}/blobs/{digest}") == 1
