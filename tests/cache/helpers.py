"""Putting content into a real Cache the way the proxy does: through a fill."""

from __future__ import annotations

import os

from cache.digests import Digest
from cache.store import Cache


async def store_blob(cache: Cache, data: bytes, repo: str = "library/app") -> Digest:
    digest = Digest.of(data)
    fill = cache.begin_fill(digest)
    fill.start(len(data))
    await fill.append(data)
    await cache.commit_fill(fill, "docker.io", repo)
    return digest


def random_blob(size: int) -> bytes:
    return os.urandom(size)
