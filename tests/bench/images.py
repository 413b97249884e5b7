"""Benchmark images: 4 layers of incompressible random data, built as files and pushed.

Each layer is a real tar.gz (one directory, one file of seeded random bytes) written
straight to disk as it is generated, never held in memory. The gzip stream uses level 0
(stored blocks): random data does not compress at any level, and level 0 builds in a
fraction of the time, so fresh images for every cold run stay affordable. A new seed
gives new bytes, so every digest is new and each cold run is cold in every cache.

The manifest and config come from ``tests.upstream.images.build_image`` and the push
from ``push_image``: the same code the test suite uses.
"""

from __future__ import annotations

import gzip
import hashlib
import random
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from tests.upstream.client import Blob
from tests.upstream.images import (
    DOCKER_LAYER,
    DOCKER_MANIFEST,
    TAR_MTIME,
    PushedImage,
    build_image,
    push_image,
)
from tests.upstream.registry import RegistryProcess
from tests.upstream.token_server import TokenServer

_CHUNK = 1 << 20


class _Writable(Protocol):
    def write(self, data: bytes, /) -> int: ...

    def flush(self) -> None: ...


class _Hashing:
    """A write-through file wrapper that hashes and counts what passes."""

    def __init__(self, inner: _Writable) -> None:
        self.inner = inner
        self.hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.hash.update(data)
        self.size += len(data)
        return self.inner.write(data)

    def flush(self) -> None:
        self.inner.flush()


def _header(name: str, size: int, is_dir: bool) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = 0 if is_dir else size
    info.type = tarfile.DIRTYPE if is_dir else tarfile.REGTYPE
    info.mode = 0o755 if is_dir else 0o644
    info.mtime = TAR_MTIME
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info.tobuf(format=tarfile.USTAR_FORMAT)


def build_random_layer(path: Path, size: int, seed: str) -> tuple[Blob, str]:
    """Stream a tar.gz holding ``size`` seeded random bytes to ``path``.

    Returns (the blob backed by the file, the diff_id of the uncompressed tar). Both
    digests are computed while writing, so the file is never read back.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = random.Random(int.from_bytes(hashlib.sha256(seed.encode()).digest()[:8], "big"))
    with open(path, "wb") as raw:
        compressed = _Hashing(raw)
        with gzip.GzipFile(
            filename="",
            mode="wb",
            fileobj=compressed,
            compresslevel=0,
            mtime=0,
        ) as gz:
            tar = _Hashing(gz)
            tar.write(_header("pullthrough/", 0, is_dir=True))
            tar.write(_header("pullthrough/random.bin", size, is_dir=False))
            left = size
            while left:
                n = min(_CHUNK, left)
                tar.write(rng.randbytes(n))
                left -= n
            tar.write(b"\0" * ((-size) % 512))
            tar.write(b"\0" * 1024)  # end-of-archive marker: two zero blocks
    blob = Blob("sha256:" + compressed.hash.hexdigest(), compressed.size, DOCKER_LAYER, path=path)
    return blob, "sha256:" + tar.hash.hexdigest()


@dataclass
class BenchImage:
    """A pushed benchmark image, and how long building and pushing took."""

    pushed: PushedImage
    build_seconds: float
    push_seconds: float

    @property
    def repo(self) -> str:
        return self.pushed.repo

    @property
    def tag(self) -> str:
        assert self.pushed.tag is not None
        return self.pushed.tag

    @property
    def blobs(self) -> list[Blob]:
        """Config and layers: what a pull downloads besides the manifest."""
        return self.pushed.blobs

    @property
    def layers(self) -> tuple[Blob, ...]:
        return self.pushed.layers

    @property
    def size(self) -> int:
        """Bytes of all blobs (config and layers): the denominator of every ratio."""
        return sum(b.size for b in self.blobs)

    @property
    def digest(self) -> str:
        return self.pushed.digest

    def ref(self, host: str, by_digest: bool = False) -> str:
        sep, reference = ("@", self.digest) if by_digest else (":", self.tag)
        return f"{host}/{self.repo}{sep}{reference}"

    def describe(self) -> dict[str, object]:
        return {
            "repo": self.repo,
            "tag": self.tag,
            "digest": self.digest,
            "size": self.size,
            "layers": [{"digest": b.digest, "size": b.size} for b in self.layers],
            "build_seconds": round(self.build_seconds, 3),
            "push_seconds": round(self.push_seconds, 3),
        }


def make_image(
    registry: RegistryProcess,
    token_server: TokenServer,
    workdir: Path,
    name: str,
    layer_bytes: int,
    layers: int = 4,
) -> BenchImage:
    """Build ``layers`` random layers for seed ``name``, push ``library/<name>:v1``, and
    delete the local layer files (the upstream keeps its own copy)."""
    started = time.perf_counter()
    seed = f"pullthrough-bench/{name}/{time.time_ns()}"
    built = [
        build_random_layer(workdir / f"{name}-layer{i}.tar.gz", layer_bytes, f"{seed}/{i}")
        for i in range(layers)
    ]
    image = build_image(seed, DOCKER_MANIFEST, layer_sizes=(), extra_layers=tuple(built))
    pushing = time.perf_counter()
    try:
        pushed = push_image(registry, token_server, f"library/{name}", "v1", image)
    finally:
        for blob, _ in built:
            assert blob.path is not None
            blob.path.unlink(missing_ok=True)
    return BenchImage(pushed, pushing - started, time.perf_counter() - pushing)
