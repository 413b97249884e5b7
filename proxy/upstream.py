"""HTTP to the upstream registries: auth handshakes, redirects, and the bookkeeping of
every exchange.

One `UpstreamClient` per process, around the one `aiohttp.ClientSession`. It answers
challenges itself, so callers just ask for a path in a repository. Three rules keep
credentials where they belong:
- the client's own `Authorization` is never forwarded (callers pass only what they choose);
- upstream credentials and tokens never appear in errors or logs;
- `Authorization` is never sent on a redirect to another origin (Docker Hub and Quay
  redirect blob downloads to CDNs with signed URLs).

The bookkeeping has one owner, so nothing is counted twice: `_record` books each exchange
(latency, breaker, the errors counted on arrival, rate limit), `count_error` is the only
counter of `upstream_errors`, and `stream_failed` books a body cut off mid-stream. What an
answer means is in `upstream_status`; tokens and Basic credentials in `upstream_auth`;
TLS, timeouts and the downloads' share of the pool in `upstream_connections`.

An upstream that is `offline: true` is never contacted: `request`, where every exchange
with upstream starts (token service and credential helper included), raises
`UpstreamOffline` before anything else. It is counted in `upstream_offline` only: no
breaker, no latency, no upstream error, since upstream did nothing wrong.

The upstream's settings come with each call (from the config current when the request
came in), so a reload takes effect on the next request. Auth state is kept under
`UpstreamConfig.access`: once a reload changes an upstream's URL, credentials or TLS,
its old tokens, challenge and helper answer are never used again.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext

import aiohttp
from cachetools import LRUCache
from yarl import URL

from proxy.breaker import CircuitBreaker
from proxy.config import UpstreamConfig
from proxy.credentials import CredentialHelpers
from proxy.errors import (
    RegistryError,
    Unauthorized,
    UpstreamBadResponse,
    UpstreamOffline,
    UpstreamUnavailable,
)
from proxy.metrics import Metrics
from proxy.upstream_auth import (
    Challenge,
    TokenCache,
    TokenFetcher,
    pick_challenge,
)
from proxy.upstream_connections import UpstreamConnections
from proxy.upstream_status import (
    counted_on_arrival,
    error_class,
    note_ratelimit,
    outcome,
    status_error,
)

MAX_REDIRECTS = 5
REPOSITORY_BREAKERS = 4096  # the repositories whose 5xx are remembered, least recent dropped
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
        self.metrics = metrics
        self.tokens = tokens or TokenCache()
        self.pool = UpstreamConnections(connections)
        self.clock = clock
        self.fetcher = TokenFetcher(
            session,
            metrics,
            self.count_error,
            self.pool,
            self.breaker,
            CredentialHelpers(clock),
        )
        self._challenges: dict[tuple[object, ...], Challenge] = {}
        self._breakers: dict[str, CircuitBreaker] = {}
        self._repository_breakers: LRUCache[tuple[str, str], CircuitBreaker] = LRUCache(
            REPOSITORY_BREAKERS
        )

    def download_slot(self, upstream: UpstreamConfig) -> asyncio.Semaphore:
        """Held for a whole blob download (`UpstreamConnections.download_slot`)."""
        return self.pool.download_slot(upstream)

    def breaker(self, upstream: UpstreamConfig) -> CircuitBreaker:
        if upstream.name not in self._breakers:
            breaker = CircuitBreaker(upstream.name, clock=self.clock)
            self._breakers[upstream.name] = breaker
            self.metrics.watch_breaker(breaker)
        return self._breakers[upstream.name]

    def repository_breaker(self, upstream: UpstreamConfig, repo: str) -> CircuitBreaker:
        """The breaker that 5xx answers about `repo` move, instead of the upstream's."""
        key = (upstream.name, repo)
        breaker = self._repository_breakers.get(key)
        if breaker is None:
            breaker = CircuitBreaker(f"{upstream.name}/{repo}", clock=self.clock)
            self._repository_breakers[key] = breaker
        return breaker

    def check(
        self, upstream: UpstreamConfig, response: aiohttp.ClientResponse, not_found: RegistryError
    ) -> None:
        """Map a non-2xx upstream answer to the error a client should see (releasing it)."""
        if 200 <= response.status < 300:
            return
        response.release()
        if response.status == 404:
            raise not_found
        error = status_error(upstream, response)
        if not counted_on_arrival(response.status):
            self.count_error(upstream, error)
        raise error

    def bad(self, upstream: UpstreamConfig, what: str) -> UpstreamBadResponse:
        """The error for an answer upstream should not have sent, counted."""
        error = UpstreamBadResponse(f"upstream {upstream.name} {what}")
        self.count_error(upstream, error)
        return error

    def stream_failed(self, upstream: UpstreamConfig, exc: BaseException) -> UpstreamUnavailable:
        """Record a body that broke off mid-stream (`exc`), and return the error for those
        waiting on it. It moves the breaker but no counter: its exchange was booked when
        the headers arrived."""
        # A read that timed out marks upstream down at once, like a connect that timed out.
        self.breaker(upstream).failure(unreachable=isinstance(exc, TimeoutError))
        return UpstreamUnavailable(f"download from {upstream.name} failed")

    def count_error(self, upstream: UpstreamConfig, error: RegistryError) -> None:
        """The one place `upstream_errors` is counted."""
        self.metrics.upstream_errors.labels(upstream.name, error_class(error)).inc()

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

        Raises `UpstreamUnavailable` when upstream can't be reached or times out, and
        `UpstreamOffline` without trying when it is `offline: true`.
        """
        if upstream.offline:
            self.metrics.upstream_offline.labels(upstream.name).inc()
            where = f" for {repo}" if repo else ""
            raise UpstreamOffline(
                f"upstream {upstream.name} is offline (offline: true); this is not cached{where}"
            )
        url = URL(upstream.url + path)
        if params:
            url = url.with_query(params)
        scope = f"repository:{repo}:pull" if repo else None
        sent_auth = await self._known_authorization(upstream, scope)
        response = await self._send(upstream, method, url, headers, sent_auth, repo)
        if response.status != 401:
            return response
        challenge = pick_challenge(response.headers.getall("WWW-Authenticate", []))
        if challenge is None:
            return response
        response.release()
        self._challenges[upstream.access] = challenge
        if sent_auth is not None:
            # A cached token that upstream now refuses (expired early, revoked): drop it.
            self.tokens.drop((upstream.access, scope))
            if challenge.scheme == "basic":
                self.fetcher.basic_refused(upstream, sent_auth)  # a rotated helper password
        authorization = await self._authorize(upstream, challenge, scope)
        if authorization is None:
            raise Unauthorized(f"upstream {upstream.name} requires credentials")
        return await self._send(upstream, method, url, headers, authorization, repo)

    async def _known_authorization(self, upstream: UpstreamConfig, scope: str | None) -> str | None:
        """Authorization we can send up front, because this upstream challenged us before."""
        challenge = self._challenges.get(upstream.access)
        if challenge is None:
            return None
        return await self._authorize(upstream, challenge, scope)

    async def _authorize(
        self, upstream: UpstreamConfig, challenge: Challenge, scope: str | None
    ) -> str | None:
        if challenge.scheme == "basic":
            return await self.fetcher.basic(upstream)
        if challenge.scheme != "bearer" or not challenge.realm:
            return None
        token = await self.tokens.get_or_fetch(
            (upstream.access, scope),
            lambda: self.fetcher.fetch(upstream, challenge, scope),
        )
        return f"Bearer {token}"

    async def _send(
        self,
        upstream: UpstreamConfig,
        method: str,
        url: URL,
        headers: Mapping[str, str] | None,
        authorization: str | None,
        repo: str | None,
    ) -> aiohttp.ClientResponse:
        """Follow redirects here, not in aiohttp, so `authorization` goes to its origin only."""
        origin = url.origin()
        for _ in range(MAX_REDIRECTS + 1):
            sent = dict(headers or {})
            if authorization is not None and url.origin() == origin:
                sent["Authorization"] = authorization
            response = await self._send_once(upstream, method, url, sent, repo)
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

    async def _send_once(
        self,
        upstream: UpstreamConfig,
        method: str,
        url: URL,
        headers: Mapping[str, str],
        repo: str | None,
    ) -> aiohttp.ClientResponse:
        scoped = self.repository_breaker(upstream, repo) if repo else None
        about_repo: AbstractContextManager[None] = scoped.attempt() if scoped else nullcontext()
        with self.breaker(upstream).attempt(), about_repo:
            started = time.perf_counter()
            try:
                response = await self.session.request(
                    method,
                    url,
                    headers=headers,
                    allow_redirects=False,
                    timeout=self.pool.timeout(upstream),
                    ssl=self.pool.ssl_context(upstream),
                )
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                error = UpstreamUnavailable(
                    f"upstream {upstream.name} unreachable: {type(exc).__name__}"
                )
                self._record(upstream, started, error, scoped)
                raise error from None
            self._record(upstream, started, response, scoped)
            return response

    def _record(
        self,
        upstream: UpstreamConfig,
        started: float,
        answer: aiohttp.ClientResponse | UpstreamUnavailable,
        scoped: CircuitBreaker | None,
    ) -> None:
        """Book one exchange with upstream: its latency by outcome, the breakers (the
        upstream's, and `scoped`, the repository's when the request was about one), the
        errors counted on arrival (unreachable, 5xx, 429), and the rate limit upstream
        reports."""
        elapsed = time.perf_counter() - started
        breaker = self.breaker(upstream)
        if isinstance(answer, UpstreamUnavailable):
            # Refused, or no answer within the timeouts: mark upstream down at once, so
            # the next request doesn't wait for the same timeout again.
            breaker.failure(unreachable=True)
            self.metrics.upstream_seconds.labels(upstream.name, "unreachable").observe(elapsed)
            self.count_error(upstream, answer)
            return
        status = answer.status
        self.metrics.upstream_seconds.labels(upstream.name, outcome(status)).observe(elapsed)
        if status >= 500:
            # A 5xx about one repository may be that repository's own fault (or a client's
            # doing): it moves that repository's breaker only.
            (scoped or breaker).failure()
        else:
            breaker.success()
            if scoped is not None:
                scoped.success()
        if counted_on_arrival(status):
            self.count_error(upstream, status_error(upstream, answer))
        note_ratelimit(self.metrics, upstream, answer)


async def read_capped(response: aiohttp.ClientResponse, limit: int, too_large: Exception) -> bytes:
    """The whole body of a small answer (a manifest, a list), or `too_large` past `limit`
    bytes. Read to its end: `content.read(n)` returns whatever has arrived so far, which
    over a network is often only part of it. A broken-off body raises what aiohttp
    raised (TimeoutError, aiohttp.ClientError), for the caller to name."""
    if (response.content_length or 0) > limit:
        raise too_large
    chunks: list[bytes] = []
    total = 0
    async for chunk in response.content.iter_chunked(64 * 1024):
        total += len(chunk)
        if total > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)
