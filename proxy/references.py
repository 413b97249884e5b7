"""Strict parsing of what a client names: repositories, tags and digests.

Everything is checked here, before any filesystem or upstream access. The grammars are
the OCI distribution spec's.
"""

from __future__ import annotations

import re

from cache.digests import Digest
from cache.errors import InvalidDigest
from proxy.errors import DigestInvalid, NameInvalid, TagInvalid

MAX_NAME_LENGTH = 255
_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
_NAME = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")


def check_repository(name: str) -> str:
    if len(name) > MAX_NAME_LENGTH or not _NAME.fullmatch(name):
        raise NameInvalid(detail={"name": name[:MAX_NAME_LENGTH]})
    return name


def parse_digest(text: str) -> Digest:
    try:
        return Digest.parse(text)
    except InvalidDigest:
        raise DigestInvalid(detail={"digest": text[:150]}) from None


def parse_reference(text: str) -> str | Digest:
    """A manifest reference: a Digest when it has a colon, else a validated tag."""
    if ":" in text:
        return parse_digest(text)
    if not _TAG.fullmatch(text):
        raise TagInvalid(detail={"tag": text[:150]})
    return text
