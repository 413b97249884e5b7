"""Scoping cached content: a stored digest is served to an (upstream, repository) pair
only when that pair is linked to it (`Cache.is_linked`).

    pair linked to the digest     serve the stored copy; upstream is never asked
    not linked, digest stored     HEAD upstream, authorized as that repository (one
                                  request, shared by everyone asking at once):
                                    2xx         link the pair; serve the stored copy
                                    404         BLOB_UNKNOWN / MANIFEST_UNKNOWN
                                    401, 403    DENIED
                                    no answer   UNAVAILABLE (503): an unlinked pair is
                                                never served from the cache, unless the
                                                upstream has no credentials and says
                                                `share_when_down` (its content is public)
    not stored                    the download asks upstream itself, as that repository

So a layer pulled with the mirror's credentials from one private repository is served to
another repository, or under another upstream, only if that upstream says it may be.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

from cache.digests import Digest
from cache.store import Cache, LookupResult
from proxy.coalesce import Coalescer
from proxy.errors import Denied, RegistryError, Unauthorized, UpstreamFailed
from proxy.routing import Target
from proxy.upstream import UpstreamClient


class LinkConfirmer:
    """Asks upstream whether a repository holds a digest the cache already stores."""

    def __init__(self, cache: Cache, client: UpstreamClient) -> None:
        self.cache = cache
        self.client = client
        self._confirming: Coalescer[LookupResult] = Coalescer()

    async def confirm(
        self,
        target: Target,
        kind: Literal["blobs", "manifests"],
        digest: Digest,
        not_found: RegistryError,
        headers: Mapping[str, str] | None = None,
    ) -> LookupResult:
        """Link `target`'s pair to `digest` if upstream holds it there ("confirmed"), or
        serve it unlinked while a `share_when_down` upstream is down ("stale"); raise
        otherwise."""
        key = (target.upstream.name, target.repo, kind, str(digest))
        return await self._confirming.run(
            key, lambda: self._confirm_once(target, kind, digest, not_found, headers)
        )

    async def _confirm_once(
        self,
        target: Target,
        kind: str,
        digest: Digest,
        not_found: RegistryError,
        headers: Mapping[str, str] | None,
    ) -> LookupResult:
        upstream = target.upstream
        try:
            response = await self.client.request(
                upstream,
                "HEAD",
                f"/v2/{target.repo}/{kind}/{digest}",
                repo=target.repo,
                headers=headers,
            )
            response.release()
            self.client.check(upstream, response, not_found)
        except Unauthorized:
            # Refused as this repository: the stored copy belongs to another one.
            raise Denied(f"upstream {upstream.name} denied access to {target.name}") from None
        except UpstreamFailed:
            if not upstream.share_when_down:
                raise
            return "stale"  # not linked: upstream is asked again next time
        await self.cache.link(digest, target.link)
        return "confirmed"
