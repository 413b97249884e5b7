"""Tag lists and referrers: upstream's answers, remembered so that they survive outages.

The rules, in one place. An answer is kept per (upstream, repository, endpoint, query
string): each page of a paginated list is its own answer, whose `Link` is rewritten to
point at the mirror, under the name each client used. No answer is ever served to
another repository.

    stored answer            upstream                        the client gets
    within listing_ttl       not asked                       the stored answer (hit)
    older, or none           answers 2xx                     upstream's answer, stored (miss)
    any                      404 (no such repository)        NAME_UNKNOWN; stored pages dropped
    older                    fails (UpstreamFailed)          the stored answer (stale)
    none                     fails                           referrers: built from the cache
                                                             (stale), if it holds the subject
                                                             or a referrer of it for this
                                                             repository; else upstream's error
    referrers, any           404 that is no OCI NAME_UNKNOWN built from the cache (hit); the
                             (it has no referrers API)       upstream is not asked again for
                                                             its listing_ttl

"Built from the cache" follows OCI distribution 1.1: an image index of the descriptors
of the stored manifests, linked to this repository, whose `subject` is the digest, plus
those in the subject's referrers tag (`sha256-<hex>`), the index that clients push to a
registry without the API; filtered by `artifactType` when asked, saying so in
`OCI-Filters-Applied`. distribution 2.8, for one, answers every referrers request with
a plain-text 404 ("404 page not found"), whether or not the repository exists: so when
the cache knows nothing of the subject, its tag list says whether the repository does.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import aiohttp

from cache.digests import Digest
from cache.store import Cache, LookupResult
from proxy.coalesce import Coalescer
from proxy.errors import ManifestUnknown, NameUnknown, UpstreamBadResponse, UpstreamFailed
from proxy.manifests import OCI_INDEX, Accept, ManifestService
from proxy.routing import Target
from proxy.upstream import UpstreamClient, read_capped

log = logging.getLogger("pullthrough.listings")

MAX_LISTING_SIZE = 8 * 1024 * 1024
TAGS = "tags/list"
# Link is kept as upstream sent it and rewritten for each client (`_for_client`): one
# answer is served to clients that name its repository differently (ns=, a path prefix).
_PASSED_HEADERS = ("Content-Type", "OCI-Filters-Applied", "Link")
_LINK_PATH = re.compile(r"<(?:https?://[^/>]+)?/v2/(.+?)/(tags/list|referrers/[^?>]*)(\?[^>]*)?>")


@dataclass(frozen=True, slots=True)
class Listing:
    body: bytes
    headers: dict[str, str]
    result: LookupResult = "miss"
    fresh_for: float = 0.0  # seconds this answer is served without asking upstream


class NoReferrersApi(Exception):
    """Upstream answered a referrers request with a 404 that names no repository."""


class ListingService:
    def __init__(
        self,
        cache: Cache,
        client: UpstreamClient,
        manifests: ManifestService,
        keep_for: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.cache = cache
        self.keep_for = keep_for  # blob_ttl: answers not renewed that long are dropped
        self.client = client
        self.manifests = manifests
        self.clock = clock
        self._fetching: Coalescer[Listing] = Coalescer()
        # When each upstream last showed it has no referrers API: not asked again within
        # its listing_ttl.
        self._without_api: dict[str, float] = {}

    async def tags(self, target: Target, params: dict[str, str]) -> Listing:
        return await self._lookup(target, TAGS, params)

    async def referrers(self, target: Target, digest: Digest, params: dict[str, str]) -> Listing:
        upstream = target.upstream
        seen = self._without_api.get(upstream.name)
        if seen is not None and self.clock() - seen < upstream.listing_ttl:
            return await self._without_referrers_api(target, digest, params)
        try:
            return await self._lookup(target, f"referrers/{digest}", params)
        except NoReferrersApi:
            self._without_api[upstream.name] = self.clock()
            return await self._without_referrers_api(target, digest, params)
        except UpstreamFailed as exc:
            found = await self._cached_referrers(target, digest, upstream_failed=True)
            if not found and not await self._knows(target, digest):
                raise
            log.warning("serving referrers of %s from the cache, upstream failed: %s", digest, exc)
            return _referrers_index(found, params, "stale", 0.0)

    async def _without_referrers_api(
        self, target: Target, digest: Digest, params: dict[str, str]
    ) -> Listing:
        found = await self._cached_referrers(target, digest)
        if not found and not await self._knows(target, digest):
            await self._fetch(target, TAGS, {"n": "1"})  # NAME_UNKNOWN if it doesn't exist
        return _referrers_index(found, params, "hit", target.upstream.listing_ttl)

    async def _lookup(self, target: Target, endpoint: str, params: dict[str, str]) -> Listing:
        upstream, repo = target.upstream, target.repo
        query = urlencode(sorted(params.items()))
        stored = await self.cache.listing(upstream.name, repo, endpoint, query)
        ttl = upstream.listing_ttl
        age = self.clock() - stored.checked if stored else 0.0
        if stored is not None and age < ttl:
            return _for_client(target, stored.body, stored.headers, "hit", ttl - age)
        key = (upstream.name, repo, endpoint, query)
        try:
            fetched = await self._fetching.run(key, lambda: self._fetch(target, endpoint, params))
        except (NameUnknown, ManifestUnknown):
            await self.cache.drop_listings(upstream.name, repo, endpoint)
            raise
        except UpstreamFailed as exc:
            if stored is None:
                raise
            log.warning("serving stored %s of %s, upstream failed: %s", endpoint, target.key, exc)
            return _for_client(target, stored.body, stored.headers, "stale", 0.0)  # already due
        await self.cache.set_listing(
            upstream.name, repo, endpoint, query, fetched.body, fetched.headers, self.keep_for
        )
        return _for_client(target, fetched.body, fetched.headers, "miss", ttl)

    async def _fetch(self, target: Target, endpoint: str, params: dict[str, str]) -> Listing:
        upstream = target.upstream
        response = await self.client.request(
            upstream, "GET", f"/v2/{target.repo}/{endpoint}", repo=target.repo, params=params
        )
        async with response:
            if response.status == 404 and endpoint != TAGS:
                await _refuse_missing_referrers_api(response, target)
            self.client.check(upstream, response, NameUnknown(detail={"name": target.name}))
            body = await self._read_capped(response, target)
            headers = {h: response.headers[h] for h in _PASSED_HEADERS if h in response.headers}
        return Listing(body, headers)

    async def _read_capped(self, response: aiohttp.ClientResponse, target: Target) -> bytes:
        too_large = UpstreamBadResponse(f"upstream {target.upstream.name} sent too large a list")
        try:
            return await read_capped(response, MAX_LISTING_SIZE, too_large)
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise self.client.stream_failed(target.upstream, exc) from None

    async def _cached_referrers(
        self, target: Target, digest: Digest, upstream_failed: bool = False
    ) -> list[dict[str, Any]]:
        """The descriptors of the referrers the cache knows for this repository."""
        tagged = await self._referrers_tag(target, digest, upstream_failed)
        found = {d["digest"]: d for d in tagged}
        for referrer in await self.cache.referrers(target.upstream.name, target.repo, digest):
            found[referrer.digest] = referrer.descriptor()
        return sorted(found.values(), key=lambda d: str(d["digest"]))

    async def _referrers_tag(
        self, target: Target, digest: Digest, upstream_failed: bool
    ) -> list[dict[str, Any]]:
        """The descriptors of the subject's referrers tag, if there is one: clients that
        found no referrers API pushed it. Looked up as any tag is (cached, revalidated),
        or, once upstream just failed, only in the cache: asking again would cost the
        client a second timeout, and an offline upstream a second refusal."""
        tag = f"{digest.algorithm}-{digest.hex[:64]}"
        accept = Accept([OCI_INDEX])
        try:
            if upstream_failed:
                manifest = await self.manifests.stored_tag(target, tag, accept)
            else:
                manifest = await self.manifests.get(target, tag, accept)
        except (ManifestUnknown, UpstreamFailed):
            return []
        if manifest is None:
            return []
        try:
            listed = json.loads(manifest.data).get("manifests")
        except (ValueError, AttributeError):
            return []
        if not isinstance(listed, list):
            return []
        return [d for d in listed if isinstance(d, dict) and isinstance(d.get("digest"), str)]

    async def _knows(self, target: Target, digest: Digest) -> bool:
        """Whether the cache holds the subject for this repository."""
        return await self.cache.is_linked(digest, target.link)


async def _refuse_missing_referrers_api(response: aiohttp.ClientResponse, target: Target) -> None:
    """A 404 to a referrers request: the repository is unknown (the one 404 the spec
    allows, with an OCI NAME_UNKNOWN body), or upstream has no such endpoint at all."""
    try:
        body = await read_capped(response, 64 * 1024, ValueError())
    except (ValueError, TimeoutError, aiohttp.ClientError):
        body = b""  # too large or broken off: a 404 all the same
    try:
        code = json.loads(body)["errors"][0]["code"]
    except (ValueError, KeyError, IndexError, TypeError):
        code = None
    if code == "NAME_UNKNOWN":
        raise NameUnknown(detail={"name": target.name})
    raise NoReferrersApi()


def _referrers_index(
    descriptors: list[dict[str, Any]],
    params: dict[str, str],
    result: LookupResult,
    fresh_for: float,
) -> Listing:
    """An OCI 1.1 referrers answer: an image index, filtered when asked, saying so."""
    headers = {"Content-Type": OCI_INDEX}
    artifact_type = params.get("artifactType")
    if artifact_type is not None:
        descriptors = [d for d in descriptors if d.get("artifactType") == artifact_type]
        headers["OCI-Filters-Applied"] = "artifactType"
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": descriptors}
    return Listing(json.dumps(index).encode(), headers, result, fresh_for)


def _for_client(
    target: Target, body: bytes, headers: dict[str, str], result: LookupResult, fresh_for: float
) -> Listing:
    if "Link" in headers:
        headers = headers | {"Link": rewrite_link(headers["Link"], target)}
    return Listing(body, headers, result, fresh_for)


def rewrite_link(link: str, target: Target) -> str:
    """Point upstream's pagination link at this mirror, under the name the client used."""

    def local(match: re.Match[str]) -> str:
        query = match[3] or ""
        if target.namespace is not None:
            query += ("&" if query else "?") + f"ns={target.namespace}"
        return f"</v2/{target.name}/{match[2]}{query}>"

    return _LINK_PATH.sub(local, link)
