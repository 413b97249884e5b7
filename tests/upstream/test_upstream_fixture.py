"""Quick checks that the real upstream (registry + token server + images) behaves."""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import re
import subprocess
import tarfile
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest

from tests.upstream.client import UpstreamClient, http_request
from tests.upstream.fixtures import UpstreamImages
from tests.upstream.images import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_INDEX,
    OCI_MANIFEST,
    PushedImage,
    big_blob_image,
    build_image,
    multi_layer_image,
)
from tests.upstream.registry import RegistryProcess, parse_access_log
from tests.upstream.token_server import TokenServer

ALL_MANIFEST_TYPES = ", ".join([OCI_INDEX, OCI_MANIFEST, DOCKER_MANIFEST_LIST, DOCKER_MANIFEST])


def _jwt_claims(token: str) -> dict[str, Any]:
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))  # type: ignore[no-any-return]


def _challenge(header: str) -> dict[str, str]:
    assert header.startswith("Bearer "), header
    return dict(re.findall(r'(\w+)="([^"]*)"', header))


def _skopeo(*args: str) -> subprocess.CompletedProcess[bytes]:
    proc = subprocess.run(["skopeo", "--insecure-policy", *args], capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr.decode()
    return proc


def test_bearer_token_flow(
    token_registry: RegistryProcess, token_server: TokenServer, pushed_images: UpstreamImages
) -> None:
    img = pushed_images.multi
    anon = http_request("127.0.0.1", token_registry.port, "GET", "/v2/", {})
    assert anon.status == 401
    challenge = _challenge(anon.headers["www-authenticate"])
    assert challenge == {"realm": token_server.realm, "service": token_server.service}

    scope = f"repository:{img.repo}:pull"
    denied = http_request(
        "127.0.0.1", token_registry.port, "GET", f"/v2/{img.repo}/manifests/v1", {}
    )
    assert _challenge(denied.headers["www-authenticate"])["scope"] == scope

    query = urlencode({"service": challenge["service"], "scope": scope})
    tok = http_request("127.0.0.1", token_server.port, "GET", f"/token?{query}", {}).json()
    assert isinstance(tok, dict) and set(tok) == {
        "token",
        "access_token",
        "expires_in",
        "issued_at",
    }
    assert tok["expires_in"] == 300
    assert _jwt_claims(tok["token"])["access"] == [
        {"type": "repository", "name": img.repo, "actions": ["pull"]}
    ]

    resp = http_request(
        "127.0.0.1",
        token_registry.port,
        "GET",
        f"/v2/{img.repo}/manifests/v1",
        {"Authorization": f"Bearer {tok['token']}", "Accept": ALL_MANIFEST_TYPES},
    )
    assert resp.status == 200
    assert resp.body == img.manifest
    assert resp.headers["docker-content-digest"] == img.digest
    assert resp.headers["content-type"] == DOCKER_MANIFEST

    [recorded] = token_server.requests
    assert (recorded.method, recorded.scopes, recorded.username, recorded.status) == (
        "GET",
        (scope,),
        None,
        200,
    )


def test_token_server_credentials_and_oauth(token_server: TokenServer) -> None:
    port, scope = token_server.port, "repository:library/x:pull,push"
    query = urlencode({"service": token_server.service, "scope": scope})

    def basic(user: str, pw: str) -> dict[str, str]:
        return {"Authorization": "Basic " + base64.b64encode(f"{user}:{pw}".encode()).decode()}

    anon = http_request("127.0.0.1", port, "GET", f"/token?{query}", {}).json()
    assert isinstance(anon, dict) and _jwt_claims(anon["token"])["access"][0]["actions"] == ["pull"]
    pusher = http_request(
        "127.0.0.1", port, "GET", f"/token?{query}", basic("pusher", "pushpass")
    ).json()
    assert isinstance(pusher, dict) and _jwt_claims(pusher["token"])["access"][0]["actions"] == [
        "pull",
        "push",
    ]
    assert (
        http_request("127.0.0.1", port, "GET", f"/token?{query}", basic("pusher", "wrong")).status
        == 401
    )

    form = urlencode(
        {
            "grant_type": "password",
            "username": "pusher",
            "password": "pushpass",
            "service": token_server.service,
            "scope": scope,
        }
    ).encode()
    oauth = http_request(
        "127.0.0.1",
        port,
        "POST",
        "/token",
        {"Content-Type": "application/x-www-form-urlencoded"},
        form,
    )
    body = oauth.json()
    assert (
        oauth.status == 200
        and isinstance(body, dict)
        and "access_token" in body
        and "token" not in body
    )

    token_server.require_auth = True  # reset by the fixture afterwards
    assert http_request("127.0.0.1", port, "GET", f"/token?{query}", {}).status == 401
    assert [(r.method, r.username, r.status) for r in token_server.requests] == [
        ("GET", None, 200),
        ("GET", "pusher", 200),
        ("GET", "pusher", 401),
        ("POST", "pusher", 200),
        ("GET", None, 401),
    ]


@pytest.mark.parametrize("kind", ["multi", "oci_index", "docker_list"])
def test_skopeo_pulls_each_image_kind(
    kind: str, pushed_images: UpstreamImages, tmp_path: Path
) -> None:
    img: PushedImage = getattr(pushed_images, kind)
    raw = _skopeo("inspect", "--raw", "--tls-verify=false", f"docker://{img.docker_ref()}")
    assert raw.stdout == img.manifest
    inspect = json.loads(
        _skopeo("inspect", "--tls-verify=false", f"docker://{img.docker_ref()}").stdout
    )
    assert inspect["Architecture"] == "amd64" and inspect["Os"] == "linux"

    dest = tmp_path / "copy"
    _skopeo(
        "copy", "--all", "--src-tls-verify=false", f"docker://{img.docker_ref()}", f"dir:{dest}"
    )
    files = {p.name for p in dest.iterdir()}
    for blob in img.blobs:
        assert blob.digest.removeprefix("sha256:") in files
        assert (dest / blob.digest.removeprefix("sha256:")).read_bytes() == blob.read_bytes()
    assert (dest / "manifest.json").read_bytes() == img.manifest


def test_plain_registry_serves_same_digests(
    plain_registry: RegistryProcess, pushed_images: UpstreamImages
) -> None:
    assert http_request("127.0.0.1", plain_registry.port, "GET", "/v2/", {}).status == 200
    img = pushed_images.plain_multi
    assert img.digest == pushed_images.multi.digest and img.host == plain_registry.host
    resp = UpstreamClient(plain_registry).get_manifest(img.repo, "v1", ALL_MANIFEST_TYPES)
    assert resp.body == img.manifest and resp.headers["docker-content-digest"] == img.digest


def test_access_log_counts_blob_gets(token_registry: RegistryProcess, unique_repo: str) -> None:
    img = multi_layer_image(token_registry, None, unique_repo, "v1")
    layer = img.layers[0]
    path = f"/v2/{unique_repo}/blobs/{layer.digest}"
    assert token_registry.count("GET", path) == 0  # pushing only HEADs blobs

    reader = UpstreamClient(token_registry, credentials=None)
    assert reader.request("HEAD", path, unique_repo).status == 200
    assert token_registry.count("GET", path) == 0
    resp = reader.get_blob(unique_repo, layer.digest)
    assert resp.status == 200 and resp.body == layer.data
    assert token_registry.count("GET", path) == 1
    assert token_registry.blob_gets(unique_repo, layer.digest) == 1
    [entry] = token_registry.requests("GET", path)
    assert (entry.status, entry.size, entry.path) == (200, layer.size, path)


def test_parse_access_log_ignores_json_lines() -> None:
    text = (
        '{"http.request.method":"GET","msg":"response completed"}\n'
        '127.0.0.1 - - [23/Nov/2026:15:00:52 +0000] "GET /v2/a/blobs/sha256:ab HTTP/1.1" 200 157 '
        '"" "curl/7.88.1"\n'
        '127.0.0.1 - - [23/Nov/2026:15:00:52 +0000] "HEAD /v2/ HTTP/1.1" 401 - "" "x \\"y\\""\n'
    )
    entries = parse_access_log(text)
    assert [(e.method, e.path, e.status, e.size) for e in entries] == [
        ("GET", "/v2/a/blobs/sha256:ab", 200, 157),
        ("HEAD", "/v2/", 401, 0),
    ]


def test_restartable_registry_survives_stop_start(restartable_registry: RegistryProcess) -> None:
    reg = restartable_registry
    assert reg.token_server is not None
    img = multi_layer_image(reg, None, "library/restart", "v1")
    port = reg.port
    reg.stop()
    assert not reg.running
    with pytest.raises(ConnectionRefusedError):
        http_request("127.0.0.1", port, "GET", "/v2/", {})
    reg.start()
    assert reg.port == port
    resp = UpstreamClient(reg, credentials=None).get_manifest(
        "library/restart", "v1", ALL_MANIFEST_TYPES
    )
    assert resp.status == 200 and resp.body == img.manifest
    assert reg.count("GET", "/v2/library/restart/manifests/v1") == 1


def test_outage_knobs_pause_and_token_server_restart(restartable_registry: RegistryProcess) -> None:
    reg, ts = restartable_registry, restartable_registry.token_server
    assert ts is not None
    reg.pause()  # hung upstream: connects, never answers
    with pytest.raises(TimeoutError):
        http_request("127.0.0.1", reg.port, "GET", "/v2/", {}, timeout=0.3)
    reg.resume()
    assert http_request("127.0.0.1", reg.port, "GET", "/v2/", {}).status == 401

    realm = ts.realm
    ts.stop()
    with pytest.raises(ConnectionRefusedError):
        http_request("127.0.0.1", ts.port, "GET", "/token", {})
    ts.start()
    assert ts.realm == realm
    ts.fail_status = 503
    assert http_request("127.0.0.1", ts.port, "GET", "/token", {}).status == 503


def test_images_are_deterministic_and_unpackable(
    tmp_path: Path, restartable_registry: RegistryProcess
) -> None:
    a, b = build_image("seed-1"), build_image("seed-1")
    assert a.manifest == b.manifest and a.digest == b.digest
    assert build_image("seed-2").digest != a.digest

    assert a.config is not None
    diff_ids = json.loads(a.config.read_bytes())["rootfs"]["diff_ids"]
    for layer, diff_id in zip(a.layers, diff_ids, strict=True):
        tar_bytes = gzip.decompress(layer.read_bytes())
        assert "sha256:" + hashlib.sha256(tar_bytes).hexdigest() == diff_id
        with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
            names = tar.getnames()
            assert names == sorted(names) and all(
                m.mtime == tar.getmember(names[0]).mtime for m in tar
            )

    # The streamed big-layer path, at a small size to stay fast.
    big = big_blob_image(
        restartable_registry, None, "library/big", "v1", size=3 * 1024 * 1024, workdir=tmp_path
    )
    [layer] = big.layers
    assert layer.path is not None and layer.path.stat().st_size == layer.size > 3 * 1024 * 1024
    resp = UpstreamClient(restartable_registry, credentials=None).get_blob(
        "library/big", layer.digest
    )
    assert resp.body == layer.read_bytes()
