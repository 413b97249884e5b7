"""A full disk or a spent budget never costs a client its download."""

from __future__ import annotations

import asyncio
import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fake_upstream.server import FakeUpstream, Fault
from tests.mirror import MakeMirror

REPO = "library/app"


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs: writes past it fail with ENOSPC, as on a full disk."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    mountpoint = tmp_path / "small"
    mountpoint.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mountpoint)], check=True)
    yield mountpoint
    subprocess.run(["umount", "-l", str(mountpoint)], check=True)


async def test_blob_larger_than_the_budget_is_passed_through(
    fake_upstream: FakeUpstream, make_mirror: MakeMirror
) -> None:
    data = os.urandom(3 * 1024 * 1024)
    digest = fake_upstream.add_blob(REPO, data)
    mirror = await make_mirror(
        [{"name": "docker.io", "url": fake_upstream.url, "default": True}],
        cache={"max_size": "1MiB"},
    )
    assert await mirror.fetch(f"/v2/app/blobs/{digest}") == data
    await mirror.fills_ended()
    assert digest not in mirror.stored_blobs()
    assert mirror.temp_files() == []
    assert await mirror.metric("pullthrough_disk_full_total") == 1


async def test_enospc_mid_download_still_serves_every_client_in_full(
    small_disk: Path, fake_upstream: FakeUpstream, make_mirror: MakeMirror
) -> None:
    data = os.urandom(8 * 1024 * 1024)  # twice the disk
    digest = fake_upstream.add_blob(REPO, data)
    gate = fake_upstream.set_fault(digest, Fault(gate_after=1024 * 1024))
    mirror = await make_mirror(
        [{"name": "docker.io", "url": fake_upstream.url, "default": True}],
        cache={"path": str(small_disk / "cache")},
    )
    path = f"/v2/app/blobs/{digest}"
    clients = [asyncio.create_task(mirror.fetch(path)) for _ in range(3)]
    await asyncio.wait_for(gate.gate_reached.wait(), 5)
    await asyncio.sleep(0.1)  # let all three join the one download
    gate.gate.set()

    assert await asyncio.gather(*clients) == [data] * 3
    assert fake_upstream.count("GET", f"/v2/{REPO}/blobs/{digest}") == 1
    await mirror.fills_ended()
    assert digest not in mirror.stored_blobs()
    assert mirror.temp_files() == []
    assert await mirror.metric("pullthrough_disk_full_total") == 1

    # The space came back: a small blob is cached as usual afterwards.
    small = os.urandom(100_000)
    small_digest = fake_upstream.add_blob(REPO, small)
    assert await mirror.fetch(f"/v2/app/blobs/{small_digest}") == small
    async with asyncio.timeout(5):
        while small_digest not in mirror.stored_blobs():  # noqa: ASYNC110 - disk poll
            await asyncio.sleep(0.01)


def fill_up(path: Path) -> None:
    """Write `path` until the file system has no room left."""
    with path.open("wb") as out:
        try:
            while True:
                out.write(b"\0" * 65536)
                out.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC


async def test_manifests_are_served_but_not_remembered_when_the_disk_is_full(
    small_disk: Path, fake_upstream: FakeUpstream, make_mirror: MakeMirror
) -> None:
    image = fake_upstream.add_image(REPO, "v1", layers=(os.urandom(100_000),))
    mirror = await make_mirror(
        [{"name": "docker.io", "url": fake_upstream.url, "default": True}],
        cache={"path": str(small_disk / "cache")},
    )
    filler = small_disk / "filler"
    fill_up(filler)

    accept = {"Accept": "application/vnd.oci.image.manifest.v1+json"}
    for path in ("/v2/app/manifests/v1", f"/v2/app/manifests/{image.manifest_digest}"):
        async with mirror.get(path, headers=accept) as response:
            assert response.status == 200, await response.text()
            assert await response.read() == image.manifest
        async with mirror.head(path, headers=accept) as response:
            assert response.status == 200
    assert await mirror.fetch(f"/v2/app/blobs/{image.layer_digests[0]}")
    assert await mirror.metric("pullthrough_disk_full_total") >= 3  # manifest, tag, blob

    # Room again: the tag's answer is remembered, and served without asking upstream.
    filler.unlink()
    async with mirror.get("/v2/app/manifests/v1", headers=accept) as response:
        assert response.status == 200
    fake_upstream.clear()
    async with mirror.get("/v2/app/manifests/v1", headers=accept) as response:
        assert await response.read() == image.manifest
    assert fake_upstream.requests == []
