"""Running skopeo, a real client, against the mirror without blocking its event loop."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path


async def skopeo(*args: str) -> str:
    process = await asyncio.create_subprocess_exec(
        "skopeo",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 120)
    if process.returncode != 0:
        raise AssertionError(f"skopeo {' '.join(args)} failed: {err.decode()[-2000:]}")
    return out.decode()


async def copy_to_dir(reference: str, dest: Path, *, all_images: bool = False) -> Path:
    """`skopeo copy docker://reference dir:dest` over plain HTTP; returns dest."""
    flags = ["--all"] if all_images else []
    await skopeo("copy", "--src-tls-verify=false", *flags, f"docker://{reference}", f"dir:{dest}")
    return dest


async def raw_manifest(reference: str) -> bytes:
    out = await skopeo("inspect", "--tls-verify=false", "--raw", f"docker://{reference}")
    return out.encode()


def verify_dir(dest: Path) -> list[str]:
    """Check every blob file in a `dir:` copy hashes to its name; return the digests."""
    digests = []
    for path in dest.iterdir():
        if len(path.name) == 64:
            assert hashlib.sha256(path.read_bytes()).hexdigest() == path.name, path
            digests.append(f"sha256:{path.name}")
    return digests


def manifest_digest(dest: Path) -> str:
    return "sha256:" + hashlib.sha256((dest / "manifest.json").read_bytes()).hexdigest()
