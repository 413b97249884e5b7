"""Manifest lookups. The rules, in one place:

    reference   cached?                          action
    digest      yes, linked to this repository   serve from the cache; never revalidated
    digest      yes, not linked                  HEAD upstream as this repository: 2xx links
                                                 it and serves the cache (proxy/links.py)
    digest      no                               GET upstream, check the digest, store, serve
    tag         yes, within its TTL              serve from the cache, no upstream request
    tag         yes, `immutable` in tag_ttl      the same, for as long as it stays cached
    tag         yes, older                       HEAD upstream (free against Docker Hub's limit):
                                                 same digest -> serve cached; new -> GET, store
    tag         no (not for this Accept)         GET upstream, store, remember tag -> digest
    tag         upstream fails on either path    serve the newest cached answer this client
                                                 accepts (stale-if-error)

"Cached" means upstream's latest answer for this tag *and this Accept*: a client that
takes an index and one that takes only image manifests may get different answers, and
each answer ages on its own. A tag's TTL is that of the first `tag_ttl` rule whose glob
matches it, else the upstream's `manifest_ttl` (`UpstreamConfig.tag_lifetime`).

An `offline: true` upstream fails every request at once (`UpstreamOffline`), so the rows
above that ask upstream fall through to stale-if-error, and a miss answers 503.

Bytes are served exactly as upstream sent them: never re-serialized or converted.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import aiohttp

from cache.digests import Digest
from cache.errors import InvalidDigest
from cache.index import TagRow
from cache.store import Cache, LookupResult
from proxy.coalesce import Coalescer
from proxy.errors import (
    ManifestTooLarge,
    ManifestUnknown,
    UpstreamBadResponse,
    UpstreamFailed,
    UpstreamOffline,
    UpstreamUnavailable,
)
from proxy.links import LinkConfirmer
from proxy.metrics import Metrics
from proxy.routing import Target
from proxy.upstream import UpstreamClient, read_capped

log = logging.getLogger("pullthrough.manifests")

MAX_MANIFEST_SIZE = 4 * 1024 * 1024
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
IMAGE_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
# Every modern format: sent upstream when a client sends no Accept, so that upstream
# never down-converts to schema 1 on our behalf.
MANIFEST_TYPES = INDEX_TYPES + IMAGE_TYPES
DEFAULT_ACCEPT = ", ".join(MANIFEST_TYPES)
# The `fresh_for` of an immutable tag (Cache-Control: max-age): a year, as for content by
# digest. The mirror itself keeps serving it for as long as it stays cached.
IMMUTABLE_TAG_FRESH_FOR = 365 * 86400.0


@dataclass(frozen=True, slots=True)
class Manifest:
    data: bytes
    media_type: str
    digest: Digest
    result: LookupResult = "miss"
    # Seconds a tag's answer stays fresh (what is left of its TTL); None for a manifest by
    # digest, which never changes.
    fresh_for: float | None = None


class Accept:
    """The media types a client accepts; none given, or `*/*`, accepts anything."""

    def __init__(self, headers: list[str]) -> None:
        types = {part.split(";", 1)[0].strip().lower() for h in headers for part in h.split(",")}
        types.discard("")
        self._any = not types or "*/*" in types
        self._types = types
        # Which remembered answers are this client's: the same set of types, in any order.
        self.key = "*/*" if self._any else ",".join(sorted(types))
        # For "anything", name the modern types: given only */*, distribution (and Docker
        # Hub) down-convert schema 2 manifests to signed schema 1, with another digest.
        self.header = DEFAULT_ACCEPT if self._any else ", ".join(headers)

    def accepts(self, media_type: str) -> bool:
        return self._any or media_type.lower() in self._types


class ManifestService:
    def __init__(
        self,
        cache: Cache,
        client: UpstreamClient,
        metrics: Metrics,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.cache = cache
        self.client = client
        self.metrics = metrics
        self.clock = clock
        self._fetching: Coalescer[Manifest] = Coalescer()
        self.links = LinkConfirmer(cache, client)

    async def get(self, target: Target, reference: str | Digest, accept: Accept) -> Manifest:
        if isinstance(reference, Digest):
            return await self._by_digest(target, reference, accept)
        return await self._by_tag(target, reference, accept)

    async def _by_digest(self, target: Target, digest: Digest, accept: Accept) -> Manifest:
        cached = await self._stored(target, digest, accept)
        if cached is not None:
            return cached
        manifest = await self._fetch(target, str(digest), accept)
        if manifest.digest != digest:
            self.metrics.digest_mismatches.labels("manifest", target.upstream.name).inc()
            raise UpstreamBadResponse(
                f"upstream {target.upstream.name} sent a manifest that does not match {digest}"
            )
        await self._store(target, manifest)
        return manifest

    async def _stored(self, target: Target, digest: Digest, accept: Accept) -> Manifest | None:
        """The stored manifest, if `target` is linked to it or upstream confirms it holds it."""
        linked = await self.cache.is_linked(digest, target.link)
        cached = await self.cache.get_manifest(digest)
        if cached is None:
            return None
        result: LookupResult = "hit"
        if not linked:
            unknown = ManifestUnknown(detail={"name": target.name})
            headers = {"Accept": accept.header}
            result = await self.links.confirm(target, "manifests", digest, unknown, headers)
        return Manifest(cached[0], cached[1], digest, result)

    async def _by_tag(self, target: Target, tag: str, accept: Accept) -> Manifest:
        rows = await self.cache.tag_answers(target.upstream.name, target.repo, tag)
        answer = next((row for row in rows if row.accept == accept.key), None)
        hit = await self._cached(answer) if answer else None
        lifetime = target.upstream.tag_lifetime(tag)
        ttl = IMMUTABLE_TAG_FRESH_FOR if lifetime is None else lifetime
        try:
            if answer is None or hit is None:
                fetched = await self._fetch_tag(target, tag, accept)
                return replace(fetched, fresh_for=ttl)
            if lifetime is None:
                return replace(hit, fresh_for=ttl)  # immutable: never revalidated
            age = self.clock() - answer.checked
            if age < ttl:
                return replace(hit, fresh_for=ttl - age)
            if await self._head(target, tag, accept) == hit.digest:
                await self._remember(target, tag, accept, hit)
                return replace(hit, fresh_for=ttl)
            return replace(await self._fetch_tag(target, tag, accept), fresh_for=ttl)
        except UpstreamFailed as exc:
            stale = hit or await self._newest_accepted(rows, accept)
            if stale is None:
                raise
            # Offline is the operator's choice, not a failure worth a warning per request.
            level = logging.DEBUG if isinstance(exc, UpstreamOffline) else logging.WARNING
            log.log(level, "serving cached %s:%s, upstream failed: %s", target.key, tag, exc)
            return replace(stale, result="stale", fresh_for=0.0)  # already due

    async def stored_tag(self, target: Target, tag: str, accept: Accept) -> Manifest | None:
        """The newest stored answer for `tag` that this client accepts, whatever its age,
        without asking upstream: for callers that already know upstream is failing."""
        rows = await self.cache.tag_answers(target.upstream.name, target.repo, tag)
        return await self._newest_accepted(rows, accept)

    async def _cached(self, row: TagRow) -> Manifest | None:
        digest = Digest.parse(row.digest)
        cached = await self.cache.get_manifest(digest)
        return Manifest(cached[0], cached[1], digest, "hit") if cached else None

    async def _newest_accepted(self, rows: list[TagRow], accept: Accept) -> Manifest | None:
        """Upstream is failing and this client's own answer is gone: the newest answer
        given to any client, of a type this one accepts (rows come newest first)."""
        for row in rows:
            if accept.accepts(row.media_type) and (found := await self._cached(row)):
                return found
        return None

    async def _fetch_tag(self, target: Target, tag: str, accept: Accept) -> Manifest:
        manifest = await self._fetch(target, tag, accept)
        await self._store(target, manifest)
        await self._remember(target, tag, accept, manifest)
        return manifest

    async def _remember(self, target: Target, tag: str, accept: Accept, manifest: Manifest) -> None:
        await self.cache.set_tag(
            target.upstream.name,
            target.repo,
            tag,
            accept.key,
            manifest.media_type,
            manifest.digest,
        )

    async def _store(self, target: Target, manifest: Manifest) -> None:
        await self.cache.put_manifest(
            manifest.digest, manifest.data, manifest.media_type, target.upstream.name, target.repo
        )

    async def _head(self, target: Target, tag: str, accept: Accept) -> Digest | None:
        response = await self._request(target, "HEAD", tag, accept)
        response.release()
        try:
            return Digest.parse(response.headers.get("Docker-Content-Digest", ""))
        except InvalidDigest:
            return None  # no usable digest: the caller will GET

    async def _fetch(self, target: Target, reference: str, accept: Accept) -> Manifest:
        """GET from upstream; concurrent misses for one manifest share one request (each
        counts against Docker Hub's pull limit)."""
        key = (target.upstream.name, target.repo, reference, accept.header)
        return await self._fetching.run(key, lambda: self._fetch_once(target, reference, accept))

    async def _fetch_once(self, target: Target, reference: str, accept: Accept) -> Manifest:
        response = await self._request(target, "GET", reference, accept)
        async with response:
            if (response.content_length or 0) > MAX_MANIFEST_SIZE:
                raise ManifestTooLarge(detail={"limit": MAX_MANIFEST_SIZE})
            data = await _read_capped(response, target)
            self.metrics.upstream_bytes.labels(target.upstream.name).inc(len(data))
            media_type = response.headers.get("Content-Type", "").split(";", 1)[0].strip()
            announced = response.headers.get("Docker-Content-Digest")
        algorithm = "sha512" if announced and announced.startswith("sha512:") else "sha256"
        manifest = Manifest(data, media_type or _sniff_media_type(data), Digest.of(data, algorithm))
        if announced and announced != str(manifest.digest):
            self.metrics.digest_mismatches.labels("manifest", target.upstream.name).inc()
            raise UpstreamBadResponse(
                f"upstream {target.upstream.name} sent a manifest whose bytes do not match"
                " its Docker-Content-Digest"
            )
        return manifest

    async def _request(
        self, target: Target, method: str, reference: str, accept: Accept
    ) -> aiohttp.ClientResponse:
        response = await self.client.request(
            target.upstream,
            method,
            f"/v2/{target.repo}/manifests/{reference}",
            repo=target.repo,
            headers={"Accept": accept.header},
        )
        self.client.check(target.upstream, response, ManifestUnknown(detail={"name": target.name}))
        return response


async def _read_capped(response: aiohttp.ClientResponse, target: Target) -> bytes:
    too_large = ManifestTooLarge(detail={"limit": MAX_MANIFEST_SIZE})
    try:
        return await read_capped(response, MAX_MANIFEST_SIZE, too_large)
    except (TimeoutError, aiohttp.ClientError) as exc:
        raise UpstreamUnavailable(
            f"upstream {target.upstream.name} broke off a manifest: {type(exc).__name__}"
        ) from None


def _sniff_media_type(data: bytes) -> str:
    """Upstreams that send no Content-Type: the manifest's own mediaType field says."""
    try:
        value = json.loads(data).get("mediaType")
    except (ValueError, AttributeError):
        value = None
    return value if isinstance(value, str) and value else OCI_MANIFEST


def platform_names(platform: dict[str, Any] | None) -> set[str]:
    """`os/arch`, and `os/arch/variant` when it has one: what `warm --platform` and
    `export --platform` match in an index's entry."""
    p = platform or {}
    names = {f"{p.get('os')}/{p.get('architecture')}"}
    if p.get("variant"):
        names.add(f"{p.get('os')}/{p.get('architecture')}/{p['variant']}")
    return names
