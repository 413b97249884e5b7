"""containerd (ctr 1.6) pulls through the mirror, configured with hosts.toml (``?ns=``)."""

from __future__ import annotations

import pytest

from tests.e2e.containerd import Containerd, containerd
from tests.e2e.support import assert_mirror_logged_no_errors, assert_stored, start_mirror
from tests.mirror import MakeMirror, Mirror
from tests.upstream.fixtures import UpstreamImages
from tests.upstream.images import Blob, PushedImage
from tests.upstream.registry import RegistryProcess

__all__ = ["containerd"]  # the fixture, for pytest to find in this module


def pulled_blobs(image: PushedImage, platform: str | None) -> list[Blob]:
    """Config and layer blobs a pull for ``platform`` (None: all platforms) fetches."""
    if not image.children or platform is None:
        return image.blobs
    return child_for(image, platform).blobs


def child_for(index: PushedImage, platform: str) -> PushedImage:
    os_, arch = platform.split("/")
    [child] = [c for c in index.children if c.image.platform == {"os": os_, "architecture": arch}]
    return child


def upstream_gets(registry: RegistryProcess, repo: str, blobs: list[Blob]) -> dict[str, int]:
    return {b.digest: registry.blob_gets(repo, b.digest) for b in blobs}


async def pull_remove_pull(
    containerd: Containerd,
    mirror: Mirror,
    ref: str,
    image: PushedImage,
    upstream: RegistryProcess,
    platform: str | None,
) -> None:
    """Pull, check, remove content from containerd, pull again: no new upstream blob GETs."""
    hosts = containerd.hosts_dir(mirror.host)
    blobs = pulled_blobs(image, platform)
    digests = {b.digest for b in blobs}
    before = upstream_gets(upstream, image.repo, blobs)

    await containerd.pull(ref, hosts, platform=platform)
    assert (await containerd.images())[ref] == image.digest
    assert digests <= await containerd.content()
    # A pull-through cache fetches each blob from upstream exactly once.
    assert upstream_gets(upstream, image.repo, blobs) == {d: n + 1 for d, n in before.items()}
    await assert_stored(mirror, digests)

    await containerd.remove_image(ref)
    assert ref not in await containerd.images()
    assert not digests & await containerd.content(), "gc left content behind"

    await containerd.pull(ref, hosts, platform=platform)
    assert (await containerd.images())[ref] == image.digest
    assert digests <= await containerd.content()
    assert upstream_gets(upstream, image.repo, blobs) == {d: n + 1 for d, n in before.items()}


@pytest.mark.parametrize(
    ("kind", "platform"),
    [
        ("multi", "linux/amd64"),  # Docker schema2, 3 layers
        ("oci_index", None),  # OCI index, both children (--all-platforms)
        ("docker_list", "linux/amd64"),  # Docker manifest list, one child
    ],
)
async def test_containerd_pulls_docker_hub_images_through_the_mirror(
    kind: str,
    platform: str | None,
    containerd: Containerd,
    make_mirror: MakeMirror,
    token_registry: RegistryProcess,
    plain_registry: RegistryProcess,
    pushed_images: UpstreamImages,
    caplog: pytest.LogCaptureFixture,
) -> None:
    image: PushedImage = getattr(pushed_images, kind)
    mirror = await start_mirror(make_mirror, token_registry, plain_registry)
    ref = f"docker.io/{image.repo}:{image.tag}"

    await pull_remove_pull(containerd, mirror, ref, image, token_registry, platform)

    assert_mirror_logged_no_errors(caplog)


async def test_containerd_pulls_ghcr_through_the_mirror_by_namespace(
    containerd: Containerd,
    make_mirror: MakeMirror,
    token_registry: RegistryProcess,
    plain_registry: RegistryProcess,
    pushed_images: UpstreamImages,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # library/multi:v1 has the same digests in both upstreams; only ?ns=ghcr.io
    # can make the mirror fetch it from plain_registry.
    image = pushed_images.plain_multi
    mirror = await start_mirror(make_mirror, token_registry, plain_registry)
    ref = f"ghcr.io/{image.repo}:{image.tag}"
    at_default = upstream_gets(token_registry, image.repo, image.blobs)

    await pull_remove_pull(containerd, mirror, ref, image, plain_registry, "linux/amd64")

    assert upstream_gets(token_registry, image.repo, image.blobs) == at_default
    assert_mirror_logged_no_errors(caplog)


async def test_containerd_pull_fails_when_the_mirror_cannot_serve_it(
    containerd: Containerd,
    make_mirror: MakeMirror,
    plain_registry: RegistryProcess,
    pushed_images: UpstreamImages,
) -> None:
    """containerd talks to the mirror only: what the mirror cannot serve, it cannot pull."""
    # plain_registry has library/multi only, and this mirror knows no ghcr.io.
    mirror = await make_mirror([{"name": "docker.io", "url": plain_registry.url, "default": True}])
    hosts = containerd.hosts_dir(mirror.host)

    for ref in ("docker.io/library/ociindex:v1", "ghcr.io/library/multi:v1"):
        result = await containerd.pull(ref, hosts, check=False)
        assert result.returncode != 0, result.describe()
        assert "not found" in result.stderr, result.describe()
    assert await containerd.images() == {}
    assert pushed_images.oci_index.digest not in await containerd.content()
