"""podman 4.3 pulls through the mirror, configured as a ``[[registry.mirror]]``.

docker.io's mirror is the bare mirror host (the mirror's default upstream);
ghcr.io's is ``HOST/ghcr.io`` (path-prefix routing).  Each registry's own
location is a local 404-everything server, so a pull succeeds only through
the mirror, and any fallback shows up in ``podman.real_registry.requests``.
"""

from __future__ import annotations

import pytest

from tests.e2e.podman import Podman, podman
from tests.e2e.support import assert_mirror_logged_no_errors, assert_stored, start_mirror
from tests.mirror import MakeMirror, Mirror
from tests.upstream.fixtures import UpstreamImages
from tests.upstream.images import Blob
from tests.upstream.registry import RegistryProcess

__all__ = ["podman"]  # the fixture, for pytest to find in this module

LINUX_AMD64 = {"os": "linux", "architecture": "amd64"}


def use(podman: Podman, mirror: Mirror) -> None:
    podman.use_mirror({"docker.io": mirror.host, "ghcr.io": f"{mirror.host}/ghcr.io"})


def upstream_gets(registry: RegistryProcess, repo: str, blobs: list[Blob]) -> dict[str, int]:
    return {b.digest: registry.blob_gets(repo, b.digest) for b in blobs}


async def test_podman_pulls_ghcr_through_the_mirror_by_path_prefix(
    podman: Podman,
    make_mirror: MakeMirror,
    token_registry: RegistryProcess,
    plain_registry: RegistryProcess,
    pushed_images: UpstreamImages,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Same digests in both upstreams: only /v2/ghcr.io/... reaches plain_registry.
    image = pushed_images.plain_multi
    mirror = await start_mirror(make_mirror, token_registry, plain_registry)
    use(podman, mirror)
    ref = f"ghcr.io/{image.repo}:{image.tag}"
    before = upstream_gets(plain_registry, image.repo, image.blobs)
    at_default = upstream_gets(token_registry, image.repo, image.blobs)

    await podman.pull(ref)

    info = await podman.inspect(ref)
    assert info["Digest"] == image.digest
    assert f"{ref.split(':')[0]}@{image.digest}" in info["RepoDigests"]
    assert podman.real_registry.requests == []
    assert upstream_gets(plain_registry, image.repo, image.blobs) == {
        d: n + 1 for d, n in before.items()
    }
    assert upstream_gets(token_registry, image.repo, image.blobs) == at_default
    await assert_stored(mirror, {b.digest for b in image.blobs})
    assert_mirror_logged_no_errors(caplog)


async def test_podman_pulls_a_docker_hub_oci_index_through_the_mirror(
    podman: Podman,
    make_mirror: MakeMirror,
    token_registry: RegistryProcess,
    plain_registry: RegistryProcess,
    pushed_images: UpstreamImages,
    caplog: pytest.LogCaptureFixture,
) -> None:
    index = pushed_images.oci_index
    [amd64] = [c for c in index.children if c.image.platform == LINUX_AMD64]
    mirror = await start_mirror(make_mirror, token_registry, plain_registry)
    use(podman, mirror)
    ref = f"docker.io/{index.repo}:{index.tag}"
    once = {d: n + 1 for d, n in upstream_gets(token_registry, index.repo, amd64.blobs).items()}

    await podman.pull(ref, platform="linux/amd64")

    info = await podman.inspect(ref)
    assert info["Digest"] == index.digest
    assert info["Architecture"] == "amd64"
    assert f"docker.io/{index.repo}@{amd64.digest}" in info["RepoDigests"]
    assert upstream_gets(token_registry, index.repo, amd64.blobs) == once
    await assert_stored(mirror, {b.digest for b in amd64.blobs})

    # Again into empty local storage: every blob now comes from the mirror's cache.
    await podman.remove_image(ref)
    assert await podman.images() == []
    await podman.pull(ref, platform="linux/amd64")
    assert (await podman.inspect(ref))["Digest"] == index.digest
    assert upstream_gets(token_registry, index.repo, amd64.blobs) == once
    assert podman.real_registry.requests == []
    assert_mirror_logged_no_errors(caplog)


async def test_podman_pull_fails_when_the_mirror_cannot_serve_it(
    podman: Podman,
    make_mirror: MakeMirror,
    plain_registry: RegistryProcess,
) -> None:
    """What the mirror cannot serve, podman cannot pull (its fallback is a dead end)."""
    # plain_registry has library/multi only, and this mirror knows no ghcr.io.
    mirror = await start_mirror(make_mirror, plain_registry, None)
    use(podman, mirror)

    for ref, mirrored in [
        ("docker.io/library/ociindex:v1", f"{mirror.host}/library/ociindex:v1"),
        ("ghcr.io/library/multi:v1", f"{mirror.host}/ghcr.io/library/multi:v1"),
    ]:
        result = await podman.pull(ref, check=False)
        assert result.returncode != 0, result.describe()
        assert f"Mirrors also failed: [{mirrored}: reading manifest" in result.stderr, (
            result.describe()
        )
    assert await podman.images() == []
