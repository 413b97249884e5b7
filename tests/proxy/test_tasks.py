"""The app's background tasks: cancelled and awaited at shutdown, never waited for forever."""

from __future__ import annotations

import asyncio
import logging

import pytest

from proxy.tasks import BackgroundTasks


async def test_close_cancels_and_awaits_every_task() -> None:
    tasks = BackgroundTasks()
    sleepers = [tasks.spawn(asyncio.sleep(3600), name=f"sleeper {n}") for n in range(3)]
    await tasks.close()
    assert all(task.cancelled() for task in sleepers)
    assert len(tasks) == 0
    with pytest.raises(RuntimeError, match="shutting down"):
        tasks.spawn(asyncio.sleep(0), name="too late")


async def test_a_task_that_ignores_its_cancellation_does_not_hold_shutdown(
    caplog: pytest.LogCaptureFixture,
) -> None:
    released = asyncio.Event()

    async def stubborn() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            await released.wait()  # swallows the cancel, as a buggy task might

    tasks = BackgroundTasks()
    task = tasks.spawn(stubborn(), name="stubborn")
    await asyncio.sleep(0)
    async with asyncio.timeout(5):
        await tasks.close(grace=0.2)
    assert not task.done()
    assert "'stubborn' did not stop when cancelled" in caplog.text
    assert any(r.levelno == logging.ERROR for r in caplog.records)
    released.set()
    await task
