"""`pullthrough import`: the images of an OCI image layout added to the cache, so that a
mirror can be seeded where no upstream is reachable.

    step                                            if it fails
    read oci-layout and index.json                  refused, nothing written
    name each image (below)                         refused
    walk its manifests (each re-hashed); every      refused
      blob they name is in the layout, its size
      the descriptor's
    the import fits the cache's budget and disk     refused
    copy each blob the cache lacks into tmp/,       the temp files are deleted:
      re-hashing it                                   nothing indexed
    make room: evict the least recently used
    move the files into blobs/, then index their
      rows, links and tag answers in one
      transaction                                   all of it or none

Naming. An entry written by `pullthrough export` says where it comes from: the
`io.pullthrough.source` annotation (UPSTREAM/REPOSITORY, the upstream as this mirror's
config names it) and `org.opencontainers.image.ref.name` (the tag); an export's wrapper
of a Docker image stands for the manifest it wraps (proxy/layout.py). Any other layout
(one written by skopeo has only the tag) needs `--as IMAGE`, in `warm`'s notation: the
image the layout stands for. --as picks one image: the only one in the layout, or else
the one whose ref.name is --as's tag (or whose digest is --as's digest).

Each image's content is linked to its repository, so the scoping rule serves it there
without asking upstream, and its tag's answer, recorded for any Accept, replaces the
tag's other answers. A by-tag request then finds it: within manifest_ttl at once, and
later as the answer served when upstream can't be reached.
"""

from __future__ import annotations

import asyncio
import io
import shutil
import threading
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from cache.digests import Digest
from cache.errors import DiskFull, FillFailed, InvalidDigest
from cache.eviction import Evictor
from cache.index import BlobRow, TagAnswer
from cache.store import Cache
from proxy.config import Config
from proxy.errors import RegistryError
from proxy.layout import (
    DOCKER_TYPES,
    INDEX_FILE,
    LAYOUT_FILE,
    REF_NAME,
    SOURCE,
    WRAPS,
    Descriptor,
    LayoutError,
    NoRoom,
    blob_name,
    check_layout_file,
    in_thread,
    index_entries,
    parse_json,
    walk,
)
from proxy.layout_files import LayoutReader, open_reader
from proxy.manifests import MAX_MANIFEST_SIZE, Accept
from proxy.progress import Progress, mb
from proxy.references import parse_reference
from proxy.routing import Target, resolve
from proxy.warm import parse_image

SHOWN = 3  # items a message names before "and N more"
ANY_ACCEPT = Accept([]).key


@dataclass(frozen=True)
class Named:
    """An index.json entry, and the image it is imported as."""

    entry: Descriptor
    target: Target
    tag: str | None

    def tag_answer(self) -> TagAnswer:
        """The tag's answer, for any client: its Accept key is that of 'anything'."""
        upstream, repo = self.target.link
        digest = str(self.entry.digest)
        return TagAnswer(upstream, repo, self.tag or "", ANY_ACCEPT, self.entry.media_type, digest)

    def __str__(self) -> str:
        where = f"{self.target.upstream.name}/{self.target.repo}"
        return f"{where}:{self.tag}" if self.tag else f"{where}@{self.entry.digest}"


@dataclass
class Contents:
    """Everything the named images hold: manifests with their bytes, blobs with sizes."""

    media_types: dict[Digest, str | None] = field(default_factory=dict)
    sizes: dict[Digest, int] = field(default_factory=dict)
    manifests: dict[Digest, bytes] = field(default_factory=dict)
    links: set[tuple[str, str, str]] = field(default_factory=set)


@dataclass(frozen=True)
class Imported:
    images: list[Named]
    blobs: int  # blobs (manifests included) the cache did not have
    size: int  # their bytes


class Importer:
    def __init__(self, config: Config, cache: Cache, bars: Progress | None = None) -> None:
        self.config = config
        self.cache = cache
        self.bars = bars or Progress(lines_when_piped=False)

    async def run(self, path: Path, as_image: str | None = None) -> Imported:
        reader = await asyncio.to_thread(open_reader, path)
        try:
            return await self._run(reader, as_image)
        finally:
            await asyncio.to_thread(reader.close)

    async def _run(self, reader: LayoutReader, as_image: str | None) -> Imported:
        entries = await asyncio.to_thread(_entries, reader)
        images = name_entries(self.config, entries, as_image)
        contents = await self._contents(reader, images)
        new = await self._check_room(contents)
        staged = await self._stage(reader, contents, new)
        try:
            await self._make_room(contents, new)
            rows = [BlobRow(str(d), contents.sizes[d], t) for d, t in contents.media_types.items()]
            tags = [image.tag_answer() for image in images if image.tag is not None]
            await self.cache.commit_staged(
                staged, rows, sorted(contents.links), tags, contents.manifests
            )
        except DiskFull as exc:
            self.cache.discard_staged(list(staged.values()))
            raise NoRoom(f"the cache's index has no room: {exc}") from None
        except BaseException:
            self.cache.discard_staged(list(staged.values()))  # those not moved yet
            raise
        return Imported(images, len(new), sum(contents.sizes[d] for d in new))

    async def _contents(self, reader: LayoutReader, images: list[Named]) -> Contents:
        """Walk every image's manifests; every blob they name must be in the layout."""
        contents, missing = Contents(), []

        async def read(descriptor: Descriptor) -> bytes | None:
            return await asyncio.to_thread(
                reader.read_small, blob_name(descriptor.digest), MAX_MANIFEST_SIZE
            )

        for image in images:
            walked = await walk(image.entry, read)
            missing += [f"manifest {d.digest}" for d in walked.missing]
            for digest, (descriptor, data) in walked.manifests.items():
                contents.media_types[digest] = descriptor.media_type
                contents.sizes[digest] = descriptor.size
                contents.manifests[digest] = data
            for digest, blob in walked.blobs.items():
                size = await asyncio.to_thread(reader.size, blob_name(digest))
                if size is None:
                    missing.append(f"blob {digest}")
                elif size != blob.size:
                    raise LayoutError(
                        f"blob {digest} is {size} bytes in the layout, its descriptor says"
                        f" {blob.size}"
                    )
                contents.media_types.setdefault(digest, None)
                contents.sizes[digest] = blob.size
            link = image.target.link
            contents.links |= {(*link, str(d)) for d in walked.manifests.keys() | walked.blobs}
        if missing:
            more = f" and {len(missing) - SHOWN} more" if len(missing) > SHOWN else ""
            raise LayoutError(f"the layout is missing {', '.join(missing[:SHOWN])}{more}")
        return contents

    async def _check_room(self, contents: Contents) -> list[Digest]:
        """The digests the cache lacks; refused up front if the import can't fit."""
        new = [
            digest
            for digest in contents.sizes
            if not self.cache.stores(digest) or await self.cache.index.get_blob(str(digest)) is None
        ]
        keeps = self.cache.budget.keeps
        total = sum(contents.sizes.values())
        if total > keeps:
            raise NoRoom(
                f"the import is {mb(total)}, more than the cache keeps: {mb(keeps)}"
                " (cache.max_size x cache.low_watermark, where eviction stops)"
            )
        needed = sum(contents.sizes[d] for d in new)
        free = shutil.disk_usage(self.cache.root).free
        if needed > free:
            raise NoRoom(f"the import needs {mb(needed)} of disk, {mb(free)} is free")
        return new

    async def _stage(
        self, reader: LayoutReader, contents: Contents, new: list[Digest]
    ) -> dict[Digest, Path]:
        """Copy and re-hash in a worker thread; cancelled (^C), it stops at its next chunk
        and deletes what it staged."""
        return await in_thread(partial(self._stage_all, reader, contents, new))

    def _stage_all(
        self,
        reader: LayoutReader,
        contents: Contents,
        new: list[Digest],
        cancelled: threading.Event,
    ) -> dict[Digest, Path]:
        staged: dict[Digest, Path] = {}
        try:
            for digest in new:
                size = contents.sizes[digest]
                data = contents.manifests.get(digest)
                source = io.BytesIO(data) if data is not None else reader.open(blob_name(digest))

                def progress(done: int, digest: Digest = digest, size: int = size) -> None:
                    if cancelled.is_set():
                        raise LayoutError("import cancelled")
                    self.bars.update(digest, done, size)

                try:
                    with source:
                        staged[digest] = self.cache.stage(digest, source, size, progress)
                except FillFailed as exc:
                    raise LayoutError(f"blob {digest} in the layout is damaged: {exc}") from None
                except DiskFull as exc:
                    raise NoRoom(f"no room in the cache for {digest}: {exc}") from None
                self.bars.finish(digest, size, "imported")
        except BaseException:
            self.cache.discard_staged(list(staged.values()))
            raise
        return staged

    async def _make_room(self, contents: Contents, new: list[Digest]) -> None:
        """Evict the least recently used until the import fits under the low watermark.
        What the import reuses is touched first, so it is the last to go (and, the whole
        import fitting under that mark, never goes)."""
        for digest in contents.sizes.keys() - set(new):
            self.cache.touch(digest)
        needed = sum(contents.sizes[d] for d in new)
        # shrink_to flushes the touches and recounts first; it evicts nothing while the
        # cache holds no more than the target (`_check_room` made it non-negative).
        await Evictor(self.cache, self.config.cache.blob_ttl).shrink_to(
            self.cache.budget.keeps - needed
        )


def _entries(reader: LayoutReader) -> list[Descriptor]:
    layout = reader.read_small(LAYOUT_FILE, MAX_MANIFEST_SIZE)
    index = reader.read_small(INDEX_FILE, MAX_MANIFEST_SIZE)
    if layout is None or index is None:
        raise LayoutError(f"not an OCI image layout: no {LAYOUT_FILE} or {INDEX_FILE}")
    check_layout_file(layout)
    entries = index_entries(index)
    if not entries:
        raise LayoutError(f"the layout holds no images ({INDEX_FILE} lists none)")
    return [_unwrapped(reader, entry) for entry in entries]


def _unwrapped(reader: LayoutReader, entry: Descriptor) -> Descriptor:
    """The Docker manifest or list an export's wrapper stands for (proxy/layout.py), with
    the wrapper's annotations; any other entry as it is."""
    wrapped = entry.annotations.get(WRAPS)
    if wrapped is None:
        return entry
    where = f"{INDEX_FILE} entry {entry.describe()}"
    try:
        digest = Digest.parse(wrapped)
    except InvalidDigest:
        raise LayoutError(f"{where}: {WRAPS} {wrapped[:80]!r} is not a digest") from None
    data = reader.read_small(blob_name(digest), MAX_MANIFEST_SIZE)
    if data is None:
        raise LayoutError(f"the layout is missing manifest {digest}, which {where} wraps")
    media_type = parse_json(data, f"manifest {digest}").get("mediaType")
    if media_type not in DOCKER_TYPES:
        raise LayoutError(f"{where} wraps {digest}, which is not a Docker manifest or list")
    return Descriptor(str(media_type), digest, len(data), None, entry.annotations)


def name_entries(config: Config, entries: list[Descriptor], as_image: str | None) -> list[Named]:
    """The images to import and what each is imported as (see the module's docstring)."""
    if as_image is not None:
        return [_named_by_as(config, entries, as_image)]
    named = [_named_by_annotations(config, n, entry) for n, entry in enumerate(entries)]
    seen: set[str] = set()
    for image in named:
        if image.tag is not None and str(image) in seen:
            raise LayoutError(f"the layout holds two images named {image}")
        seen.add(str(image))
    return named


def _named_by_as(config: Config, entries: list[Descriptor], as_image: str) -> Named:
    try:
        target, reference = parse_image(config, as_image)
    except RegistryError as exc:
        raise LayoutError(f"--as {as_image}: {exc.message}") from None
    if len(entries) == 1:
        chosen = entries
    elif isinstance(reference, Digest):
        chosen = [entry for entry in entries if entry.digest == reference]
    else:
        chosen = [entry for entry in entries if entry.annotations.get(REF_NAME) == reference]
    if len(chosen) != 1:
        names = ", ".join(entry.describe() for entry in entries[:SHOWN])
        names += ", ..." if len(entries) > SHOWN else ""
        raise LayoutError(
            f"the layout holds {len(entries)} images ({names});"
            f" --as {as_image} names none of them by tag (ref.name) or digest"
        )
    entry = chosen[0]
    if isinstance(reference, Digest):
        if entry.digest != reference:
            raise LayoutError(f"the layout's image is {entry.digest}, not --as's {reference}")
        return Named(entry, target, None)
    return Named(entry, target, reference)


def _named_by_annotations(config: Config, n: int, entry: Descriptor) -> Named:
    where = f"{INDEX_FILE} manifests[{n}] ({entry.describe()})"
    source = entry.annotations.get(SOURCE)
    if source is None:
        raise LayoutError(
            f"{where} does not say which upstream and repository it comes from"
            f" (no {SOURCE} annotation): name the image with --as IMAGE"
        )
    upstream, _, repo = source.partition("/")
    if config.upstream(upstream) is None:
        raise LayoutError(
            f"{where} comes from upstream {upstream!r}, which this mirror's config does not"
            " have: add it, or name the image with --as IMAGE"
        )
    try:
        target = resolve(config, repo, upstream)
        tag = entry.annotations.get(REF_NAME)
        reference = parse_reference(tag) if tag is not None else None
    except RegistryError as exc:
        raise LayoutError(f"{where}: {exc.message}") from None
    if isinstance(reference, Digest):
        raise LayoutError(f"{where}: its {REF_NAME} is not a tag; name it with --as IMAGE")
    return Named(entry, target, reference)
