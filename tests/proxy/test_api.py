"""The API surface: ping, routing by ns and prefix, read-only refusals, listings."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest
from yarl import URL

from tests.fake_upstream.fixtures import MakeFakeUpstream
from tests.fake_upstream.server import FakeUpstream
from tests.mirror import MakeMirror, Mirror
from tests.upstream.registry import RegistryProcess

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


async def two_upstream_mirror(
    make_mirror: MakeMirror, hub: FakeUpstream, ghcr: FakeUpstream
) -> Mirror:
    return await make_mirror(
        [
            {"name": "docker.io", "url": hub.url, "default": True},
            {"name": "ghcr.io", "url": ghcr.url},
        ]
    )


async def error_of(response: Any) -> tuple[int, str]:
    body = await response.json()
    return response.status, body["errors"][0]["code"]


async def test_ping(fake_upstream: FakeUpstream, make_mirror: MakeMirror) -> None:
    mirror = await make_mirror([{"name": "docker.io", "url": fake_upstream.url}])
    async with mirror.get("/v2/") as response:
        assert response.status == 200
        assert await response.json() == {}
        assert response.headers["Docker-Distribution-API-Version"] == "registry/2.0"


async def test_routing_by_ns_prefix_and_default(
    make_fake_upstream: MakeFakeUpstream, make_mirror: MakeMirror
) -> None:
    hub, ghcr = await make_fake_upstream(), await make_fake_upstream(auth="ghcr")
    hub_digest = hub.add_blob("library/alpine", b"hub bytes")
    ghcr_digest = ghcr.add_blob("org/tool", b"ghcr bytes")
    mirror = await two_upstream_mirror(make_mirror, hub, ghcr)

    cases = [
        (f"/v2/alpine/blobs/{hub_digest}", b"hub bytes", None),  # docker.io adds library/
        (f"/v2/library/alpine/blobs/{hub_digest}?ns=docker.io", b"hub bytes", "docker.io"),
        (f"/v2/ghcr.io/org/tool/blobs/{ghcr_digest}", b"ghcr bytes", None),
        (f"/v2/org/tool/blobs/{ghcr_digest}?ns=ghcr.io", b"ghcr bytes", "ghcr.io"),
    ]
    for path, expected, namespace in cases:
        async with mirror.get(path) as response:
            assert response.status == 200, path
            assert await response.read() == expected
            assert response.headers.get("OCI-Namespace") == namespace


@pytest.mark.parametrize(
    "path",
    ["/v2/x/manifests/latest?ns=nowhere.example", "/v2/nowhere.example/x/manifests/latest"],
)
async def test_unknown_namespace_or_prefix_lists_the_upstreams(
    fake_upstream: FakeUpstream, make_mirror: MakeMirror, path: str
) -> None:
    mirror = await make_mirror([{"name": "docker.io", "url": fake_upstream.url, "default": True}])
    async with mirror.get(path) as response:
        assert await error_of(response) == (404, "NAME_UNKNOWN")
    async with mirror.get(path) as response:
        assert "docker.io" in (await response.json())["errors"][0]["message"]
    assert fake_upstream.requests == []


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("PUT", "/v2/app/manifests/v1"),
        ("DELETE", "/v2/app/manifests/v1"),
        ("POST", "/v2/app/blobs/uploads/"),
        ("PATCH", "/v2/app/blobs/uploads/some-uuid"),
        ("PUT", "/v2/app/blobs/uploads/some-uuid?digest=sha256:00"),
        ("DELETE", "/v2/app/blobs/sha256:" + "0" * 64),
    ],
)
async def test_writes_are_unsupported(
    fake_upstream: FakeUpstream, make_mirror: MakeMirror, method: str, path: str
) -> None:
    mirror = await make_mirror([{"name": "docker.io", "url": fake_upstream.url, "default": True}])
    async with mirror.session.request(method, mirror.url + path, data=b"x") as response:
        assert await error_of(response) == (405, "UNSUPPORTED")
    assert fake_upstream.requests == []


async def test_unknown_route_and_bad_references_get_oci_errors(
    fake_upstream: FakeUpstream, make_mirror: MakeMirror
) -> None:
    mirror = await make_mirror([{"name": "docker.io", "url": fake_upstream.url, "default": True}])
    cases = {
        "/nope": (404, "NOT_FOUND"),
        "/v2/app/manifests/bad!tag": (400, "TAG_INVALID"),
        "/v2/app/manifests/sha256:xyz": (400, "DIGEST_INVALID"),
        "/v2/app/blobs/sha256:ABC": (400, "DIGEST_INVALID"),
        "/v2/Upper/manifests/v1": (400, "NAME_INVALID"),
        "/v2/a/../b/manifests/v1": (400, "NAME_INVALID"),
        "/v2/a%2Fb/manifests/v1": (400, "NAME_INVALID"),
        "/v2/a%00b/manifests/v1": (400, "NAME_INVALID"),
        "/v2/caf%C3%A9/manifests/v1": (400, "NAME_INVALID"),
        "/v2/app/manifests/" + "t" * 129: (400, "TAG_INVALID"),
    }
    for path, expected in cases.items():
        # encoded=True sends the path exactly as written: no client-side normalizing.
        async with mirror.session.get(URL(mirror.url + path, encoded=True)) as response:
            assert await error_of(response) == expected, path
            assert response.content_type == "application/json"
    assert fake_upstream.requests == []


async def test_tags_list_passes_through_with_links_pointing_at_the_mirror(
    make_fake_upstream: MakeFakeUpstream, make_mirror: MakeMirror
) -> None:
    hub = await make_fake_upstream(tags_page_size=2)
    ghcr = await make_fake_upstream(tags_page_size=2)
    for tag in ("a", "b", "c"):
        hub.add_manifest("library/app", tag, f'{{"t":"{tag}"}}'.encode(), OCI_MANIFEST)
        ghcr.add_manifest("org/app", tag, f'{{"t":"{tag}"}}'.encode(), OCI_MANIFEST)
    mirror = await two_upstream_mirror(make_mirror, hub, ghcr)

    async with mirror.get("/v2/app/tags/list?n=2") as response:
        assert response.status == 200
        assert (await response.json())["tags"] == ["a", "b"]
        link = response.headers["Link"]
    assert link.startswith("</v2/app/tags/list?") and 'rel="next"' in link
    async with mirror.get(link[1 : link.index(">")]) as response:
        assert (await response.json())["tags"] == ["c"]

    async with mirror.get("/v2/org/app/tags/list?n=2&ns=ghcr.io") as response:
        link = response.headers["Link"]
    assert link.startswith("</v2/org/app/tags/list?") and "ns=ghcr.io" in link
    async with mirror.get("/v2/ghcr.io/org/app/tags/list?n=2") as response:
        assert response.headers["Link"].startswith("</v2/ghcr.io/org/app/tags/list?")


async def test_referrers_pass_through(fake_upstream: FakeUpstream, make_mirror: MakeMirror) -> None:
    subject = "sha256:" + hashlib.sha256(b"subject").hexdigest()
    fake_upstream.add_referrer(
        "library/app",
        subject,
        {"mediaType": OCI_MANIFEST, "digest": "sha256:" + "1" * 64, "size": 10},
    )
    mirror = await make_mirror([{"name": "docker.io", "url": fake_upstream.url, "default": True}])
    async with mirror.get(f"/v2/app/referrers/{subject}") as response:
        assert response.status == 200
        assert response.content_type == "application/vnd.oci.image.index.v1+json"
        body = await response.json()
    assert [m["digest"] for m in body["manifests"]] == ["sha256:" + "1" * 64]


async def test_catalog_lists_cached_repositories(
    make_fake_upstream: MakeFakeUpstream, make_mirror: MakeMirror
) -> None:
    hub, ghcr = await make_fake_upstream(), await make_fake_upstream()
    hub.add_manifest("library/alpine", "v1", b'{"a":1}', OCI_MANIFEST)
    ghcr.add_manifest("org/tool", "v1", b'{"b":1}', OCI_MANIFEST)
    mirror = await two_upstream_mirror(make_mirror, hub, ghcr)
    async with mirror.get("/v2/_catalog") as response:
        assert await response.json() == {"repositories": []}
    for path in ("/v2/alpine/manifests/v1", "/v2/ghcr.io/org/tool/manifests/v1"):
        async with mirror.get(path) as response:
            assert response.status == 200
    async with mirror.get("/v2/_catalog") as response:
        assert await response.json() == {"repositories": ["ghcr.io/org/tool", "library/alpine"]}
    async with mirror.get("/v2/_catalog?n=1") as response:
        assert json.loads(await response.read()) == {"repositories": ["ghcr.io/org/tool"]}
        assert response.headers["Link"] == '</v2/_catalog?n=1&last=ghcr.io/org/tool>; rel="next"'
    async with mirror.get("/v2/_catalog?n=1&last=ghcr.io/org/tool") as response:
        assert await response.json() == {"repositories": ["library/alpine"]}


async def test_a_name_too_long_once_library_is_added_is_refused_before_upstream(
    token_registry: RegistryProcess, make_mirror: MakeMirror
) -> None:
    """255 characters are valid for us, but Docker Hub names get `library/` (263 then):
    the real registry answers that with a 500, which would count against the upstream."""
    mirror = await make_mirror([{"name": "docker.io", "url": token_registry.url, "default": True}])
    for _ in range(3):
        async with mirror.get(f"/v2/{'a' * 255}/manifests/latest") as response:
            assert await error_of(response) == (400, "NAME_INVALID")
    async with mirror.get(f"/v2/{'a' * 247}/manifests/latest") as response:
        assert await error_of(response) == (404, "MANIFEST_UNKNOWN")  # 255 with the prefix
    breaker = 'pullthrough_upstream_breaker_state{state="closed",upstream="docker.io"}'
    assert await mirror.metric(breaker) == 1
