"""tags/list and referrers through the mirror, against a fake upstream that has the
referrers API: answers are stored per query string, served within listing_ttl, and
served stale when upstream fails."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import pytest
from aiohttp import web

from proxy.config import parse_config
from proxy.settings import ConfigError
from tests.fake_upstream.fixtures import MakeFakeUpstream
from tests.fake_upstream.server import FakeUpstream, Fault, sha256_digest
from tests.mirror import MakeMirror, Mirror

REPO = "library/app"
TTL = 60
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
SUBJECT = sha256_digest(b"subject")
TAGS_PATH = f"/v2/{REPO}/tags/list"
REFERRERS_PATH = f"/v2/{REPO}/referrers/{SUBJECT}"
CLIENT_REFERRERS = f"/v2/app/referrers/{SUBJECT}"


async def mirror_for(make_mirror: MakeMirror, url: str, **extra: Any) -> Mirror:
    entry = {"name": "docker.io", "url": url, "default": True, "listing_ttl": TTL, **extra}
    return await make_mirror([entry])


async def get(mirror: Mirror, path: str) -> tuple[int, dict[str, str], Any]:
    async with mirror.get(path) as response:
        return response.status, dict(response.headers), await response.json(content_type=None)


def add_tags(upstream: FakeUpstream, *tags: str) -> None:
    for tag in tags:
        upstream.add_manifest(REPO, tag, f'{{"t":"{tag}"}}'.encode(), OCI_MANIFEST)


def referrer(n: int, artifact_type: str) -> dict[str, Any]:
    return {
        "mediaType": OCI_MANIFEST,
        "digest": sha256_digest(f"referrer {n}".encode()),
        "size": 100 + n,
        "artifactType": artifact_type,
    }


async def test_tags_are_served_from_the_store_within_listing_ttl(
    fake_upstream: FakeUpstream, make_mirror: MakeMirror
) -> None:
    add_tags(fake_upstream, "v1", "v2")
    mirror = await mirror_for(make_mirror, fake_upstream.url)
    first = await get(mirror, "/v2/app/tags/list")
    assert first[0] == 200 and first[2]["tags"] == ["v1", "v2"]
    assert first[1]["Cache-Control"] == f"max-age={TTL}"
    mirror.clock.advance(TTL - 1)
    add_tags(fake_upstream, "v3")
    second = await get(mirror, "/v2/app/tags/list")
    assert second[2] == first[2] and second[1]["Cache-Control"] == "max-age=1"
    assert fake_upstream.count("GET", TAGS_PATH) == 1
    assert (await mirror.lookups("tags", "miss"), await mirror.lookups("tags", "hit")) == (1, 1)

    mirror.clock.advance(2)  # past the TTL: upstream is asked again
    assert (await get(mirror, "/v2/app/tags/list"))[2]["tags"] == ["v1", "v2", "v3"]
    assert fake_upstream.count("GET", TAGS_PATH) == 2


async def test_a_list_that_arrives_in_pieces_is_read_and_stored_whole(
    make_mirror: MakeMirror,
) -> None:
    """A body that comes in several reads (as on any real network) is read to its end: a
    list cut short would be served, and stored for listing_ttl, as if it were complete.
    (The fake upstream's slow-body faults are for blobs; this upstream is just the list.)"""
    tags = [f"v{n:04}" for n in range(3000)]
    body = json.dumps({"name": REPO, "tags": tags}).encode()

    async def tags_list(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.content_length = len(body)
        await response.prepare(request)
        for start in range(0, len(body), 8192):
            await response.write(body[start : start + 8192])
            await asyncio.sleep(0.005)
        return response

    app = web.Application()
    app.router.add_get(TAGS_PATH, tags_list)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        mirror = await mirror_for(make_mirror, f"http://127.0.0.1:{port}")
        for _ in range(2):  # from upstream, then stored
            status, _, answer = await get(mirror, "/v2/app/tags/list")
            assert status == 200 and answer["tags"] == tags
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("status", [503, 500, 429])
@pytest.mark.parametrize(
    ("kind", "path", "upstream_path"),
    [("tags", "/v2/app/tags/list", TAGS_PATH), ("referrers", CLIENT_REFERRERS, REFERRERS_PATH)],
)
async def test_a_failing_upstream_gets_the_stored_answer_counted_stale(
    status: int,
    kind: str,
    path: str,
    upstream_path: str,
    fake_upstream: FakeUpstream,
    make_mirror: MakeMirror,
    caplog: pytest.LogCaptureFixture,
) -> None:
    add_tags(fake_upstream, "v1")
    fake_upstream.add_referrer(REPO, SUBJECT, referrer(1, "application/x-sbom"))
    mirror = await mirror_for(make_mirror, fake_upstream.url)
    stored = await get(mirror, path)
    fault = fake_upstream.set_fault(upstream_path, Fault(status=status, retry_after=5))
    mirror.clock.advance(TTL + 1)
    with caplog.at_level(logging.WARNING, "pullthrough.listings"):
        answer = await get(mirror, path)
    assert (answer[0], answer[1]["Cache-Control"], answer[2]) == (200, "no-cache", stored[2])
    assert fault.hits == 1
    assert await mirror.lookups(kind, "stale") == 1
    assert "upstream failed" in caplog.text and "docker.io/library/app" in caplog.text


async def test_an_unreachable_upstream_gets_stored_tags_and_referrers(
    fake_upstream: FakeUpstream, make_mirror: MakeMirror
) -> None:
    add_tags(fake_upstream, "v1")
    fake_upstream.add_referrer(REPO, SUBJECT, referrer(1, "application/x-sbom"))
    mirror = await mirror_for(make_mirror, fake_upstream.url)
    tags = await get(mirror, "/v2/app/tags/list")
    referrers = await get(mirror, f"/v2/app/referrers/{SUBJECT}")
    assert referrers[1]["Content-Type"] == OCI_INDEX
    await fake_upstream.close()
    mirror.clock.advance(TTL + 1)
    status, headers, body = await get(mirror, "/v2/app/tags/list")
    assert (status, headers["Cache-Control"], body) == (200, "no-cache", tags[2])
    again = await get(mirror, f"/v2/app/referrers/{SUBJECT}")
    assert (again[0], again[1]["Content-Type"], again[2]) == (200, OCI_INDEX, referrers[2])
    assert await mirror.lookups("tags", "stale") == 1
    assert await mirror.lookups("referrers", "stale") == 1


async def test_nothing_stored_and_upstream_down_is_the_same_error_as_before(
    fake_upstream: FakeUpstream, make_mirror: MakeMirror
) -> None:
    mirror = await mirror_for(make_mirror, fake_upstream.url)
    fake_upstream.set_fault(TAGS_PATH, Fault(status=503))
    fake_upstream.set_fault(REFERRERS_PATH, Fault(status=429, retry_after=7))
    status, _, body = await get(mirror, "/v2/app/tags/list")
    assert (status, body["errors"][0]["code"]) == (503, "UNAVAILABLE")
    status, headers, body = await get(mirror, f"/v2/app/referrers/{SUBJECT}")
    assert (status, body["errors"][0]["code"], headers["Retry-After"]) == (
        429,
        "TOOMANYREQUESTS",
        "7",
    )
    await fake_upstream.close()
    for path in ("/v2/app/tags/list", f"/v2/app/referrers/{SUBJECT}"):
        status, _, body = await get(mirror, path)
        assert (status, body["errors"][0]["code"]) == (503, "UNAVAILABLE"), path


async def test_each_page_is_stored_under_its_own_query_with_its_link(
    make_fake_upstream: MakeFakeUpstream, make_mirror: MakeMirror
) -> None:
    upstream = await make_fake_upstream(tags_page_size=2)
    add_tags(upstream, "a", "b", "c")
    mirror = await make_mirror(
        [
            {"name": "docker.io", "url": upstream.url, "default": True, "listing_ttl": TTL},
            {"name": "other.io", "url": upstream.url},
        ]
    )
    first = await get(mirror, "/v2/app/tags/list?n=2")
    link = first[1]["Link"]
    assert link == '</v2/app/tags/list?n=2&last=b>; rel="next"'
    second = await get(mirror, link[1 : link.index(">")])
    assert (second[2]["tags"], "Link" in second[1]) == (["c"], False)

    upstream.set_fault(TAGS_PATH, Fault(status=502))
    mirror.clock.advance(TTL + 1)
    stale_first = await get(mirror, "/v2/app/tags/list?n=2")
    assert (stale_first[2]["tags"], stale_first[1]["Link"]) == (["a", "b"], link)
    assert (await get(mirror, "/v2/app/tags/list?n=2&last=b"))[2]["tags"] == ["c"]
    # The same stored page, asked for by a client that names the upstream with ns=: its
    # Link is written in that client's spelling.
    as_ns = await get(mirror, "/v2/library/app/tags/list?n=2&ns=docker.io")
    assert as_ns[1]["Link"] == '</v2/library/app/tags/list?n=2&last=b&ns=docker.io>; rel="next"'
    # A query never asked for has no stored answer.
    status, _, body = await get(mirror, "/v2/app/tags/list?n=1")
    assert (status, body["errors"][0]["code"]) == (503, "UNAVAILABLE")
    assert await mirror.lookups("tags", "stale") == 3


async def test_answers_are_never_shared_between_repositories_or_upstreams(
    make_fake_upstream: MakeFakeUpstream, make_mirror: MakeMirror
) -> None:
    hub, other = await make_fake_upstream(), await make_fake_upstream()
    add_tags(hub, "v1")
    mirror = await make_mirror(
        [
            {"name": "docker.io", "url": hub.url, "default": True},
            {"name": "other.io", "url": other.url},
        ]
    )
    assert (await get(mirror, "/v2/app/tags/list"))[0] == 200
    await hub.close()
    await other.close()
    for path in ("/v2/library/app/tags/list?ns=other.io", "/v2/app2/tags/list"):
        status, _, body = await get(mirror, path)
        assert (status, body["errors"][0]["code"]) == (503, "UNAVAILABLE"), path


async def test_name_unknown_is_never_stored_and_drops_what_was(
    fake_upstream: FakeUpstream, make_mirror: MakeMirror
) -> None:
    mirror = await mirror_for(make_mirror, fake_upstream.url, listing_ttl=0)
    status, _, body = await get(mirror, "/v2/app/tags/list")
    assert (status, body["errors"][0]["code"]) == (404, "NAME_UNKNOWN")
    add_tags(fake_upstream, "v1")
    assert (await get(mirror, "/v2/app/tags/list"))[0] == 200
    # The repository is deleted upstream: its stored answer must not come back later.
    fake_upstream.set_fault(TAGS_PATH, Fault(status=404))
    status, _, body = await get(mirror, "/v2/app/tags/list")
    assert (status, body["errors"][0]["code"]) == (404, "NAME_UNKNOWN")
    await fake_upstream.close()
    status, _, body = await get(mirror, "/v2/app/tags/list")
    assert (status, body["errors"][0]["code"]) == (503, "UNAVAILABLE")


async def test_referrers_pass_through_and_are_stored_per_artifact_type(
    fake_upstream: FakeUpstream, make_mirror: MakeMirror
) -> None:
    fake_upstream.add_referrer(REPO, SUBJECT, referrer(1, "application/x-sbom"))
    fake_upstream.add_referrer(REPO, SUBJECT, referrer(2, "application/x-sig"))
    mirror = await mirror_for(make_mirror, fake_upstream.url)
    everything = await get(mirror, f"/v2/app/referrers/{SUBJECT}")
    assert len(everything[2]["manifests"]) == 2 and "OCI-Filters-Applied" not in everything[1]
    sboms = await get(mirror, f"/v2/app/referrers/{SUBJECT}?artifactType=application/x-sbom")
    assert sboms[2]["manifests"] == [referrer(1, "application/x-sbom")]
    assert sboms[1]["OCI-Filters-Applied"] == "artifactType"
    for _ in range(2):  # within the TTL: from the store
        status, headers, body = await get(mirror, f"/v2/app/referrers/{SUBJECT}")
        assert (status, headers["Content-Type"], body) == (200, OCI_INDEX, everything[2])
    assert fake_upstream.count("GET", REFERRERS_PATH) == 2
    assert await mirror.lookups("referrers", "hit") == 2

    fake_upstream.set_fault(REFERRERS_PATH, Fault(status=503))
    mirror.clock.advance(TTL + 1)
    stale = await get(mirror, f"/v2/app/referrers/{SUBJECT}?artifactType=application/x-sbom")
    assert (stale[2], stale[1]["OCI-Filters-Applied"]) == (sboms[2], "artifactType")
    assert await mirror.lookups("referrers", "stale") == 1


async def test_without_a_referrers_api_an_unknown_repository_is_still_name_unknown(
    fake_upstream: FakeUpstream, make_mirror: MakeMirror
) -> None:
    """Like distribution 2.8, this upstream answers every referrers request with a 404
    that names no repository: with nothing cached for the subject, its tag list says
    whether the repository exists."""
    mirror = await mirror_for(make_mirror, fake_upstream.url)
    fake_upstream.set_fault(REFERRERS_PATH, Fault(status=404))  # code NOT_FOUND
    status, _, body = await get(mirror, f"/v2/app/referrers/{SUBJECT}")
    assert (status, body["errors"][0]["code"]) == (404, "NAME_UNKNOWN")
    add_tags(fake_upstream, "v1")
    status, headers, body = await get(mirror, f"/v2/app/referrers/{SUBJECT}")
    assert (status, headers["Content-Type"], body["manifests"]) == (200, OCI_INDEX, [])
    assert fake_upstream.count("GET", TAGS_PATH) == 2


def referring_manifest(artifact_type: str | None, n: int, **extra: Any) -> bytes:
    manifest: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": "application/vnd.oci.empty.v1+json",
            "digest": sha256_digest(b"{}"),
            "size": 2,
        },
        "layers": [],
        "subject": {"mediaType": OCI_MANIFEST, "digest": SUBJECT, "size": 7},
        "annotations": {"n": str(n)},
        **extra,
    }
    if artifact_type is not None:
        manifest["artifactType"] = artifact_type
    return json.dumps(manifest).encode()


async def test_referrers_come_from_cached_manifests_when_upstream_is_down(
    fake_upstream: FakeUpstream, make_mirror: MakeMirror
) -> None:
    sbom = referring_manifest("application/x-sbom", 1)
    untyped = referring_manifest(None, 2)  # its config's mediaType is its artifactType
    elsewhere = referring_manifest("application/x-sbom", 3)
    digests = [
        fake_upstream.add_manifest(REPO, sha256_digest(m), m, OCI_MANIFEST) for m in (sbom, untyped)
    ]
    other = fake_upstream.add_manifest(
        "library/other", sha256_digest(elsewhere), elsewhere, OCI_MANIFEST
    )
    mirror = await mirror_for(make_mirror, fake_upstream.url)
    for digest in digests:  # pulled through the mirror, so cached and linked to library/app
        await mirror.fetch(f"/v2/app/manifests/{digest}")
    await mirror.fetch(f"/v2/other/manifests/{other}")
    await fake_upstream.close()

    status, headers, body = await get(mirror, f"/v2/app/referrers/{SUBJECT}")
    assert (status, headers["Content-Type"], "OCI-Filters-Applied" in headers) == (
        200,
        OCI_INDEX,
        False,
    )
    expected = {
        digests[0]: {
            "mediaType": OCI_MANIFEST,
            "digest": digests[0],
            "size": len(sbom),
            "artifactType": "application/x-sbom",
            "annotations": {"n": "1"},
        },
        digests[1]: {
            "mediaType": OCI_MANIFEST,
            "digest": digests[1],
            "size": len(untyped),
            "artifactType": "application/vnd.oci.empty.v1+json",
            "annotations": {"n": "2"},
        },
    }
    assert body == {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [expected[d] for d in sorted(expected)],
    }
    status, headers, body = await get(
        mirror, f"/v2/app/referrers/{SUBJECT}?artifactType=application/x-sbom"
    )
    assert (body["manifests"], headers["OCI-Filters-Applied"]) == (
        [expected[digests[0]]],
        "artifactType",
    )
    status, headers, body = await get(mirror, f"/v2/app/referrers/{SUBJECT}?artifactType=x/none")
    assert (status, body["manifests"], headers["OCI-Filters-Applied"]) == (200, [], "artifactType")
    assert await mirror.lookups("referrers", "stale") == 3
    # Another repository's referrer is not this one's, and one that knows nothing of the
    # subject gets the error, as before.
    status, _, body = await get(mirror, f"/v2/third/referrers/{SUBJECT}")
    assert (status, body["errors"][0]["code"]) == (503, "UNAVAILABLE")


def test_listing_ttl_is_parsed_like_manifest_ttl() -> None:
    raw = {
        "upstream_defaults": {"listing_ttl": "10m"},
        "upstreams": [
            {"name": "a.io", "url": "https://a.io"},
            {"name": "b.io", "url": "https://b.io", "listing_ttl": 0},
        ],
    }
    a, b = parse_config(raw, env={}).upstreams
    assert (a.listing_ttl, b.listing_ttl, a.manifest_ttl) == (600, 0, 300)
    default = parse_config({"upstreams": [{"name": "a.io", "url": "https://a.io"}]}, env={})
    assert default.upstreams[0].listing_ttl == default.upstreams[0].manifest_ttl == 300
    with pytest.raises(ConfigError, match=r"^upstreams\[0\]\.listing_ttl: must be a duration"):
        parse_config(
            {"upstreams": [{"name": "a.io", "url": "https://a.io", "listing_ttl": "x"}]}, env={}
        )
    with pytest.raises(ConfigError, match=r"^upstream_defaults\.listing_ttl: must be a duration"):
        parse_config(
            {"upstream_defaults": {"listing_ttl": -1}, "upstreams": raw["upstreams"]}, env={}
        )
