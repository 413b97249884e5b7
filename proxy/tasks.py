"""Work that belongs to the app rather than to a request."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

log = logging.getLogger("pullthrough.tasks")


class BackgroundTasks:
    """Tasks the app owns: they outlive the request that started them (a fill keeps going
    when its client disconnects) and are cancelled, and awaited, at shutdown."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        if self._closed:
            coro.close()
            raise RuntimeError("the app is shutting down")
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._finished)
        return task

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task %r failed", task.get_name(), exc_info=task.exception())

    def __len__(self) -> int:
        return len(self._tasks)

    async def close(self, grace: float = 10.0) -> None:
        """Cancel every task and wait for them, `grace` seconds at most: a task that
        ignores its cancellation is reported, not waited for forever."""
        self._closed = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if not tasks:
            return
        _, stuck = await asyncio.wait(tasks, timeout=grace)
        for task in stuck:
            log.error("background task %r did not stop when cancelled", task.get_name())
