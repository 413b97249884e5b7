"""skopeo pulls a cached image from a mirror started with `offline: true`: every byte comes
from the cache, the upstream registry (still running, so it could answer) sees nothing,
and an image that isn't cached fails with 503, not as "no such image"."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.skopeo import copy_to_dir, manifest_digest, verify_dir
from tests.mirror_process import MirrorProcess
from tests.upstream.fixtures import UpstreamImages
from tests.upstream.registry import RegistryProcess


async def test_skopeo_pulls_a_cached_image_from_an_offline_mirror(
    pushed_images: UpstreamImages, token_registry: RegistryProcess, tmp_path: Path
) -> None:
    image = pushed_images.multi
    online = MirrorProcess(tmp_path, token_registry.url)
    offline: MirrorProcess | None = None
    try:
        await online.start()
        host = f"127.0.0.1:{online.port}"
        await copy_to_dir(f"{host}/multi:v1", tmp_path / "first")
        assert await online.terminate() == 0

        offline = MirrorProcess(tmp_path, token_registry.url, "offline: true\n")
        await offline.start()
        asked = len(token_registry.requests())
        host = f"127.0.0.1:{offline.port}"
        dest = await copy_to_dir(f"{host}/multi:v1", tmp_path / "second")
        assert manifest_digest(dest) == image.digest
        assert set(verify_dir(dest)) == {blob.digest for blob in image.blobs}
        # skopeo shows the status, not the OCI message (that one: tests/proxy/test_offline.py).
        with pytest.raises(AssertionError, match="503 Service Unavailable"):
            await copy_to_dir(f"{host}/ociindex:v1", tmp_path / "cold")
        assert len(token_registry.requests()) == asked
        assert await offline.terminate() == 0
    finally:
        for mirror in (online, offline):
            if mirror is not None and mirror.process and mirror.process.returncode is None:
                await mirror.kill()
