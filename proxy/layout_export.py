"""`pullthrough export`: cached images written as an OCI image layout, from the cache only.

    IMAGE names          the entry written to index.json
    a tag                the tag's newest stored answer, an index preferred (so a
                         multi-platform image stays one), with every platform in it
    a digest             that manifest, and everything under it
    --platform given     out of an index, the manifest for that platform alone, with its
                         `platform`; a single-platform image is written as it is

With --platform the entry is the platform's own manifest rather than a filtered index:
it keeps upstream's bytes and digest (a filtered index would be a new manifest, whose
digest no registry knows), and skopeo and every other reader take a plain manifest.

Upstream is never asked. Content counts as cached for a repository only if the mirror
would serve it to that repository without asking (it is linked to it, proxy/links.py),
so an export never labels one repository's content as another's. Everything is looked
up before anything is written; every blob is re-hashed as it is copied.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

from cache.digests import Digest
from cache.store import Cache
from proxy.config import Config
from proxy.errors import RegistryError
from proxy.layout import (
    DOCKER_TYPES,
    REF_NAME,
    SOURCE,
    WRAPS,
    Descriptor,
    LayoutError,
    NotCached,
    blob_name,
    children,
    in_thread,
    layout_files,
    walk,
    wrap,
)
from proxy.layout_files import LayoutWriter, check_output, open_writer
from proxy.manifests import INDEX_TYPES
from proxy.progress import Progress
from proxy.routing import Target
from proxy.warm import parse_image

READ_CHUNK = 1 << 20
SHOWN_MISSING = 3  # items a "not in the cache" message names before "and N more"


@dataclass
class Plan:
    """What an export writes: the index.json entries and every blob under them."""

    entries: list[Descriptor] = field(default_factory=list)
    manifests: dict[Digest, bytes] = field(default_factory=dict)
    blobs: dict[Digest, int] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return sum(len(data) for data in self.manifests.values()) + sum(self.blobs.values())


class Exporter:
    def __init__(
        self,
        config: Config,
        cache: Cache,
        platform: str | None = None,
        bars: Progress | None = None,
    ) -> None:
        self.config = config
        self.cache = cache
        self.platform = platform
        self.bars = bars or Progress(lines_when_piped=False)

    async def export(self, images: list[str], out: Path) -> Plan:
        check_output(out)  # before the lookups: a taken -o is the first thing to hear about
        plan = await self.plan(images)
        await self.write(plan, out)
        return plan

    async def plan(self, images: list[str]) -> Plan:
        """Find every image's content in the cache; raise NotCached naming all that is
        missing, before anything is written."""
        plan, missing = Plan(), list[str]()
        for image in images:
            await self._add(plan, image, missing)
        if missing:
            raise NotCached(_missing_message(missing, self.platform is None))
        return plan

    async def _add(self, plan: Plan, image: str, missing: list[str]) -> None:
        target, reference = _parse(self.config, image)
        found = await self._top(target, reference, image, missing)
        if found is None:
            return
        entry = self._select(image, *found)
        walked = await walk(entry, partial(self._read, target))
        missing += [f"{image}: {d.describe()}" for d in walked.missing]
        for digest, blob in walked.blobs.items():
            if not await self._has(target, digest):
                missing.append(f"{image}: blob {digest}")
            plan.blobs[digest] = blob.size
        plan.manifests.update((d, data) for d, (_, data) in walked.manifests.items())
        annotations = {SOURCE: f"{target.upstream.name}/{target.repo}"}
        if isinstance(reference, str):
            annotations[REF_NAME] = reference
        if entry.media_type in DOCKER_TYPES and not walked.missing:
            annotations[WRAPS] = str(entry.digest)
            entry, wrapper = wrap(entry, walked.manifests[entry.digest][1])
            plan.manifests[entry.digest] = wrapper
        entry = replace(entry, annotations=annotations)
        if entry not in plan.entries:
            plan.entries.append(entry)

    async def _top(
        self, target: Target, reference: str | Digest, image: str, missing: list[str]
    ) -> tuple[Descriptor, bytes] | None:
        """The manifest an image name stands for in the cache (the newest answer for a
        tag, an index preferred), or None with the reason added to `missing`."""
        if isinstance(reference, Digest):
            candidates = [reference]
        else:
            rows = await self.cache.tag_answers(target.upstream.name, target.repo, reference)
            rows.sort(key=lambda row: row.media_type not in INDEX_TYPES)  # stable: newest first
            candidates = [Digest.parse(row.digest) for row in rows]
            if not candidates:
                missing.append(f"{image}: the tag has no answer in the cache")
                return None
        for digest in candidates:
            stored = await self.cache.get_manifest(digest)
            if stored is not None and await self.cache.is_linked(digest, target.link):
                return Descriptor(stored[1], digest, len(stored[0])), stored[0]
        missing.append(f"{image}: manifest {candidates[0]}")
        return None

    def _select(self, image: str, top: Descriptor, data: bytes) -> Descriptor:
        if self.platform is None or top.media_type not in INDEX_TYPES:
            return top
        options = children(json.loads(data), top.digest)
        chosen = [child for child in options if self.platform in child.platform_names()]
        if len(chosen) != 1:
            have = ", ".join(sorted(max(c.platform_names(), key=len) for c in options))
            what = "no" if not chosen else "more than one"
            raise LayoutError(f"{image} has {what} {self.platform} manifest (it has: {have})")
        return chosen[0]

    async def _read(self, target: Target, descriptor: Descriptor) -> bytes | None:
        stored = await self.cache.get_manifest(descriptor.digest)
        if stored is None or not await self.cache.is_linked(descriptor.digest, target.link):
            return None
        return stored[0]

    async def _has(self, target: Target, digest: Digest) -> bool:
        return self.cache.stores(digest) and await self.cache.is_linked(digest, target.link)

    async def write(self, plan: Plan, out: Path) -> None:
        """Write the layout to a temp sibling of `out` in a worker thread, then move it
        into place. Cancelled (^C), the thread stops at its next chunk and cleans up."""
        await in_thread(partial(self._write, plan, out))

    def _write(self, plan: Plan, out: Path, cancelled: threading.Event) -> None:
        writer = open_writer(out)
        try:
            for name, data in layout_files(plan.entries).items():
                writer.add_bytes(name, data)
            for digest, data in plan.manifests.items():
                writer.add_bytes(blob_name(digest), data)
            for digest, size in plan.blobs.items():
                self._copy_blob(writer, digest, size, cancelled)
            writer.commit()
        except BaseException:
            writer.abort()
            raise

    def _copy_blob(
        self, writer: LayoutWriter, digest: Digest, size: int, cancelled: threading.Event
    ) -> None:
        blob = self.cache.open_blob(digest)
        if blob is None or blob.fill is not None:
            raise NotCached(f"blob {digest} left the cache during the export (evicted)")
        try:
            reader = CachedBlob(blob.fd, digest, size, self.bars, cancelled)
            if blob.size != size:
                raise reader.corrupt()
            writer.add(blob_name(digest), size, reader)  # type: ignore[arg-type]
            reader.verify()
        finally:
            blob.close()
        self.bars.finish(digest, size, "exported")


class CachedBlob:
    """A stored blob's bytes as a file-like reader that hashes them as they pass."""

    def __init__(
        self, fd: int, digest: Digest, size: int, bars: Progress, cancelled: threading.Event
    ) -> None:
        self.fd, self.digest, self.size = fd, digest, size
        self.bars, self.cancelled = bars, cancelled
        self.done = 0
        self.hasher = digest.hasher()

    def read(self, n: int = -1) -> bytes:
        if self.cancelled.is_set():
            raise LayoutError("export cancelled")
        want = self.size - self.done if n < 0 else min(n, self.size - self.done)
        data = os.pread(self.fd, min(want, READ_CHUNK), self.done)
        if want and not data:
            raise self.corrupt()  # shorter than its size: cut short on disk
        self.hasher.update(data)
        self.done += len(data)
        self.bars.update(self.digest, self.done, self.size)
        return data

    def verify(self) -> None:
        if self.done != self.size or self.hasher.hexdigest() != self.digest.hex:
            raise self.corrupt()

    def corrupt(self) -> LayoutError:
        return NotCached(
            f"cached blob {self.digest} is damaged (run `pullthrough fsck --repair`);"
            " nothing was written"
        )


def _parse(config: Config, image: str) -> tuple[Target, str | Digest]:
    try:
        return parse_image(config, image)
    except RegistryError as exc:
        raise LayoutError(f"{image}: {exc.message}") from None


def _missing_message(missing: list[str], all_platforms: bool) -> str:
    shown = "; ".join(missing[:SHOWN_MISSING])
    more = f"; and {len(missing) - SHOWN_MISSING} more" if len(missing) > SHOWN_MISSING else ""
    hint = " (pull it through the mirror first"
    hint += ", or export one platform with --platform)" if all_platforms else ")"
    return f"not in the cache: {shown}{more}{hint}"
