"""Per-request bookkeeping: a request id, one access-log line, request and cache metrics.

Handlers say what the cache did with `note_lookup`; the middleware does the rest once the
response is finished, so a handler never touches logging or metrics itself.

An access-log line (text, or one JSON object per line with `log.format: json`):

    7f3a9c2e41d05b88 10.0.0.7 "GET /v2/library/alpine/blobs/sha256:…" 200 3402 12.4ms
        upstream=docker.io cache=HIT

The client address is the TCP peer's, unless the peer is one of `trusted_proxies`: then
it is the right-most address of `Forwarded: for=` (RFC 7239) or, without that header,
`X-Forwarded-For` that is not itself a trusted proxy. Headers from any other peer are
ignored, since a client can write whatever it likes into them.

Paths are logged without their query string except `ns`: queries are the one place a
client could put something secret, and nothing else in them matters for operations.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address

from aiohttp import web
from aiohttp.typedefs import Middleware

from cache.store import LookupResult
from proxy.errors import Handler
from proxy.metrics import Metrics

access_log = logging.getLogger("pullthrough.access")

_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
# One `for=` of a Forwarded element: a token, or a quoted string such as "[2001:db8::1]:80".
_FORWARDED_FOR = re.compile(r'(?:^|[;,])\s*for\s*=\s*("[^"]*"|[^;,\s]+)', re.IGNORECASE)

Networks = Sequence[IPv4Network | IPv6Network]


@dataclass(frozen=True, slots=True)
class Lookup:
    kind: str  # manifest, blob, tags or referrers
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


def client_address(request: web.Request, trusted: Networks) -> str:
    """Who the request came from, as the access log names them (see the module docstring)."""
    peer = request.remote or "-"
    if not trusted or not _is_trusted(_address(peer), trusted):  # no parsing when none is
        return peer
    if forwarded := request.headers.getall("Forwarded", []):
        hops = [m[1].strip('"') for m in _FORWARDED_FOR.finditer(",".join(forwarded))]
    else:
        listed = ",".join(request.headers.getall("X-Forwarded-For", []))
        hops = [hop.strip() for hop in listed.split(",")]
    addresses = [_address(hop) for hop in hops if hop]
    for address in reversed(addresses):
        if not _is_trusted(address, trusted):
            # Not an address (`unknown`, an obfuscated name, garbage): never logged as given.
            return str(address) if address is not None else "unknown"
    # Every hop is a trusted proxy: the first of them is as near the client as we can see.
    return str(addresses[0]) if addresses else peer


def _address(text: str) -> IPv4Address | IPv6Address | None:
    """An address as written in a header: `1.2.3.4`, `1.2.3.4:80`, `[::1]:80` or `::1`;
    None for `unknown`, an obfuscated `_name` or garbage."""
    if text.startswith("["):
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    try:
        return ip_address(text)
    except ValueError:
        return None


def _is_trusted(address: IPv4Address | IPv6Address | None, trusted: Networks) -> bool:
    if address is None:
        return False
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in trusted)


def observe_middleware(metrics: Metrics, json_lines: bool, trusted: Networks = ()) -> Middleware:
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
            client = client_address(request, trusted)
            _log(request, request_id, client, status, sent, elapsed, json_lines)

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
    client: str,
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
        "client": client,
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
