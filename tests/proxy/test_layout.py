"""`pullthrough import` and `export` run as a user would, on layouts built by hand: what is
accepted, what is refused (and that a refusal leaves nothing behind), and what lands in
the cache. skopeo's side of it is in tests/e2e/test_layout.py."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pty
import signal
import sqlite3
import sys
import tarfile
from pathlib import Path

import aiohttp
import pytest

from tests.layouts import (
    REF_NAME,
    SOURCE,
    WRAPS,
    blob_path,
    member,
    names,
    read_layout,
    tar_layout,
    write_layout,
)
from tests.mirror_process import mirror_processes
from tests.proxy.test_cli import run
from tests.upstream.images import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_INDEX,
    OCI_LAYER,
    OCI_MANIFEST,
    Blob,
    Image,
    build_image,
    build_index,
)
from tests.upstream.registry import free_port

APP = build_image("layout/app", OCI_MANIFEST)
OTHER = build_image("layout/other", OCI_MANIFEST, layer_sizes=(1024, 100_000))
INDEX = build_index("layout/index", OCI_INDEX)
FROM_US = {SOURCE: "docker.io/library/app", REF_NAME: "v1"}


def configure(workdir: Path, max_size: str = "1GiB") -> Path:
    """A mirror whose upstream is a closed port: nothing here can be fetched."""
    workdir.mkdir(exist_ok=True)
    (workdir / "mirror.yaml").write_text(
        f"listen: 127.0.0.1:{free_port()}\n"
        f"cache: {{path: ./data, max_size: {max_size}}}\n"
        f"upstreams: [{{name: docker.io, url: 'http://127.0.0.1:{free_port()}', default: true}}]\n"
    )
    return workdir


def stored(workdir: Path) -> set[str]:
    return {f"sha256:{p.name}" for p in (workdir / "data" / "blobs").glob("sha256/*/*")}


def rows(workdir: Path, sql: str) -> list[tuple[object, ...]]:
    with contextlib.closing(sqlite3.connect(workdir / "data" / "index.db")) as db, db:
        return db.execute(sql).fetchall()


def digests(image: Image) -> set[str]:
    return {image.digest} | {c.digest for c in image.children} | {b.digest for b in image.blobs}


def assert_refused(code: int, out: str, message: str, status: int = 2) -> None:
    assert code == status, out
    assert "Traceback" not in out, out
    line = out.strip().splitlines()[-1]
    assert line.startswith("pullthrough: import: ") and message in line, out


async def assert_nothing_imported(workdir: Path) -> None:
    """No blob, row or temp file: as if the import had never run (and fsck agrees)."""
    assert stored(workdir) == set()
    assert list((workdir / "data" / "tmp").iterdir()) == []
    assert (
        rows(
            workdir,
            "SELECT digest FROM blobs UNION ALL SELECT digest FROM tags"
            " UNION ALL SELECT digest FROM repo_blobs",
        )
        == []
    )
    code, out = await run("fsck", cwd=workdir)
    assert (code, out.strip()) == (0, "checked 0 blobs: 0 bad, 0 missing")


async def test_an_export_imports_anywhere_with_its_names(tmp_path: Path) -> None:
    here, there = configure(tmp_path / "here"), configure(tmp_path / "there")
    layout = write_layout(tmp_path / "layout", [(APP, FROM_US)])
    code, out = await run("import", str(layout), cwd=here)
    assert code == 0, out
    assert f"imported docker.io/library/app:v1 ({APP.digest})" in out
    assert stored(here) == digests(APP)
    assert rows(here, "SELECT upstream, repo, tag, accept, digest FROM tags") == [
        ("docker.io", "library/app", "v1", "*/*", APP.digest)
    ]
    links = rows(here, "SELECT upstream, repo, digest FROM repo_blobs")
    assert sorted(links) == sorted(("docker.io", "library/app", d) for d in digests(APP))

    code, out = await run("export", "app:v1", "-o", str(tmp_path / "app.tar"), cwd=here)
    assert code == 0, out
    assert out.strip() == f"exported 1 images (5 blobs, {size_mb(APP)}) to {tmp_path / 'app.tar'}"
    with tarfile.open(tmp_path / "app.tar") as tar:
        tar.extractall(tmp_path / "unpacked", filter="data")
    entries, blobs = read_layout(tmp_path / "unpacked")
    assert entries == [{**APP.descriptor(), "annotations": FROM_US}]
    assert blobs == {APP.digest: APP.manifest} | {b.digest: b.read_bytes() for b in APP.blobs}

    # The export names its source, so a second mirror takes it without --as.
    code, out = await run("import", str(tmp_path / "app.tar"), cwd=there)
    assert code == 0 and "imported docker.io/library/app:v1" in out, out
    code, out = await run("fsck", cwd=there)
    assert (code, out.strip()) == (0, "checked 5 blobs: 0 bad, 0 missing")


def size_mb(image: Image) -> str:
    return f"{(image.size + sum(b.size for b in image.blobs)) / 1e6:.1f} MB"


async def test_a_corrupted_blob_is_refused_and_nothing_stays(tmp_path: Path) -> None:
    workdir = configure(tmp_path)
    good = write_layout(tmp_path / "good", [(OTHER, {**FROM_US, SOURCE: "docker.io/x/other"})])
    assert (await run("import", str(good), cwd=workdir))[0] == 0
    before = stored(workdir)

    layout = write_layout(tmp_path / "bad", [(APP, FROM_US)])
    layer = blob_path(layout, APP.layers[1].digest)
    data = bytearray(layer.read_bytes())
    data[100] ^= 0xFF  # same size, one bit wrong
    layer.write_bytes(data)
    for source in (layout, tar_layout(layout, tmp_path / "bad.tar")):
        code, out = await run("import", str(source), cwd=workdir)
        assert_refused(code, out, f"blob {APP.layers[1].digest} in the layout is damaged")
        assert stored(workdir) == before  # not even the blobs that were fine
        assert list((workdir / "data" / "tmp").iterdir()) == []
        assert rows(workdir, "SELECT tag FROM tags WHERE repo = 'library/app'") == []
    code, out = await run("fsck", cwd=workdir)
    assert (code, out.strip()) == (0, f"checked {len(before)} blobs: 0 bad, 0 missing")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (member("../escaped", b"x"), "archive member '../escaped' points outside the layout"),
        (member("blobs/../../up", b"x"), "points outside the layout"),
        (member("/etc/passwd", b"x"), "archive member '/etc/passwd' points outside the layout"),
        (member("link", kind=tarfile.SYMTYPE, link="/etc/passwd"), "is a symlink to '/etc/passwd'"),
        (member("hard", kind=tarfile.LNKTYPE, link="index.json"), "is a hard link to 'index.json'"),
        (member("dev", kind=tarfile.CHRTYPE), "is a device or fifo"),
        (member("index.json", b"{}"), "archive member 'index.json' appears twice"),
    ],
)
async def test_unsafe_archives_are_refused(
    tmp_path: Path, extra: tuple[tarfile.TarInfo, bytes], message: str
) -> None:
    workdir = configure(tmp_path / "work")
    layout = write_layout(tmp_path / "layout", [(APP, FROM_US)])
    archive = tar_layout(layout, tmp_path / "evil.tar", [extra])
    code, out = await run("import", str(archive), cwd=workdir)
    assert_refused(code, out, message)
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "up").exists()
    await assert_nothing_imported(workdir)


async def test_absurd_sizes_and_compressed_archives_are_refused(tmp_path: Path) -> None:
    workdir = configure(tmp_path / "work")
    layout = write_layout(tmp_path / "layout", [(APP, FROM_US)])
    archive = tar_layout(layout, tmp_path / "app.tar")
    with tarfile.open(archive) as tar:
        at = next(m for m in tar if m.isfile()).offset
    data = bytearray(archive.read_bytes())
    # The first file's header claims 4 GiB (its octal size field at 124, the checksum at
    # 148 recomputed), in an archive of a few hundred KB.
    header = data[at : at + 512]
    header[124:136] = b"%011o\0" % (4 << 30)
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    data[at : at + 512] = header
    (tmp_path / "huge.tar").write_bytes(data)
    code, out = await run("import", str(tmp_path / "huge.tar"), cwd=workdir)
    assert_refused(code, out, "claims 4294967296 bytes, more than the archive holds")

    (tmp_path / "app.tar.gz").write_bytes(b"\x1f\x8b" + bytes(data[2:]))
    code, out = await run("import", str(tmp_path / "app.tar.gz"), cwd=workdir)
    assert_refused(code, out, "is compressed: decompress it first")
    (tmp_path / "junk.tar").write_bytes(b"not a tar at all" * 100)
    code, out = await run("import", str(tmp_path / "junk.tar"), cwd=workdir)
    assert_refused(code, out, "is not a tar archive of a layout")
    await assert_nothing_imported(workdir)


def _break_json(layout: Path) -> None:
    (layout / "index.json").write_text('{"schemaVersion": 2, "manifests": [')


def _nest_json(layout: Path) -> None:
    (layout / "index.json").write_text("[" * 100_000 + "]" * 100_000)


def _drop_layout_file(layout: Path) -> None:
    (layout / "oci-layout").unlink()


def _drop_layer(layout: Path) -> None:
    blob_path(layout, APP.layers[0].digest).unlink()


def _grow_layer(layout: Path) -> None:
    with blob_path(layout, APP.layers[0].digest).open("ab") as file:
        file.write(b"more")


def _symlink_layer(layout: Path) -> None:
    path = blob_path(layout, APP.layers[0].digest)
    (layout / "elsewhere").write_bytes(path.read_bytes())
    path.unlink()
    path.symlink_to(layout / "elsewhere")


def _wrong_manifest_digest(layout: Path) -> None:
    index = json.loads((layout / "index.json").read_text())
    index["manifests"][0]["digest"] = OTHER.digest
    index["manifests"][0]["size"] = OTHER.size
    (layout / "index.json").write_text(json.dumps(index))
    blob_path(layout, OTHER.digest).write_bytes(APP.manifest[: OTHER.size].ljust(OTHER.size))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (_break_json, "index.json is not valid JSON"),
        (_nest_json, "index.json is not valid JSON"),
        (_drop_layout_file, "not an OCI image layout: no oci-layout or index.json"),
        (_drop_layer, f"the layout is missing blob {APP.layers[0].digest}"),
        (_grow_layer, f"blob {APP.layers[0].digest} is {APP.layers[0].size + 4} bytes in the"),
        (_symlink_layer, f"{APP.layers[0].digest.removeprefix('sha256:')} is a symlink"),
        (_wrong_manifest_digest, f"manifest {OTHER.digest}: content hashed to"),
    ],
)
async def test_bad_layouts_are_refused(tmp_path: Path, damage: object, message: str) -> None:
    workdir = configure(tmp_path / "work")
    layout = write_layout(tmp_path / "layout", [(APP, FROM_US)])
    assert callable(damage)
    damage(layout)
    code, out = await run("import", str(layout), cwd=workdir)
    assert_refused(code, out, message)
    await assert_nothing_imported(workdir)


async def test_not_a_layout_at_all(tmp_path: Path) -> None:
    workdir = configure(tmp_path / "work")
    (tmp_path / "empty").mkdir()
    code, out = await run("import", str(tmp_path / "empty"), cwd=workdir)
    assert_refused(code, out, "not an OCI image layout")
    code, out = await run("import", str(tmp_path / "nowhere"), cwd=workdir)
    assert_refused(code, out, "no such file or directory")


async def test_a_layout_without_its_source_needs_as(tmp_path: Path) -> None:
    workdir = configure(tmp_path / "work")
    # What skopeo writes: the tag, nothing about where the image came from.
    layout = write_layout(tmp_path / "layout", [(APP, {REF_NAME: "v1"}), (OTHER, {REF_NAME: "v2"})])
    code, out = await run("import", str(layout), cwd=workdir)
    assert_refused(
        code, out, f"does not say which upstream and repository it comes from (no {SOURCE}"
    )
    assert "--as IMAGE" in out
    code, out = await run("import", str(layout), "--as", "ghcr.io/x/y:v2", cwd=workdir)
    assert_refused(code, out, "--as ghcr.io/x/y:v2: this mirror does not serve registry 'ghcr.io'")
    code, out = await run("import", str(layout), "--as", "app:v3", cwd=workdir)
    assert_refused(code, out, "the layout holds 2 images ('v1', 'v2'); --as app:v3 names none")
    await assert_nothing_imported(workdir)

    # With several images, --as picks the one its tag names.
    code, out = await run("import", str(layout), "--as", "team/app:v2", cwd=workdir)
    assert code == 0, out
    assert out.splitlines()[0] == f"imported docker.io/team/app:v2 ({OTHER.digest})"
    assert stored(workdir) == digests(OTHER)
    # With one image, --as names it whatever its ref.name: its tag is --as's.
    single = write_layout(tmp_path / "single", [(APP, {REF_NAME: "whatever"})])
    code, out = await run("import", str(single), "--as", "app", cwd=workdir)
    assert code == 0 and f"imported docker.io/library/app:latest ({APP.digest})" in out, out
    code, out = await run("import", str(single), "--as", f"app@{APP.digest}", cwd=workdir)
    assert code == 0 and f"imported docker.io/library/app@{APP.digest}" in out, out
    assert "0 new blobs, 0.0 MB" in out


async def test_an_index_imports_with_every_child_and_replaces_the_tag(tmp_path: Path) -> None:
    workdir = configure(tmp_path)
    old = write_layout(tmp_path / "old", [(APP, {**FROM_US, SOURCE: "docker.io/library/multi"})])
    assert (await run("import", str(old), cwd=workdir))[0] == 0
    # Another client's answer for the tag, from before.
    with contextlib.closing(sqlite3.connect(workdir / "data" / "index.db")) as db, db:
        db.execute(
            "INSERT INTO tags VALUES ('docker.io', 'library/multi', 'v1', 'x/y', ?, ?, 0)",
            (OCI_MANIFEST, APP.digest),
        )
    layout = write_layout(
        tmp_path / "layout", [(INDEX, {**FROM_US, SOURCE: "docker.io/library/multi"})]
    )
    code, out = await run("import", str(tar_layout(layout, tmp_path / "index.tar")), cwd=workdir)
    assert code == 0, out
    assert stored(workdir) == digests(APP) | digests(INDEX)
    # The imported answer is the tag's only one, whatever clients asked before.
    assert rows(workdir, "SELECT accept, media_type, digest FROM tags") == [
        ("*/*", OCI_INDEX, INDEX.digest)
    ]

    code, out = await run("export", "multi:v1", "-o", str(tmp_path / "all"), cwd=workdir)
    assert code == 0, out
    entries, blobs = read_layout(tmp_path / "all")
    assert entries == [
        {**INDEX.descriptor(), "annotations": FROM_US | {SOURCE: "docker.io/library/multi"}}
    ]
    assert set(blobs) == digests(INDEX)

    arm = next(c for c in INDEX.children if c.platform and c.platform["architecture"] == "arm64")
    out_dir = tmp_path / "arm"
    code, out = await run(
        "export", "multi:v1", "--platform", "linux/arm64", "-o", str(out_dir), cwd=workdir
    )
    assert code == 0, out
    entries, blobs = read_layout(out_dir)
    assert [e["digest"] for e in entries] == [arm.digest]
    assert entries[0]["platform"] == arm.platform
    assert set(blobs) == digests(arm)

    code, out = await run(
        "export", "multi:v1", "--platform", "linux/s390x", "-o", str(tmp_path / "no"), cwd=workdir
    )
    assert (
        code == 2
        and "multi:v1 has no linux/s390x manifest (it has: linux/amd64, linux/arm64/v8)" in out
    )
    assert not (tmp_path / "no").exists()


async def test_export_refuses_what_is_not_cached_and_writes_nothing(tmp_path: Path) -> None:
    workdir = configure(tmp_path)
    layout = write_layout(tmp_path / "layout", [(APP, FROM_US)])
    assert (await run("import", str(layout), cwd=workdir))[0] == 0
    out_tar = tmp_path / "out.tar"

    code, out = await run("export", "app:v1", "nothere:v1", "-o", str(out_tar), cwd=workdir)
    assert code == 1, out
    assert "pullthrough: export: not in the cache: nothere:v1: the tag has no answer" in out
    code, out = await run("export", "ghcr.io/x/app:v1", "-o", str(out_tar), cwd=workdir)
    assert code == 2 and "this mirror does not serve registry 'ghcr.io'" in out, out
    # Cached, but for another repository: not this one's to export.
    code, out = await run("export", f"other@{APP.digest}", "-o", str(out_tar), cwd=workdir)
    assert code == 1 and f"not in the cache: other@{APP.digest}: manifest {APP.digest}" in out

    # A layer gone from disk: named, and nothing partial is left behind.
    (
        workdir / "data" / "blobs" / "sha256" / APP.layers[2].digest[7:9] / APP.layers[2].digest[7:]
    ).unlink()
    for target in (out_tar, tmp_path / "out-dir"):
        code, out = await run("export", "app:v1", "-o", str(target), cwd=workdir)
        assert code == 1 and f"not in the cache: app:v1: blob {APP.layers[2].digest}" in out, out
        assert names(tmp_path) == ["data", "layout", "mirror.yaml"]

    out_tar.write_bytes(b"mine")
    code, out = await run("export", "app:v1", "-o", str(out_tar), cwd=workdir)
    assert code == 2 and "exists already" in out and out_tar.read_bytes() == b"mine"


async def test_a_damaged_cached_blob_is_not_exported(tmp_path: Path) -> None:
    workdir = configure(tmp_path)
    layout = write_layout(tmp_path / "layout", [(APP, FROM_US)])
    assert (await run("import", str(layout), cwd=workdir))[0] == 0
    path = (
        workdir / "data" / "blobs" / "sha256" / APP.layers[1].digest[7:9] / APP.layers[1].digest[7:]
    )
    data = bytearray(path.read_bytes())
    data[0] ^= 1
    path.write_bytes(data)
    code, out = await run("export", "app:v1", "-o", str(tmp_path / "out.tar"), cwd=workdir)
    assert code == 1 and f"cached blob {APP.layers[1].digest} is damaged" in out, out
    assert names(tmp_path) == ["data", "layout", "mirror.yaml"]


async def test_an_import_larger_than_the_cache_is_refused_up_front(tmp_path: Path) -> None:
    workdir = configure(tmp_path, max_size="200KB")
    layout = write_layout(tmp_path / "layout", [(APP, FROM_US)])
    code, out = await run("import", str(layout), cwd=workdir)
    assert_refused(code, out, "the import is 0.4 MB, more than the cache keeps: 0.2 MB", status=1)
    await assert_nothing_imported(workdir)


async def test_an_import_evicts_the_least_recently_used_to_fit(tmp_path: Path) -> None:
    workdir = configure(tmp_path, max_size="500KB")
    first = write_layout(tmp_path / "first", [(OTHER, {**FROM_US, SOURCE: "docker.io/x/other"})])
    assert (await run("import", str(first), cwd=workdir))[0] == 0
    layout = write_layout(tmp_path / "layout", [(APP, FROM_US)])
    code, out = await run("import", str(layout), cwd=workdir)
    assert code == 0, out
    # OTHER, least recently used, made room: the cache is under its low watermark.
    left = stored(workdir)
    assert digests(APP) <= left and left - digests(APP) < digests(OTHER)
    (size,) = rows(workdir, "SELECT sum(size) FROM blobs")[0]
    assert isinstance(size, int) and size <= 400_000
    code, out = await run("fsck", cwd=workdir)
    assert (code, out.strip()) == (0, f"checked {len(left)} blobs: 0 bad, 0 missing")


async def on_terminal(*args: str, cwd: Path) -> tuple[int, str]:
    """Run `pullthrough ARGS` with a pseudo-terminal as its stdout and stderr."""
    primary, secondary = pty.openpty()
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy", *args, cwd=cwd, stdout=secondary, stderr=secondary,
        )  # fmt: skip
        os.close(secondary)
        out = await asyncio.to_thread(_read_all, primary)  # read as it runs: never blocks it
        return await process.wait(), out.decode()
    finally:
        os.close(primary)


def _read_all(fd: int) -> bytes:
    out = b""
    with contextlib.suppress(OSError):  # EIO once the terminal's other end is closed
        while chunk := os.read(fd, 65536):
            out += chunk
    return out


async def test_progress_bars_only_on_a_terminal(tmp_path: Path) -> None:
    workdir = configure(tmp_path)
    layout = write_layout(tmp_path / "layout", [(APP, FROM_US)])
    layer = APP.layers[2].digest
    code, text = await on_terminal("import", str(layout), cwd=workdir)
    assert code == 0 and f"\r{layer[:19]} [" in text and "#" * 30 + "]" in text, text
    assert f"{layer}  0.3 MB  imported" in text
    code, text = await on_terminal("export", "app:v1", "-o", "tty.tar", cwd=workdir)
    assert code == 0 and f"\r{layer[:19]} [" in text and f"{layer}  0.3 MB  exported" in text

    code, plain = await run("export", "app:v1", "-o", str(tmp_path / "out.tar"), cwd=workdir)
    assert code == 0 and "\r" not in plain and len(plain.strip().splitlines()) == 1, plain
    code, plain = await run("import", str(tmp_path / "out.tar"), cwd=configure(tmp_path / "b"))
    assert code == 0 and "\r" not in plain and len(plain.strip().splitlines()) == 2, plain


@pytest.mark.parametrize("kind", [DOCKER_MANIFEST, DOCKER_MANIFEST_LIST])
async def test_docker_images_travel_wrapped_and_come_back_as_upstream_sent_them(
    tmp_path: Path, kind: str
) -> None:
    image = (build_image if kind == DOCKER_MANIFEST else build_index)("layout/docker", kind)
    here, there = configure(tmp_path / "here"), configure(tmp_path / "there")
    # As containerd's export writes it: the Docker type right in index.json.
    layout = write_layout(tmp_path / "layout", [(image, FROM_US)])
    assert (await run("import", str(layout), cwd=here))[0] == 0
    code, out = await run("export", "app:v1", "-o", str(tmp_path / "out"), cwd=here)
    assert code == 0, out

    (entry,), blobs = read_layout(tmp_path / "out")
    assert entry["mediaType"] == OCI_INDEX
    assert entry["annotations"] == {**FROM_US, WRAPS: image.digest}
    wrapper = json.loads(blobs[entry["digest"]])
    if kind == DOCKER_MANIFEST:  # no platform: any reader takes it, as a plain entry
        assert wrapper["manifests"] == [
            {"mediaType": kind, "digest": image.digest, "size": image.size}
        ]
    else:
        assert wrapper["manifests"] == json.loads(image.manifest)["manifests"]
    assert set(blobs) == digests(image) | {entry["digest"]}

    code, out = await run("import", str(tmp_path / "out"), cwd=there)
    assert code == 0 and f"imported docker.io/library/app:v1 ({image.digest})" in out, out
    assert stored(there) == digests(image)  # the wrapper is not part of the image
    assert rows(there, "SELECT media_type, digest FROM tags") == [(kind, image.digest)]

    # A wrapper must wrap a Docker manifest: here it names a config blob.
    config = image.config or image.children[0].config
    assert config is not None
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    index["manifests"][0]["annotations"][WRAPS] = config.digest
    (tmp_path / "out" / "index.json").write_text(json.dumps(index))
    code, out = await run("import", str(tmp_path / "out"), cwd=configure(tmp_path / "third"))
    assert_refused(code, out, f"wraps {config.digest}, which is not a Docker manifest or list")


async def test_an_import_killed_midway_leaves_a_cache_that_restarts_clean(tmp_path: Path) -> None:
    workdir = configure(tmp_path / "work")
    layer = bytes(200 * 1024 * 1024)  # long enough to copy that the kill lands mid-way
    big = build_image("layout/big", OCI_MANIFEST, layer_sizes=(), extra_layers=((
        Blob.from_bytes(layer, OCI_LAYER), "sha256:" + "0" * 64),))  # fmt: skip
    layout = write_layout(tmp_path / "layout", [(big, FROM_US)])
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "import", str(layout), cwd=workdir,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    tmp = workdir / "data" / "tmp"
    async with asyncio.timeout(30):
        while not (tmp.is_dir() and names(tmp)):  # noqa: ASYNC110 - a file appearing
            await asyncio.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    assert await process.wait() == -signal.SIGKILL
    assert any(name.endswith(".part") for name in names(tmp))  # caught staging a blob

    async with mirror_processes(workdir, f"http://127.0.0.1:{free_port()}") as make:
        mirror = make()
        await mirror.start()  # a start clears tmp/
        assert mirror.temp_files == []
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{mirror.url}/v2/app/manifests/v1") as response,
        ):
            assert response.status == 503  # not imported, and upstream unreachable
        await mirror.terminate()
    await assert_nothing_imported(workdir)


async def test_an_imported_artifact_answers_referrers_of_its_subject_offline(
    tmp_path: Path,
) -> None:
    """Imported manifests are indexed with their `subject`, as pulled ones are: an offline
    mirror builds the referrers index of the subject from them."""
    empty = Blob.from_bytes(b"{}", "application/vnd.oci.empty.v1+json")
    sbom = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": "application/vnd.example.sbom.v1",
            "config": empty.descriptor(),
            "layers": [empty.descriptor()],
            "subject": APP.descriptor(),
            "annotations": {"org.example.note": "sbom"},
        }
    ).encode()
    artifact = Image(OCI_MANIFEST, sbom, config=empty, layers=(empty,))
    workdir = configure(tmp_path / "here")
    layout = write_layout(
        tmp_path / "layout", [(APP, FROM_US), (artifact, {**FROM_US, REF_NAME: "sbom"})]
    )
    code, out = await run("import", str(layout), cwd=workdir)
    assert code == 0, out

    async with mirror_processes(
        workdir, f"http://127.0.0.1:{free_port()}", "offline: true\n"
    ) as make:
        mirror = make()
        await mirror.start()
        path = f"/v2/app/referrers/{APP.digest}"
        async with aiohttp.ClientSession() as session, session.get(mirror.url + path) as response:
            assert response.status == 200
            index = await response.json(content_type=None)
        await mirror.terminate()
    assert [(d["digest"], d.get("artifactType")) for d in index["manifests"]] == [
        (artifact.digest, "application/vnd.example.sbom.v1")
    ]
    assert index["manifests"][0]["annotations"] == {"org.example.note": "sbom"}
