"""`Range` headers, parsed strictly (RFC 9110 §14): one byte range or none at all.

A multi-range or malformed header is ignored (the full body is sent with 200), as the
RFC allows; a well-formed range that starts past the end is answered with 416.
"""

from __future__ import annotations

import re

from proxy.errors import RangeNotSatisfiable

# Eighteen digits keep every number an ordinary int well below 2**63.
_RANGE = re.compile(r"bytes=(\d{1,18})?-(\d{1,18})?")


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """[start, stop) to send, or None for the whole body. Raises RangeNotSatisfiable."""
    if header is None:
        return None
    match = _RANGE.fullmatch(header.strip())
    if match is None or (match[1] is None and match[2] is None):
        return None
    if match[1] is None:  # suffix: the last N bytes
        length = int(match[2])
        if length == 0 or size == 0:
            raise _unsatisfiable(size)
        return max(0, size - length), size
    start = int(match[1])
    end = int(match[2]) if match[2] is not None else None
    if end is not None and end < start:
        return None
    if start >= size:
        raise _unsatisfiable(size)
    return start, size if end is None else min(end + 1, size)


def _unsatisfiable(size: int) -> RangeNotSatisfiable:
    return RangeNotSatisfiable(detail={"size": size}, headers={"Content-Range": f"bytes */{size}"})
