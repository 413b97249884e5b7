"""What each kind of upstream failure is counted as: once, under one class, and what it
does to the breaker (the table in proxy/upstream_status.py)."""

from __future__ import annotations

import asyncio
import os
import time

import aiohttp
import pytest

from proxy.config import UpstreamConfig
from proxy.errors import UpstreamUnavailable
from proxy.keys import UPSTREAM
from proxy.upstream import UpstreamClient
from tests.fake_upstream.fixtures import MakeFakeUpstream
from tests.fake_upstream.server import FakeUpstream, Fault
from tests.mirror import MakeMirror, Mirror
from tests.upstream.registry import free_port

REPO = "library/app"
ERRORS = "pullthrough_upstream_errors_total"
LATENCY = "pullthrough_upstream_request_duration_seconds_count"


async def mirror_for(make_mirror: MakeMirror, url: str, **extra: object) -> Mirror:
    return await make_mirror([{"name": "docker.io", "url": url, "default": True, **extra}])


async def status_of(mirror: Mirror, path: str) -> int:
    async with mirror.get(path) as response:
        await response.read()
        return response.status


async def counted(mirror: Mirror) -> dict[str, float]:
    """The non-zero error counts by class, the latency observations by outcome, the token
    fetches by outcome, and the breaker's state, of upstream docker.io."""
    found: dict[str, float] = {}
    for sample, value in (await mirror.metrics()).items():
        if 'upstream="docker.io"' not in sample or not value:
            continue
        name, labels = sample.split("{", 1)
        key = labels.split('"', 2)[1]  # the first label: class, outcome or state
        if name == ERRORS:
            found[f"error:{key}"] = value
        elif name == LATENCY:
            found[f"latency:{key}"] = value
        elif name == "pullthrough_token_fetches_total":
            found[f"token:{key}"] = value
        elif name == "pullthrough_upstream_breaker_state":
            found["breaker"] = {"closed": 0, "open": 1, "half_open": 2}[key]
    return found


async def no_fills(mirror: Mirror) -> None:
    async with asyncio.timeout(5):
        while await mirror.metric("pullthrough_fills_in_progress"):  # noqa: ASYNC110
            await asyncio.sleep(0.01)


CLOSED, OPEN = 0, 1


@pytest.mark.parametrize(
    ("fault", "status", "expected"),
    [
        (Fault(status=503), 503, {"error:server_error": 1, "latency:server_error": 1}),
        (Fault(status=429), 429, {"error:rate_limited": 1, "latency:rate_limited": 1}),
        (Fault(status=401), 401, {"error:unauthorized": 1, "latency:client_error": 1}),
        (Fault(status=403), 403, {"error:unauthorized": 1, "latency:client_error": 1}),
        (Fault(status=400), 502, {"error:bad_response": 1, "latency:client_error": 1}),
        (
            Fault(redirect=302, redirect_location=""),
            502,
            {"error:bad_response": 1, "latency:ok": 1},
        ),
        (None, 404, {"latency:not_found": 1}),
    ],
    ids=["503", "429", "401-no-challenge", "403", "400", "redirect-nowhere", "404"],
)
async def test_each_answer_is_counted_once_under_its_class(
    fake_upstream: FakeUpstream,
    make_mirror: MakeMirror,
    fault: Fault | None,
    status: int,
    expected: dict[str, float],
) -> None:
    digest = fake_upstream.add_blob(REPO, os.urandom(100))
    if fault is None:
        digest = "sha256:" + "0" * 64
    else:
        fake_upstream.set_fault(digest, fault)
    mirror = await mirror_for(make_mirror, fake_upstream.url)
    assert await status_of(mirror, f"/v2/app/blobs/{digest}") == status
    assert await counted(mirror) == {**expected, "breaker": CLOSED}


async def test_unreachable_is_counted_once_and_the_fail_fast_after_it_not_at_all(
    make_mirror: MakeMirror,
) -> None:
    mirror = await mirror_for(make_mirror, f"http://127.0.0.1:{free_port()}")
    for _ in range(2):  # the second is refused by the open breaker, without asking upstream
        assert await status_of(mirror, "/v2/app/blobs/sha256:" + "1" * 64) == 503
    assert await counted(mirror) == {
        "error:unreachable": 1,
        "latency:unreachable": 1,
        "breaker": OPEN,
    }


async def with_token_fault(
    make_fake_upstream: MakeFakeUpstream, fault: Fault
) -> tuple[FakeUpstream, str]:
    """A Docker-Hub-like upstream holding one blob (its digest), whose token service has `fault`."""
    upstream = await make_fake_upstream(auth="dockerhub")
    digest = upstream.add_blob(REPO, os.urandom(100))
    assert upstream.auth.token_path is not None
    upstream.set_fault(upstream.auth.token_path, fault)
    return upstream, digest


async def test_a_token_service_5xx_is_counted_once_and_is_one_upstream_breaker_failure(
    make_fake_upstream: MakeFakeUpstream, make_mirror: MakeMirror
) -> None:
    upstream, digest = await with_token_fault(make_fake_upstream, Fault(status=503))
    mirror = await mirror_for(make_mirror, upstream.url)
    assert await status_of(mirror, f"/v2/app/blobs/{digest}") == 503
    assert await counted(mirror) == {
        "error:server_error": 1,
        "token:error": 1,
        "latency:client_error": 1,  # the registry's 401 challenge
        "breaker": CLOSED,
    }
    # An upstream-wide signal: the challenge's answer reset the breaker, the token's 503 is
    # its one failure since.
    assert mirror.app[UPSTREAM].breaker(mirror.config.upstreams[0]).failures == 1


async def test_a_hanging_token_service_costs_one_timeout_then_fails_fast(
    make_fake_upstream: MakeFakeUpstream, make_mirror: MakeMirror
) -> None:
    upstream, digest = await with_token_fault(make_fake_upstream, Fault(hang=True))
    mirror = await mirror_for(make_mirror, upstream.url, read_timeout="1s")
    waited: list[float] = []
    for _ in range(2):
        started = time.monotonic()
        assert await status_of(mirror, f"/v2/app/blobs/{digest}") == 503
        waited.append(time.monotonic() - started)
    assert waited[0] > 0.9 and waited[1] < 0.5, waited  # the second doesn't wait again
    assert len(upstream.token_requests) == 1
    assert await counted(mirror) == {
        "error:unreachable": 1,
        "token:error": 1,
        "latency:client_error": 1,  # the registry's 401 challenge
        "breaker": OPEN,
    }


async def cut_off(mirror: Mirror, digest: str) -> None:
    with pytest.raises(aiohttp.ClientPayloadError):
        async with mirror.get(f"/v2/app/blobs/{digest}") as response:
            await response.read()
    await no_fills(mirror)


async def test_a_body_that_stalls_past_read_timeout_opens_the_breaker_at_once(
    fake_upstream: FakeUpstream, make_mirror: MakeMirror
) -> None:
    digest = fake_upstream.add_blob(REPO, os.urandom(100_000))
    gate = fake_upstream.set_fault(digest, Fault(gate_after=1000))
    mirror = await mirror_for(make_mirror, fake_upstream.url, read_timeout="0.3s")
    try:
        await cut_off(mirror, digest)
    finally:
        gate.gate.set()
    assert await counted(mirror) == {"latency:ok": 1, "breaker": OPEN}


async def test_a_body_cut_off_mid_stream_is_one_breaker_failure_and_no_error_count(
    fake_upstream: FakeUpstream, make_mirror: MakeMirror, monkeypatch: pytest.MonkeyPatch
) -> None:
    digest = fake_upstream.add_blob(REPO, os.urandom(100_000))
    fake_upstream.set_fault(digest, Fault(reset_after=1000))
    mirror = await mirror_for(make_mirror, fake_upstream.url)
    client = mirror.app[UPSTREAM]
    seen: list[BaseException] = []

    def spy(upstream: UpstreamConfig, exc: BaseException) -> UpstreamUnavailable:
        seen.append(exc)
        return UpstreamClient.stream_failed(client, upstream, exc)

    monkeypatch.setattr(client, "stream_failed", spy)
    await cut_off(mirror, digest)
    assert len(seen) == 1 and isinstance(seen[0], aiohttp.ClientError)
    # The headers' success reset the breaker; the cut body is its one failure since.
    assert client.breaker(mirror.config.upstreams[0]).failures == 1
    # The exchange was booked as ok when its headers arrived; the cut adds no error count.
    assert await counted(mirror) == {"latency:ok": 1, "breaker": CLOSED}


async def test_a_cancelled_probe_is_released_and_the_next_request_probes(
    fake_upstream: FakeUpstream, make_mirror: MakeMirror
) -> None:
    digest = fake_upstream.add_blob(REPO, os.urandom(100))
    path = f"/v2/{REPO}/blobs/{digest}"
    fake_upstream.set_fault(digest, Fault(hang=True))
    mirror = await mirror_for(make_mirror, fake_upstream.url, read_timeout="0.3s")
    client, upstream = mirror.app[UPSTREAM], mirror.config.upstreams[0]
    assert await status_of(mirror, f"/v2/app/blobs/{digest}") == 503  # timed out: open
    mirror.clock.advance(61)  # past the open interval: the next request is the probe
    probe = asyncio.create_task(client.request(upstream, "GET", path, repo=REPO))
    async with asyncio.timeout(5):
        while fake_upstream.count("GET", path) < 2:  # noqa: ASYNC110 - the probe is upstream
            await asyncio.sleep(0.01)
    probe.cancel()
    with pytest.raises(asyncio.CancelledError):
        await probe
    fake_upstream.clear_faults()
    response = await client.request(upstream, "GET", path, repo=REPO)  # a probe again
    response.release()
    assert response.status == 200
    assert (await counted(mirror))["breaker"] == CLOSED


async def test_5xx_about_one_repository_open_its_breaker_not_the_upstreams(
    fake_upstream: FakeUpstream, make_mirror: MakeMirror
) -> None:
    broken = fake_upstream.add_blob("library/broken", os.urandom(100))
    fine = fake_upstream.add_blob(REPO, os.urandom(100))
    fake_upstream.set_fault(broken, Fault(status=500))
    mirror = await mirror_for(make_mirror, fake_upstream.url)
    for _ in range(4):  # the 4th fails fast: this repository's breaker is open
        assert await status_of(mirror, f"/v2/broken/blobs/{broken}") == 503
    assert fake_upstream.count("GET", f"/v2/library/broken/blobs/{broken}") == 3
    assert await status_of(mirror, f"/v2/app/blobs/{fine}") == 200  # every other one is served
    assert await counted(mirror) == {
        "error:server_error": 3,
        "latency:server_error": 3,
        "latency:ok": 1,
        "breaker": CLOSED,
    }
