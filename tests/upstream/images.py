"""Deterministic test images, built byte-for-byte here and pushed upstream.

Layers are real gzip'd tars (sorted entries, fixed mtime/uid/gid, gzip mtime 0)
filled with seeded random data, so the same (seed) always gives the same
digests, real clients can unpack them, and different repos/tags differ.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import random
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.upstream.client import Blob, UpstreamClient, push_blob, push_manifest
from tests.upstream.registry import RegistryProcess
from tests.upstream.token_server import TokenServer

__all__ = [
    "DOCKER_CONFIG",
    "DOCKER_LAYER",
    "DOCKER_MANIFEST",
    "DOCKER_MANIFEST_LIST",
    "OCI_CONFIG",
    "OCI_INDEX",
    "OCI_LAYER",
    "OCI_MANIFEST",
    "Blob",
    "Image",
    "PushedImage",
    "big_blob_image",
    "build_big_layer",
    "build_image",
    "build_index",
    "build_layer",
    "docker_manifest_list_image",
    "multi_layer_image",
    "oci_index_image",
    "push_blob",
    "push_image",
    "push_manifest",
]

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"

_CONFIG_FOR = {DOCKER_MANIFEST: DOCKER_CONFIG, OCI_MANIFEST: OCI_CONFIG}
_LAYER_FOR = {DOCKER_MANIFEST: DOCKER_LAYER, OCI_MANIFEST: OCI_LAYER}
_CHILD_FOR = {DOCKER_MANIFEST_LIST: DOCKER_MANIFEST, OCI_INDEX: OCI_MANIFEST}

TAR_MTIME = 1577836800  # 2020-01-01T00:00:00Z, fixed for reproducibility
CREATED = "2020-01-01T00:00:00Z"
PLATFORMS: list[dict[str, str]] = [
    {"architecture": "amd64", "os": "linux"},
    {"architecture": "arm64", "os": "linux", "variant": "v8"},
]


@dataclass(frozen=True)
class Image:
    """Content of one manifest (image or index), independent of where it is pushed."""

    media_type: str
    manifest: bytes = field(repr=False)
    config: Blob | None = None  # None for indexes
    layers: tuple[Blob, ...] = ()
    children: tuple[Image, ...] = ()  # child manifests of an index
    platform: dict[str, str] | None = None  # set on children of an index

    @property
    def digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.manifest).hexdigest()

    @property
    def size(self) -> int:
        return len(self.manifest)

    @property
    def blobs(self) -> list[Blob]:
        """Config and layer blobs of this image and all children (no duplicates)."""
        out: dict[str, Blob] = {}
        for child in self.children:
            out.update((b.digest, b) for b in child.blobs)
        if self.config is not None:
            out[self.config.digest] = self.config
        out.update((b.digest, b) for b in self.layers)
        return list(out.values())

    def descriptor(self) -> dict[str, Any]:
        d: dict[str, Any] = {"mediaType": self.media_type, "size": self.size, "digest": self.digest}
        if self.platform is not None:
            d["platform"] = self.platform
        return d


@dataclass(frozen=True)
class PushedImage:
    """An :class:`Image` as pushed to ``host`` under ``repo`` (and ``tag``)."""

    host: str  # "127.0.0.1:PORT" of the registry it was pushed to
    repo: str
    tag: str | None
    image: Image

    @property
    def digest(self) -> str:
        return self.image.digest

    @property
    def manifest(self) -> bytes:
        return self.image.manifest

    @property
    def media_type(self) -> str:
        return self.image.media_type

    @property
    def config(self) -> Blob | None:
        return self.image.config

    @property
    def layers(self) -> tuple[Blob, ...]:
        return self.image.layers

    @property
    def blobs(self) -> list[Blob]:
        return self.image.blobs

    @property
    def children(self) -> list[PushedImage]:
        """Child manifests of an index, addressable by digest only (tag None)."""
        return [PushedImage(self.host, self.repo, None, c) for c in self.image.children]

    @property
    def reference(self) -> str:
        """``tag`` if there is one, else the digest (what goes after ``/manifests/``)."""
        return self.tag or self.digest

    def docker_ref(self, host: str | None = None) -> str:
        """``HOST/REPO:TAG`` (or ``@DIGEST``), e.g. for ``skopeo ... docker://<ref>``."""
        sep = ":" if self.tag else "@"
        return f"{host or self.host}/{self.repo}{sep}{self.reference}"


# -- building ------------------------------------------------------------------


def _seed_int(seed: str) -> int:
    return int.from_bytes(hashlib.sha256(seed.encode()).digest()[:8], "big")


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, indent=3).encode()


def _tarinfo(name: str, size: int = 0, is_dir: bool = False) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = 0 if is_dir else size
    info.type = tarfile.DIRTYPE if is_dir else tarfile.REGTYPE
    info.mode = 0o755 if is_dir else 0o644
    info.mtime = TAR_MTIME
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info


def _dirs_of(names: list[str]) -> list[str]:
    dirs = {"/".join(n.split("/")[:i]) for n in names for i in range(1, n.count("/") + 1)}
    return sorted(dirs)


def build_layer(files: dict[str, bytes], media_type: str = DOCKER_LAYER) -> tuple[Blob, str]:
    """A gzip'd tar of ``files`` (relative paths); returns (blob, diff_id)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for d in _dirs_of(list(files)):
            tar.addfile(_tarinfo(d + "/", is_dir=True))
        for name in sorted(files):
            tar.addfile(_tarinfo(name, len(files[name])), io.BytesIO(files[name]))
    tar_bytes = raw.getvalue()
    diff_id = "sha256:" + hashlib.sha256(tar_bytes).hexdigest()
    return Blob.from_bytes(gzip.compress(tar_bytes, compresslevel=6, mtime=0), media_type), diff_id


def _config(platform: dict[str, str], diff_ids: list[str], seed: str) -> bytes:
    config: dict[str, Any] = {
        "architecture": platform["architecture"],
        "os": platform["os"],
        "created": CREATED,
        "config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Cmd": ["/bin/sh"],
            "Labels": {"org.pullthrough.test.seed": seed},
        },
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [
            {"created": CREATED, "created_by": f"pullthrough test layer {i}"}
            for i in range(len(diff_ids))
        ],
    }
    if "variant" in platform:
        config["variant"] = platform["variant"]
    return _dumps(config)


def build_image(
    seed: str,
    media_type: str = DOCKER_MANIFEST,
    layer_sizes: tuple[int, ...] = (4 * 1024, 48 * 1024, 300 * 1024),
    platform: dict[str, str] | None = None,
    extra_layers: tuple[tuple[Blob, str], ...] = (),
) -> Image:
    """A single-platform image: one layer per ``layer_sizes`` entry of seeded random data.

    ``extra_layers`` are prebuilt ``(blob, diff_id)`` pairs appended after them.
    """
    rng = random.Random(_seed_int(seed))
    plat = platform or PLATFORMS[0]
    layers: list[tuple[Blob, str]] = []
    for i, size in enumerate(layer_sizes):
        files = {
            f"pullthrough/layer{i}/random.bin": rng.randbytes(size),
            f"pullthrough/layer{i}/README.txt": f"seed={seed} layer={i} size={size}\n".encode(),
        }
        layers.append(build_layer(files, _LAYER_FOR[media_type]))
    layers.extend(extra_layers)
    config = Blob.from_bytes(_config(plat, [d for _, d in layers], seed), _CONFIG_FOR[media_type])
    manifest = _dumps(
        {
            "schemaVersion": 2,
            "mediaType": media_type,
            "config": config.descriptor(),
            "layers": [b.descriptor() for b, _ in layers],
        }
    )
    return Image(media_type, manifest, config, tuple(b for b, _ in layers), platform=platform)


def build_index(
    seed: str, media_type: str = OCI_INDEX, platforms: list[dict[str, str]] | None = None
) -> Image:
    """An OCI index or Docker manifest list with one child image per platform."""
    children = tuple(
        build_image(
            f"{seed}/{p['architecture']}", _CHILD_FOR[media_type], (8 * 1024, 64 * 1024), platform=p
        )
        for p in (platforms or PLATFORMS)
    )
    manifest = _dumps(
        {
            "schemaVersion": 2,
            "mediaType": media_type,
            "manifests": [c.descriptor() for c in children],
        }
    )
    return Image(media_type, manifest, children=children)


class _RandomReader:
    """File-like stream of ``size`` seeded random bytes (fixed 1 MiB generation blocks)."""

    def __init__(self, seed: str, size: int) -> None:
        self._rng = random.Random(_seed_int(seed))
        self._left = size
        self._buf = b""

    def read(self, n: int = -1) -> bytes:
        n = self._left if n < 0 else min(n, self._left)
        while len(self._buf) < n:
            self._buf += self._rng.randbytes(1 << 20)
        out, self._buf = self._buf[:n], self._buf[n:]
        self._left -= n
        return out


class _HashingWriter:
    """Write-through wrapper that hashes (the uncompressed tar, for the diff_id)."""

    def __init__(self, inner: io.BufferedIOBase) -> None:
        self.inner, self.hash, self.pos = inner, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.hash.update(data)
        self.pos += len(data)
        return self.inner.write(data)

    def tell(self) -> int:
        return self.pos


def build_big_layer(
    path: Path, size: int = 50 * 1024 * 1024, seed: str = "big"
) -> tuple[Blob, str]:
    """Stream a tar.gz with one ``size``-byte random (incompressible) file to ``path``.

    Returns (blob backed by the file, diff_id).  Never holds the data in memory.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    # gzip level 1: random data does not compress anyway, so be fast.
    with (
        open(path, "wb") as out,
        gzip.GzipFile(filename="", mode="wb", fileobj=out, compresslevel=1, mtime=0) as gz,
    ):
        hashing = _HashingWriter(gz)
        with tarfile.open(fileobj=hashing, mode="w", format=tarfile.USTAR_FORMAT) as tar:  # type: ignore[call-overload]
            tar.addfile(_tarinfo("pullthrough/", is_dir=True))
            tar.addfile(_tarinfo("pullthrough/big.bin", size), _RandomReader(seed, size))
    return Blob.from_path(path, DOCKER_LAYER), "sha256:" + hashing.hash.hexdigest()


# -- pushing -------------------------------------------------------------------


def push_image(
    registry: RegistryProcess,
    token_server: TokenServer | None,
    repo: str,
    tag: str | None,
    image: Image,
) -> PushedImage:
    """Push blobs, then children (by digest), then the manifest under ``tag`` (or its digest)."""
    client = UpstreamClient(registry, token_server)
    _push(client, repo, image)
    client.push_manifest(repo, tag or image.digest, image.manifest, image.media_type)
    return PushedImage(registry.host, repo, tag, image)


def _push(client: UpstreamClient, repo: str, image: Image) -> None:
    # The registry verifies references on manifest PUT, so children and blobs go first.
    for child in image.children:
        _push(client, repo, child)
        client.push_manifest(repo, child.digest, child.manifest, child.media_type)
    for blob in ([image.config] if image.config else []) + list(image.layers):
        client.push_blob(repo, blob)


def multi_layer_image(
    registry: RegistryProcess,
    token_server: TokenServer | None,
    repo: str,
    tag: str,
    seed: str | None = None,
) -> PushedImage:
    """Docker schema2 image with 3 layers (4 KiB, 48 KiB, 300 KiB of random data)."""
    return push_image(
        registry, token_server, repo, tag, build_image(seed or f"{repo}:{tag}", DOCKER_MANIFEST)
    )


def oci_index_image(
    registry: RegistryProcess,
    token_server: TokenServer | None,
    repo: str,
    tag: str,
    seed: str | None = None,
) -> PushedImage:
    """OCI image index with linux/amd64 and linux/arm64/v8 OCI image manifests."""
    return push_image(
        registry, token_server, repo, tag, build_index(seed or f"{repo}:{tag}", OCI_INDEX)
    )


def docker_manifest_list_image(
    registry: RegistryProcess,
    token_server: TokenServer | None,
    repo: str,
    tag: str,
    seed: str | None = None,
) -> PushedImage:
    """Docker manifest list with linux/amd64 and linux/arm64/v8 schema2 children."""
    return push_image(
        registry,
        token_server,
        repo,
        tag,
        build_index(seed or f"{repo}:{tag}", DOCKER_MANIFEST_LIST),
    )


def big_blob_image(
    registry: RegistryProcess,
    token_server: TokenServer | None,
    repo: str,
    tag: str,
    size: int = 50 * 1024 * 1024,
    workdir: Path | None = None,
    seed: str | None = None,
) -> PushedImage:
    """Schema2 image whose single layer is ~``size`` bytes of incompressible data.

    The layer is kept as a file in ``workdir`` (``layers[0].path``); reuse an
    existing build there if one with the same name exists.
    """
    seed = seed or f"{repo}:{tag}:{size}"
    if workdir is None:
        workdir = Path(tempfile.mkdtemp(prefix="pullthrough-big-"))
    path = workdir / f"big-{_seed_int(seed):016x}-{size}.tar.gz"
    meta = path.with_suffix(".diffid")
    if path.exists() and meta.exists():
        layer = (Blob.from_path(path, DOCKER_LAYER), meta.read_text())
    else:
        layer = build_big_layer(path, size, seed)
        meta.write_text(layer[1])
    image = build_image(seed, DOCKER_MANIFEST, layer_sizes=(), extra_layers=(layer,))
    return push_image(registry, token_server, repo, tag, image)
