"""Start-up reconciliation and fsck on a real store: the index and the files agree again."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from cache.digests import Digest
from cache.integrity import fsck, reconcile
from cache.store import Budget, Cache
from tests.cache.helpers import random_blob, store_blob

BUDGET = Budget(1 << 30, 0.9, 0.8)


async def opened(root: Path) -> Cache:
    cache = Cache(root, BUDGET)
    await cache.open()
    return cache


def blob_path(root: Path, digest: Digest) -> Path:
    return root / "blobs" / digest.algorithm / digest.hex[:2] / digest.hex


async def test_reconcile_after_a_crash(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    cache = await opened(root)
    kept = await store_blob(cache, random_blob(5000))
    lost = await store_blob(cache, random_blob(5000))
    await cache.close()

    # What a crash can leave: a temp file, a file renamed but never indexed, a row whose
    # file is gone, and (disk trouble) an unindexed file whose bytes are wrong.
    (root / "tmp" / "abc.1234.part").write_bytes(b"half a download")
    orphan_data = random_blob(7000)
    orphan = Digest.of(orphan_data)
    blob_path(root, orphan).parent.mkdir(parents=True, exist_ok=True)
    blob_path(root, orphan).write_bytes(orphan_data)
    rotten = Digest.of(b"what it should be")
    blob_path(root, rotten).parent.mkdir(parents=True, exist_ok=True)
    blob_path(root, rotten).write_bytes(b"what it is instead")
    blob_path(root, lost).unlink()

    cache = await opened(root)
    try:
        assert list((root / "tmp").iterdir()) == []
        report = await reconcile(cache)
        assert report.missing == [str(lost)]
        assert report.adopted == [str(orphan)]
        assert report.bad == [str(rotten)]
        assert await cache.index.digests() == {str(kept), str(orphan)}
        assert not blob_path(root, rotten).exists()
        assert (cache.used, cache.count) == (12000, 2)
        assert (await fsck(cache)).clean
    finally:
        await cache.close()


def flip_first_byte(path: Path) -> None:
    """Rot one byte. (Writing a fixed byte would change nothing one time in 256, when the
    random blob already starts with it, and the test would fail for no fault of fsck.)"""
    data = path.read_bytes()
    path.write_bytes(bytes([data[0] ^ 0xFF]) + data[1:])


async def test_fsck_finds_and_repairs_bit_rot(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    cache = await opened(root)
    good = await store_blob(cache, random_blob(3000))
    bad = await store_blob(cache, random_blob(3000))
    path = blob_path(root, bad)
    flip_first_byte(path)

    report = await fsck(cache)
    assert (report.checked, report.bad, report.missing) == (2, [str(bad)], [])
    report = await fsck(cache, repair=True)
    assert report.removed == [str(bad)]
    assert await cache.index.digests() == {str(good)}
    assert not path.exists()
    await cache.close()


async def run_cli(*args: str, cwd: Path) -> tuple[int | None, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", *args, cwd=cwd,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(process.communicate(), 60)
    return process.returncode, out.decode()


async def test_fsck_command(tmp_path: Path) -> None:
    root = tmp_path / "data"
    cache = await opened(root)
    bad = await store_blob(cache, random_blob(3000))
    await store_blob(cache, random_blob(3000))
    await cache.close()
    path = blob_path(root, bad)
    flip_first_byte(path)
    (tmp_path / "mirror.yaml").write_text(
        "cache: {path: ./data}\nupstreams: [{name: docker.io, url: 'http://127.0.0.1:9'}]\n"
    )

    code, out = await run_cli("fsck", cwd=tmp_path)
    assert code == 1
    assert f"BAD      {bad}" in out and "checked 2 blobs: 1 bad, 0 missing" in out
    code, out = await run_cli("fsck", "--repair", cwd=tmp_path)
    assert code == 0 and "removed 1" in out
    code, out = await run_cli("fsck", cwd=tmp_path)
    assert code == 0 and "checked 1 blobs: 0 bad, 0 missing" in out
