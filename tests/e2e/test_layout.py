"""skopeo (and dockerd) judge `pullthrough export` and `import`: an export of images pulled
through a running mirror from the real registry is read by `skopeo copy oci-archive:`,
and a layout skopeo wrote from the real registry, imported into a running mirror whose
upstream can't be reached, is served to skopeo and to dockerd."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path
from typing import Any

import aiohttp

from tests.e2e.docker import StartDockerd, start_dockerd
from tests.e2e.skopeo import copy_to_dir, manifest_digest, skopeo, verify_dir
from tests.mirror_process import MirrorProcess, mirror_processes
from tests.proxy.test_cli import run, wait_no_fills
from tests.upstream.fixtures import UpstreamImages
from tests.upstream.images import OCI_INDEX, PushedImage
from tests.upstream.registry import RegistryProcess, free_port

__all__ = ["start_dockerd"]  # the fixture, for pytest to find in this module


def unreachable() -> str:
    """An upstream URL nothing listens on: an air-gapped mirror (`offline: true` says the
    same without a closed port)."""
    return f"http://127.0.0.1:{free_port()}"


def host(mirror: MirrorProcess) -> str:
    return mirror.url.removeprefix("http://")


def blob_digests(image: PushedImage) -> set[str]:
    return {blob.digest for blob in image.blobs}


async def read_back(source: str, dest: Path, *flags: str) -> Path:
    await skopeo("copy", *flags, source, f"dir:{dest}")
    return dest


async def test_skopeo_reads_an_export_made_beside_a_running_mirror(
    pushed_images: UpstreamImages, token_registry: RegistryProcess, tmp_path: Path
) -> None:
    image = pushed_images.multi
    (tmp_path / "warm").mkdir()
    async with mirror_processes(tmp_path / "warm", token_registry.url) as make:
        mirror = make()
        await mirror.start()
        await copy_to_dir(f"{host(mirror)}/multi:v1", tmp_path / "pulled")
        async with aiohttp.ClientSession() as session:
            await wait_no_fills(session, mirror.url)
        # Exported while the server runs on the cache.
        for out in (tmp_path / "export.tar", tmp_path / "export"):
            code, text = await run("export", "multi:v1", "-o", str(out), cwd=tmp_path / "warm")
            assert code == 0, text

    for source in (f"oci-archive:{tmp_path / 'export.tar'}:v1", f"oci:{tmp_path / 'export'}:v1"):
        dest = await read_back(source, tmp_path / f"read-{len(source)}")
        assert manifest_digest(dest) == image.digest  # upstream's bytes, untouched
        assert set(verify_dir(dest)) >= blob_digests(image)
    # A Docker image is listed through an OCI index that wraps upstream's manifest.
    (entry,) = json.loads((tmp_path / "export" / "index.json").read_text())["manifests"]
    assert entry["mediaType"] == "application/vnd.oci.image.index.v1+json"
    assert entry["annotations"] == {
        "org.opencontainers.image.ref.name": "v1",
        "io.pullthrough.source": "docker.io/library/multi",
        "io.pullthrough.manifest": image.digest,
    }

    # Carried into an air-gapped network: imported while that mirror runs, no --as
    # needed, and served by tag with upstream's digests.
    (tmp_path / "gapped").mkdir()
    async with mirror_processes(tmp_path / "gapped", unreachable()) as make:
        gapped = make()
        await gapped.start()
        code, text = await run("import", str(tmp_path / "export.tar"), cwd=tmp_path / "gapped")
        assert code == 0 and f"imported docker.io/library/multi:v1 ({image.digest})" in text
        dest = await copy_to_dir(f"{host(gapped)}/multi:v1", tmp_path / "served")
        assert manifest_digest(dest) == image.digest
        assert set(verify_dir(dest)) >= blob_digests(image)


async def test_multi_platform_exports_with_and_without_platform(
    pushed_images: UpstreamImages, token_registry: RegistryProcess, tmp_path: Path
) -> None:
    for listing in (pushed_images.oci_index, pushed_images.docker_list):
        short = listing.repo.removeprefix("library/")
        work = tmp_path / short
        work.mkdir()
        async with mirror_processes(work, token_registry.url) as make:
            mirror = make()
            await mirror.start()
            # One platform pulled (this host's): the whole index can't be exported yet.
            await copy_to_dir(f"{host(mirror)}/{short}:v1", work / "one")
            async with aiohttp.ClientSession() as session:
                await wait_no_fills(session, mirror.url)
            arm = next(c for c in listing.children if "arm64" in json.dumps(c.image.platform))
            code, text = await run("export", f"{short}:v1", "-o", "all.tar", cwd=work)
            assert code == 1 and f"not in the cache: {short}:v1: linux/arm64/v8 manifest" in text
            assert arm.digest in text and "--platform" in text
            assert not (work / "all.tar").exists()
            amd = await _export_one(work, short, "linux/amd64")
            dest = await read_back(f"oci-archive:{amd}:v1", work / "amd-read")
            assert manifest_digest(dest) == next(
                c.digest for c in listing.children if c.digest != arm.digest
            )

            await copy_to_dir(f"{host(mirror)}/{short}:v1", work / "all", all_images=True)
            async with aiohttp.ClientSession() as session:
                await wait_no_fills(session, mirror.url)
            code, text = await run("export", f"{short}:v1", "-o", "all.tar", cwd=work)
            assert code == 0, text
        dest = await read_back(f"oci-archive:{work / 'all.tar'}:v1", work / "all-read", "--all")
        entry = top_entry(work / "all.tar")
        assert manifest_digest(dest) == entry["digest"]
        if listing.media_type == OCI_INDEX:
            assert entry["digest"] == listing.digest
        else:  # a wrapper around upstream's list, which is in the archive too
            assert entry["annotations"]["io.pullthrough.manifest"] == listing.digest
            assert entry["mediaType"] == OCI_INDEX
        for child in listing.children:
            copied = (dest / f"{child.digest.removeprefix('sha256:')}.manifest.json").read_bytes()
            assert copied == child.manifest
        assert set(verify_dir(dest)) >= blob_digests(listing)

        # One platform out of the index: its own manifest, upstream's digest, with its
        # platform in the entry.
        arm_tar = await _export_one(work, short, "linux/arm64")
        dest = await read_back(f"oci-archive:{arm_tar}:v1", work / "arm-read")
        assert manifest_digest(dest) == arm.digest
        assert set(verify_dir(dest)) >= blob_digests(arm)


def top_entry(archive: Path) -> dict[str, Any]:
    with tarfile.open(archive) as tar:
        index = tar.extractfile("index.json")
        assert index is not None
        (entry,) = json.load(index)["manifests"]
    assert isinstance(entry, dict)
    return entry


async def _export_one(work: Path, short: str, platform: str) -> Path:
    out = work / f"{platform.replace('/', '-')}.tar"
    code, text = await run(
        "export", f"{short}:v1", "--platform", platform, "-o", str(out), cwd=work
    )
    assert code == 0, text
    return out


async def test_a_skopeo_layout_imported_into_an_air_gapped_mirror_is_served(
    pushed_images: UpstreamImages,
    token_registry: RegistryProcess,
    start_dockerd: StartDockerd,
    tmp_path: Path,
) -> None:
    image = pushed_images.multi
    layout = tmp_path / "layout"
    await skopeo(
        "copy", "--src-tls-verify=false",
        f"docker://{token_registry.host}/{image.repo}:v1", f"oci:{layout}:v1",
    )  # fmt: skip
    # skopeo converts a Docker image to OCI for an oci: layout: a new manifest digest.
    (entry,) = json.loads((layout / "index.json").read_text())["manifests"]
    assert entry["annotations"] == {"org.opencontainers.image.ref.name": "v1"}

    # Served by a mirror with `offline: true` in front of the very registry the layout
    # came from: it must not ask it for anything.
    work = tmp_path / "gapped"
    work.mkdir()
    asked_before = len(token_registry.requests(path_contains=f"/v2/{image.repo}/"))
    async with mirror_processes(work, token_registry.url, "offline: true\n") as make:
        mirror = make()
        await mirror.start()
        code, text = await run("import", str(layout), cwd=work)
        assert code == 2 and "name the image with --as IMAGE" in text, text
        code, text = await run("import", str(layout), "--as", "multi:v1", cwd=work)
        assert code == 0 and f"imported docker.io/library/multi:v1 ({entry['digest']})" in text

        dest = await copy_to_dir(f"{host(mirror)}/multi:v1", tmp_path / "served")
        assert manifest_digest(dest) == entry["digest"]
        assert set(verify_dir(dest)) >= {b.digest for b in image.layers}

        dockerd = await start_dockerd(host(mirror))
        await dockerd.docker("pull", "multi:v1")
        out = await dockerd.docker(
            "image", "inspect", "--format", "{{json .RepoDigests}}", "multi:v1"
        )
        assert f"multi@{entry['digest']}" in out
    assert len(token_registry.requests(path_contains=f"/v2/{image.repo}/")) == asked_before
