"""What an upstream's answer means: the error a client sees, the class that error is
counted under (`pullthrough_upstream_errors_total`), the outcome label of the latency
histogram (`pullthrough_upstream_request_duration_seconds`), and the pulls its rate limit
has left (`ratelimit-remaining`).

    answer       client sees              error class    counted         latency outcome
    2xx          -                        -              -               ok
    404          the caller's "unknown"   -              -               not_found
    401, 403     Unauthorized, Denied     unauthorized   when checked    client_error
    429          UpstreamRateLimited      rate_limited   on arrival      rate_limited
    5xx          UpstreamServerError      server_error   on arrival      server_error
    any other    UpstreamBadResponse      bad_response   when checked    ok (3xx), client_error
    no answer    UpstreamUnavailable      unreachable    on arrival      unreachable

"On arrival" is `UpstreamClient._record`, for every answer; "when checked" is
`UpstreamClient.check`, for the answers a caller refuses. A 401 waits for the check
because most 401s are challenges that `UpstreamClient.request` answers itself.

A token service's failures are counted by `TokenFetcher` (upstream_auth.py), by the class
of the error they raise; they have no latency, and when unreachable or 5xx they move the
upstream's breaker. A blob body that breaks off mid-stream moves only the breaker
(`UpstreamClient.stream_failed`).
"""

from __future__ import annotations

import logging

import aiohttp

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

log = logging.getLogger("pullthrough.upstream")

LOW_RATELIMIT = 10  # pulls left at which a warning is logged


def status_error(upstream: UpstreamConfig, response: aiohttp.ClientResponse) -> RegistryError:
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


def counted_on_arrival(status: int) -> bool:
    """Whether an answer's error is counted as it arrives, rather than when checked."""
    return status >= 500 or status == 429


def outcome(status: int) -> str:
    if status < 400:
        return "ok"
    if status == 404:
        return "not_found"
    if status == 429:
        return "rate_limited"
    return "server_error" if status >= 500 else "client_error"


def error_class(error: RegistryError) -> str:
    if isinstance(error, UpstreamRateLimited):
        return "rate_limited"
    if isinstance(error, Unauthorized | Denied):
        return "unauthorized"
    # Before UpstreamUnavailable: a server error is a kind of unavailable.
    if isinstance(error, UpstreamServerError):
        return "server_error"
    if isinstance(error, UpstreamUnavailable):
        return "unreachable"
    return "bad_response"


def note_ratelimit(
    metrics: Metrics, upstream: UpstreamConfig, response: aiohttp.ClientResponse
) -> None:
    """Docker Hub reports pulls left as `ratelimit-remaining: 76;w=21600`."""
    value = response.headers.get("ratelimit-remaining", "").split(";", 1)[0].strip()
    if not value.isdigit():
        return
    remaining = int(value)
    metrics.ratelimit_remaining.labels(upstream.name).set(remaining)
    if remaining < LOW_RATELIMIT:
        log.warning("upstream %s: only %d pulls left in its rate limit", upstream.name, remaining)
