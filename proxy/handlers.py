"""HTTP handlers: parse the name and reference, call one service, build the response."""

from __future__ import annotations

import asyncio
import json

from aiohttp import web

from proxy.errors import NameInvalid, Unsupported
from proxy.keys import BLOBS, CACHE, CONFIG, LISTINGS, MANIFESTS, METRICS
from proxy.listings import Listing
from proxy.manifests import Accept
from proxy.metrics import metrics_response
from proxy.observe import note_lookup
from proxy.references import parse_digest, parse_reference
from proxy.responses import send_blob
from proxy.routing import Target, client_name, resolve

# Set when shutdown begins (`proxy.app`): from then on /readyz answers 503, so that a
# balancer sends no new work while the responses in flight finish.
SHUTTING_DOWN = web.AppKey("shutting_down", asyncio.Event)


def _target(request: web.Request) -> Target:
    # Names, tags and digests never need percent-encoding, and a decoded %2F would forge
    # an extra path segment, so any escape in the path is refused outright.
    if "%" in request.raw_path.partition("?")[0]:
        raise NameInvalid("percent-encoded characters are not allowed in names")
    config = request.app[CONFIG].current
    return resolve(config, request.match_info["name"], request.query.get("ns"))


def _headers(target: Target) -> dict[str, str]:
    return {"OCI-Namespace": target.namespace} if target.namespace else {}


# Content by digest never changes, so any HTTP cache or CDN in front may keep it for good.
IMMUTABLE = "public, max-age=31536000, immutable"


def _cache_control(fresh_for: float | None) -> str:
    """A tag's answer may be kept as long as we would serve it without asking upstream."""
    if fresh_for is None:
        return IMMUTABLE
    seconds = int(fresh_for)
    return f"max-age={seconds}" if seconds > 0 else "no-cache"


async def metrics(request: web.Request) -> web.Response:
    return metrics_response(request.app[METRICS])


async def healthz(request: web.Request) -> web.Response:
    """The process is alive and its event loop answers."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Not shutting down, the index answers and the cache directory takes writes."""
    problem = await request.app[CACHE].readiness_problem()
    if request.app[SHUTTING_DOWN].is_set():  # checked last: it may be set while we waited
        problem = "shutting down"
    if problem:
        return web.json_response({"status": "not ready", "reason": problem}, status=503)
    return web.json_response({"status": "ready"})


async def ping(request: web.Request) -> web.Response:
    return web.json_response({})


async def manifest(request: web.Request) -> web.Response:
    target = _target(request)
    reference = parse_reference(request.match_info["reference"])
    accept = Accept(request.headers.getall("Accept", []))
    found = await request.app[MANIFESTS].get(target, reference, accept)
    note_lookup(request, "manifest", target.upstream.name, found.result)
    headers = _headers(target) | {
        "Docker-Content-Digest": str(found.digest),
        "ETag": f'"{found.digest}"',
        "Cache-Control": _cache_control(found.fresh_for),
    }
    headers["Content-Type"] = found.media_type
    return web.Response(body=found.data, headers=headers)


async def blob(request: web.Request) -> web.StreamResponse:
    target = _target(request)
    digest = parse_digest(request.match_info["digest"])
    blobs = request.app[BLOBS]
    headers = _headers(target) | {"Docker-Content-Digest": str(digest), "Cache-Control": IMMUTABLE}
    if request.method == "HEAD":
        size, result = await blobs.size(target, digest)
        note_lookup(request, "blob", target.upstream.name, result)
        response = web.StreamResponse(headers=headers | {"Accept-Ranges": "bytes"})
        response.content_type = "application/octet-stream"
        response.content_length = size
        await response.prepare(request)
        return response
    opened = await blobs.open(target, digest)
    note_lookup(request, "blob", target.upstream.name, opened.result)
    try:
        return await send_blob(request, opened, headers)
    finally:
        opened.close()


async def tags(request: web.Request) -> web.Response:
    target = _target(request)
    params = {k: request.query[k] for k in ("n", "last") if k in request.query}
    listing = await request.app[LISTINGS].tags(target, params)
    return _listing_response(request, target, "tags", listing)


async def referrers(request: web.Request) -> web.Response:
    target = _target(request)
    digest = parse_digest(request.match_info["digest"])
    # Every parameter but ns goes upstream: a pagination Link may carry any of them.
    params = {k: v for k, v in request.query.items() if k != "ns"}
    listing = await request.app[LISTINGS].referrers(target, digest, params)
    return _listing_response(request, target, "referrers", listing)


def _listing_response(
    request: web.Request, target: Target, kind: str, listing: Listing
) -> web.Response:
    note_lookup(request, kind, target.upstream.name, listing.result)
    headers = _headers(target) | listing.headers
    headers["Cache-Control"] = _cache_control(listing.fresh_for)
    return web.Response(body=listing.body, headers=headers)


async def catalog(request: web.Request) -> web.Response:
    config = request.app[CONFIG].current
    default = config.default_upstream
    names = sorted(
        client_name(upstream, repo, default)
        for name, repo in await request.app[CACHE].repositories()
        if (upstream := config.upstream(name)) is not None
    )
    last = request.query.get("last")
    if last:
        names = [n for n in names if n > last]
    headers = {}
    n = request.query.get("n", "")
    if n.isdigit() and int(n) < len(names):
        names = names[: int(n)]
        if names:
            headers["Link"] = f'</v2/_catalog?n={n}&last={names[-1]}>; rel="next"'
    body = json.dumps({"repositories": names}).encode()
    return web.Response(body=body, content_type="application/json", headers=headers)


async def unsupported(request: web.Request) -> web.Response:
    raise Unsupported(f"{request.method} is not supported: this mirror is read-only")
