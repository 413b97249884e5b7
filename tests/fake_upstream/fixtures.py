"""pytest fixtures for the fake upstream.

Import into ``tests/conftest.py`` with
``from tests.fake_upstream.fixtures import *``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Any

import pytest_asyncio

from .server import FakeUpstream

__all__ = ["MakeFakeUpstream", "fake_upstream", "make_fake_upstream"]

MakeFakeUpstream = Callable[..., Awaitable[FakeUpstream]]


@pytest_asyncio.fixture
async def fake_upstream() -> AsyncIterator[FakeUpstream]:
    """A started FakeUpstream without auth, closed at teardown."""
    async with FakeUpstream() as upstream:
        yield upstream


@pytest_asyncio.fixture
async def make_fake_upstream() -> AsyncIterator[MakeFakeUpstream]:
    """Factory: ``up = await make_fake_upstream(auth="ghcr", ...)``.

    Keyword arguments go to :class:`FakeUpstream`; every upstream made is
    closed at teardown, most recent first.
    """
    # The exit stack closes every upstream even if closing one fails.
    async with AsyncExitStack() as stack:

        async def make(**kwargs: Any) -> FakeUpstream:
            upstream: FakeUpstream = await stack.enter_async_context(FakeUpstream(**kwargs))
            return upstream

        yield make
