"""Starting and stopping the mirror many times leaks no files, threads or tasks.

Each cycle does what a restart does in production: open the cache (index, reconcile,
evictor, sendfile threads, upstream session), answer a manifest from upstream, fill a
blob from upstream, send it again from its file, and shut everything down.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import aiohttp
from aiohttp import web

from proxy.app import make_app
from proxy.config import Config, parse_config
from proxy.keys import CACHE
from tests.fake_upstream.server import FakeUpstream
from tests.mirror import fills_ended

REPO = "library/app"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
WARM_UP = 5  # cycles before the baseline: first-use imports and caches
CYCLES = 50

Snapshot = dict[str, Counter[str]]


def in_use() -> Snapshot:
    """Open fds (by what they point to), threads and tasks (by name)."""
    fds: Counter[str] = Counter()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the fd listdir itself used, closed by now
            fds[os.readlink(f"/proc/self/fd/{fd}")] += 1
    return {
        "fds": fds,
        "threads": Counter(t.name for t in threading.enumerate()),
        "tasks": Counter(t.get_name() for t in asyncio.all_tasks()),
    }


def counts(snapshot: Snapshot) -> dict[str, int]:
    return {kind: sum(found.values()) for kind, found in snapshot.items()}


async def settled(limit: Snapshot) -> Snapshot:
    """What is in use once no count is above `limit`'s, or after 2 s if that never comes.

    Shutdown ends a few things a moment after `runner.cleanup()` returns: aiosqlite's
    worker thread exits after the index closes (it is not joined), closed sockets leave
    /proc a loop iteration later, and the fake upstream's handlers end after the mirror
    has hung up. No event tells when; a real leak never goes back, so it fails here.
    """
    wanted = counts(limit)
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(2):
            while any(counts(in_use())[k] > wanted[k] for k in wanted):  # noqa: ASYNC110 - /proc
                await asyncio.sleep(0.01)
    return in_use()


def started_executor() -> ThreadPoolExecutor:
    """A default executor for the loop with every worker already started.

    asyncio's own starts a worker whenever a call finds none idle, up to its max_workers,
    and keeps it for the loop's life: that growth would read as a leak. This one is sized
    the same and never grows; `asyncio.Runner` shuts it down with the loop."""
    workers = min(32, (os.cpu_count() or 1) + 4)
    executor = ThreadPoolExecutor(workers, thread_name_prefix="asyncio")
    everyone = threading.Barrier(workers, timeout=5)  # each call holds its worker till all do
    for started in [executor.submit(everyone.wait) for _ in range(workers)]:
        started.result()
    return executor


async def cycle(config: Config, upstream: FakeUpstream, n: int) -> None:
    """Start the mirror on a real socket, make it use the upstream and the cache, stop it."""
    layer = os.urandom(64 * 1024 + n)  # a new blob each time: a miss, then a hit
    image = upstream.add_image(REPO, f"v{n}", layers=(layer,))
    app = make_app(config)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        host, port = runner.addresses[0][:2]
        url = f"http://{host}:{port}/v2/app"
        async with aiohttp.ClientSession() as session:
            headers = {"Accept": OCI_MANIFEST}
            async with session.get(f"{url}/manifests/v{n}", headers=headers) as response:
                assert (response.status, await response.read()) == (200, image.manifest)
            blob = f"{url}/blobs/{image.layer_digests[0]}"
            async with session.get(blob) as response:  # filled from upstream
                assert (response.status, await response.read()) == (200, layer)
            await fills_ended(app[CACHE])
            async with session.get(blob) as response:  # sent from the file
                assert (response.status, await response.read()) == (200, layer)
    finally:
        await runner.cleanup()


async def test_fifty_restarts_leak_no_fds_threads_or_tasks(
    fake_upstream: FakeUpstream, tmp_path: Path
) -> None:
    asyncio.get_running_loop().set_default_executor(started_executor())
    config = parse_config(
        {
            "upstreams": [{"name": "docker.io", "url": fake_upstream.url, "default": True}],
            "cache": {"path": str(tmp_path / "cache")},
        },
        env={},
    )
    start = in_use()
    for n in range(WARM_UP):
        await cycle(config, fake_upstream, n)
    before = await settled(start)
    for n in range(WARM_UP, WARM_UP + CYCLES):
        await cycle(config, fake_upstream, n)
    after = await settled(before)

    grown = {kind: after[kind] - before[kind] for kind in after}
    assert counts(after) == counts(before), f"in use after {CYCLES} restarts: {grown}"
