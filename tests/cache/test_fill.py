"""A pass-through fill (nothing goes to disk) and its readers, on real Fill objects."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from cache.digests import Digest
from cache.errors import FillFailed
from cache.fill import PASSTHROUGH_BUFFER, Fill, spans
from cache.store import Budget, Cache

MiB = 1 << 20
CHUNK = 512 * 1024


async def read_all(fill: Fill, size: int) -> bytes:
    got = bytearray()
    reader = fill.attach(0)
    try:
        async for span in spans(0, size, fill, reader):
            assert isinstance(span, bytes)  # pass-through: every byte comes from memory
            got += span
    finally:
        fill.detach(reader)
    return bytes(got)


def passthrough_fill(tmp_path: Path, data: bytes, stall_timeout: float) -> Fill:
    """A fill with no file behind it (the disk was full at its start), started."""
    fill = Fill(Digest.of(data), -1, tmp_path / "none", stall_timeout=stall_timeout)
    fill.go_passthrough()
    fill.start(len(data))
    return fill


async def test_a_reader_that_takes_nothing_is_dropped_and_holds_no_more_than_the_buffer(
    tmp_path: Path,
) -> None:
    data = os.urandom(4 * PASSTHROUGH_BUFFER)
    fill = passthrough_fill(tmp_path, data, stall_timeout=0.3)
    stalled = fill.attach(0)  # a client whose socket is full: it never advances
    steady = asyncio.create_task(read_all(fill, len(data)))

    async def download() -> None:
        for start in range(0, len(data), CHUNK):
            await fill.append(data[start : start + CHUNK])
        fill.verify()

    downloading = asyncio.create_task(download())
    # Until the stalled reader is dropped, the download must wait for it: look at every
    # step of the fill, up to that later event, rather than at one moment after a sleep.
    loop = asyncio.get_running_loop()
    held, held_since = -1, loop.time()
    async with asyncio.timeout(5):
        while stalled not in fill._dropped:
            assert not downloading.done()
            assert fill.written <= PASSTHROUGH_BUFFER + CHUNK  # what memory holds for it
            if fill.written != held:
                held, held_since = fill.written, loop.time()
            await fill.wait_change()
    assert held == PASSTHROUGH_BUFFER + CHUNK  # the download stopped there, full...
    assert loop.time() - held_since >= 0.25  # ...until the stall timeout (0.3 s) dropped it

    async with asyncio.timeout(5):  # then the stalled reader is dropped, the others go on
        await downloading
        assert await steady == data
    with pytest.raises(FillFailed, match="took nothing"):
        fill.advance(stalled, CHUNK)


async def test_a_download_whose_only_reader_stalls_fails_instead_of_waiting(
    tmp_path: Path,
) -> None:
    data = os.urandom(2 * PASSTHROUGH_BUFFER)
    fill = passthrough_fill(tmp_path, data, stall_timeout=0.2)
    fill.attach(0)
    with pytest.raises(FillFailed, match="no client left"):
        async with asyncio.timeout(5):
            for start in range(0, len(data), CHUNK):
                await fill.append(data[start : start + CHUNK])


async def test_a_reader_that_joined_keeps_its_bytes_until_it_starts_reading(
    tmp_path: Path,
) -> None:
    """A client joins a download, then takes its time to start (its response headers are
    still being sent, say) while the download has turned pass-through: every byte must
    still be there for it."""
    cache = Cache(tmp_path / "cache", Budget(1 << 30, 0.9, 0.8))
    await cache.open()
    try:
        data = os.urandom(2 * PASSTHROUGH_BUFFER)
        fill = cache.begin_fill(Digest.of(data))
        joined = cache.open_blob(fill.digest)
        assert joined is not None and joined.fill is fill
        fill.go_passthrough()
        fill.start(len(data))

        async def download() -> bool:
            for start in range(0, len(data), CHUNK):
                await fill.append(data[start : start + CHUNK])
            return await cache.commit_fill(fill, "docker.io", "library/app")

        downloading = asyncio.create_task(download())
        # The reader has not started: at the buffer's end the download must wait for it,
        # not fail. It decides in the step that appends the chunk that fills the buffer,
        # so once that chunk is in, the decision is made and `done()` shows it.
        async with asyncio.timeout(5):
            while fill.written < PASSTHROUGH_BUFFER + CHUNK and not downloading.done():
                await fill.wait_change()
        assert not downloading.done()
        assert fill.written == PASSTHROUGH_BUFFER + CHUNK
        got = bytearray()
        async with asyncio.timeout(5):
            async for span in spans(0, len(data), joined.fill, joined.reader):
                assert isinstance(span, bytes)
                got += span
            assert await downloading is False  # served, not stored
        assert got == data
        joined.close()
    finally:
        await cache.close()
