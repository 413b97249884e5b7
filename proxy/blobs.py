"""Blob lookups and downloads.

    cached on disk      serve from the file; upstream is never asked
    filling right now   stream from the growing temp file (one upstream GET, many readers)
    neither             start a fill owned by the app, then read it like any follower

The first two only for a repository linked to the blob; any other asks upstream first
(proxy/links.py), and is then served the same file or fill: never a second download.

The download is a task of the app's, not of the request: a client that disconnects does
not cancel it, and later clients join it. Downloads take their upstream connections from
a share of the pool (`UpstreamClient.download_slot`), so manifests, tokens and HEADs
always have connections of their own, even while every download is held up.
"""

from __future__ import annotations

import asyncio
import logging

import aiohttp

from cache.digests import Digest
from cache.errors import DigestMismatch, FillFailed, SizeMismatch
from cache.eviction import Evictor
from cache.fill import Fill
from cache.store import Cache, LookupResult, OpenBlob
from proxy.errors import BlobUnknown, RegistryError, UpstreamBadResponse, UpstreamUnavailable
from proxy.links import LinkConfirmer
from proxy.metrics import Metrics
from proxy.routing import Target
from proxy.tasks import BackgroundTasks
from proxy.upstream import UpstreamClient

log = logging.getLogger("pullthrough.blobs")

# Bytes per upstream read, and the client session's read buffer: small reads cost CPU
# per byte, large ones memory per client (the trade measured in tests/bench/README.md).
UPSTREAM_CHUNK = 512 << 10


class BlobService:
    def __init__(
        self,
        cache: Cache,
        evictor: Evictor,
        client: UpstreamClient,
        tasks: BackgroundTasks,
        metrics: Metrics,
    ) -> None:
        self.cache = cache
        self.evictor = evictor
        self.client = client
        self.tasks = tasks
        self.metrics = metrics
        self.links = LinkConfirmer(cache, client)

    async def open(self, target: Target, digest: Digest) -> OpenBlob:
        """A readable blob with a known size. The caller closes it."""
        admitted = await self._admit(target, digest)
        # No await from _admit's last look to here: a blob it found absent is still
        # absent, so no other repository's file or fill can be served unconfirmed.
        blob = self.cache.open_blob(digest)
        if blob is None:
            # A pass-through download waits for a client that stopped reading no longer
            # than it would wait for upstream to send something.
            fill = self.cache.begin_fill(
                digest, stall_timeout=target.upstream.read_timeout, link=target.link
            )
            self.tasks.spawn(self._download(target, fill), name=f"fill {digest}")
            blob = self.cache.open_blob(digest)
            assert blob is not None and blob.fill is fill
            blob.result = "miss"
        elif admitted is not None:
            blob.result = admitted
        if blob.fill is None:
            return blob
        try:
            await blob.fill.wait_started()
            if blob.fill.error is not None:
                # Failed before we answered anything: a clear error beats a cut connection.
                raise _as_registry_error(blob.fill.error)
        except BaseException:
            blob.close()
            raise
        blob.size = blob.fill.size
        return blob

    async def size(self, target: Target, digest: Digest) -> tuple[int, LookupResult]:
        """The blob's size for HEAD, and the cache's result: from the cache if it can,
        else from an upstream HEAD."""
        admitted = await self._admit(target, digest)
        blob = self.cache.open_blob(digest)
        if blob is not None:
            blob.close()
            if blob.size is not None:
                return blob.size, admitted or blob.result
        response = await self.client.request(
            target.upstream, "HEAD", f"/v2/{target.repo}/blobs/{digest}", repo=target.repo
        )
        response.release()
        self.client.check(target.upstream, response, _unknown(target, digest))
        if response.content_length is None:
            raise UpstreamUnavailable(f"upstream {target.upstream.name} sent no blob size")
        return response.content_length, "miss"

    async def _admit(self, target: Target, digest: Digest) -> LookupResult | None:
        """How upstream admitted `target` to the blob the cache stores (raising if it did
        not), or None when it had no need to. Returns without awaiting anything after its
        last look at the cache, so the caller acts on what it saw."""
        if await self.cache.is_linked(digest, target.link):
            return None
        if not self.cache.stores(digest):
            return None  # nothing to serve: the download asks upstream as target anyway
        return await self.links.confirm(target, "blobs", digest, _unknown(target, digest))

    async def _download(self, target: Target, fill: Fill) -> None:
        digest, upstream = fill.digest, target.upstream
        try:
            async with self.client.download_slot(upstream):
                await self._fetch_into(target, fill)
            await self.cache.commit_fill(fill, upstream.name, target.repo)
        except (DigestMismatch, SizeMismatch) as exc:
            # Wrong bytes: nothing is committed, and readers see their bodies cut off.
            log.error("discarded %s from %s: %s", digest, upstream.name, exc)
            self.metrics.digest_mismatches.labels("blob", upstream.name).inc()
            self.cache.abandon_fill(fill, exc)
        except asyncio.CancelledError:
            self.cache.abandon_fill(fill, UpstreamUnavailable("the mirror is shutting down"))
            raise
        except (RegistryError, FillFailed) as exc:
            self.cache.abandon_fill(fill, exc)
        except (TimeoutError, aiohttp.ClientError) as exc:
            log.warning("download of %s from %s failed: %r", digest, upstream.name, exc)
            self.cache.abandon_fill(fill, self.client.stream_failed(upstream, exc))
        except Exception:
            # Whatever went wrong, the readers must be released, not left waiting.
            log.exception("storing %s failed", digest)
            self.cache.abandon_fill(fill, RegistryError("the mirror could not store the blob"))

    async def _fetch_into(self, target: Target, fill: Fill) -> None:
        upstream = target.upstream
        response = await self.client.request(
            upstream, "GET", f"/v2/{target.repo}/blobs/{fill.digest}", repo=target.repo
        )
        self.client.check(upstream, response, _unknown(target, fill.digest))
        async with response:
            if response.content_length is None:
                # Without a length, a body could run forever; registries always send one.
                raise self.client.bad(upstream, "sent a blob without Content-Length")
            await self.evictor.make_room(fill, response.content_length)
            fill.start(response.content_length)
            fetched = self.metrics.upstream_bytes.labels(upstream.name)
            async for chunk in response.content.iter_chunked(UPSTREAM_CHUNK):
                fetched.inc(len(chunk))
                await fill.append(chunk)


def _as_registry_error(error: BaseException) -> RegistryError:
    if isinstance(error, RegistryError):
        return error
    return UpstreamBadResponse(f"the download was discarded: {error}")


def _unknown(target: Target, digest: Digest) -> BlobUnknown:
    return BlobUnknown(detail={"name": target.name, "digest": str(digest)})
