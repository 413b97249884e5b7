"""A pass-through fill (nothing goes to disk) and its readers, on real Fill objects."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from cache.digests import Digest
from cache.errors import FillFailed
from cache.fill import PASSTHROUGH_BUFFER, Fill, spans

MiB = 1 << 20
CHUNK = 512 * 1024


async def read_all(fill: Fill, size: int) -> bytes:
    got = bytearray()
    async for span in spans(0, size, fill):
        assert isinstance(span, bytes)  # pass-through: every byte comes from memory
        got += span
    return bytes(got)


async def test_a_reader_that_takes_nothing_is_dropped_and_holds_no_more_than_the_buffer(
    tmp_path: Path,
) -> None:
    data = os.urandom(4 * PASSTHROUGH_BUFFER)
    fill = Fill(Digest.of(data), -1, tmp_path / "none", stall_timeout=0.3)
    fill.go_passthrough()
    fill.start(len(data))
    stalled = fill.attach(0)  # a client whose socket is full: it never advances
    steady = asyncio.create_task(read_all(fill, len(data)))

    async def download() -> None:
        for start in range(0, len(data), CHUNK):
            await fill.append(data[start : start + CHUNK])
        fill.verify()

    downloading = asyncio.create_task(download())
    async with asyncio.timeout(5):
        while not downloading.done() and fill.written < PASSTHROUGH_BUFFER:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    await asyncio.sleep(0.1)  # well within the stall timeout: the download must be waiting
    assert not downloading.done()
    assert fill.written <= PASSTHROUGH_BUFFER + CHUNK  # what memory holds for the stalled one

    async with asyncio.timeout(5):  # then the stalled reader is dropped, the others go on
        await downloading
        assert await steady == data
    with pytest.raises(FillFailed, match="took nothing"):
        fill.advance(stalled, CHUNK)


async def test_a_download_whose_only_reader_stalls_fails_instead_of_waiting(
    tmp_path: Path,
) -> None:
    data = os.urandom(2 * PASSTHROUGH_BUFFER)
    fill = Fill(Digest.of(data), -1, tmp_path / "none", stall_timeout=0.2)
    fill.go_passthrough()
    fill.start(len(data))
    fill.attach(0)
    with pytest.raises(FillFailed, match="no client left"):
        async with asyncio.timeout(5):
            for start in range(0, len(data), CHUNK):
                await fill.append(data[start : start + CHUNK])
