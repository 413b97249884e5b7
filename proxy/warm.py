"""Pre-fetching images into the cache through the same services a pull uses.

`pullthrough warm IMAGE...` and the config's `warm:` list both come here. An image's
manifest is fetched as a client would (every modern media type accepted); an index is
narrowed to the wanted platforms; then each image's config and layers are read to the end,
which fills the cache exactly as a client's download does.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

from cache.digests import Digest
from cache.fill import read_range
from proxy.blobs import BlobService
from proxy.config import Config, WarmEntry
from proxy.errors import RegistryError
from proxy.manifests import INDEX_TYPES, Accept, ManifestService, platform_names
from proxy.progress import Progress, mb
from proxy.references import parse_digest, parse_reference
from proxy.routing import Target, resolve

log = logging.getLogger("pullthrough.warm")


def parse_image(config: Config, image: str) -> tuple[Target, str | Digest]:
    """`alpine`, `ghcr.io/org/app:v1`, `quay.io/x/y@sha256:…` → where it lives, and the ref."""
    name, at, digest = image.partition("@")
    if at:
        reference: str | Digest = parse_digest(digest)
    else:
        slash = name.rfind("/")
        colon = name.rfind(":")
        name, reference = (name[:colon], name[colon + 1 :]) if colon > slash else (name, "latest")
        reference = parse_reference(reference)
    return resolve(config, name, None), reference


class Warmer:
    def __init__(
        self,
        config: Config,
        manifests: ManifestService,
        blobs: BlobService,
        progress: Progress | None = None,
    ) -> None:
        self.config = config
        self.manifests = manifests
        self.blobs = blobs
        self.progress = progress

    async def warm(self, request: WarmEntry) -> int:
        """Fetch one image (for the wanted platforms); returns the bytes of its blobs."""
        target, reference = parse_image(self.config, request.image)
        top = await self.manifests.get(target, reference, Accept([]))
        images = [top.data]
        if top.media_type in INDEX_TYPES:
            images = [
                (await self.manifests.get(target, Digest.parse(child), Accept([]))).data
                for child in _children(top.data, request.platforms)
            ]
        total = 0
        for data in images:
            for digest in _blob_digests(data):
                total += await self._fetch_blob(target, digest)
        return total

    async def _fetch_blob(self, target: Target, digest: Digest) -> int:
        blob = await self.blobs.open(target, digest)
        try:
            size, done = blob.size or 0, 0
            async for chunk in read_range(blob.fd, 0, size, blob.fill, blob.reader):
                done += len(chunk)
                if self.progress is not None:
                    self.progress.update(str(digest), done, size)
            if blob.fill is not None:
                await blob.fill.settled.wait()  # stored for good, not just read
            if self.progress is not None:
                self.progress.finish(str(digest), size, blob.result)
            return size
        finally:
            blob.close()


def _children(index: bytes, platforms: frozenset[str] | None) -> list[str]:
    doc = json.loads(index)
    chosen = []
    for entry in doc.get("manifests", []):
        if platforms is None or platform_names(entry.get("platform")) & platforms:
            chosen.append(entry["digest"])
    return chosen


def _blob_digests(manifest: bytes) -> list[Digest]:
    doc = json.loads(manifest)
    descriptors = ([doc["config"]] if "config" in doc else []) + doc.get("layers", [])
    return [Digest.parse(d["digest"]) for d in descriptors]


def skip_offline(config: Config, entries: tuple[WarmEntry, ...]) -> list[WarmEntry]:
    """The entries whose upstream may be asked: start-up warming has nothing to gain from
    an `offline: true` upstream (each would fail), so those are left out, with a log line.
    An entry that names no upstream is kept, for `warm_all` to report."""
    kept = []
    for entry in entries:
        try:
            target, _ = parse_image(config, entry.image)
        except RegistryError:
            kept.append(entry)
            continue
        if target.upstream.offline:
            log.info("not warming %s: upstream %s is offline", entry.image, target.upstream.name)
        else:
            kept.append(entry)
    return kept


async def warm_all(
    warmer: Warmer, requests: list[WarmEntry], report: Callable[[str], None] = log.info
) -> int:
    """Warm each image in turn; a failure is reported and the rest still run. Returns
    how many failed."""
    failed = 0
    for request in requests:
        try:
            size = await warmer.warm(request)
            report(f"warmed {request.image}: {mb(size)}")
        except (RegistryError, ValueError, KeyError) as exc:
            failed += 1
            message = exc.message if isinstance(exc, RegistryError) else str(exc)
            report(f"could not warm {request.image}: {message}")
    return failed
