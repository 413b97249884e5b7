"""Tag freshness by pattern (`tag_ttl`): the first matching glob gives a tag its TTL, an
immutable tag is never revalidated, and `manifest_ttl` is the fallback. Upstream is the
real registry; its access log counts the HEADs and GETs, across TTLs on an injected clock."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.config import ConfigError, TagTtl, load_config, parse_config
from tests.mirror import MakeMirror, Mirror
from tests.upstream.client import UpstreamClient
from tests.upstream.images import DOCKER_MANIFEST, build_image, push_image
from tests.upstream.registry import RegistryProcess
from tests.upstream.token_server import TokenServer

RULES = [
    {"match": "v[0-9]*.[0-9]*.[0-9]*", "immutable": True},
    {"match": "latest", "ttl": "1m"},
]
FALLBACK = 600.0  # manifest_ttl: 10m
YEAR = 365 * 86400


def parse(upstream: dict[str, object], **top: object) -> list[TagTtl]:
    raw = {"upstreams": [{"name": "a.io", "url": "https://a.io", **upstream}], **top}
    return list(parse_config(raw, env={}).upstreams[0].tag_ttl)


def test_rules_keep_their_order_and_the_first_match_wins() -> None:
    config = parse_config(
        {
            "upstreams": [
                {
                    "name": "a.io",
                    "url": "https://a.io",
                    "manifest_ttl": "10m",
                    "tag_ttl": [*RULES, {"match": "v*", "ttl": "1h"}, {"match": "V*", "ttl": 0}],
                }
            ]
        },
        env={},
    )
    (upstream,) = config.upstreams
    assert upstream.tag_ttl[:2] == (TagTtl("v[0-9]*.[0-9]*.[0-9]*", None), TagTtl("latest", 60))
    assert upstream.tag_lifetime("v1.2.3") is None  # immutable, before the v* rule
    assert upstream.tag_lifetime("v1.2") == 3600  # a moving minor tag: v*
    assert upstream.tag_lifetime("V1") == 0  # case-sensitive
    assert upstream.tag_lifetime("latest") == 60
    assert upstream.tag_lifetime("latest-alpine") == FALLBACK  # globs match the whole tag


def test_upstream_defaults_give_tag_ttl_to_upstreams_without_their_own() -> None:
    raw = {
        "upstream_defaults": {"tag_ttl": [{"match": "nightly*", "ttl": "1d"}]},
        "upstreams": [
            {"name": "a.io", "url": "https://a.io"},
            {"name": "b.io", "url": "https://b.io", "tag_ttl": []},
        ],
    }
    a, b = parse_config(raw, env={}).upstreams
    assert a.tag_ttl == (TagTtl("nightly*", 86400),)
    assert b.tag_ttl == ()


@pytest.mark.parametrize(
    ("rules", "message"),
    [
        ("latest", "upstreams[0].tag_ttl: must be a list"),
        ("[{match: latest, ttl: 1m}, latest]", "upstreams[0].tag_ttl[1]: must be {match"),
        ("[{match: latest, ttl: 1m}, {match: x, ttl: soon}]", "upstreams[0].tag_ttl[1].ttl:"),
        ("[{ttl: 1m}]", "upstreams[0].tag_ttl[0].match: must be a glob"),
        ("[{match: ''}]", "upstreams[0].tag_ttl[0].match: must be a glob"),
        ("[{match: x}]", "upstreams[0].tag_ttl[0]: give either ttl or immutable: true"),
        ("[{match: x, ttl: 1m, immutable: true}]", "upstreams[0].tag_ttl[0]: give either"),
        ("[{match: x, immutable: false}]", "upstreams[0].tag_ttl[0]: give either"),
        ("[{match: x, immutable: 'yes'}]", "upstreams[0].tag_ttl[0].immutable: must be true"),
        ("[{match: x, ttl: 1m, regex: y}]", "upstreams[0].tag_ttl[0].regex: unknown setting"),
    ],
)
def test_errors_name_the_rule(tmp_path: Path, rules: str, message: str) -> None:
    path = tmp_path / "mirror.yaml"
    path.write_text(f"upstreams: [{{name: a.io, url: 'https://a.io', tag_ttl: {rules}}}]\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={})
    assert message in str(caught.value)


def test_a_bad_default_rule_is_named_under_upstream_defaults(tmp_path: Path) -> None:
    path = tmp_path / "mirror.yaml"
    path.write_text(
        "upstream_defaults: {tag_ttl: [{match: x, ttl: 1m}, {match: y}]}\n"
        "upstreams: [{name: a.io, url: 'https://a.io'}]\n"
    )
    with pytest.raises(ConfigError, match=r"^upstream_defaults\.tag_ttl\[1\]: give either"):
        load_config(path, env={})


async def test_each_tag_is_revalidated_on_its_own_ttl(
    token_registry: RegistryProcess,
    token_server: TokenServer,
    make_mirror: MakeMirror,
    unique_repo: str,
) -> None:
    """One image under three tags: an immutable one, a short-TTL one and one that falls
    back to manifest_ttl. Upstream's log counts what each costs as time passes."""
    pushed = push_image(
        token_registry, token_server, unique_repo, "v1.2.3", build_image(unique_repo)
    )
    pusher = UpstreamClient(token_registry, token_server)
    for tag in ("latest", "stable"):
        pusher.push_manifest(unique_repo, tag, pushed.manifest, DOCKER_MANIFEST)
    mirror = await make_mirror(
        [
            {
                "name": "docker.io",
                "url": token_registry.url,
                "default": True,
                "manifest_ttl": "10m",
                "tag_ttl": RULES,
            }
        ]
    )

    async def pull(tag: str) -> str:
        async with mirror.get(f"/v2/{unique_repo}/manifests/{tag}") as response:
            assert response.status == 200
            assert response.headers["Docker-Content-Digest"] == pushed.digest
            return response.headers["Cache-Control"]

    def asked(tag: str) -> tuple[int, int]:
        """Upstream's (HEAD, GET) answers for the tag, 2xx only: not auth challenges."""
        path = f"/v2/{unique_repo}/manifests/{tag}"
        return token_registry.count("HEAD", path, 2), token_registry.count("GET", path, 2)

    first = {tag: await pull(tag) for tag in ("v1.2.3", "latest", "stable")}
    assert first == {
        "v1.2.3": f"max-age={YEAR}",
        "latest": "max-age=60",
        "stable": "max-age=600",
    }
    assert [asked(tag) for tag in first] == [(0, 1), (0, 1), (0, 1)]

    mirror.clock.advance(61)  # latest is due; the fallback is not
    assert await pull("v1.2.3") == f"max-age={YEAR}"
    assert await pull("latest") == "max-age=60"  # revalidated: a fresh minute
    assert await pull("stable") == "max-age=539"
    assert [asked(tag) for tag in first] == [(0, 1), (1, 1), (0, 1)]

    mirror.clock.advance(FALLBACK)  # both are due
    for tag in first:
        await pull(tag)
    assert [asked(tag) for tag in first] == [(0, 1), (2, 1), (1, 1)]

    mirror.clock.advance(YEAR)  # an immutable tag is not asked about, ever
    assert await pull("v1.2.3") == f"max-age={YEAR}"
    assert asked("v1.2.3") == (0, 1)


async def test_an_immutable_tag_moved_upstream_keeps_its_cached_answer(
    token_registry: RegistryProcess,
    token_server: TokenServer,
    make_mirror: MakeMirror,
    unique_repo: str,
) -> None:
    """What immutable means, seen from outside: the mirror never looks again, so a tag
    re-pushed upstream is not noticed (while a short-TTL tag is, once it is due)."""
    old = push_image(token_registry, token_server, unique_repo, "v2.0.0", build_image("old"))
    push_image(token_registry, token_server, unique_repo, "latest", old.image)
    mirror: Mirror = await make_mirror(
        [{"name": "docker.io", "url": token_registry.url, "default": True, "tag_ttl": RULES}]
    )

    async def digest(tag: str) -> str:
        async with mirror.get(f"/v2/{unique_repo}/manifests/{tag}") as response:
            assert response.status == 200
            return response.headers["Docker-Content-Digest"]

    assert (await digest("v2.0.0"), await digest("latest")) == (old.digest, old.digest)
    new = push_image(token_registry, token_server, unique_repo, "v2.0.0", build_image("new"))
    push_image(token_registry, token_server, unique_repo, "latest", new.image)
    mirror.clock.advance(3600)
    assert (await digest("v2.0.0"), await digest("latest")) == (old.digest, new.digest)
