"""The mirror under test, served in-process on a real loopback socket."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest_asyncio
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from cache.store import Cache
from proxy.app import make_app
from proxy.config import Config, parse_config
from proxy.keys import CACHE
from proxy.tls import server_context

__all__ = ["FakeClock", "MakeMirror", "Mirror", "fills_ended", "make_mirror", "samples"]


class FakeClock:
    """An injected wall clock that moves only when a test says so."""

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Mirror:
    url: str
    host: str
    app: web.Application
    config: Config
    clock: FakeClock
    session: aiohttp.ClientSession

    @property
    def cache_dir(self) -> Path:
        return self.config.cache.path

    def stored_blobs(self) -> set[str]:
        """Digests of every committed file in the store."""
        root = self.cache_dir / "blobs"
        return {f"{p.parent.parent.name}:{p.name}" for p in root.glob("*/*/*") if p.is_file()}

    async def wait_committed(self, *digests: str) -> None:
        """Blobs are committed just after their last byte is sent: wait until they are
        renamed into the store and indexed."""
        index = self.app[CACHE].index
        async with asyncio.timeout(5):
            for digest in digests:
                while await index.get_blob(digest) is None:  # noqa: ASYNC110 - polling SQLite
                    await asyncio.sleep(0.01)

    async def fetch(self, path: str) -> bytes:
        """GET a body that must be there (200)."""
        async with self.get(path) as response:
            assert response.status == 200, (path, response.status)
            return await response.read()

    async def fills_ended(self) -> None:
        await fills_ended(self.app[CACHE])

    async def metrics(self) -> dict[str, float]:
        """Every sample of /metrics, keyed as the text format writes them (labels sorted):
        `pullthrough_evictions_total{reason="size"}`."""
        async with self.get("/metrics") as response:
            return samples(await response.text())

    async def metric(self, sample: str) -> float:
        """One sample of /metrics, e.g. `pullthrough_evictions_total{reason="size"}`."""
        value = (await self.metrics()).get(sample)
        if value is None:
            raise AssertionError(f"{sample} not exported")
        return value

    async def lookups(self, kind: str, result: str, upstream: str = "docker.io") -> float:
        """`pullthrough_cache_requests_total` for one kind, result and upstream."""
        labels = f'kind="{kind}",result="{result}",upstream="{upstream}"'
        return await self.metric(f"pullthrough_cache_requests_total{{{labels}}}")

    def temp_files(self) -> list[Path]:
        return list((self.cache_dir / "tmp").iterdir())

    def get(self, path: str, **kwargs: Any) -> AbstractAsyncContextManager[aiohttp.ClientResponse]:
        return self.session.get(self.url + path, **kwargs)

    def head(self, path: str, **kwargs: Any) -> AbstractAsyncContextManager[aiohttp.ClientResponse]:
        return self.session.head(self.url + path, **kwargs)


MakeMirror = Callable[..., Awaitable[Mirror]]


async def fills_ended(cache: Cache) -> None:
    """Wait until no download is in flight, so that an absence checked next is final.

    Bytes reach blobs/ only through a fill, and a fill counts in `fills_in_progress` until
    it has committed, turned pass-through (its temp file unlinked, never to be committed)
    or been abandoned (its temp file unlinked). Once the count is 0, a blob that is not
    stored never will be, and tmp/ holds nothing of the fills that ended; a sleep instead
    would let a commit that is merely slow pass as one that never happens.
    """
    async with asyncio.timeout(5):
        while cache.fills_in_progress:  # noqa: ASYNC110 - fills end in background tasks
            await asyncio.sleep(0.01)


def samples(text: str) -> dict[str, float]:
    """Prometheus text, parsed by prometheus_client's own parser."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            found[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return found


def upstream_entry(name: str, url: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "url": url, **extra}


@pytest_asyncio.fixture
async def make_mirror(tmp_path: Path) -> AsyncIterator[MakeMirror]:
    """Factory: `mirror = await make_mirror([{"name": ..., "url": ...}], cache={...})`."""
    runners: list[web.AppRunner] = []
    sessions: list[aiohttp.ClientSession] = []

    async def make(upstreams: list[dict[str, Any]], **raw: Any) -> Mirror:
        cache = {"path": str(tmp_path / f"cache{len(runners)}"), **raw.pop("cache", {})}
        config = parse_config({"upstreams": upstreams, "cache": cache, **raw}, env={})
        clock = FakeClock()
        app = make_app(config, clock=clock)
        runner = web.AppRunner(app, handle_signals=False, keepalive_timeout=config.client_timeout)
        await runner.setup()
        runners.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_context(config))
        await site.start()
        host, port = runner.addresses[0][:2]
        session = aiohttp.ClientSession(auto_decompress=False)
        sessions.append(session)
        return Mirror(f"http://{host}:{port}", f"{host}:{port}", app, config, clock, session)

    yield make
    for session in sessions:
        await session.close()
    for runner in reversed(runners):
        await runner.cleanup()
