"""Upstream auth in the shapes GHCR, Quay, Docker Hub and Basic-only registries send."""

from __future__ import annotations

import asyncio
import base64
import os

import pytest

from proxy.coalesce import Kept
from proxy.config import Secret, UpstreamConfig
from proxy.upstream_auth import TokenCache, basic_authorization, parse_challenges
from tests.fake_upstream.fixtures import MakeFakeUpstream
from tests.fake_upstream.server import FakeUpstream, Fault
from tests.mirror import MakeMirror, Mirror
from tests.secrets import SECRET

REPO = "org/app"


async def mirror_for(make_mirror: MakeMirror, upstream: FakeUpstream, **extra: object) -> Mirror:
    return await make_mirror([{"name": "ghcr.io", "url": upstream.url, **extra}])


async def get_blob(mirror: Mirror, digest: str) -> tuple[int, bytes]:
    async with mirror.get(f"/v2/ghcr.io/{REPO}/blobs/{digest}") as response:
        return response.status, await response.read()


@pytest.mark.parametrize("shape", ["ghcr", "quay", "dockerhub"])
async def test_anonymous_bearer_token_shapes(
    make_fake_upstream: MakeFakeUpstream, make_mirror: MakeMirror, shape: str
) -> None:
    upstream = await make_fake_upstream(auth=shape)
    data = os.urandom(5000)
    digest = upstream.add_blob(REPO, data)
    mirror = await mirror_for(make_mirror, upstream)

    assert await get_blob(mirror, digest) == (200, data)
    grant = upstream.token_grants[-1]
    assert grant.username is None
    assert f"repository:{REPO}:pull" in " ".join(grant.scopes)


async def test_credentials_buy_the_token_and_never_reach_the_client(
    make_fake_upstream: MakeFakeUpstream, make_mirror: MakeMirror
) -> None:
    upstream = await make_fake_upstream(auth="dockerhub", credentials=("robot", SECRET))
    data = os.urandom(5000)
    digest = upstream.add_blob(REPO, data)
    mirror = await mirror_for(make_mirror, upstream, username="robot", password=SECRET)

    async with mirror.get(f"/v2/ghcr.io/{REPO}/blobs/{digest}") as response:
        assert response.status == 200
        assert await response.read() == data
        assert SECRET not in str(response.headers)
    assert upstream.token_grants[-1].username == "robot"


async def test_wrong_credentials_are_a_clean_401(
    make_fake_upstream: MakeFakeUpstream, make_mirror: MakeMirror
) -> None:
    upstream = await make_fake_upstream(auth="ghcr", credentials=("robot", "right"))
    digest = upstream.add_blob(REPO, b"data")
    mirror = await mirror_for(make_mirror, upstream, username="robot", password="wrong-pw")
    async with mirror.get(f"/v2/ghcr.io/{REPO}/blobs/{digest}") as response:
        assert response.status == 401
        body = await response.text()
    assert "UNAUTHORIZED" in body and "wrong-pw" not in body


async def test_basic_only_upstream(
    make_fake_upstream: MakeFakeUpstream, make_mirror: MakeMirror
) -> None:
    upstream = await make_fake_upstream(auth="basic", credentials=("user", "pw"))
    data = os.urandom(3000)
    digest = upstream.add_blob(REPO, data)
    mirror = await mirror_for(make_mirror, upstream, username="user", password="pw")
    assert await get_blob(mirror, digest) == (200, data)


async def test_tokens_are_cached_per_scope_and_one_fetch_serves_concurrent_misses(
    make_fake_upstream: MakeFakeUpstream, make_mirror: MakeMirror
) -> None:
    upstream = await make_fake_upstream(auth="dockerhub")
    blobs = [os.urandom(2000) for _ in range(6)]
    digests = [upstream.add_blob(REPO, b) for b in blobs]
    mirror = await mirror_for(make_mirror, upstream)

    results = await asyncio.gather(*(get_blob(mirror, d) for d in digests))
    assert results == [(200, b) for b in blobs]
    # One token for the scope, however many blobs were fetched at once.
    assert len(upstream.token_grants) == 1


async def test_a_revoked_cached_token_is_dropped_and_retried_once(
    make_fake_upstream: MakeFakeUpstream, make_mirror: MakeMirror
) -> None:
    upstream = await make_fake_upstream(auth="ghcr")
    first, second = os.urandom(1000), os.urandom(1000)
    d1, d2 = upstream.add_blob(REPO, first), upstream.add_blob(REPO, second)
    mirror = await mirror_for(make_mirror, upstream)
    assert await get_blob(mirror, d1) == (200, first)
    upstream.revoke_tokens()
    assert await get_blob(mirror, d2) == (200, second)
    assert len(upstream.token_grants) == 2


async def test_redirect_to_another_host_never_carries_authorization(
    make_fake_upstream: MakeFakeUpstream, make_mirror: MakeMirror
) -> None:
    upstream = await make_fake_upstream(auth="dockerhub", credentials=("robot", "pw"))
    data = os.urandom(200_000)
    digest = upstream.add_blob(REPO, data)
    upstream.set_fault(digest, Fault(redirect=307, redirect_to="cdn"))
    mirror = await mirror_for(make_mirror, upstream, username="robot", password="pw")

    assert await get_blob(mirror, digest) == (200, data)
    assert len(upstream.cdn.requests) == 1, "the blob came from the CDN"
    assert not upstream.cdn.saw_authorization


async def test_redirect_to_the_same_host_keeps_authorization(
    make_fake_upstream: MakeFakeUpstream, make_mirror: MakeMirror
) -> None:
    upstream = await make_fake_upstream(auth="ghcr")
    data = os.urandom(1000)
    digest = upstream.add_blob(REPO, data)
    upstream.set_fault(digest, Fault(redirect=302, redirect_to="self"))
    mirror = await mirror_for(make_mirror, upstream)
    assert await get_blob(mirror, digest) == (200, data)


def test_challenge_parser_reads_each_registry_shape() -> None:
    hub = parse_challenges(
        'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
        'scope="repository:library/alpine:pull"'
    )
    assert hub[0].scheme == "bearer"
    assert hub[0].params == {
        "realm": "https://auth.docker.io/token",
        "service": "registry.docker.io",
        "scope": "repository:library/alpine:pull",
    }
    quay = parse_challenges('Bearer realm="https://quay.io/v2/auth",service="quay.io"')
    assert quay[0].params == {"realm": "https://quay.io/v2/auth", "service": "quay.io"}
    basic = parse_challenges('Basic realm="Registry Realm"')
    assert (basic[0].scheme, basic[0].realm) == ("basic", "Registry Realm")
    both = parse_challenges('Basic realm="x", Bearer realm="https://a/t",service=s')
    assert [c.scheme for c in both] == ["basic", "bearer"]
    assert both[1].params["service"] == "s"
    assert parse_challenges('Bearer realm="a\\"b"')[0].realm == 'a"b'


async def test_token_lifetime_honours_expires_in_with_a_sixty_second_floor() -> None:
    now = [1000.0]
    tokens = TokenCache(clock=lambda: now[0])
    fetched: list[str] = []

    async def fetch(lifetime: float) -> tuple[str, float]:
        fetched.append("t")
        return f"token{len(fetched)}", lifetime

    assert await tokens.get_or_fetch("short", lambda: fetch(5)) == "token1"
    now[0] += 59
    assert tokens.get("short") == "token1"  # 5 s was raised to the 60 s floor
    now[0] += 2
    assert tokens.get("short") is None
    assert await tokens.get_or_fetch("long", lambda: fetch(300)) == "token2"
    now[0] += 299
    assert tokens.get("long") == "token2"
    now[0] += 2
    assert tokens.get("long") is None


async def test_the_clients_authorization_is_never_forwarded(
    make_fake_upstream: MakeFakeUpstream, make_mirror: MakeMirror
) -> None:
    upstream = await make_fake_upstream(auth="ghcr")
    digest = upstream.add_blob(REPO, b"data")
    mirror = await mirror_for(make_mirror, upstream)
    secret = {"Authorization": "Bearer client-own-token-xyz"}
    async with mirror.get(f"/v2/ghcr.io/{REPO}/blobs/{digest}", headers=secret) as response:
        assert response.status == 200
    async with mirror.get(f"/v2/ghcr.io/{REPO}/manifests/v1", headers=secret) as response:
        assert response.status == 404
    assert upstream.requests
    assert all("client-own-token" not in str(r.headers) for r in upstream.requests)


@pytest.mark.parametrize(("user", "password"), [("robot", SECRET), ("jürgen", "pä:ss wörd")])
def test_basic_credentials_are_utf8_user_colon_password(user: str, password: str) -> None:
    upstream = UpstreamConfig(
        "ghcr.io", "https://ghcr.io", username=user, password=Secret(password)
    )
    expected = base64.b64encode(f"{user}:{password}".encode()).decode()
    assert basic_authorization(upstream) == f"Basic {expected}"
    assert basic_authorization(UpstreamConfig("ghcr.io", "https://ghcr.io")) is None


def test_a_token_never_shows_in_a_repr() -> None:
    assert SECRET not in repr(Kept(SECRET, 60.0))
