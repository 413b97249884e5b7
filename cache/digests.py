"""Content digests, validated before any path on disk is built from one."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

from cache.errors import InvalidDigest

# The OCI spec registers sha256 and sha512; hex must be lowercase so that one blob has
# exactly one name (and one path) in the store.
_HEX_LENGTH = {"sha256": 64, "sha512": 128}
_DIGEST = re.compile(r"(sha256|sha512):([0-9a-f]+)")


@dataclass(frozen=True, slots=True)
class Digest:
    algorithm: str
    hex: str

    @classmethod
    def parse(cls, text: str) -> Digest:
        match = _DIGEST.fullmatch(text)
        if match is None or len(match[2]) != _HEX_LENGTH[match[1]]:
            raise InvalidDigest(f"not a sha256 or sha512 digest: {text[:150]!r}")
        return cls(match[1], match[2])

    @classmethod
    def of(cls, data: bytes, algorithm: str = "sha256") -> Digest:
        return cls(algorithm, hashlib.new(algorithm, data).hexdigest())

    def hasher(self) -> Any:
        return hashlib.new(self.algorithm)

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"
