"""Upstream authentication: `WWW-Authenticate` challenges, Basic credentials, and bearer
tokens (fetched from the token service a challenge names, and cached until they expire).
Credentials are the configured `username`/`password`, or a credential helper's answer
(`proxy.credentials`), which is asked again, once, when upstream refuses it.

The shapes seen in the wild, all handled by one parser:

    Docker Hub  Bearer realm="https://auth.docker.io/token",service="registry.docker.io",
                       scope="repository:library/alpine:pull"
    GHCR        Bearer realm="https://ghcr.io/token",service="ghcr.io",scope="repository:o/r:pull"
    Quay        Bearer realm="https://quay.io/v2/auth",service="quay.io"      (no scope)
    others      Basic realm="Registry"
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from yarl import URL

from proxy.breaker import CircuitBreaker
from proxy.coalesce import Expiring
from proxy.config import UpstreamConfig
from proxy.credentials import CredentialHelpers, Credentials
from proxy.errors import (
    RegistryError,
    Unauthorized,
    UpstreamBadResponse,
    UpstreamServerError,
    UpstreamUnavailable,
)
from proxy.metrics import Metrics
from proxy.upstream_connections import UpstreamConnections
from proxy.upstream_status import status_error

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


def basic_authorization(upstream: UpstreamConfig, helped: Credentials | None = None) -> str | None:
    """`Basic ...` for a helper's answer `helped`, else for the upstream's configured
    credentials, if it has any. An identity token is no password: it buys tokens only."""
    if helped is not None:
        if helped.identity_token:
            return None
        return aiohttp.encode_basic_auth(helped.username, helped.secret.reveal())
    if upstream.username is None or upstream.password is None:
        return None
    return aiohttp.encode_basic_auth(upstream.username, upstream.password.reveal())


class TokenCache(Expiring[str]):
    """Bearer tokens by key, each kept until its own expiry, and for at least
    MIN_TOKEN_LIFETIME; one fetch per key at a time."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, maxsize: int = 4096) -> None:
        super().__init__(clock, maxsize)

    async def get_or_fetch(
        self, key: Hashable, fetch: Callable[[], Awaitable[tuple[str, float]]]
    ) -> str:
        """A cached token, or one fetched by `fetch` -> (token, expires_in seconds)."""

        async def at_least_the_minimum() -> tuple[str, float]:
            value, expires_in = await fetch()
            return value, max(expires_in, MIN_TOKEN_LIFETIME)

        return await super().get_or_fetch(key, at_least_the_minimum)


class TokenFetcher:
    """Fetches bearer tokens from the token service a challenge names (the Docker token
    spec), with each upstream's TLS settings and timeouts. Every fetch is counted in
    `token_fetches`; a failed one is also handed to `count_error`, the client's one
    counter of upstream errors.

    The token service (for Docker Hub, another host) sits behind the upstream's breaker:
    a dead one would otherwise cost every request its full timeout. Its refused
    connections, timeouts and 5xx are upstream-wide signals; a token it hands out says
    nothing about the registry, so it doesn't close the breaker (a probe it carried is
    released, and the registry request after it probes).

    With a credential helper, a 401 from the token service runs the helper again and
    retries once: its answer may have been rotated since it was kept. A helper that fails
    raises before any request, so it moves no breaker and counts no upstream error."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        metrics: Metrics,
        count_error: Callable[[UpstreamConfig, RegistryError], None],
        pool: UpstreamConnections,
        breaker: Callable[[UpstreamConfig], CircuitBreaker],
        helpers: CredentialHelpers,
    ) -> None:
        self.helpers = helpers
        self.session = session
        self.metrics = metrics
        self.count_error = count_error
        self.pool = pool
        self.breaker = breaker

    async def fetch(
        self, upstream: UpstreamConfig, challenge: Challenge, scope: str | None
    ) -> tuple[str, float]:
        """A token for `scope` -> (token, expires_in seconds)."""
        helped = await self.helpers.get(upstream)
        try:
            return await self._fetch_once(upstream, challenge, scope, helped)
        except Unauthorized:
            if helped is None:
                raise
        self.helpers.refused(upstream, helped)
        helped = await self.helpers.get(upstream)
        return await self._fetch_once(upstream, challenge, scope, helped)

    async def basic(self, upstream: UpstreamConfig) -> str | None:
        """`Basic ...` for the upstream's credentials, from its helper if it has one."""
        return basic_authorization(upstream, await self.helpers.get(upstream))

    def basic_refused(self, upstream: UpstreamConfig, sent: str) -> None:
        """Upstream refused Basic `sent`: if that was the helper's answer, the next
        `basic` runs the helper again."""
        kept = self.helpers.kept(upstream)
        if kept is not None and basic_authorization(upstream, kept) == sent:
            self.helpers.refused(upstream, kept)

    async def _fetch_once(
        self,
        upstream: UpstreamConfig,
        challenge: Challenge,
        scope: str | None,
        helped: Credentials | None,
    ) -> tuple[str, float]:
        request = _token_request(upstream, challenge, scope, helped)
        breaker = self.breaker(upstream)
        with breaker.attempt():
            try:
                token = await self._request(upstream, request)
            except RegistryError as error:
                self.metrics.token_fetches.labels(upstream.name, "error").inc()
                self.count_error(upstream, error)
                if isinstance(error, UpstreamServerError):
                    breaker.failure()
                elif isinstance(error, UpstreamUnavailable):
                    breaker.failure(unreachable=True)
                raise
        self.metrics.token_fetches.labels(upstream.name, "ok").inc()
        return token

    async def _request(self, upstream: UpstreamConfig, request: TokenRequest) -> tuple[str, float]:
        timeout, ssl_context = self.pool.timeout(upstream), self.pool.ssl_context(upstream)
        try:
            async with self.session.request(
                request.method,
                request.url,
                headers=request.headers,
                data=request.form,
                timeout=timeout,
                ssl=ssl_context,
            ) as response:
                return await _read_token(upstream, response)
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise UpstreamUnavailable(
                f"token service of {upstream.name} unreachable: {type(exc).__name__}"
            ) from None


@dataclass(frozen=True)
class TokenRequest:
    method: str
    url: URL
    headers: dict[str, str] = field(default_factory=dict, repr=False)
    form: dict[str, str] | None = field(default=None, repr=False)


def _token_request(
    upstream: UpstreamConfig, challenge: Challenge, scope: str | None, helped: Credentials | None
) -> TokenRequest:
    """The token spec's `GET` (anonymous or Basic), or for an identity token its OAuth2
    form: `POST` with `grant_type=refresh_token`, as Docker sends one."""
    realm = URL(challenge.realm or "")
    if realm.scheme not in ("http", "https"):
        raise UpstreamBadResponse(f"upstream {upstream.name} sent an unusable token realm")
    asked: dict[str, str] = {}
    if "service" in challenge.params:
        asked["service"] = challenge.params["service"]
    # The request's own scope first: a remembered challenge names the repository of the
    # request that drew it, and a token for that one would be refused for this one.
    wanted = scope or challenge.params.get("scope")
    if wanted:
        asked["scope"] = wanted
    if helped is not None and helped.identity_token:
        form = {"grant_type": "refresh_token", "client_id": "pullthrough", **asked}
        form["refresh_token"] = helped.secret.reveal()
        return TokenRequest("POST", realm, form=form)
    query = {**realm.query, **asked}
    headers = {}
    basic = basic_authorization(upstream, helped)
    if basic is not None:
        headers["Authorization"] = basic
        query["account"] = helped.username if helped is not None else upstream.username or ""
    return TokenRequest("GET", realm.with_query(query), headers)


async def _read_token(
    upstream: UpstreamConfig, response: aiohttp.ClientResponse
) -> tuple[str, float]:
    if response.status in (401, 403):
        raise Unauthorized(f"upstream {upstream.name}'s token service refused us")
    if response.status != 200:
        raise status_error(upstream, response)
    body = await response.read()
    try:
        data: Any = json.loads(body)
        token = data.get("token") or data.get("access_token")
        expires_in = float(data.get("expires_in") or 0)
    except (ValueError, AttributeError, TypeError):
        token = None
    if not isinstance(token, str) or not token:
        raise UpstreamBadResponse(f"token service of {upstream.name} sent no token")
    return token, expires_in
