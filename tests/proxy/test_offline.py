"""Offline mode (`offline: true`): the upstream is never contacted, not even its token
service; what the cache holds is served (by the same stale-if-error rules as an outage,
and the same scoping), and anything else is 503 UNAVAILABLE saying the upstream is
offline. Switched in-process with the `Reloader` that SIGHUP runs (tests/proxy/
test_reload.py sends the real signal)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.config import load_config, parse_config
from proxy.keys import CONFIG, METRICS
from proxy.reload import Reloader
from tests.fake_upstream.server import FakeUpstream
from tests.mirror import MakeMirror, Mirror
from tests.secrets import SECRET
from tests.upstream.images import DOCKER_MANIFEST, build_image, push_image
from tests.upstream.registry import RegistryProcess
from tests.upstream.token_server import TokenServer

OFFLINE = "upstream docker.io is offline (offline: true)"


def reload(mirror: Mirror, workdir: Path, upstreams: list[dict[str, Any]], **top: Any) -> bool:
    """Rewrite the mirror's config file and reload it, as SIGHUP does."""
    path = workdir / "reloaded.yaml"
    raw = {"cache": {"path": str(mirror.cache_dir)}, "upstreams": upstreams, **top}
    path.write_text(yaml.safe_dump(raw))
    return Reloader(mirror.app[CONFIG], path, mirror.app[METRICS], env={}).reload()


def reloads(caplog: Any) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "pullthrough.reload"]


async def answer(mirror: Mirror, path: str, method: str = "GET", **headers: str) -> Any:
    """(status, OCI error code or None, message or body)."""
    request = mirror.get if method == "GET" else mirror.head
    async with request(path, headers=headers) as response:
        body = await response.read()
        if response.status < 400:
            return response.status, None, body
        if method == "HEAD":
            return response.status, None, b""
        (error,) = json.loads(body)["errors"]
        return response.status, error["code"], error["message"]


def test_the_global_offline_holds_for_upstreams_that_do_not_set_their_own() -> None:
    raw: dict[str, Any] = {
        "offline": True,
        "upstreams": [
            {"name": "a.io", "url": "https://a.io"},
            {"name": "b.io", "url": "https://b.io", "offline": False},
        ],
    }
    config = parse_config(raw, env={})
    assert [(u.name, u.offline) for u in config.upstreams] == [("a.io", True), ("b.io", False)]
    raw["offline"] = False
    raw["upstreams"][0]["offline"] = True
    config = parse_config(raw, env={})
    assert [u.offline for u in config.upstreams] == [True, False]


def test_offline_from_the_environment_and_bad_values_named(tmp_path: Path) -> None:
    path = tmp_path / "mirror.yaml"
    path.write_text("upstreams: [{name: a.io, url: 'https://a.io'}]\n")
    config = load_config(path, env={"PULLTHROUGH_OFFLINE": "true"})
    assert config.offline and config.upstreams[0].offline
    with pytest.raises(Exception, match=r"^offline: must be true or false"):
        load_config(path, env={"PULLTHROUGH_OFFLINE": "sometimes"})
    path.write_text("upstreams: [{name: a.io, url: 'https://a.io', offline: 1}]\n")
    with pytest.raises(Exception, match=r"^upstreams\[0\]\.offline: must be true or false"):
        load_config(path, env={})


async def test_an_offline_upstream_is_never_contacted(
    make_fake_upstream: Any, make_mirror: MakeMirror
) -> None:
    """Every kind of request, cold: 503 UNAVAILABLE saying why, and the upstream (whose
    token service is on the same server) sees nothing at all. It is no upstream failure:
    no error counted, the breaker stays closed, and the mirror stays ready."""
    upstream: FakeUpstream = await make_fake_upstream(auth="dockerhub")
    image = upstream.add_image("library/app", "v1", [os.urandom(1000)])
    mirror = await make_mirror(
        [{"name": "docker.io", "url": upstream.url, "default": True, "offline": True}]
    )
    paths = [
        ("GET", "/v2/app/manifests/v1"),
        ("HEAD", "/v2/app/manifests/v1"),
        ("GET", f"/v2/app/manifests/{image.manifest_digest}"),
        ("GET", f"/v2/app/blobs/{image.layer_digests[0]}"),
        ("HEAD", f"/v2/app/blobs/{image.layer_digests[0]}"),
        ("GET", "/v2/app/tags/list"),
        ("GET", f"/v2/app/referrers/{image.manifest_digest}"),
    ]
    for method, path in paths:
        status, code, message = await answer(mirror, path, method)
        assert (status, code) == (503, "UNAVAILABLE" if method == "GET" else None), path
        if method == "GET":
            assert message.startswith(OFFLINE), message
            assert "is not cached" in message
    assert upstream.requests == []
    metrics = await mirror.metrics()
    assert metrics['pullthrough_upstream_offline_total{upstream="docker.io"}'] == len(paths)
    errors = [
        value
        for name, value in metrics.items()
        if name.startswith("pullthrough_upstream_errors_total")
    ]
    assert errors and set(errors) == {0.0}
    closed = 'pullthrough_upstream_breaker_state{state="closed",upstream="docker.io"}'
    assert metrics[closed] == 1.0
    assert not any(n.startswith("pullthrough_upstream_request_duration") for n in metrics)
    async with mirror.get("/readyz") as response:
        assert response.status == 200
    assert mirror.temp_files() == []


async def test_offline_serves_what_is_cached_and_only_where_it_is_linked(
    token_registry: RegistryProcess,
    token_server: TokenServer,
    make_mirror: MakeMirror,
    unique_repo_factory: Any,
    tmp_path: Path,
) -> None:
    repo, other = unique_repo_factory("app"), unique_repo_factory("other")
    pushed = push_image(token_registry, token_server, repo, "v1", build_image(repo))
    push_image(token_registry, token_server, repo, "v2", build_image(repo + "v2"))
    push_image(token_registry, token_server, other, "v1", pushed.image)
    upstreams = [{"name": "docker.io", "url": token_registry.url, "default": True}]
    mirror = await make_mirror(upstreams)
    layer = pushed.layers[0]
    tag_path, blob_path = f"/v2/{repo}/manifests/v1", f"/v2/{repo}/blobs/{layer.digest}"
    assert (await answer(mirror, tag_path, Accept=DOCKER_MANIFEST))[2] == pushed.manifest
    assert await mirror.fetch(blob_path) == layer.read_bytes()
    await mirror.wait_committed(layer.digest)

    assert reload(mirror, tmp_path, upstreams, offline=True)
    asked_before = len(token_registry.requests()), token_server.count()
    mirror.clock.advance(3600)  # the tag is long due for a HEAD upstream
    async with mirror.get(tag_path, headers={"Accept": DOCKER_MANIFEST}) as response:
        assert response.status == 200
        assert await response.read() == pushed.manifest
        assert response.headers["Cache-Control"] == "no-cache"  # stale: already due
    # Another client's Accept: any stored answer it accepts (as in an outage).
    assert (await answer(mirror, tag_path))[2] == pushed.manifest
    assert (await answer(mirror, f"/v2/{repo}/manifests/{pushed.digest}"))[2] == pushed.manifest
    assert await mirror.fetch(blob_path) == layer.read_bytes()
    assert (await answer(mirror, blob_path, "HEAD"))[0] == 200
    assert await mirror.lookups("manifest", "stale") == 2

    # Not cached: a tag never pulled, a blob never pulled.
    for path in (f"/v2/{repo}/manifests/v2", f"/v2/{repo}/blobs/{pushed.layers[1].digest}"):
        status, code, message = await answer(mirror, path)
        assert (status, code) == (503, "UNAVAILABLE")
        assert message == f"{OFFLINE}; this is not cached for {repo}"
    # Cached, but for another repository: no upstream to confirm it, so not served...
    other_blob = f"/v2/{other}/blobs/{layer.digest}"
    assert (await answer(mirror, other_blob))[:2] == (503, "UNAVAILABLE")
    # ...unless the upstream's content is public (share_when_down, no credentials).
    shared = [{**upstreams[0], "share_when_down": True}]
    assert reload(mirror, tmp_path, shared, offline=True)
    assert await mirror.fetch(other_blob) == layer.read_bytes()
    assert (len(token_registry.requests()), token_server.count()) == asked_before

    # Back online: the next request asks upstream again.
    assert reload(mirror, tmp_path, upstreams)
    async with mirror.get(f"/v2/{repo}/manifests/v2", headers={"Accept": DOCKER_MANIFEST}):
        pass
    assert token_registry.count("GET", f"/v2/{repo}/manifests/v2", 2) == 1


async def test_changed_credentials_are_used_from_the_next_request(
    make_fake_upstream: Any, make_mirror: MakeMirror, tmp_path: Path
) -> None:
    """A reload that changes an upstream's password: its cached token (for the old
    credentials) is never sent again; the next request fetches one with the new ones.
    Tokens are kept per credentials, so changing back finds the first token again."""
    upstream: FakeUpstream = await make_fake_upstream(auth="dockerhub", credentials=("bob", SECRET))
    image = upstream.add_image("library/app", "v1", [b"one", b"two"])
    right = {"name": "docker.io", "url": upstream.url, "default": True, "username": "bob"}
    mirror = await make_mirror([{**right, "password": SECRET}])
    one, two = (f"/v2/app/blobs/{digest}" for digest in image.layer_digests)
    assert await mirror.fetch(one) == b"one"
    grants = len(upstream.token_grants)

    assert reload(mirror, tmp_path, [{**right, "password": "not-the-password"}])
    status, code, _ = await answer(mirror, two)
    assert (status, code) == (401, "UNAUTHORIZED")  # the old token was not reused
    assert len(upstream.token_grants) == grants

    assert reload(mirror, tmp_path, [{**right, "password": SECRET}])
    assert await mirror.fetch(two) == b"two"
    assert len(upstream.token_grants) == grants  # bob's token, still valid


async def test_a_bad_file_is_refused_and_the_running_config_stays(
    fake_upstream: FakeUpstream, make_mirror: MakeMirror, tmp_path: Path, caplog: Any
) -> None:
    upstreams = [{"name": "docker.io", "url": fake_upstream.url, "default": True}]
    mirror = await make_mirror(upstreams)
    running = mirror.app[CONFIG].current
    bad = [{**upstreams[0], "tag_ttl": [{"match": "v*", "ttl": "soon"}]}]
    with caplog.at_level(logging.INFO, "pullthrough.reload"):
        assert not reload(mirror, tmp_path, bad, offline=True)
    assert mirror.app[CONFIG].current is running
    (record,) = reloads(caplog)
    assert record.levelname == "ERROR"
    assert "still serving the previous config: upstreams[0].tag_ttl[0].ttl:" in record.message


async def test_restart_only_settings_are_named_and_keep_their_running_value(
    fake_upstream: FakeUpstream, make_mirror: MakeMirror, tmp_path: Path, caplog: Any
) -> None:
    upstreams: list[dict[str, Any]] = [
        {"name": "docker.io", "url": fake_upstream.url, "default": True}
    ]
    mirror = await make_mirror(upstreams)
    before = mirror.app[CONFIG].current
    added = [*upstreams, {"name": "quay.io", "url": fake_upstream.url}]
    with caplog.at_level(logging.INFO, "pullthrough.reload"):
        assert reload(
            mirror, tmp_path, added, listen="127.0.0.1:5999", client_timeout="5s", offline=True
        )
    warning, info = reloads(caplog)
    assert warning.levelname == "WARNING"
    assert "listen, client_timeout changed, needs a restart" in warning.message
    summary = "upstreams added: quay.io; upstreams changed: docker.io; offline: docker.io, quay.io"
    assert info.message.endswith(summary)
    after = mirror.app[CONFIG].current
    assert (after.listen_port, after.client_timeout) == (before.listen_port, 60.0)
    assert after.offline and [u.name for u in after.upstreams] == ["docker.io", "quay.io"]
    # The added upstream is served at once (offline, so from nothing: 503 offline).
    status, code, message = await answer(mirror, "/v2/quay.io/org/app/manifests/v1")
    assert (status, code) == (503, "UNAVAILABLE") and "upstream quay.io is offline" in message
    assert fake_upstream.requests == []


async def test_startup_warming_skips_offline_upstreams(
    fake_upstream: FakeUpstream, make_mirror: MakeMirror, caplog: Any
) -> None:
    fake_upstream.add_image("library/app", "v1")
    fake_upstream.add_image("org/tool", "v1")
    with caplog.at_level(logging.INFO, "pullthrough.warm"):
        await make_mirror(
            [
                {"name": "docker.io", "url": fake_upstream.url, "default": True, "offline": True},
                {"name": "ghcr.io", "url": fake_upstream.url},
            ],
            warm=["app:v1", "ghcr.io/org/tool:v1"],
        )
        async with asyncio.timeout(5):
            while not any("warmed" in r.message for r in caplog.records):  # noqa: ASYNC110
                await asyncio.sleep(0.02)
    messages = [r.message for r in caplog.records]
    assert "not warming app:v1: upstream docker.io is offline" in messages
    assert any(m.startswith("warmed ghcr.io/org/tool:v1") for m in messages)
    assert not any("library/app" in r.path for r in fake_upstream.requests)


async def test_check_config_shows_which_upstreams_are_offline(tmp_path: Path) -> None:
    (tmp_path / "mirror.yaml").write_text(
        "offline: true\n"
        "upstreams:\n"
        "  - {name: docker.io, url: 'https://registry-1.docker.io', default: true}\n"
        "  - {name: ghcr.io, url: 'https://ghcr.io', offline: false}\n"
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "check-config", cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await process.communicate()
    assert process.returncode == 0, out
    text = out.decode()
    assert "# upstream docker.io: offline: never contacted\n" in text
    assert "# upstream ghcr.io: online\n" in text
    printed = yaml.safe_load(text)  # still a config
    assert [u["offline"] for u in printed["upstreams"]] == [True, False]
    assert printed["offline"] is True


async def test_log_level_is_reloaded_unless_the_command_line_set_it(
    fake_upstream: FakeUpstream, make_mirror: MakeMirror, tmp_path: Path
) -> None:
    upstreams = [{"name": "docker.io", "url": fake_upstream.url, "default": True}]
    mirror = await make_mirror(upstreams)
    path = tmp_path / "reloaded.yaml"
    raw = {"cache": {"path": str(mirror.cache_dir)}, "upstreams": upstreams}
    path.write_text(yaml.safe_dump({**raw, "log": {"level": "error"}}))
    root = logging.getLogger()
    level = root.level
    try:
        live, metrics = mirror.app[CONFIG], mirror.app[METRICS]
        assert Reloader(live, path, metrics, level_override="DEBUG", env={}).reload()
        assert root.level == level  # --log-level wins
        assert live.current.log.level == "INFO"
        path.write_text(yaml.safe_dump({**raw, "log": {"level": "warning"}}))
        assert Reloader(live, path, metrics, env={}).reload()
        assert root.level == logging.WARNING
        assert live.current.log.level == "WARNING"
    finally:
        root.setLevel(level)
