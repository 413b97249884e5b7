"""Mapped reads of stored blob files (cache.fill.map_span), as the responses use them."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from cache.errors import FillFailed
from cache.fill import READ_CHUNK, map_span

SIZE = 3 * READ_CHUNK + READ_CHUNK // 2 + 123  # several chunks and a ragged end


@pytest.fixture
def stored(tmp_path: Path) -> Iterator[tuple[int, bytes]]:
    data = os.urandom(SIZE)
    path = tmp_path / "blob"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    yield fd, data
    os.close(fd)


@pytest.mark.parametrize(
    "start, length",
    [
        (0, SIZE),  # the whole file
        (1, 10),  # inside the first page, unaligned
        (4095, 4097),  # across a page boundary
        (READ_CHUNK - 1, 3),  # across a chunk boundary
        (READ_CHUNK + 5000, 2 * READ_CHUNK),  # unaligned start, several chunks
        (SIZE - 1, 1),  # the last byte
    ],
)
def test_views_hold_exactly_the_span(stored: tuple[int, bytes], start: int, length: int) -> None:
    fd, data = stored
    views = list(map_span(fd, (start, length)))
    assert b"".join(bytes(v) for v in views) == data[start : start + length]
    assert all(len(v) <= READ_CHUNK for v in views)


def test_a_view_kept_after_its_pages_were_dropped_still_reads_right(
    stored: tuple[int, bytes],
) -> None:
    # A transport may hold a view until it is sent (Python 3.12+ does), after map_span
    # has dropped its pages from our page tables: it must still read the file's bytes.
    fd, data = stored
    views = list(map_span(fd, (0, SIZE)))
    assert len(views) > 1
    assert bytes(views[0]) == data[:READ_CHUNK]
    assert bytes(views[-1][-100:]) == data[-100:]


def test_a_file_shorter_than_the_span_is_refused_before_mapping(
    stored: tuple[int, bytes],
) -> None:
    fd, _ = stored
    with pytest.raises(FillFailed, match="expected"):
        next(map_span(fd, (SIZE - 10, 11)))
