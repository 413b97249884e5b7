"""A real Docker daemon (dockerd 20.10, ``registry-mirrors``) pulls docker.io images through
the mirror from the real token-auth registry.

docker.io itself is unreachable here, so a pull can only succeed through the mirror; the
mirror's store holding the layers afterwards shows that it did.
"""

from __future__ import annotations

import json
import platform

from tests.e2e.docker import Dockerd, StartDockerd, start_dockerd
from tests.mirror import MakeMirror, Mirror
from tests.upstream.fixtures import UpstreamImages
from tests.upstream.images import PushedImage
from tests.upstream.registry import RegistryProcess

__all__ = ["start_dockerd"]  # the fixture, for pytest to find in this module

GOARCH = {"x86_64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(
    platform.machine(), platform.machine()
)


async def inspect(dockerd: Dockerd, reference: str) -> dict[str, object]:
    out = await dockerd.docker("image", "inspect", "--format", "{{json .}}", reference)
    result: dict[str, object] = json.loads(out)
    return result


async def repo_digests(dockerd: Dockerd, reference: str) -> set[str]:
    out = await dockerd.docker("image", "inspect", "--format", "{{json .RepoDigests}}", reference)
    return {entry.split("@", 1)[1] for entry in json.loads(out)}


def upstream_blob_gets(registry: RegistryProcess, image: PushedImage) -> dict[str, int]:
    return {b.digest: registry.blob_gets(image.repo, b.digest) for b in image.blobs}


def this_platform(listing: PushedImage) -> PushedImage:
    """The child of ``listing`` that dockerd on this machine picks (linux/GOARCH)."""
    (child,) = [
        c for c in listing.children if (c.image.platform or {}).get("architecture") == GOARCH
    ]
    return child


def short_id(digest: str) -> str:
    return digest.removeprefix("sha256:")[:12]


async def test_docker_pulls_docker_io_images_through_the_mirror(
    pushed_images: UpstreamImages,
    token_registry: RegistryProcess,
    make_mirror: MakeMirror,
    start_dockerd: StartDockerd,
) -> None:
    mirror: Mirror = await make_mirror(
        [{"name": "docker.io", "url": token_registry.url, "default": True}]
    )
    dockerd = await start_dockerd(mirror.host)
    multi = pushed_images.multi
    assert multi.config is not None

    # docker.io/library/multi:v1 -> the mirror (registry-mirrors) -> token_registry.
    await dockerd.docker("pull", "multi:v1")
    assert await repo_digests(dockerd, "multi:v1") == {multi.digest}
    assert (await inspect(dockerd, "multi:v1"))["Id"] == multi.config.digest
    assert {b.digest for b in multi.blobs} <= mirror.stored_blobs()

    # A manifest list: Docker takes this machine's platform; RepoDigests names the list.
    listing = pushed_images.docker_list
    await dockerd.docker("pull", "dockerlist:v1")
    assert await repo_digests(dockerd, "dockerlist:v1") == {listing.digest}
    child = this_platform(listing)
    assert child.config is not None
    assert (await inspect(dockerd, "dockerlist:v1"))["Id"] == child.config.digest
    assert {b.digest for b in child.blobs} <= mirror.stored_blobs()

    # Forget the image entirely, pull again: every layer is downloaded anew, and all of
    # them come from the mirror's cache, none from upstream.
    await dockerd.docker("rmi", "multi:v1")
    left = await dockerd.docker("image", "ls", "--format", "{{.Repository}}")
    assert left.split() == ["dockerlist"], left
    before = upstream_blob_gets(token_registry, multi)
    assert all(before.values()), before
    output = await dockerd.docker("pull", "multi:v1")
    for layer in multi.layers:
        assert f"{short_id(layer.digest)}: Pull complete" in output, output
    assert await repo_digests(dockerd, "multi:v1") == {multi.digest}
    assert upstream_blob_gets(token_registry, multi) == before
