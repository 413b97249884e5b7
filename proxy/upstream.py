"""HTTP to the upstream registries: auth, redirects, timeouts, and error mapping.

One `UpstreamClient` per process, around the one `aiohttp.ClientSession`. It answers
challenges itself, so callers just ask for a path in a repository. Three rules keep
credentials where they belong:
- the client's own `Authorization` is never forwarded (callers pass only what they choose);
- upstream credentials and tokens never appear in errors or logs;
- `Authorization` is never sent on a redirect to another origin (Docker Hub and Quay
  redirect blob downloads to CDNs with signed URLs).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import ssl
import time
from collections.abc import Callable, Mapping
from typing import Any

import aiohttp
from yarl import URL

from proxy.breaker import CircuitBreaker
from proxy.config import UpstreamConfig
from proxy.errors import (
    Denied,
    RegistryError,
    Unauthorized,
    UpstreamBadResponse,
    UpstreamRateLimited,
    UpstreamServerError,
    UpstreamUnavailable,
)
from proxy.metrics import Metrics
from proxy.tls import upstream_ssl
from proxy.upstream_auth import Challenge, TokenCache, pick_challenge

log = logging.getLogger("pullthrough.upstream")

MAX_REDIRECTS = 5
# Connections to each upstream kept for everything but blob downloads (manifests, tokens,
# HEADs, listings): a quarter of the pool, at least one and at most this many.
RESERVED_CONNECTIONS = 4
LOW_RATELIMIT = 10  # pulls left at which a warning is logged
_REDIRECTS = {301, 302, 303, 307, 308}


class UpstreamClient:
    """Requests to any configured upstream, authenticated as that upstream asks."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        metrics: Metrics,
        tokens: TokenCache | None = None,
        clock: Callable[[], float] = time.monotonic,
        connections: int = 32,
    ) -> None:
        self.session = session
        self.connections = connections
        self.metrics = metrics
        self.tokens = tokens or TokenCache()
        self.clock = clock
        self._challenges: dict[str, Challenge] = {}
        self._breakers: dict[str, CircuitBreaker] = {}
        self._ssl_contexts: dict[str, ssl.SSLContext | bool] = {}
        self._download_slots: dict[str, asyncio.Semaphore] = {}

    def download_slot(self, upstream: UpstreamConfig) -> asyncio.Semaphore:
        """Held for a whole blob download. Downloads get the pool less a reserve, so the
        other requests to this upstream never queue behind them (a download may stall for
        as long as its slowest client allows)."""
        if upstream.name not in self._download_slots:
            reserve = min(RESERVED_CONNECTIONS, self.connections // 4) or 1
            self._download_slots[upstream.name] = asyncio.Semaphore(
                max(1, self.connections - reserve)
            )
        return self._download_slots[upstream.name]

    def _ssl(self, upstream: UpstreamConfig) -> ssl.SSLContext | bool:
        if upstream.name not in self._ssl_contexts:
            self._ssl_contexts[upstream.name] = upstream_ssl(upstream)
        return self._ssl_contexts[upstream.name]

    def breaker(self, upstream: UpstreamConfig) -> CircuitBreaker:
        if upstream.name not in self._breakers:
            breaker = CircuitBreaker(upstream.name, clock=self.clock)
            self._breakers[upstream.name] = breaker
            self.metrics.watch_breaker(breaker)
        return self._breakers[upstream.name]

    def check(
        self, upstream: UpstreamConfig, response: aiohttp.ClientResponse, not_found: RegistryError
    ) -> None:
        """Map a non-2xx upstream answer to the error a client should see (releasing it)."""
        if 200 <= response.status < 300:
            return
        response.release()
        if response.status == 404:
            raise not_found
        error = _status_error(upstream, response)
        if response.status < 500 and response.status != 429:  # 5xx, 429: counted in _send
            self.count_error(upstream, error)
        raise error

    def count_error(self, upstream: UpstreamConfig, error: RegistryError) -> None:
        self.metrics.upstream_errors.labels(upstream.name, _error_class(error)).inc()

    async def request(
        self,
        upstream: UpstreamConfig,
        method: str,
        path: str,
        *,
        repo: str | None = None,
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
    ) -> aiohttp.ClientResponse:
        """Send one request, answering one auth challenge. The caller releases the response.

        Raises `UpstreamUnavailable` when upstream can't be reached or times out.
        """
        url = URL(upstream.url + path)
        if params:
            url = url.with_query(params)
        scope = f"repository:{repo}:pull" if repo else None
        sent_auth = await self._known_authorization(upstream, scope)
        response = await self._send(upstream, method, url, headers, sent_auth)
        if response.status != 401:
            return response
        challenge = pick_challenge(response.headers.getall("WWW-Authenticate", []))
        if challenge is None:
            return response
        response.release()
        self._challenges[upstream.name] = challenge
        if sent_auth is not None:
            # A cached token that upstream now refuses (expired early, revoked): drop it.
            self.tokens.drop((upstream.name, scope))
        authorization = await self._authorize(upstream, challenge, scope)
        if authorization is None:
            raise Unauthorized(f"upstream {upstream.name} requires credentials")
        return await self._send(upstream, method, url, headers, authorization)

    async def _known_authorization(self, upstream: UpstreamConfig, scope: str | None) -> str | None:
        """Authorization we can send up front, because this upstream challenged us before."""
        challenge = self._challenges.get(upstream.name)
        if challenge is None:
            return None
        return await self._authorize(upstream, challenge, scope)

    async def _authorize(
        self, upstream: UpstreamConfig, challenge: Challenge, scope: str | None
    ) -> str | None:
        if challenge.scheme == "basic":
            return _basic(upstream)
        if challenge.scheme != "bearer" or not challenge.realm:
            return None
        token = await self.tokens.get_or_fetch(
            (upstream.name, scope), lambda: self._fetch_token(upstream, challenge, scope)
        )
        return f"Bearer {token}"

    async def _fetch_token(
        self, upstream: UpstreamConfig, challenge: Challenge, scope: str | None
    ) -> tuple[str, float]:
        realm = URL(challenge.realm or "")
        if realm.scheme not in ("http", "https"):
            raise UpstreamBadResponse(f"upstream {upstream.name} sent an unusable token realm")
        query: dict[str, str] = dict(realm.query)
        if "service" in challenge.params:
            query["service"] = challenge.params["service"]
        wanted = challenge.params.get("scope") or scope
        if wanted:
            query["scope"] = wanted
        headers = {}
        basic = _basic(upstream)
        if basic is not None:
            headers["Authorization"] = basic
            query["account"] = upstream.username or ""
        try:
            token = await self._request_token(upstream, realm.with_query(query), headers)
        except RegistryError as error:
            self.metrics.token_fetches.labels(upstream.name, "error").inc()
            self.count_error(upstream, error)
            raise
        self.metrics.token_fetches.labels(upstream.name, "ok").inc()
        return token

    async def _request_token(
        self, upstream: UpstreamConfig, url: URL, headers: dict[str, str]
    ) -> tuple[str, float]:
        try:
            async with self.session.get(
                url, headers=headers, timeout=_timeout(upstream), ssl=self._ssl(upstream)
            ) as response:
                if response.status in (401, 403):
                    raise Unauthorized(f"upstream {upstream.name}'s token service refused us")
                if response.status != 200:
                    raise _status_error(upstream, response)
                body = await response.read()
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise UpstreamUnavailable(
                f"token service of {upstream.name} unreachable: {type(exc).__name__}"
            ) from None
        return _parse_token(upstream, body)

    async def _send(
        self,
        upstream: UpstreamConfig,
        method: str,
        url: URL,
        headers: Mapping[str, str] | None,
        authorization: str | None,
    ) -> aiohttp.ClientResponse:
        origin = url.origin()
        breaker = self.breaker(upstream)
        for _ in range(MAX_REDIRECTS + 1):
            sent = dict(headers or {})
            if authorization is not None and url.origin() == origin:
                sent["Authorization"] = authorization
            breaker.before_request()
            started = time.perf_counter()
            try:
                response = await self.session.request(
                    method,
                    url,
                    headers=sent,
                    allow_redirects=False,
                    timeout=_timeout(upstream),
                    ssl=self._ssl(upstream),
                )
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                # Refused, or no answer within the timeouts: mark upstream down at once, so
                # the next request doesn't wait for the same timeout again.
                breaker.failure(unreachable=True)
                self._observe(upstream, "unreachable", started)
                error = UpstreamUnavailable(
                    f"upstream {upstream.name} unreachable: {type(exc).__name__}"
                )
                self.count_error(upstream, error)
                raise error from None
            self._observe(upstream, _outcome(response.status), started)
            if response.status >= 500:
                breaker.failure()
                self.metrics.upstream_errors.labels(upstream.name, "server_error").inc()
            else:
                breaker.success()
            if response.status == 429:
                self.metrics.upstream_errors.labels(upstream.name, "rate_limited").inc()
            self._note_ratelimit(upstream, response)
            if response.status not in _REDIRECTS:
                return response
            location = response.headers.get("Location")
            response.release()
            if not location:
                raise self.bad(upstream, "redirected nowhere")
            url = url.join(URL(location))
            if url.scheme not in ("http", "https"):
                raise self.bad(upstream, "redirected to a non-http URL")
            if response.status == 303:
                method = "GET"
        raise self.bad(upstream, "redirected too many times")

    def bad(self, upstream: UpstreamConfig, what: str) -> UpstreamBadResponse:
        error = UpstreamBadResponse(f"upstream {upstream.name} {what}")
        self.count_error(upstream, error)
        return error

    def _observe(self, upstream: UpstreamConfig, outcome: str, started: float) -> None:
        elapsed = time.perf_counter() - started
        self.metrics.upstream_seconds.labels(upstream.name, outcome).observe(elapsed)

    def _note_ratelimit(self, upstream: UpstreamConfig, response: aiohttp.ClientResponse) -> None:
        """Docker Hub reports pulls left as `ratelimit-remaining: 76;w=21600`."""
        value = response.headers.get("ratelimit-remaining", "").split(";", 1)[0].strip()
        if not value.isdigit():
            return
        remaining = int(value)
        self.metrics.ratelimit_remaining.labels(upstream.name).set(remaining)
        if remaining < LOW_RATELIMIT:
            log.warning(
                "upstream %s: only %d pulls left in its rate limit", upstream.name, remaining
            )


def _basic(upstream: UpstreamConfig) -> str | None:
    if upstream.username is None or upstream.password is None:
        return None
    pair = f"{upstream.username}:{upstream.password.reveal()}".encode()
    return "Basic " + base64.b64encode(pair).decode("ascii")


def _timeout(upstream: UpstreamConfig) -> aiohttp.ClientTimeout:
    return aiohttp.ClientTimeout(
        total=None, sock_connect=upstream.connect_timeout, sock_read=upstream.read_timeout
    )


def _parse_token(upstream: UpstreamConfig, body: bytes) -> tuple[str, float]:
    try:
        data: Any = json.loads(body)
        token = data.get("token") or data.get("access_token")
        expires_in = float(data.get("expires_in") or 0)
    except (ValueError, AttributeError, TypeError):
        token = None
    if not isinstance(token, str) or not token:
        raise UpstreamBadResponse(f"token service of {upstream.name} sent no token")
    return token, expires_in


def _status_error(upstream: UpstreamConfig, response: aiohttp.ClientResponse) -> RegistryError:
    """The error for an upstream status that isn't success or "not found"."""
    status = response.status
    if status == 401:
        return Unauthorized(f"upstream {upstream.name} refused our credentials")
    if status == 403:
        return Denied(f"upstream {upstream.name} denied access")
    if status == 429:
        retry_after = response.headers.get("Retry-After", "")
        headers = {"Retry-After": retry_after} if retry_after.isdigit() else {}
        return UpstreamRateLimited(f"upstream {upstream.name} is rate-limiting", headers=headers)
    if status >= 500:
        return UpstreamServerError(f"upstream {upstream.name} answered {status}")
    return UpstreamBadResponse(f"upstream {upstream.name} answered {status}")


def _outcome(status: int) -> str:
    if status < 400:
        return "ok"
    if status == 404:
        return "not_found"
    if status == 429:
        return "rate_limited"
    return "server_error" if status >= 500 else "client_error"


def _error_class(error: RegistryError) -> str:
    if isinstance(error, UpstreamRateLimited):
        return "rate_limited"
    if isinstance(error, Unauthorized | Denied):
        return "unauthorized"
    if isinstance(error, UpstreamServerError):
        return "server_error"
    if isinstance(error, UpstreamUnavailable):
        return "unreachable"
    return "bad_response"
