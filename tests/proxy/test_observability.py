"""Metrics move as they should; one access-log line per request; health endpoints."""

from __future__ import annotations

import asyncio
import json
import logging
import os

import pytest

from tests.fake_upstream.fixtures import MakeFakeUpstream
from tests.fake_upstream.server import FakeUpstream, Fault
from tests.mirror import MakeMirror, Mirror
from tests.secrets import SECRET

REPO = "library/app"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


async def scrape(mirror: Mirror) -> dict[str, float]:
    return await mirror.metrics()


def lookups(metrics: dict[str, float], kind: str, result: str) -> float:
    key = (
        f'pullthrough_cache_requests_total{{kind="{kind}",result="{result}",upstream="docker.io"}}'
    )
    return metrics.get(key, 0.0)


async def mirror_for(make_mirror: MakeMirror, upstream: FakeUpstream, **raw: object) -> Mirror:
    return await make_mirror(
        [{"name": "docker.io", "url": upstream.url, "default": True, "manifest_ttl": 60}], **raw
    )


async def read(mirror: Mirror, path: str) -> bytes:
    async with mirror.get(path, headers={"Accept": OCI_MANIFEST}) as response:
        assert response.status == 200, path
        return await response.read()


async def test_miss_then_hit_counts_and_bytes_by_source(
    fake_upstream: FakeUpstream, make_mirror: MakeMirror
) -> None:
    data = os.urandom(100_000)
    digest = fake_upstream.add_blob(REPO, data)
    mirror = await mirror_for(make_mirror, fake_upstream)
    await read(mirror, f"/v2/app/blobs/{digest}")
    await mirror.wait_committed(digest)
    await read(mirror, f"/v2/app/blobs/{digest}")

    m = await scrape(mirror)
    assert (lookups(m, "blob", "miss"), lookups(m, "blob", "hit")) == (1, 1)
    assert m['pullthrough_served_bytes_total{source="upstream"}'] == len(data)
    assert m['pullthrough_served_bytes_total{source="cache"}'] == len(data)
    assert m['pullthrough_upstream_bytes_total{upstream="docker.io"}'] == len(data)
    assert m['pullthrough_http_requests_total{method="GET",route="blob",status="200"}'] == 2
    assert (
        m['pullthrough_upstream_request_duration_seconds_count{outcome="ok",upstream="docker.io"}']
        == 1
    )
    assert m['pullthrough_upstream_breaker_state{state="closed",upstream="docker.io"}'] == 1
    assert m["pullthrough_cache_size_bytes"] == len(data)


async def test_a_follower_counts_as_coalesced(
    fake_upstream: FakeUpstream, make_mirror: MakeMirror
) -> None:
    data = os.urandom(2 * 1024 * 1024)
    digest = fake_upstream.add_blob(REPO, data)
    gate = fake_upstream.set_fault(digest, Fault(gate_after=1024 * 1024))
    mirror = await mirror_for(make_mirror, fake_upstream)
    leader = asyncio.create_task(read(mirror, f"/v2/app/blobs/{digest}"))
    await asyncio.wait_for(gate.gate_reached.wait(), 5)
    follower = asyncio.create_task(read(mirror, f"/v2/app/blobs/{digest}"))
    await asyncio.sleep(0.1)
    assert (await scrape(mirror))["pullthrough_fills_in_progress"] == 1
    gate.gate.set()
    assert list(await asyncio.gather(leader, follower)) == [data, data]
    # A request is counted once its handler returns, just after the client has the body.
    async with asyncio.timeout(5):
        while True:
            m = await scrape(mirror)
            if lookups(m, "blob", "miss") + lookups(m, "blob", "coalesced") == 2:
                break
            await asyncio.sleep(0.01)
    assert (lookups(m, "blob", "miss"), lookups(m, "blob", "coalesced")) == (1, 1)
    assert m['pullthrough_served_bytes_total{source="upstream"}'] == 2 * len(data)


async def test_stale_serve_and_upstream_errors_are_counted(
    fake_upstream: FakeUpstream, make_mirror: MakeMirror
) -> None:
    fake_upstream.add_manifest(REPO, "v1", b'{"schemaVersion":2}', OCI_MANIFEST)
    mirror = await mirror_for(make_mirror, fake_upstream)
    await read(mirror, "/v2/app/manifests/v1")
    fake_upstream.set_fault("v1", Fault(status=503, methods=("GET", "HEAD")))
    mirror.clock.advance(61)
    await read(mirror, "/v2/app/manifests/v1")
    m = await scrape(mirror)
    assert (lookups(m, "manifest", "miss"), lookups(m, "manifest", "stale")) == (1, 1)
    assert m['pullthrough_upstream_errors_total{class="server_error",upstream="docker.io"}'] == 1


async def test_token_fetches_are_counted(
    make_fake_upstream: MakeFakeUpstream, make_mirror: MakeMirror
) -> None:
    upstream = await make_fake_upstream(auth="dockerhub")
    digest = upstream.add_blob(REPO, b"x" * 100)
    mirror = await mirror_for(make_mirror, upstream)
    await read(mirror, f"/v2/app/blobs/{digest}")
    m = await scrape(mirror)
    assert m['pullthrough_token_fetches_total{outcome="ok",upstream="docker.io"}'] == 1


@pytest.mark.parametrize("form", ["text", "json"])
async def test_one_access_log_line_per_request(
    fake_upstream: FakeUpstream,
    make_mirror: MakeMirror,
    caplog: pytest.LogCaptureFixture,
    form: str,
) -> None:
    data = os.urandom(5000)
    digest = fake_upstream.add_blob(REPO, data)
    mirror = await mirror_for(make_mirror, fake_upstream, log={"format": form})
    caplog.set_level(logging.INFO, logger="pullthrough.access")
    path = f"/v2/app/blobs/{digest}"
    async with mirror.get(
        path + "?ns=docker.io&secret=hunter2", headers={"X-Request-ID": "req-1"}
    ) as r:
        assert r.headers["X-Request-ID"] == "req-1"
        await r.read()
    async with mirror.get("/v2/app/manifests/nope") as r:
        generated = r.headers["X-Request-ID"]

    lines = [rec.getMessage() for rec in caplog.records if rec.name == "pullthrough.access"]
    assert len(lines) == 2
    assert all("hunter2" not in line for line in lines)
    if form == "json":
        first, second = (json.loads(line) for line in lines)
        assert first | {"duration_ms": 0} == {
            "request_id": "req-1",
            "client": "127.0.0.1",
            "method": "GET",
            "path": f"/v2/app/blobs/{digest}?ns=docker.io",
            "status": 200,
            "bytes": len(data),
            "duration_ms": 0,
            "upstream": "docker.io",
            "cache": "MISS",
        }
        assert (second["request_id"], second["status"], second["cache"]) == (generated, 404, None)
    else:
        assert lines[0].startswith(
            f'req-1 127.0.0.1 "GET /v2/app/blobs/{digest}?ns=docker.io" 200 5000 '
        )
        assert lines[0].endswith("upstream=docker.io cache=MISS")
        assert f'{generated} 127.0.0.1 "GET /v2/app/manifests/nope" 404 ' in lines[1]


async def test_health_and_readiness(fake_upstream: FakeUpstream, make_mirror: MakeMirror) -> None:
    mirror = await mirror_for(make_mirror, fake_upstream)
    async with mirror.get("/healthz") as response:
        assert (response.status, await response.json()) == (200, {"status": "ok"})
    async with mirror.get("/readyz") as response:
        assert (response.status, await response.json()) == (200, {"status": "ready"})
    # The cache directory stops taking writes (root ignores permissions, so remove it).
    (mirror.cache_dir / "tmp").rmdir()
    async with mirror.get("/readyz") as response:
        body = await response.json()
        assert response.status == 503 and body["status"] == "not ready"
    (mirror.cache_dir / "tmp").mkdir()
    async with mirror.get("/readyz") as response:
        assert response.status == 200


async def test_no_secret_reaches_any_log_line_even_at_debug(
    make_fake_upstream: MakeFakeUpstream,
    make_mirror: MakeMirror,
    caplog: pytest.LogCaptureFixture,
) -> None:
    import base64

    caplog.set_level(logging.DEBUG)
    secret = SECRET
    upstream = await make_fake_upstream(auth="dockerhub", credentials=("bot", secret))
    data = os.urandom(2000)
    digest = upstream.add_blob(REPO, data)
    upstream.set_fault(digest, Fault(redirect=307, redirect_to="cdn"))
    mirror = await make_mirror(
        [{"name": "docker.io", "url": upstream.url, "default": True, "username": "bot",
          "password": secret}]
    )  # fmt: skip
    second = upstream.add_blob(REPO, os.urandom(2000))
    await read(mirror, f"/v2/app/blobs/{digest}")
    upstream.revoke_tokens()  # a 401 on a cached token, then a new token
    await read(mirror, f"/v2/app/blobs/{second}")
    async with mirror.get("/v2/app/manifests/missing") as response:
        assert response.status == 404

    tokens = [grant.token for grant in upstream.token_grants]
    basic = base64.b64encode(f"bot:{secret}".encode()).decode()
    text = "\n".join(caplog.text.splitlines() + [r.getMessage() for r in caplog.records])
    assert len(tokens) == 2 and text
    for needle in [secret, basic, *tokens]:
        assert needle not in text


async def test_each_kind_of_route_is_a_label_of_its_own(
    fake_upstream: FakeUpstream, make_mirror: MakeMirror
) -> None:
    mirror = await mirror_for(make_mirror, fake_upstream)
    asked = {
        ("GET", "/healthz"): "health",
        ("GET", "/readyz"): "ready",
        ("GET", "/v2/"): "ping",
        ("GET", "/v2/_catalog"): "catalog",
        ("PUT", "/v2/app/manifests/v1"): "manifest",
        ("DELETE", "/v2/app/blobs/sha256:" + "0" * 64): "blob",
        ("POST", "/v2/app/blobs/uploads/"): "uploads",
        ("GET", "/nothing/here"): "other",
    }
    for (method, path), _ in asked.items():
        async with mirror.session.request(method, mirror.url + path) as response:
            await response.read()
    metrics = await scrape(mirror)
    for (method, _), route in asked.items():
        counted = sum(
            value
            for key, value in metrics.items()
            if key.startswith("pullthrough_http_requests_total{")
            and f'method="{method}",route="{route}",' in key
        )
        assert counted == 1, (method, route)
