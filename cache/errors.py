"""Storage errors. They carry no HTTP; `proxy` decides what a client sees.

CacheError
├── InvalidDigest       a string that is not an `algorithm:hex` digest we support
├── BlobNotFound        no such blob in the store
├── FillFailed          a fill in progress was abandoned (upstream error, disk error)
│   ├── DigestMismatch  the bytes did not hash to the digest asked for
│   └── SizeMismatch    more or fewer bytes than announced
├── DiskFull            no room on the disk for a file or an index write: nothing was stored
└── StoreClosed         the store was used after close()
"""

from __future__ import annotations

import errno

# What the kernel says when the disk (or the user's quota) has no room.
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


class CacheError(Exception):
    """Base of every storage error."""


class InvalidDigest(CacheError, ValueError):
    pass


class BlobNotFound(CacheError):
    pass


class FillFailed(CacheError):
    pass


class DigestMismatch(FillFailed):
    def __init__(self, expected: str, actual: str) -> None:
        super().__init__(f"content hashed to {actual}, not {expected}")
        self.expected = expected
        self.actual = actual


class SizeMismatch(FillFailed):
    def __init__(self, expected: int, actual: int) -> None:
        super().__init__(f"received {actual} bytes, expected {expected}")
        self.expected = expected
        self.actual = actual


class DiskFull(CacheError):
    pass


class StoreClosed(CacheError):
    pass
