"""One in-flight call per key: concurrent callers for the same key share its result
(`Coalescer`); and on top of it, results kept until their own deadline (`Expiring`)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from cachetools import TLRUCache

T = TypeVar("T")


class Coalescer(Generic[T]):
    def __init__(self) -> None:
        self._pending: dict[Hashable, asyncio.Future[T]] = {}

    async def run(self, key: Hashable, call: Callable[[], Awaitable[T]]) -> T:
        pending = self._pending.get(key)
        if pending is not None:
            # shield: a follower that gives up must not cancel the leader's call.
            return await asyncio.shield(pending)
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._pending[key] = future
        try:
            result = await call()
            future.set_result(result)
            return result
        except asyncio.CancelledError:
            future.cancel()
            raise
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved here: there may be no followers to do it
            raise
        finally:
            del self._pending[key]


@dataclass(frozen=True, slots=True)
class Kept(Generic[T]):
    value: T = field(repr=False)  # a token or a password: never in a log line
    until: float


class Expiring(Generic[T]):
    """Values by key, each kept until its own deadline, at most `maxsize` of them (the
    least recently used go first); one fetch per key at a time."""

    def __init__(self, clock: Callable[[], float], maxsize: int = 4096) -> None:
        self.clock = clock
        self._kept: TLRUCache[Hashable, Kept[T]] = TLRUCache(
            maxsize, ttu=lambda _key, kept, _now: kept.until, timer=clock
        )
        self._fetching: Coalescer[T] = Coalescer()

    def get(self, key: Hashable) -> T | None:
        kept = self._kept.get(key)
        return kept.value if kept is not None else None

    def drop(self, key: Hashable, value: T | None = None) -> None:
        """Forget `key`'s value; given `value`, only if that is still the one kept (a
        newer one is left alone)."""
        kept = self._kept.get(key)
        if kept is not None and (value is None or kept.value is value):
            del self._kept[key]

    async def get_or_fetch(
        self, key: Hashable, fetch: Callable[[], Awaitable[tuple[T, float]]]
    ) -> T:
        """The value kept for `key`, or the one `fetch` returns with its lifetime in
        seconds. Concurrent callers for one key share one fetch."""
        cached = self.get(key)
        if cached is not None:
            return cached

        async def fetch_and_keep() -> T:
            value, lifetime = await fetch()
            self._kept[key] = Kept(value, self.clock() + lifetime)
            return value

        return await self._fetching.run(key, fetch_and_keep)
