"""The OCI image layout (image-spec `image-layout.md`): what `export` writes and `import` reads.

    <layout>/                   a directory, or the same tree as an uncompressed tar
    ├── oci-layout              {"imageLayoutVersion": "1.0.0"}
    ├── index.json              an image index: one descriptor per image
    └── blobs/
        └── sha256/
            └── 3f2a…e9         a manifest, config or layer, named by its digest's hex

An image's entry in index.json carries these annotations:

    org.opencontainers.image.ref.name   its tag, as skopeo's `oci:DIR:TAG` names it
    io.pullthrough.source               UPSTREAM/REPOSITORY it was cached from, as the
                                        mirror's config names the upstream, e.g.
                                        docker.io/library/alpine
    io.pullthrough.manifest             only on a wrapper (below): the digest of the
                                        Docker manifest or manifest list it wraps

Manifests are kept byte for byte, so every digest stays upstream's. That includes Docker
ones, though readers such as skopeo take only OCI types in index.json: a Docker image is
listed there through a wrapper, a small OCI index whose children are the Docker list's
(or the one Docker manifest). The wrapped bytes are in blobs/ too,
and `import` takes them, not the wrapper.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from cache.digests import Digest
from cache.errors import InvalidDigest
from proxy.manifests import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    INDEX_TYPES,
    MANIFEST_TYPES,
    MAX_MANIFEST_SIZE,
    OCI_INDEX,
    platform_names,
)

T = TypeVar("T")

LAYOUT_FILE = "oci-layout"
INDEX_FILE = "index.json"
LAYOUT_VERSION = "1.0.0"
REF_NAME = "org.opencontainers.image.ref.name"
SOURCE = "io.pullthrough.source"
WRAPS = "io.pullthrough.manifest"
DOCKER_TYPES = (DOCKER_MANIFEST, DOCKER_LIST)
MAX_DEPTH = 4  # an index of indexes of ... : deeper than any real image nests


class LayoutError(Exception):
    """A layout, or a request about one, that can't be done: one line for the user.
    `status` is the exit status (2: bad input)."""

    status = 2


class NotCached(LayoutError):
    """Export: content an image needs is not in the cache (exit status 1)."""

    status = 1


class NoRoom(LayoutError):
    """Import: the cache's budget or disk can't take it (exit status 1)."""

    status = 1


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: Digest
    size: int
    platform: dict[str, Any] | None = None
    annotations: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, raw: object, where: str) -> Descriptor:
        if not isinstance(raw, dict):
            raise LayoutError(f"{where}: not a descriptor object")
        media_type, digest, size = raw.get("mediaType"), raw.get("digest"), raw.get("size")
        if not isinstance(media_type, str) or not media_type:
            raise LayoutError(f"{where}: no mediaType")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise LayoutError(f"{where}: size is not a non-negative integer")
        try:
            parsed = Digest.parse(digest if isinstance(digest, str) else "")
        except InvalidDigest:
            raise LayoutError(
                f"{where}: digest {str(digest)[:80]!r} is not sha256/sha512"
            ) from None
        platform, annotations = raw.get("platform"), raw.get("annotations") or {}
        if platform is not None and not isinstance(platform, dict):
            raise LayoutError(f"{where}: platform is not an object")
        if not isinstance(annotations, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in annotations.items()
        ):
            raise LayoutError(f"{where}: annotations are not strings")
        return cls(media_type, parsed, size, platform, annotations)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "mediaType": self.media_type,
            "digest": str(self.digest),
            "size": self.size,
        }
        if self.platform is not None:
            out["platform"] = self.platform
        if self.annotations:
            out["annotations"] = self.annotations
        return out

    def platform_names(self) -> set[str]:
        return platform_names(self.platform)

    def describe(self) -> str:
        """How a message names it: its tag, platform or digest."""
        if REF_NAME in self.annotations:
            return repr(self.annotations[REF_NAME])
        if self.platform:
            return f"{max(self.platform_names(), key=len)} manifest {self.digest}"
        return str(self.digest)


def parse_json(data: bytes, where: str) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):  # RecursionError: nested past the parser's depth
        raise LayoutError(f"{where} is not valid JSON") from None
    if not isinstance(doc, dict):
        raise LayoutError(f"{where} is not a JSON object")
    return doc


def check_layout_file(data: bytes) -> None:
    version = parse_json(data, LAYOUT_FILE).get("imageLayoutVersion")
    if not isinstance(version, str) or not version.startswith("1."):
        raise LayoutError(f"{LAYOUT_FILE}: imageLayoutVersion {version!r} is not 1.x")


def index_entries(data: bytes) -> list[Descriptor]:
    doc = parse_json(data, INDEX_FILE)
    if doc.get("schemaVersion") != 2 or not isinstance(doc.get("manifests"), list):
        raise LayoutError(f"{INDEX_FILE} is not an image index (schemaVersion 2, manifests)")
    entries = [
        Descriptor.parse(raw, f"{INDEX_FILE} manifests[{n}]")
        for n, raw in enumerate(doc["manifests"])
    ]
    for n, entry in enumerate(entries):
        if entry.media_type not in MANIFEST_TYPES:
            raise LayoutError(f"{INDEX_FILE} manifests[{n}]: unsupported type {entry.media_type}")
    return entries


def layout_files(entries: list[Descriptor]) -> dict[str, bytes]:
    """oci-layout and index.json for these entries."""
    index: dict[str, Any] = {"schemaVersion": 2, "mediaType": OCI_INDEX}
    index["manifests"] = [entry.to_json() for entry in entries]
    return {
        LAYOUT_FILE: json.dumps({"imageLayoutVersion": LAYOUT_VERSION}).encode(),
        INDEX_FILE: json.dumps(index, indent=2).encode(),
    }


def wrap(entry: Descriptor, data: bytes) -> tuple[Descriptor, bytes]:
    """An OCI index around a Docker manifest list (its children, with their platforms)
    or a Docker manifest (itself, with no platform: a reader then takes it whatever its
    own platform, as it would take a manifest listed directly)."""
    if entry.media_type == DOCKER_LIST:
        kids = parse_json(data, f"index {entry.digest}")["manifests"]
    else:
        kids = [Descriptor(entry.media_type, entry.digest, entry.size).to_json()]
    body = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": kids}
    data = json.dumps(body, indent=2).encode()
    return Descriptor(OCI_INDEX, Digest.of(data), len(data)), data


def blob_name(digest: Digest) -> str:
    return f"blobs/{digest.algorithm}/{digest.hex}"


# -- walking an image: its manifests, then the blobs they name -------------------------


@dataclass
class Walked:
    """Everything one entry needs: its manifests (the entry first), the config and layer
    blobs they name (no duplicates), and the manifests `read` could not find."""

    manifests: dict[Digest, tuple[Descriptor, bytes]] = field(default_factory=dict)
    blobs: dict[Digest, Descriptor] = field(default_factory=dict)
    missing: list[Descriptor] = field(default_factory=list)


ReadManifest = Callable[[Descriptor], Awaitable[bytes | None]]


async def walk(entry: Descriptor, read: ReadManifest) -> Walked:
    """Read the entry's manifest, an index's children depth first, and collect their
    blobs. Every manifest is checked against its descriptor (digest, size, media type)."""
    walked = Walked()
    await _walk(entry, read, walked, 0)
    return walked


async def _walk(descriptor: Descriptor, read: ReadManifest, walked: Walked, depth: int) -> None:
    if descriptor.digest in walked.manifests:
        return
    if descriptor.media_type not in MANIFEST_TYPES or depth > MAX_DEPTH:
        raise LayoutError(f"manifest {descriptor.digest}: unsupported type or nesting")
    check_manifest_size(descriptor)
    data = await read(descriptor)
    if data is None:
        walked.missing.append(descriptor)
        return
    check_content(descriptor, data)
    doc = parse_json(data, f"manifest {descriptor.digest}")
    if doc.get("mediaType", descriptor.media_type) != descriptor.media_type:
        raise LayoutError(
            f"manifest {descriptor.digest} says it is {doc.get('mediaType')},"
            f" its descriptor {descriptor.media_type}"
        )
    walked.manifests[descriptor.digest] = (descriptor, data)
    if descriptor.media_type in INDEX_TYPES:
        for child in children(doc, descriptor.digest):
            await _walk(child, read, walked, depth + 1)
        return
    for blob in blob_descriptors(doc, descriptor.digest):
        known = walked.blobs.setdefault(blob.digest, blob)
        if known.size != blob.size:
            raise LayoutError(f"blob {blob.digest} is described with two sizes")


def check_content(descriptor: Descriptor, data: bytes) -> None:
    if len(data) != descriptor.size:
        raise LayoutError(
            f"manifest {descriptor.digest} is {len(data)} bytes, its descriptor says"
            f" {descriptor.size}"
        )
    actual = Digest.of(data, descriptor.digest.algorithm)
    if actual != descriptor.digest:
        raise LayoutError(f"manifest {descriptor.digest}: content hashed to {actual}")


def children(index: dict[str, Any], digest: Digest) -> list[Descriptor]:
    raw = index.get("manifests")
    if not isinstance(raw, list):
        raise LayoutError(f"index {digest} has no manifests list")
    return [Descriptor.parse(r, f"index {digest} manifests[{n}]") for n, r in enumerate(raw)]


def blob_descriptors(manifest: dict[str, Any], digest: Digest) -> list[Descriptor]:
    """The config and the layers (not `subject`: that is another image, not a part)."""
    config, layers = manifest.get("config"), manifest.get("layers", [])
    if not isinstance(config, dict) or not isinstance(layers, list):
        raise LayoutError(f"manifest {digest} has no config or layers")
    where = f"manifest {digest}"
    return [Descriptor.parse(config, f"{where} config")] + [
        Descriptor.parse(layer, f"{where} layers[{n}]") for n, layer in enumerate(layers)
    ]


def check_manifest_size(descriptor: Descriptor) -> None:
    if descriptor.size > MAX_MANIFEST_SIZE:
        raise LayoutError(f"manifest {descriptor.digest} is larger than {MAX_MANIFEST_SIZE} bytes")


async def in_thread(work: Callable[[threading.Event], T]) -> T:
    """Run the blocking `work` in a worker thread. Cancelled (^C), set the event it
    watches, so it stops at its next chunk and cleans up; wait for that, then re-raise."""
    cancelled = threading.Event()
    job = asyncio.ensure_future(asyncio.to_thread(work, cancelled))
    try:
        return await asyncio.shield(job)
    except asyncio.CancelledError:
        cancelled.set()
        with contextlib.suppress(Exception):
            await job
        raise
