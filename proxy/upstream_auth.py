"""Upstream authentication: `WWW-Authenticate` challenges and a cache of bearer tokens.

The shapes seen in the wild, all handled by one parser:

    Docker Hub  Bearer realm="https://auth.docker.io/token",service="registry.docker.io",
                       scope="repository:library/alpine:pull"
    GHCR        Bearer realm="https://ghcr.io/token",service="ghcr.io",scope="repository:o/r:pull"
    Quay        Bearer realm="https://quay.io/v2/auth",service="quay.io"      (no scope)
    others      Basic realm="Registry"
"""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field

from cachetools import TLRUCache

from proxy.coalesce import Coalescer

# RFC 9110 token and quoted-string; a challenge is `scheme` followed by `k=v` pairs.
_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_QUOTED = r'"(?:[^"\\]|\\.)*"'
_SCHEME = re.compile(rf"\s*,?\s*({_TOKEN})(?:\s+|$)")
_PARAM = re.compile(rf"\s*,?\s*({_TOKEN})\s*=\s*({_QUOTED}|{_TOKEN})\s*")
_UNESCAPE = re.compile(r"\\(.)")

MIN_TOKEN_LIFETIME = 60.0  # the token spec's default, and a floor against tiny expires_in


@dataclass(frozen=True)
class Challenge:
    scheme: str  # lowercase: "bearer" or "basic"
    params: dict[str, str] = field(default_factory=dict)

    @property
    def realm(self) -> str | None:
        return self.params.get("realm")


def parse_challenges(header: str) -> list[Challenge]:
    """Every challenge in one `WWW-Authenticate` value; malformed parts are skipped."""
    challenges: list[Challenge] = []
    pos = 0
    while pos < len(header):
        scheme = _SCHEME.match(header, pos)
        if scheme is None:
            break
        pos = scheme.end()
        params: dict[str, str] = {}
        while (param := _PARAM.match(header, pos)) is not None:
            value = param[2]
            if value.startswith('"'):
                value = _UNESCAPE.sub(r"\1", value[1:-1])
            params[param[1].lower()] = value
            pos = param.end()
        challenges.append(Challenge(scheme[1].lower(), params))
    return challenges


def pick_challenge(headers: list[str]) -> Challenge | None:
    """Prefer Bearer over Basic, the way Docker's client does."""
    found = [c for header in headers for c in parse_challenges(header)]
    for scheme in ("bearer", "basic"):
        for challenge in found:
            if challenge.scheme == scheme:
                return challenge
    return None


@dataclass(frozen=True, slots=True)
class Token:
    value: str
    expires_at: float


class TokenCache:
    """Bearer tokens by key, each kept until its own expiry; one fetch per key at a time."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, maxsize: int = 4096) -> None:
        self.clock = clock
        self._tokens: TLRUCache[Hashable, Token] = TLRUCache(
            maxsize, ttu=lambda _key, token, _now: token.expires_at, timer=clock
        )
        self._fetching: Coalescer[str] = Coalescer()

    def get(self, key: Hashable) -> str | None:
        token = self._tokens.get(key)
        return token.value if token is not None else None

    def drop(self, key: Hashable) -> None:
        self._tokens.pop(key, None)

    async def get_or_fetch(
        self, key: Hashable, fetch: Callable[[], Awaitable[tuple[str, float]]]
    ) -> str:
        """A cached token, or one fetched by `fetch` -> (token, expires_in seconds).

        Concurrent callers for one key share one fetch.
        """
        cached = self.get(key)
        if cached is not None:
            return cached

        async def fetch_and_keep() -> str:
            value, expires_in = await fetch()
            lifetime = max(expires_in, MIN_TOKEN_LIFETIME)
            self._tokens[key] = Token(value, self.clock() + lifetime)
            return value

        return await self._fetching.run(key, fetch_and_keep)
