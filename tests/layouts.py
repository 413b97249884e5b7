"""OCI image layouts built by hand from tests/upstream/images.py images, for `import`,
and reading back what `export` wrote."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tests.upstream.images import Image

REF_NAME = "org.opencontainers.image.ref.name"
SOURCE = "io.pullthrough.source"
WRAPS = "io.pullthrough.manifest"


def all_manifests(image: Image) -> list[Image]:
    return [image, *(m for child in image.children for m in all_manifests(child))]


def write_layout(root: Path, entries: list[tuple[Image, dict[str, str]]]) -> Path:
    """A directory layout holding each image, its entry carrying `annotations`."""
    blobs = root / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    manifests = []
    for image, notes in entries:
        for manifest in all_manifests(image):
            (blobs / manifest.digest.removeprefix("sha256:")).write_bytes(manifest.manifest)
        for blob in image.blobs:
            (blobs / blob.digest.removeprefix("sha256:")).write_bytes(blob.read_bytes())
        manifests.append({**image.descriptor(), "annotations": notes})
    (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json"}
    (root / "index.json").write_text(json.dumps({**index, "manifests": manifests}))
    return root


def names(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir())


def blob_path(root: Path, digest: str) -> Path:
    return root / "blobs" / "sha256" / digest.removeprefix("sha256:")


def tar_layout(root: Path, out: Path, extra: Sequence[tuple[tarfile.TarInfo, bytes]] = ()) -> Path:
    """`root` as a tar (what skopeo's oci-archive: is), with `extra` members appended."""
    with tarfile.open(out, "w", format=tarfile.USTAR_FORMAT) as tar:
        for path in sorted(root.rglob("*")):
            tar.add(path, arcname=str(path.relative_to(root)), recursive=False)
        for info, data in extra:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return out


def member(
    name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, link: str = ""
) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type, info.size, info.linkname = kind, len(data) if kind == tarfile.REGTYPE else 0, link
    return info, data


def read_layout(root: Path) -> tuple[list[dict[str, Any]], dict[str, bytes]]:
    """index.json's entries, and every blob by digest, each checked against its name."""
    index = json.loads((root / "index.json").read_text())
    assert json.loads((root / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    blobs = {}
    for path in (root / "blobs" / "sha256").iterdir():
        data = path.read_bytes()
        assert hashlib.sha256(data).hexdigest() == path.name, path
        blobs[f"sha256:{path.name}"] = data
    return index["manifests"], blobs
