"""kill -9 during concurrent fills, then a restart: the cache comes back clean.

The mirror runs as a real subprocess (`python -m proxy serve`) so that SIGKILL hits it
as it would in production; the fake upstream feeds it slowly so fills are mid-way.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest

from tests.fake_upstream.server import FakeUpstream, Fault
from tests.mirror_process import MirrorProcess, mirror_processes

REPO = "library/app"


@pytest.fixture
async def mirror_process(
    tmp_path: Path, fake_upstream: FakeUpstream
) -> AsyncIterator[Callable[[], MirrorProcess]]:
    async with mirror_processes(tmp_path, fake_upstream.url) as make:
        yield make


async def pull(url: str) -> bytes:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        response.raise_for_status()
        return await response.read()


@pytest.mark.parametrize("kill_after", [0.1, 0.3, 0.6])
async def test_sigkill_during_concurrent_fills_restarts_clean(
    fake_upstream: FakeUpstream, mirror_process: Callable[[], MirrorProcess], kill_after: float
) -> None:
    blobs = {fake_upstream.add_blob(REPO, os.urandom(n * 300_000)): n for n in range(1, 7)}
    contents = {d: fake_upstream._content[d] for d in blobs}
    digests = list(blobs)
    # The first two arrive at once; the others trickle, so they are mid-fill at the kill.
    for digest in digests[2:]:
        fake_upstream.set_fault(digest, Fault(chunk_size=16_384, delay=0.01))

    mirror = mirror_process()
    await mirror.start()
    for digest in digests[:2]:
        assert await pull(f"{mirror.url}/v2/app/blobs/{digest}") == contents[digest]
    clients = [
        asyncio.create_task(pull(f"{mirror.url}/v2/app/blobs/{digest}"))
        for digest in digests[2:]
        for _ in range(2)
    ]
    await asyncio.sleep(kill_after)
    assert mirror.temp_files, "fills should be in progress at the kill"
    await mirror.kill()
    results = await asyncio.gather(*clients, return_exceptions=True)
    wanted = [contents[d] for d in digests[2:] for _ in range(2)]
    for result, expected in zip(results, wanted, strict=True):
        # Finished before the kill, or cut off by it: never a short or wrong body.
        assert result == expected or isinstance(result, aiohttp.ClientError)
    assert any(isinstance(r, aiohttp.ClientError) for r in results)

    fake_upstream.clear_faults()
    restarted = mirror_process()
    await restarted.start()
    assert restarted.temp_files == []
    for digest in digests:
        data = await pull(f"{restarted.url}/v2/app/blobs/{digest}")
        assert "sha256:" + hashlib.sha256(data).hexdigest() == digest
    # The two blobs committed before the kill were served from disk after the restart.
    assert all(fake_upstream.count("GET", f"/v2/{REPO}/blobs/{d}") == 1 for d in digests[:2])
    await restarted.kill()

    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "fsck", "--config", "mirror.yaml",
        cwd=restarted.workdir, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, _ = await process.communicate()
    assert process.returncode == 0, out
    assert "0 bad, 0 missing" in out.decode()
