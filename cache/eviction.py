"""Eviction: least-recently-used under a size budget, plus a time-to-live.

    trigger                                        what goes
    usage above high_watermark * max_size          least recent first, down to low_watermark
    a download that would not fit in max_size      least recent first, until it fits
    not accessed for blob_ttl                      everything that old, whatever the size

Victims come from `blobs_by_last_access` in small batches, so choosing them stays cheap
with millions of rows. Fills in progress are not in the index and can't be chosen; a
client still reading an evicted file keeps its fd and finishes normally.

One pass runs at a time: two passes choosing from the same least-recent rows would
evict the same blobs twice, and a download could count room that another pass is about
to give to a different one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from cache.fill import Fill
from cache.index import BlobRow
from cache.store import Cache

log = logging.getLogger("pullthrough.eviction")

BATCH = 500
EvictionHook = Callable[[str, int, int], None]  # (reason, blobs, bytes)


class Evictor:
    def __init__(
        self,
        cache: Cache,
        blob_ttl: float,
        clock: Callable[[], float] = time.time,
        on_evict: EvictionHook | None = None,
    ) -> None:
        self.cache = cache
        self.blob_ttl = blob_ttl
        self.clock = clock
        self.on_evict = on_evict
        self._lock = asyncio.Lock()

    async def run_once(self) -> dict[str, int]:
        """One pass: TTL first, then size. Returns blobs evicted by reason."""
        async with self._lock:
            await self._refresh()
            removed = {"ttl": await self._expire(), "size": 0}
            budget = self.cache.budget
            if self.cache.used > budget.max_size * budget.high_watermark:
                removed["size"] = await self._shrink_to(budget.keeps, "size")
            return removed

    async def make_room(self, fill: Fill, size: int) -> None:
        """Before a download: evict so it fits, or pass it through uncached if it can't.

        The fill's size is reserved at once, before any wait, so downloads starting
        together each see the others' room as taken."""
        fill.size = size
        if self._fits():
            return
        async with self._lock:
            await self._refresh()
            room = self.cache.budget.max_size - self.cache.reserved()
            if not self._fits() and room >= 0:  # else even an empty cache would not do
                await self._shrink_to(room, "size")
            if not self._fits():
                fill.go_passthrough()

    def _fits(self) -> bool:
        return self.cache.used + self.cache.reserved() <= self.cache.budget.max_size

    async def _refresh(self) -> None:
        """Flush access times, and recount: `pullthrough evict` or `gc` may have changed
        the cache from outside this process."""
        await self.cache.flush_access()
        await self.cache.recount()

    async def run_forever(self, interval: float = 60.0) -> None:
        """The app's background task: a pass every `interval`, or when the cache asks."""
        while True:
            # Not asyncio.wait_for: on Python 3.11 a cancel that arrives as the event fires
            # is swallowed, and the app's shutdown would wait for this loop forever.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await self.cache.over_budget.wait()
            self.cache.over_budget.clear()
            try:
                await self.run_once()
            except Exception:
                log.exception("eviction pass failed; retrying in %ss", interval)

    async def _expire(self) -> int:
        cutoff = self.clock() - self.blob_ttl
        total = 0
        while rows := await self.cache.index.least_recent(BATCH, before=cutoff):
            total += await self._evict(rows, "ttl")
        return total

    async def shrink_to(self, target: int, reason: str = "size") -> int:
        """Evict least recently used content until at most `target` bytes are left."""
        async with self._lock:
            await self._refresh()
            return await self._shrink_to(target, reason)

    async def _shrink_to(self, target: int, reason: str) -> int:
        total = 0
        while self.cache.used > target:
            rows = await self.cache.index.least_recent(BATCH)
            if not rows:
                break
            victims, freed = [], 0
            for row in rows:
                if self.cache.used - freed <= target:
                    break
                victims.append(row)
                freed += row.size
            total += await self._evict(victims, reason)
        return total

    async def _evict(self, rows: list[BlobRow], reason: str) -> int:
        """Remove rows; count and return only those this pass removed."""
        removed = await self.cache.remove(rows)
        if not removed:
            return 0
        size = sum(row.size for row in removed)
        log.info("evicted %d blobs (%d bytes) by %s", len(removed), size, reason)
        if self.on_evict is not None:
            self.on_evict(reason, len(removed), size)
        return len(removed)
