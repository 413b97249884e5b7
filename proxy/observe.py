"""Per-request bookkeeping: a request id, one access-log line, request and cache metrics.

Handlers say what the cache did with `note_lookup`; the middleware does the rest once the
response is finished, so a handler never touches logging or metrics itself.

An access-log line (text, or one JSON object per line with `log.format: json`):

    7f3a9c2e41d05b88 10.0.0.7 "GET /v2/library/alpine/blobs/sha256:…" 200 3402 12.4ms
        upstream=docker.io cache=HIT

Paths are logged without their query string except `ns`: queries are the one place a
client could put something secret, and nothing else in them matters for operations.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import time
from dataclasses import dataclass

from aiohttp import web
from aiohttp.typedefs import Middleware

from cache.store import LookupResult
from proxy.errors import Handler
from proxy.metrics import Metrics

access_log = logging.getLogger("pullthrough.access")

_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


@dataclass(frozen=True, slots=True)
class Lookup:
    kind: str  # manifest or blob
    upstream: str
    result: LookupResult


LOOKUP = web.RequestKey("lookup", Lookup)
REQUEST_ID = web.RequestKey("request_id", str)
BODY_BYTES = web.RequestKey("body_bytes", int)  # set by handlers that stream their body
CLIENT_GONE = 499  # nginx's status for "the client closed the connection first"


def note_lookup(request: web.Request, kind: str, upstream: str, result: LookupResult) -> None:
    request[LOOKUP] = Lookup(kind, upstream, result)


def route_kind(request: web.Request) -> str:
    """The name `proxy.app` gave the matched resource; "other" when nothing matched."""
    resource = request.match_info.route.resource
    return resource.name if resource is not None and resource.name else "other"


def observe_middleware(metrics: Metrics, json_lines: bool) -> Middleware:
    @web.middleware
    async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.perf_counter()
        incoming = request.headers.get("X-Request-ID", "")
        request_id = incoming if _REQUEST_ID.fullmatch(incoming) else secrets.token_hex(8)
        request[REQUEST_ID] = request_id
        status, sent = CLIENT_GONE, 0
        try:
            response = await handler(request)
            status, sent = response.status, _body_bytes(request, response)
            return response
        finally:
            # Errors became responses further in; what still lands here is a client
            # that went away (or a shutdown), logged as 499.
            elapsed = time.perf_counter() - started
            _record(metrics, request, status, sent, elapsed)
            _log(request, request_id, status, sent, elapsed, json_lines)

    return observe


async def add_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: streamed responses send their headers inside the handler."""
    if REQUEST_ID in request:
        response.headers["X-Request-ID"] = request[REQUEST_ID]


def _body_bytes(request: web.Request, response: web.StreamResponse) -> int:
    """Body bytes only: aiohttp's own counters include the header block."""
    if BODY_BYTES in request:
        return request[BODY_BYTES]
    if request.method != "HEAD" and isinstance(response, web.Response) and not response.prepared:
        return response.content_length or 0
    return 0


def _record(metrics: Metrics, request: web.Request, status: int, sent: int, elapsed: float) -> None:
    route = route_kind(request)
    metrics.requests.labels(route, request.method, str(status)).inc()
    metrics.request_seconds.labels(route).observe(elapsed)
    lookup = request.get(LOOKUP)
    if lookup is None:
        return
    metrics.cache_requests.labels(lookup.kind, lookup.upstream, lookup.result).inc()
    if sent:
        source = "upstream" if lookup.result in ("miss", "coalesced") else "cache"
        metrics.served_bytes.labels(source).inc(sent)


def _log(
    request: web.Request,
    request_id: str,
    status: int,
    sent: int,
    elapsed: float,
    json_lines: bool,
) -> None:
    if not access_log.isEnabledFor(logging.INFO):
        return
    lookup = request.get(LOOKUP)
    ns = request.query.get("ns")
    path = request.path + (f"?ns={ns}" if ns else "")
    fields = {
        "request_id": request_id,
        "client": request.remote or "-",
        "method": request.method,
        "path": path,
        "status": status,
        "bytes": sent,
        "duration_ms": round(elapsed * 1000, 1),
        "upstream": lookup.upstream if lookup else None,
        "cache": lookup.result.upper() if lookup else None,
    }
    if json_lines:
        access_log.info(json.dumps(fields))
        return
    access_log.info(
        '%s %s "%s %s" %d %d %.1fms upstream=%s cache=%s',
        request_id,
        fields["client"],
        request.method,
        path,
        status,
        sent,
        elapsed * 1000,
        fields["upstream"] or "-",
        fields["cache"] or "-",
    )
