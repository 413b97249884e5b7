"""The mirror behind a load balancer, a CDN or an HTTP cache: the client address it logs,
/readyz during shutdown, and how long its answers may be kept."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import aiohttp
import pytest

from tests.fake_upstream.server import FakeUpstream, Fault
from tests.mirror import MakeMirror, Mirror

REPO = "library/app"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
IMMUTABLE = "public, max-age=31536000, immutable"
Request = Callable[..., AbstractAsyncContextManager[aiohttp.ClientResponse]]


async def mirror_for(
    make_mirror: MakeMirror, upstream: FakeUpstream, ttl: float = 60, **raw: Any
) -> Mirror:
    upstreams = [{"name": "docker.io", "url": upstream.url, "default": True, "manifest_ttl": ttl}]
    return await make_mirror(upstreams, **raw)


async def logged_client(
    mirror: Mirror, caplog: pytest.LogCaptureFixture, headers: dict[str, str]
) -> str:
    """The client address of the access-log line of one request to /v2/ with `headers`."""
    caplog.clear()
    async with mirror.get("/v2/", headers=headers) as response:
        assert response.status == 200
    (line,) = [r.getMessage() for r in caplog.records if r.name == "pullthrough.access"]
    return str(json.loads(line)["client"])


# The in-process mirror is reached from 127.0.0.1: that is the peer every request has.
@pytest.mark.parametrize(
    ("headers", "client"),
    [
        ({}, "127.0.0.1"),
        # The left-most entries are whatever the client wrote; the right-most address that
        # no trusted proxy wrote for itself is the one the first trusted proxy saw.
        ({"X-Forwarded-For": "198.51.100.1, 203.0.113.9, 10.1.2.3"}, "203.0.113.9"),
        ({"X-Forwarded-For": "203.0.113.9"}, "203.0.113.9"),
        ({"X-Forwarded-For": "10.1.2.3, 10.4.5.6"}, "10.1.2.3"),  # all trusted: the first
        ({"Forwarded": 'for=198.51.100.1, for="[2001:db8::7]:4711";proto=https'}, "2001:db8::7"),
        (
            {"Forwarded": "for=203.0.113.9:80, for=10.1.2.3", "X-Forwarded-For": "1.1.1.1"},
            "203.0.113.9",
        ),
        ({"X-Forwarded-For": '"><script>, 10.1.2.3'}, "unknown"),  # never logged as written
    ],
)
async def test_a_trusted_proxy_names_the_client(
    fake_upstream: FakeUpstream,
    make_mirror: MakeMirror,
    caplog: pytest.LogCaptureFixture,
    headers: dict[str, str],
    client: str,
) -> None:
    trusted = ["127.0.0.0/8", "10.0.0.0/8"]
    mirror = await mirror_for(
        make_mirror, fake_upstream, trusted_proxies=trusted, log={"format": "json"}
    )
    caplog.set_level(logging.INFO, logger="pullthrough.access")
    assert await logged_client(mirror, caplog, headers) == client


@pytest.mark.parametrize("trusted", [[], ["10.0.0.0/8"]])
async def test_forwarding_headers_from_an_untrusted_peer_are_ignored(
    fake_upstream: FakeUpstream,
    make_mirror: MakeMirror,
    caplog: pytest.LogCaptureFixture,
    trusted: list[str],
) -> None:
    mirror = await mirror_for(
        make_mirror, fake_upstream, trusted_proxies=trusted, log={"format": "json"}
    )
    caplog.set_level(logging.INFO, logger="pullthrough.access")
    spoofed = {"X-Forwarded-For": "203.0.113.9", "Forwarded": "for=198.51.100.1"}
    assert await logged_client(mirror, caplog, spoofed) == "127.0.0.1"


async def test_readyz_answers_503_once_shutdown_has_begun(
    fake_upstream: FakeUpstream, make_mirror: MakeMirror
) -> None:
    mirror = await mirror_for(make_mirror, fake_upstream)
    async with mirror.get("/readyz") as response:
        assert response.status == 200
    await mirror.app.shutdown()  # what aiohttp runs on SIGTERM, once its sites are stopped
    async with mirror.get("/readyz") as response:
        body = await response.json()
        assert (response.status, body) == (503, {"status": "not ready", "reason": "shutting down"})
    async with mirror.get("/healthz") as response:
        assert response.status == 200  # alive all the same: nothing should restart it


async def test_content_by_digest_may_be_kept_for_good(
    fake_upstream: FakeUpstream, make_mirror: MakeMirror
) -> None:
    blob = fake_upstream.add_blob(REPO, os.urandom(10_000))
    manifest = fake_upstream.add_manifest(REPO, "v1", b'{"schemaVersion": 2}', OCI_MANIFEST)
    mirror = await mirror_for(make_mirror, fake_upstream)
    for path in (f"/v2/app/blobs/{blob}", f"/v2/app/manifests/{manifest}"):
        for request in (mirror.get, mirror.head):
            async with request(path) as response:
                assert response.status == 200, path
                assert response.headers["Cache-Control"] == IMMUTABLE
    async with mirror.get(f"/v2/app/blobs/{blob}", headers={"Range": "bytes=0-9"}) as response:
        assert (response.status, response.headers["Cache-Control"]) == (206, IMMUTABLE)


async def cache_control(mirror: Mirror, method: str, path: str) -> str:
    request = mirror.get if method == "GET" else mirror.head
    async with request(path, headers={"Accept": OCI_MANIFEST}) as response:
        assert response.status == 200
        return response.headers["Cache-Control"]


@pytest.mark.parametrize("method", ["GET", "HEAD"])
async def test_a_tag_may_be_kept_for_what_is_left_of_its_ttl(
    fake_upstream: FakeUpstream, make_mirror: MakeMirror, method: str
) -> None:
    fake_upstream.add_manifest(REPO, "v1", b'{"schemaVersion": 2}', OCI_MANIFEST)
    mirror = await mirror_for(make_mirror, fake_upstream, ttl=60)
    path = "/v2/app/manifests/v1"
    assert await cache_control(mirror, method, path) == "max-age=60"  # just fetched
    mirror.clock.advance(45)
    assert await cache_control(mirror, method, path) == "max-age=15"  # cached, 15 s left
    mirror.clock.advance(20)
    assert await cache_control(mirror, method, path) == "max-age=60"  # upstream re-asked
    # Upstream fails: the stale answer is served, and is due already.
    fake_upstream.set_fault("v1", Fault(status=503, methods=("GET", "HEAD")))
    mirror.clock.advance(61)
    assert await cache_control(mirror, method, path) == "no-cache"


async def test_a_tag_with_no_ttl_is_never_kept(
    fake_upstream: FakeUpstream, make_mirror: MakeMirror
) -> None:
    fake_upstream.add_manifest(REPO, "v1", b'{"schemaVersion": 2}', OCI_MANIFEST)
    mirror = await mirror_for(make_mirror, fake_upstream, ttl=0)
    for method in ("GET", "HEAD"):
        assert await cache_control(mirror, method, "/v2/app/manifests/v1") == "no-cache"


async def test_errors_carry_no_cache_control(
    fake_upstream: FakeUpstream, make_mirror: MakeMirror
) -> None:
    blob = fake_upstream.add_blob(REPO, os.urandom(100))
    mirror = await mirror_for(make_mirror, fake_upstream)
    missing = "sha256:" + "0" * 64
    answers: list[tuple[Request, str, dict[str, str], int]] = [
        (request, path, {}, 404)
        for request in (mirror.get, mirror.head)
        for path in (
            "/v2/app/manifests/nope",
            f"/v2/app/manifests/{missing}",
            f"/v2/app/blobs/{missing}",
        )
    ]
    answers.append((mirror.get, f"/v2/app/blobs/{blob}", {"Range": "bytes=500-600"}, 416))
    for request, path, headers, status in answers:
        async with request(path, headers=headers) as response:
            assert response.status == status, path
            assert "Cache-Control" not in response.headers, path
