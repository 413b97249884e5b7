"""Tests of the fake upstream itself, driven by a plain aiohttp client."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator

import aiohttp
import pytest
import pytest_asyncio

from .fixtures import MakeFakeUpstream
from .server import OCI_INDEX, OCI_MANIFEST, FakeUpstream, Fault, sha256_digest

REPO = "library/alpine"  # has a slash on purpose
BLOB = bytes(range(256)) * 40  # 10 KiB


@pytest_asyncio.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def blob_url(up: FakeUpstream, digest: str, name: str = REPO) -> str:
    return f"{up.url}/v2/{name}/blobs/{digest}"


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    scheme, _, rest = header.partition(" ")
    params = {}
    for part in rest.split(","):
        key, _, value = part.partition("=")
        params[key.strip()] = value.strip().strip('"')
    return scheme, params


def basic(user: str, password: str) -> dict[str, str]:
    # aiohttp.BasicAuth is deprecated in 3.14 (a warning, hence an error here).
    return {"Authorization": aiohttp.encode_basic_auth(user, password)}


async def get_token(
    session: aiohttp.ClientSession, challenge: str, scope: str | None = None
) -> aiohttp.ClientResponse:
    _, params = parse_challenge(challenge)
    query = {"service": params["service"]}
    if scope or "scope" in params:
        query["scope"] = scope or params["scope"]
    return await session.get(params["realm"], params=query)


# ---------------------------------------------------------------------------
# Content


async def test_manifest_by_tag_and_digest(
    fake_upstream: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    up = fake_upstream
    image = up.add_image(REPO, "3.19", [b"layer-one", b"layer-two"])
    for ref in ("3.19", image.manifest_digest):
        url = f"{up.url}/v2/{REPO}/manifests/{ref}"
        async with session.get(url) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"] == OCI_MANIFEST
            assert resp.headers["Docker-Content-Digest"] == image.manifest_digest
            assert await resp.read() == image.manifest
        async with session.head(url) as resp:
            assert resp.status == 200
            assert int(resp.headers["Content-Length"]) == len(image.manifest)
            assert resp.headers["Docker-Content-Digest"] == image.manifest_digest
    assert up.count("GET", f"/v2/{REPO}/manifests/3.19") == 1
    assert up.count("HEAD", f"/v2/{REPO}/manifests/3.19") == 1


async def test_blob_get_head_and_range(
    fake_upstream: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    up = fake_upstream
    digest = up.add_blob(REPO, BLOB)
    assert digest == "sha256:" + hashlib.sha256(BLOB).hexdigest()
    async with session.get(blob_url(up, digest)) as resp:
        assert resp.status == 200
        assert resp.headers["Docker-Content-Digest"] == digest
        assert await resp.read() == BLOB
    async with session.head(blob_url(up, digest)) as resp:
        assert int(resp.headers["Content-Length"]) == len(BLOB)
    async with session.get(blob_url(up, digest), headers={"Range": "bytes=100-"}) as resp:
        assert resp.status == 206
        assert resp.headers["Content-Range"] == f"bytes 100-{len(BLOB) - 1}/{len(BLOB)}"
        assert await resp.read() == BLOB[100:]


async def test_unknown_content_gives_oci_errors(
    fake_upstream: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    up = fake_upstream
    up.add_blob(REPO, b"x")
    cases = {
        f"/v2/{REPO}/manifests/nope": "MANIFEST_UNKNOWN",
        f"/v2/{REPO}/blobs/{sha256_digest(b'other')}": "BLOB_UNKNOWN",
        "/v2/no/such/tags/list": "NAME_UNKNOWN",
    }
    for path, code in cases.items():
        async with session.get(up.url + path) as resp:
            assert resp.status == 404
            assert (await resp.json())["errors"][0]["code"] == code


async def test_mismatched_digest_is_served_as_given(
    fake_upstream: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    fake = "sha256:" + "0" * 64
    fake_upstream.add_blob(REPO, b"not matching", digest=fake)
    async with session.get(blob_url(fake_upstream, fake)) as resp:
        assert await resp.read() == b"not matching"


async def test_tags_pagination_with_link(
    fake_upstream: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    up = fake_upstream
    tags = [f"v{i}" for i in range(5)]
    for tag in tags:
        up.add_manifest(REPO, tag, f'{{"tag":"{tag}"}}'.encode(), OCI_MANIFEST)

    seen: list[str] = []
    path = f"/v2/{REPO}/tags/list?n=2"
    links = []
    while path:
        async with session.get(up.url + path) as resp:
            body = await resp.json()
            seen += body["tags"]
            link = resp.headers.get("Link")
        links.append(link)
        path = link.split(">")[0].lstrip("<") if link else ""
    assert seen == tags
    assert links[0] == f'</v2/{REPO}/tags/list?n=2&last=v1>; rel="next"'
    assert links[-1] is None and len(links) == 3


async def test_tags_server_side_page_size(
    make_fake_upstream: MakeFakeUpstream, session: aiohttp.ClientSession
) -> None:
    up = await make_fake_upstream(tags_page_size=3)
    for i in range(4):
        up.add_manifest(REPO, f"t{i}", b"{}", OCI_MANIFEST)
    async with session.get(f"{up.url}/v2/{REPO}/tags/list") as resp:
        assert (await resp.json())["tags"] == ["t0", "t1", "t2"]
        assert "last=t2" in resp.headers["Link"]


async def test_referrers_lists_subject_manifests(
    fake_upstream: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    up = fake_upstream
    image = up.add_image(REPO, "latest")
    sig = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": "application/vnd.dev.sigstore.bundle+json",
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": "x", "size": 2},
        "layers": [],
        "subject": {"mediaType": OCI_MANIFEST, "digest": image.manifest_digest, "size": 1},
    }
    data = json.dumps(sig).encode()
    # Pushed by digest only, as signatures are.
    sig_digest = up.add_manifest(REPO, sha256_digest(data), data, OCI_MANIFEST)
    async with session.get(f"{up.url}/v2/{REPO}/referrers/{image.manifest_digest}") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == OCI_INDEX
        index = await resp.json()
    assert [m["digest"] for m in index["manifests"]] == [sig_digest]
    assert index["manifests"][0]["artifactType"] == sig["artifactType"]
    # Unknown subjects get an empty index, never 404.
    async with session.get(f"{up.url}/v2/{REPO}/referrers/{sha256_digest(b'?')}") as resp:
        assert resp.status == 200 and (await resp.json())["manifests"] == []


# ---------------------------------------------------------------------------
# Auth


@pytest.mark.parametrize(
    ("mode", "service", "token_path", "scope_in_challenge", "token_keys"),
    [
        ("ghcr", "ghcr.io", "/token", True, {"token"}),
        ("quay", "quay.io", "/v2/auth", False, {"token"}),
        (
            "dockerhub",
            "registry.docker.io",
            "/token",
            True,
            {"token", "access_token", "expires_in", "issued_at"},
        ),
    ],
)
async def test_bearer_flow(
    make_fake_upstream: MakeFakeUpstream,
    session: aiohttp.ClientSession,
    mode: str,
    service: str,
    token_path: str,
    scope_in_challenge: bool,
    token_keys: set[str],
) -> None:
    up = await make_fake_upstream(auth=mode)
    digest = up.add_blob(REPO, BLOB)

    async with session.get(up.url + "/v2/") as resp:
        assert resp.status == 401
        scheme, params = parse_challenge(resp.headers["WWW-Authenticate"])
    assert scheme == "Bearer"
    assert params == {"realm": up.url + token_path, "service": service}

    async with session.get(blob_url(up, digest)) as resp:
        assert resp.status == 401
        challenge = resp.headers["WWW-Authenticate"]
    assert ("scope" in parse_challenge(challenge)[1]) is scope_in_challenge

    # Quay: the client computes the scope itself.
    async with await get_token(session, challenge, scope=f"repository:{REPO}:pull") as resp:
        assert resp.status == 200
        body = await resp.json()
    assert set(body) == token_keys
    headers = {"Authorization": f"Bearer {body['token']}"}
    async with session.get(blob_url(up, digest), headers=headers) as resp:
        assert resp.status == 200
        assert await resp.read() == BLOB

    assert [r.path for r in up.token_requests] == [token_path]
    assert up.token_grants[0].scopes == (f"repository:{REPO}:pull",)
    assert up.token_grants[0].username is None
    assert up.requests[-1].authorization == headers["Authorization"]


async def test_token_scope_is_enforced(
    make_fake_upstream: MakeFakeUpstream, session: aiohttp.ClientSession
) -> None:
    up = await make_fake_upstream(auth="ghcr")
    digest = up.add_blob(REPO, b"x")
    params = {"scope": "repository:other/repo:pull"}
    async with session.get(f"{up.url}/token", params=params) as resp:
        headers = {"Authorization": f"Bearer {(await resp.json())['token']}"}
    async with session.get(blob_url(up, digest), headers=headers) as resp:
        assert resp.status == 401


async def test_dockerhub_expires_in_is_configurable_and_enforced(
    make_fake_upstream: MakeFakeUpstream, session: aiohttp.ClientSession
) -> None:
    up = await make_fake_upstream(auth="dockerhub", token_expires_in=0)
    async with session.get(f"{up.url}/token", params={"scope": f"repository:{REPO}:pull"}) as resp:
        body = await resp.json()
    assert body["expires_in"] == 0
    up.add_blob(REPO, b"x")
    headers = {"Authorization": f"Bearer {body['token']}"}
    async with session.get(blob_url(up, sha256_digest(b"x")), headers=headers) as resp:
        assert resp.status == 401


async def test_revoke_tokens(
    make_fake_upstream: MakeFakeUpstream, session: aiohttp.ClientSession
) -> None:
    up = await make_fake_upstream(auth="ghcr")
    digest = up.add_blob(REPO, b"x")
    async with session.get(f"{up.url}/token", params={"scope": f"repository:{REPO}:pull"}) as resp:
        headers = {"Authorization": f"Bearer {(await resp.json())['token']}"}
    async with session.get(blob_url(up, digest), headers=headers) as resp:
        assert resp.status == 200
    up.revoke_tokens()
    async with session.get(blob_url(up, digest), headers=headers) as resp:
        assert resp.status == 401
        assert "Bearer" in resp.headers["WWW-Authenticate"]


async def test_bearer_with_credentials(
    make_fake_upstream: MakeFakeUpstream, session: aiohttp.ClientSession
) -> None:
    up = await make_fake_upstream(auth="quay", credentials=("robot", "s3cret"))
    params = {"service": "quay.io", "scope": f"repository:{REPO}:pull"}
    async with session.get(f"{up.url}/v2/auth", params=params) as resp:
        assert resp.status == 401  # anonymous refused
    bad = basic("robot", "wrong")
    async with session.get(f"{up.url}/v2/auth", params=params, headers=bad) as resp:
        assert resp.status == 401
    good = basic("robot", "s3cret")
    async with session.get(f"{up.url}/v2/auth", params=params, headers=good) as resp:
        assert resp.status == 200
    assert [g.username for g in up.token_grants] == ["robot"]
    assert len(up.token_requests) == 3


async def test_basic_auth(
    make_fake_upstream: MakeFakeUpstream, session: aiohttp.ClientSession
) -> None:
    up = await make_fake_upstream(auth="basic", credentials=("u", "p"))
    digest = up.add_blob(REPO, b"x")
    async with session.get(blob_url(up, digest)) as resp:
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"] == 'Basic realm="fake"'
    async with session.get(blob_url(up, digest), headers=basic("u", "bad")) as resp:
        assert resp.status == 401
    async with session.get(blob_url(up, digest), headers=basic("u", "p")) as resp:
        assert resp.status == 200


# ---------------------------------------------------------------------------
# Faults


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
async def test_redirect_to_cdn_without_authorization(
    make_fake_upstream: MakeFakeUpstream, session: aiohttp.ClientSession, status: int
) -> None:
    up = await make_fake_upstream(auth="ghcr")
    digest = up.add_blob(REPO, BLOB)
    up.set_fault(digest, Fault(redirect=status))
    async with session.get(f"{up.url}/token", params={"scope": f"repository:{REPO}:pull"}) as resp:
        auth = {"Authorization": f"Bearer {(await resp.json())['token']}"}

    # Follow by hand: aiohttp's own redirect handling decides by itself
    # what to forward, and that is exactly what the proxy must control.
    async with session.get(blob_url(up, digest), headers=auth, allow_redirects=False) as resp:
        assert resp.status == status
        location = resp.headers["Location"]
    assert location.startswith(up.cdn.url + "/blobs/" + digest)
    async with session.get(location) as resp:
        assert resp.status == 200
        assert await resp.read() == BLOB
    assert not up.cdn.saw_authorization
    assert len(up.cdn.requests) == 1

    # The signed query string is required, like S3.
    async with session.get(location.split("?")[0]) as resp:
        assert resp.status == 403


async def test_redirect_to_same_host(
    fake_upstream: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    up = fake_upstream
    digest = up.add_blob(REPO, BLOB)
    up.set_fault(digest, Fault(redirect=307, redirect_to="self"))
    async with session.get(blob_url(up, digest), allow_redirects=False) as resp:
        location = resp.headers["Location"]
    assert location == f"{up.url}/_redirected/blobs/{digest}"
    # For comparison with the CDN case: a same-origin redirect keeps the
    # credentials even when aiohttp follows it by itself.
    async with session.get(blob_url(up, digest), headers={"Authorization": "Bearer t"}) as resp:
        assert await resp.read() == BLOB
    assert up.requests[-1].path == f"/_redirected/blobs/{digest}"
    assert up.requests[-1].authorization == "Bearer t"
    assert up.cdn.requests == []


async def test_cdn_fault(fake_upstream: FakeUpstream, session: aiohttp.ClientSession) -> None:
    up = fake_upstream
    digest = up.add_blob(REPO, BLOB)
    up.set_fault(digest, Fault(redirect=307))
    up.cdn.set_fault(digest, Fault(status=503, times=1))
    async with session.get(blob_url(up, digest)) as resp:  # auto-follow is fine here
        assert resp.status == 503
    async with session.get(blob_url(up, digest)) as resp:
        assert await resp.read() == BLOB


async def test_corrupt(fake_upstream: FakeUpstream, session: aiohttp.ClientSession) -> None:
    digest = fake_upstream.add_blob(REPO, BLOB)
    fake_upstream.set_fault(digest, Fault(corrupt=True))
    async with session.get(blob_url(fake_upstream, digest)) as resp:
        body = await resp.read()
        assert int(resp.headers["Content-Length"]) == len(BLOB)
    assert len(body) == len(BLOB)
    assert sha256_digest(body) != digest
    assert sum(a != b for a, b in zip(body, BLOB, strict=True)) == 1


@pytest.mark.parametrize("hard", [False, True])
async def test_reset_after(
    fake_upstream: FakeUpstream, session: aiohttp.ClientSession, hard: bool
) -> None:
    digest = fake_upstream.add_blob(REPO, BLOB)
    fake_upstream.set_fault(digest, Fault(reset_after=1000, hard_reset=hard, times=1))
    with pytest.raises((aiohttp.ClientPayloadError, aiohttp.ClientOSError)):
        async with session.get(blob_url(fake_upstream, digest)) as resp:
            assert int(resp.headers["Content-Length"]) == len(BLOB)
            await resp.read()
    # times=1: the retry succeeds.
    async with session.get(blob_url(fake_upstream, digest)) as resp:
        assert await resp.read() == BLOB


async def test_reset_after_delivers_the_prefix(
    fake_upstream: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    digest = fake_upstream.add_blob(REPO, BLOB)
    fake_upstream.set_fault(digest, Fault(reset_after=1000))
    async with session.get(blob_url(fake_upstream, digest)) as resp:
        assert await resp.content.readexactly(1000) == BLOB[:1000]
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.content.read()


async def test_wrong_length_longer_header(
    fake_upstream: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    digest = fake_upstream.add_blob(REPO, BLOB)
    fake_upstream.set_fault(digest, Fault(wrong_length=+10))
    with pytest.raises(aiohttp.ClientPayloadError):
        async with session.get(blob_url(fake_upstream, digest)) as resp:
            assert int(resp.headers["Content-Length"]) == len(BLOB) + 10
            await resp.read()


async def test_wrong_length_shorter_header(
    fake_upstream: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    # With a body this large the client has the declared bytes before the
    # surplus arrives, so it silently sees a truncated body.  (With tiny
    # bodies aiohttp may instead notice the surplus and raise.)
    data = BLOB * 100
    digest = fake_upstream.add_blob(REPO, data)
    fake_upstream.set_fault(digest, Fault(wrong_length=-10))
    try:
        async with session.get(blob_url(fake_upstream, digest)) as resp:
            assert int(resp.headers["Content-Length"]) == len(data) - 10
            body = await resp.read()
    except aiohttp.ClientResponseError:
        return
    assert body == data[:-10]


@pytest.mark.parametrize("status", [429, 500, 502, 503])
async def test_status_faults_then_recovery(
    fake_upstream: FakeUpstream, session: aiohttp.ClientSession, status: int
) -> None:
    digest = fake_upstream.add_blob(REPO, b"x")
    fake_upstream.set_fault(digest, Fault(status=status, retry_after=7, times=1))
    async with session.get(blob_url(fake_upstream, digest)) as resp:
        assert resp.status == status
        assert resp.headers["Retry-After"] == "7"
        assert (await resp.json())["errors"][0]["code"]
    async with session.get(blob_url(fake_upstream, digest)) as resp:
        assert resp.status == 200


async def test_faults_are_get_only_by_default(
    fake_upstream: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    digest = fake_upstream.add_blob(REPO, b"x")
    fault = fake_upstream.set_fault(digest, Fault(status=503, times=1))
    async with session.head(blob_url(fake_upstream, digest)) as resp:
        assert resp.status == 200
    assert fault.hits == 0
    fake_upstream.set_fault(digest, Fault(status=503, methods=("GET", "HEAD")))
    async with session.head(blob_url(fake_upstream, digest)) as resp:
        assert resp.status == 503


async def test_queued_faults_and_tag_and_path_keys(
    fake_upstream: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    up = fake_upstream
    up.add_manifest(REPO, "latest", b"{}", OCI_MANIFEST)
    up.add_fault("latest", Fault(status=502, times=1))
    up.add_fault("latest", Fault(status=429, times=1))
    url = f"{up.url}/v2/{REPO}/manifests/latest"
    statuses = []
    for _ in range(3):
        async with session.get(url) as resp:
            statuses.append(resp.status)
    assert statuses == [502, 429, 200]

    up.set_fault("/v2/", Fault(status=503))
    async with session.get(up.url + "/v2/") as resp:
        assert resp.status == 503
    with pytest.raises(ValueError):
        up.set_fault("/v2/", Fault(corrupt=True))


async def test_hang_and_close_is_prompt(session: aiohttp.ClientSession) -> None:
    up = FakeUpstream()
    await up.start()
    try:
        digest = up.add_blob(REPO, b"x")
        up.set_fault(digest, Fault(hang=True))
        with pytest.raises(asyncio.TimeoutError):
            async with session.get(blob_url(up, digest), timeout=aiohttp.ClientTimeout(total=0.2)):
                pass
        # A second request parks in the handler until close() releases it.
        pending = asyncio.create_task(session.get(blob_url(up, digest)))
        while up.count("GET", f"/v2/{REPO}/blobs/{digest}") < 2:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    finally:
        await asyncio.wait_for(up.close(), 1.0)
    with pytest.raises(aiohttp.ClientError):
        await pending


async def test_slow(fake_upstream: FakeUpstream, session: aiohttp.ClientSession) -> None:
    digest = fake_upstream.add_blob(REPO, BLOB)
    fake_upstream.set_fault(digest, Fault(chunk_size=len(BLOB) // 5, delay=0.01))
    loop = asyncio.get_running_loop()
    start = loop.time()
    async with session.get(blob_url(fake_upstream, digest)) as resp:
        assert await resp.read() == BLOB
    assert loop.time() - start >= 0.04


async def test_gate_holds_concurrent_downloads(
    fake_upstream: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    up = fake_upstream
    digest = up.add_blob(REPO, BLOB)
    fault = up.set_fault(digest, Fault(gate_after=100))

    first = await session.get(blob_url(up, digest))
    await asyncio.wait_for(fault.gate_reached.wait(), 1)
    assert await first.content.readexactly(100) == BLOB[:100]
    # A range request is gated too (gate_after counts bytes of the slice).
    ranged = await session.get(blob_url(up, digest), headers={"Range": "bytes=5000-"})
    assert ranged.status == 206
    assert await ranged.content.readexactly(100) == BLOB[5000:5100]
    assert not first.content.at_eof()

    fault.gate.set()
    assert await first.content.read() == BLOB[100:]
    assert await ranged.content.read() == BLOB[5100:]
    first.release()
    ranged.release()
    assert fault.hits == 2


async def test_close_releases_a_closed_gate(session: aiohttp.ClientSession) -> None:
    up = FakeUpstream()
    await up.start()
    digest = up.add_blob(REPO, BLOB)
    fault = up.set_fault(digest, Fault(gate_after=10))
    resp = await session.get(blob_url(up, digest))
    await fault.gate_reached.wait()
    await asyncio.wait_for(up.close(), 1.0)
    with pytest.raises(aiohttp.ClientPayloadError):
        await resp.read()
    resp.release()
