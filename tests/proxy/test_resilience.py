"""Upstream outages: stale-if-error, fail-fast circuit breaker, clear 503s and 429s.

Time-dependent behaviour runs on the mirror's injected clock; nothing here sleeps to
let time pass.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import pytest

from proxy.breaker import BreakerSettings, CircuitBreaker
from proxy.errors import UpstreamUnavailable
from tests.fake_upstream.server import FakeUpstream, Fault
from tests.mirror import FakeClock, MakeMirror, Mirror
from tests.upstream.images import multi_layer_image
from tests.upstream.registry import RegistryProcess

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
REPO = "library/app"


def test_breaker_opens_probes_and_backs_off() -> None:
    clock = FakeClock(0)
    breaker = CircuitBreaker("up", BreakerSettings(threshold=3, min_open=2, max_open=8), clock)
    for _ in range(2):
        breaker.failure()
        breaker.before_request()  # two 5xx in a row: still closed
    breaker.failure()
    with pytest.raises(UpstreamUnavailable, match="marked down"):
        breaker.before_request()

    clock.advance(2)
    breaker.before_request()  # the one probe
    with pytest.raises(UpstreamUnavailable):
        breaker.before_request()  # everyone else still fails fast
    breaker.failure()  # probe failed: open again for twice as long
    clock.advance(3)
    with pytest.raises(UpstreamUnavailable):
        breaker.before_request()
    clock.advance(1)
    breaker.before_request()
    breaker.failure()
    clock.advance(8)  # 2 -> 4 -> 8, capped at max_open
    breaker.before_request()
    breaker.success()
    assert (breaker.state, breaker.interval) == ("closed", 2)
    breaker.before_request()


def test_a_probe_that_ends_in_an_unexpected_error_is_released() -> None:
    clock = FakeClock(0)
    breaker = CircuitBreaker("up", clock=clock)
    breaker.failure(unreachable=True)
    clock.advance(2)
    with pytest.raises(ValueError), breaker.attempt():
        with pytest.raises(UpstreamUnavailable), breaker.attempt():
            pass  # while the probe is out, everyone else still fails fast
        raise ValueError("neither success nor failure")
    assert breaker.before_request()  # the next request is the probe again
    breaker.success()
    assert breaker.state == "closed"


def test_an_unreachable_upstream_opens_the_breaker_at_once() -> None:
    breaker = CircuitBreaker("up", clock=FakeClock(0))
    breaker.failure(unreachable=True)
    with pytest.raises(UpstreamUnavailable):
        breaker.before_request()


async def mirror_for(make_mirror: MakeMirror, url: str, **extra: object) -> Mirror:
    entry = {"name": "docker.io", "url": url, "default": True, "manifest_ttl": 60, **extra}
    return await make_mirror([entry])


async def status_and_code(mirror: Mirror, path: str) -> tuple[int, str | None, str | None]:
    async with mirror.get(path, headers={"Accept": OCI_MANIFEST}) as response:
        body = await response.read()
        code = json.loads(body)["errors"][0]["code"] if response.status >= 400 else None
        return response.status, code, response.headers.get("Retry-After")


async def timed(coro: Callable[[], object]) -> float:
    started = time.monotonic()
    await coro()  # type: ignore[misc]
    return time.monotonic() - started


async def test_hanging_upstream_costs_one_timeout_then_fails_fast_to_stale(
    fake_upstream: FakeUpstream, make_mirror: MakeMirror
) -> None:
    data = b'{"schemaVersion":2,"mediaType":"%s"}' % OCI_MANIFEST.encode()
    fake_upstream.add_manifest(REPO, "v1", data, OCI_MANIFEST)
    layer = fake_upstream.add_blob(REPO, b"layer bytes")
    mirror = await mirror_for(make_mirror, fake_upstream.url, read_timeout=0.5)
    assert (await status_and_code(mirror, "/v2/app/manifests/v1"))[0] == 200

    fake_upstream.set_fault("v1", Fault(hang=True, methods=("GET", "HEAD")))
    fake_upstream.set_fault(layer, Fault(hang=True))
    mirror.clock.advance(61)
    first = await timed(lambda: status_and_code(mirror, "/v2/app/manifests/v1"))
    assert 0.4 < first < 5  # one read timeout, then the cached answer
    fake_upstream.clear()
    for path in ("/v2/app/manifests/v1", f"/v2/app/blobs/{layer}"):
        started = time.monotonic()
        status = (await status_and_code(mirror, path))[:2]
        assert time.monotonic() - started < 0.3, path  # no second timeout
        assert status == ((200, None) if "manifests" in path else (503, "UNAVAILABLE"))
    assert fake_upstream.requests == []


async def test_a_stopped_real_upstream_serves_stale_then_recovers(
    restartable_registry: RegistryProcess, make_mirror: MakeMirror
) -> None:
    registry = restartable_registry
    image = multi_layer_image(registry, registry.token_server, "library/app", "v1")
    mirror = await mirror_for(make_mirror, registry.url)
    async with mirror.get("/v2/app/manifests/v1") as response:
        assert response.headers["Docker-Content-Digest"] == image.digest
    layer = image.layers[0].digest
    async with mirror.get(f"/v2/app/blobs/{layer}") as response:
        assert await response.read() == image.layers[0].read_bytes()
    await mirror.wait_committed(layer)

    registry.stop()
    mirror.clock.advance(61)
    async with mirror.get("/v2/app/manifests/v1") as response:
        assert response.status == 200  # stale, and counted as such
        assert response.headers["Docker-Content-Digest"] == image.digest
    async with mirror.get(f"/v2/app/blobs/{layer}") as response:
        assert await response.read() == image.layers[0].read_bytes()
    assert await status_and_code(mirror, "/v2/app/manifests/other") == (503, "UNAVAILABLE", None)
    assert await status_and_code(mirror, f"/v2/app/blobs/{image.layers[1].digest}") == (
        503,
        "UNAVAILABLE",
        None,
    )
    assert await mirror.lookups("manifest", "stale") == 1

    registry.start()
    mirror.clock.advance(60)  # past the breaker's interval: the next request probes
    async with mirror.get(f"/v2/app/blobs/{image.layers[1].digest}") as response:
        assert response.status == 200


async def test_rate_limited_with_nothing_cached_passes_retry_after(
    fake_upstream: FakeUpstream, make_mirror: MakeMirror
) -> None:
    fake_upstream.add_manifest(REPO, "v1", b"{}", OCI_MANIFEST)
    fake_upstream.set_fault("v1", Fault(status=429, retry_after=30, methods=("GET", "HEAD")))
    mirror = await mirror_for(make_mirror, fake_upstream.url)
    assert await status_and_code(mirror, "/v2/app/manifests/v1") == (429, "TOOMANYREQUESTS", "30")


async def test_the_server_starts_and_serves_when_upstream_is_down_at_start(
    make_mirror: MakeMirror,
) -> None:
    from tests.upstream.registry import free_port

    mirror = await mirror_for(make_mirror, f"http://127.0.0.1:{free_port()}")
    async with mirror.get("/v2/") as response:
        assert response.status == 200
    assert await status_and_code(mirror, "/v2/app/manifests/v1") == (503, "UNAVAILABLE", None)


async def test_docker_hub_ratelimit_remaining_is_recorded(
    fake_upstream: FakeUpstream, make_mirror: MakeMirror
) -> None:
    fake_upstream.add_manifest(REPO, "v1", b"{}", OCI_MANIFEST)
    fake_upstream.extra_headers = {"ratelimit-remaining": "7;w=21600"}
    mirror = await mirror_for(make_mirror, fake_upstream.url)
    assert (await status_and_code(mirror, "/v2/app/manifests/v1"))[0] == 200
    assert (
        await mirror.metric('pullthrough_upstream_ratelimit_remaining{upstream="docker.io"}') == 7
    )
