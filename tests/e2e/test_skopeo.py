"""skopeo pulls through the mirror from the real registry (token auth), and the digests
match upstream's: by tag and by digest, by default route and by path prefix."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest

from tests.e2e.skopeo import copy_to_dir, manifest_digest, raw_manifest, verify_dir
from tests.e2e.support import start_mirror
from tests.mirror import MakeMirror, Mirror
from tests.secrets import SECRET
from tests.upstream.fixtures import UpstreamImages
from tests.upstream.images import PushedImage, multi_layer_image, push_blob
from tests.upstream.registry import RegistryProcess

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"


async def mirror_of(make_mirror: MakeMirror, registry: RegistryProcess) -> Mirror:
    # Two names for one real registry: the default route and a path-prefix route.
    return await start_mirror(make_mirror, registry, registry)


def references(mirror: Mirror, image: PushedImage) -> list[str]:
    short = image.repo.removeprefix("library/")
    return [
        f"{mirror.host}/{short}:{image.tag}",
        f"{mirror.host}/{image.repo}@{image.digest}",
        f"{mirror.host}/ghcr.io/{image.repo}:{image.tag}",
        f"{mirror.host}/ghcr.io/{image.repo}@{image.digest}",
    ]


@pytest.mark.parametrize("kind", ["multi", "oci_index", "docker_list"])
async def test_skopeo_copies_each_image_kind_with_upstream_digests(
    pushed_images: UpstreamImages,
    token_registry: RegistryProcess,
    make_mirror: MakeMirror,
    tmp_path: Path,
    kind: str,
) -> None:
    image: PushedImage = getattr(pushed_images, kind)
    mirror = await mirror_of(make_mirror, token_registry)
    for n, reference in enumerate(references(mirror, image)):
        assert await raw_manifest(reference) == image.manifest, reference
        dest = await copy_to_dir(reference, tmp_path / f"copy{n}", all_images=True)
        assert manifest_digest(dest) == image.digest, reference
        assert set(verify_dir(dest)) >= {blob.digest for blob in image.blobs}
    assert {blob.digest for blob in image.blobs} <= mirror.stored_blobs()
    assert image.digest in mirror.stored_blobs()


async def test_a_second_pull_is_served_from_the_cache(
    pushed_images: UpstreamImages,
    token_registry: RegistryProcess,
    make_mirror: MakeMirror,
    tmp_path: Path,
) -> None:
    image = pushed_images.multi
    mirror = await mirror_of(make_mirror, token_registry)
    await copy_to_dir(f"{mirror.host}/multi:v1", tmp_path / "first")
    before = {b.digest: token_registry.blob_gets(image.repo, b.digest) for b in image.blobs}
    await copy_to_dir(f"{mirror.host}/multi@{image.digest}", tmp_path / "second")
    after = {b.digest: token_registry.blob_gets(image.repo, b.digest) for b in image.blobs}
    assert after == before
    assert manifest_digest(tmp_path / "second") == image.digest


async def test_accept_decides_the_answer_never_the_cached_type(
    pushed_images: UpstreamImages, token_registry: RegistryProcess, make_mirror: MakeMirror
) -> None:
    mirror = await mirror_of(make_mirror, token_registry)
    listing, index = pushed_images.docker_list, pushed_images.oci_index
    await raw_manifest(f"{mirror.host}/dockerlist:v1")  # caches the list for this tag
    await raw_manifest(f"{mirror.host}/ociindex:v1")  # and the index for this one

    old_client = {"Accept": DOCKER_MANIFEST}
    async with mirror.get("/v2/dockerlist/manifests/v1", headers=old_client) as response:
        assert response.status == 200
        assert response.content_type == DOCKER_MANIFEST
        amd64 = next(
            c
            for c in listing.children
            if c.image.platform is not None and c.image.platform["architecture"] == "amd64"
        )
        assert await response.read() == amd64.manifest
    async with mirror.get("/v2/ociindex/manifests/v1", headers=old_client) as response:
        # Upstream has only an OCI index for this tag, which this client can't take.
        assert response.status == 404
    async with mirror.get("/v2/ociindex/manifests/v1") as response:
        assert response.headers["Docker-Content-Digest"] == index.digest


async def test_eight_clients_one_upstream_get_for_a_cold_50mb_blob(
    big_image: PushedImage, token_registry: RegistryProcess, make_mirror: MakeMirror
) -> None:
    layer = big_image.layers[0]
    assert layer.path is not None
    expected = hashlib.sha256(layer.path.read_bytes()).hexdigest()
    mirror = await mirror_of(make_mirror, token_registry)
    before = token_registry.blob_gets(big_image.repo, layer.digest)

    async def client() -> str:
        # Separate sessions: separate connections, as separate machines would have.
        async with aiohttp.ClientSession() as session:
            url = f"{mirror.url}/v2/big/blobs/{layer.digest}"
            async with session.get(url) as response:
                assert response.status == 200
                digest = hashlib.sha256()
                async for chunk in response.content.iter_chunked(1 << 20):
                    digest.update(chunk)
                return digest.hexdigest()

    assert await asyncio.gather(*(client() for _ in range(8))) == [expected] * 8
    assert token_registry.blob_gets(big_image.repo, layer.digest) - before == 1


async def test_corrupt_blob_upstream_leaves_nothing_cached(
    registry_factory: Callable[..., RegistryProcess], make_mirror: MakeMirror
) -> None:
    registry = registry_factory(auth=False)
    data = bytes(range(256)) * 4096
    blob = push_blob(registry, None, "library/victim", data)
    stored = registry.blob_path(blob.digest)
    stored.write_bytes(data[:-1] + b"\x00")  # same length, last byte wrong
    mirror = await make_mirror([{"name": "docker.io", "url": registry.url, "default": True}])

    with pytest.raises(aiohttp.ClientPayloadError):
        async with mirror.get(f"/v2/victim/blobs/{blob.digest}") as response:
            await response.read()
    await mirror.fills_ended()
    assert blob.digest not in mirror.stored_blobs()
    assert mirror.temp_files() == []


async def test_upstream_credentials_buy_tokens_from_the_real_token_server(
    registry_factory: Callable[..., RegistryProcess], make_mirror: MakeMirror, tmp_path: Path
) -> None:
    registry = registry_factory(auth=True)
    assert registry.token_server is not None
    image = multi_layer_image(registry, registry.token_server, "private/app", "v1")
    registry.token_server.require_auth = True  # anonymous pulls are refused from now on
    registry.token_server.clear_requests()

    entry = {"name": "docker.io", "url": registry.url, "default": True}
    anonymous = await make_mirror([entry])
    async with anonymous.get("/v2/private/app/manifests/v1") as response:
        assert response.status == 401
        assert (await response.json())["errors"][0]["code"] == "UNAUTHORIZED"

    registry.token_server.users = {**registry.token_server.users, "robot": SECRET}
    mirror = await make_mirror([{**entry, "username": "robot", "password": SECRET}])
    dest = await copy_to_dir(f"{mirror.host}/private/app:v1", tmp_path / "copy")
    assert manifest_digest(dest) == image.digest
    outcomes = {(r.username, r.status) for r in registry.token_server.requests}
    assert outcomes == {(None, 401), ("robot", 200)}
