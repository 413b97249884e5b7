"""The `pullthrough` commands, run as a user would, against a real registry."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import aiohttp

from tests.fake_upstream.server import FakeUpstream, Fault
from tests.mirror_process import mirror_processes
from tests.secrets import SECRET
from tests.upstream.fixtures import UpstreamImages
from tests.upstream.registry import RegistryProcess


async def run(*args: str, cwd: Path, env: dict[str, str] | None = None) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", *args, cwd=cwd,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, **(env or {})},
    )  # fmt: skip
    out, _ = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode is not None
    return process.returncode, out.decode()


def write_config(workdir: Path, url: str, extra: str = "") -> None:
    (workdir / "mirror.yaml").write_text(
        "listen: 127.0.0.1:5998\ncache: {path: ./data}\n"
        f"upstreams: [{{name: docker.io, url: '{url}', default: true}}]\n" + extra
    )


async def test_warm_fetches_images_for_the_platforms_asked(
    pushed_images: UpstreamImages, token_registry: RegistryProcess, tmp_path: Path
) -> None:
    write_config(tmp_path, token_registry.url)
    index = pushed_images.oci_index
    arch = {c.image.platform["architecture"]: c for c in index.children if c.image.platform}
    arm, amd = arch["arm64"], arch["amd64"]

    code, out = await run(
        "warm", "multi:v1", "ociindex:v1", "--platform", "linux/arm64", cwd=tmp_path
    )
    assert code == 0, out
    assert "warmed multi:v1" in out and "warmed ociindex:v1" in out
    for blob in pushed_images.multi.blobs + arm.blobs:
        assert f"{blob.digest}  " in out  # one plain line per blob: not a terminal
    assert not any(blob.digest in out for blob in amd.image.layers)

    code, out = await run("fsck", cwd=tmp_path)
    # The blobs, plus three manifests: multi, the index and its arm64 child.
    expected = len({b.digest for b in pushed_images.multi.blobs + arm.blobs}) + 3
    assert (code, f"checked {expected} blobs: 0 bad, 0 missing") == (
        0,
        out.strip().splitlines()[-1],
    )

    code, out = await run("warm", "nothing-here:v1", cwd=tmp_path)
    assert code == 1 and "could not warm nothing-here:v1: manifest unknown" in out
    code, out = await run("warm", "UPPER:case", cwd=tmp_path)
    assert code == 2 and out.startswith("pullthrough: UPPER:case: invalid repository name")


async def test_serve_warms_the_configured_images_at_start(
    pushed_images: UpstreamImages, token_registry: RegistryProcess, tmp_path: Path
) -> None:
    async with mirror_processes(tmp_path, token_registry.url, "warm: [multi:v1]\n") as make:
        mirror = make()
        await mirror.start()
        wanted = {blob.digest.removeprefix("sha256:") for blob in pushed_images.multi.blobs}
        async with asyncio.timeout(20):
            while not wanted <= {p.name for p in (tmp_path / "data" / "blobs").rglob("*")}:  # noqa: ASYNC110
                await asyncio.sleep(0.05)


async def test_stats_gc_and_evict(
    pushed_images: UpstreamImages, token_registry: RegistryProcess, tmp_path: Path
) -> None:
    async with mirror_processes(tmp_path, token_registry.url) as make:
        mirror = make()
        await mirror.start()
        blobs = pushed_images.multi.blobs  # its config and 3 layers; no manifest is asked for
        assert len(blobs) == 4
        async with aiohttp.ClientSession() as session:
            for blob in blobs:
                for _ in range(2):  # a miss, then a hit (or a join, if still committing)
                    async with session.get(f"{mirror.url}/v2/multi/blobs/{blob.digest}") as r:
                        await r.read()
            # A blob is indexed just after its last byte is sent: wait for every commit.
            await wait_no_fills(session, mirror.url)
        total = sum(blob.size for blob in blobs)
        code, out = await run("stats", "--server", mirror.url, cwd=tmp_path)
        assert code == 0, out
        assert "blobs:  4" in out.splitlines(), out
        assert f"{total / 1e6:10.1f} MB  docker.io/library/multi" in out
        assert "hit ratio since start: 50.0% of" in out
        await mirror.terminate()

    code, out = await run("gc", cwd=tmp_path)
    assert code == 0 and "evicted 0 by ttl and 0 by size" in out
    code, out = await run("evict", "--to", "0", cwd=tmp_path)
    assert code == 0 and "now 0 bytes" in out
    code, out = await run("stats", "--server", "http://127.0.0.1:9", cwd=tmp_path)
    assert "blobs:  0" in out and "hit ratio since start: unknown" in out


async def wait_no_fills(session: aiohttp.ClientSession, url: str) -> None:
    """Wait until the server at `url` has no download in flight: each fill has committed
    (and is indexed), or been passed through or abandoned."""
    async with asyncio.timeout(10):
        while True:
            async with session.get(f"{url}/metrics") as response:
                lines = (await response.text()).splitlines()
            if "pullthrough_fills_in_progress 0.0" in lines:
                return
            await asyncio.sleep(0.02)


async def test_check_config_masks_secrets(tmp_path: Path) -> None:
    write_config(tmp_path, "https://registry.example")
    text = (tmp_path / "mirror.yaml").read_text()
    text = text.replace("default: true}", "default: true, username: bot, password: '${PW}'}")
    (tmp_path / "mirror.yaml").write_text(text)
    code, out = await run("check-config", cwd=tmp_path, env={"PW": SECRET})
    assert code == 0
    assert "password: '***'" in out and SECRET not in out
    assert "manifest_ttl: 300.0" in out and "listen: 127.0.0.1:5998" in out


async def test_bad_input_gets_a_clear_message_and_nonzero_exit(tmp_path: Path) -> None:
    write_config(tmp_path, "https://registry.example")
    cases = [
        (("evict", "--to", "lots"), 2, "pullthrough: --to: must be a size"),
        (("fsck",), 2, "pullthrough: no cache at data"),
        (("stats",), 2, "pullthrough: no cache at data"),
        (("warm",), 2, "the following arguments are required: IMAGE"),
        (("serve", "--config", "nope.yaml"), 2, "pullthrough: cannot read config 'nope.yaml'"),
    ]
    for args, expected_code, message in cases:
        code, out = await run(*args, cwd=tmp_path)
        assert (code, message in out, "Traceback" in out) == (expected_code, True, False), out


async def test_sigterm_lets_inflight_downloads_finish(
    fake_upstream: FakeUpstream, tmp_path: Path
) -> None:
    """On SIGTERM aiohttp first closes the listening socket and asks every connection to
    close after its current response, then runs on_shutdown, which turns /readyz to 503
    (logged). So a balancer's check sees a refused connection at once, and one already on
    its way sees the 503 (test_behind_a_proxy shows that answer). What a real process
    lets us observe is the order: the shutdown is announced while a slow download is far
    from done, no new connection is accepted, and the download finishes whole."""
    data = os.urandom(1_500_000)
    digest = fake_upstream.add_blob("library/app", data)
    fake_upstream.set_fault(digest, Fault(chunk_size=65_536, delay=0.05))  # ~1.2 s in all
    async with mirror_processes(tmp_path, fake_upstream.url, "shutdown_grace: 10s\n") as make:
        mirror = make()
        await mirror.start()
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{mirror.url}/v2/app/blobs/{digest}") as response,
        ):
            first = await response.content.readexactly(65_536)
            assert mirror.process is not None
            mirror.process.send_signal(15)
            log = tmp_path / "mirror.log"
            async with asyncio.timeout(5):
                while "/readyz answers 503" not in log.read_text():  # noqa: ASYNC110 - a file
                    await asyncio.sleep(0.02)
            assert mirror.process.returncode is None  # still serving the download
            # No new connections once shutdown has begun...
            try:
                async with session.get(f"{mirror.url}/v2/", timeout=aiohttp.ClientTimeout(total=2)):
                    raise AssertionError("a new request was accepted during shutdown")
            except aiohttp.ClientConnectionError:
                pass
            # ...but the download in flight completes, whole.
            assert first + await response.read() == data
        assert await mirror.process.wait() == 0
    assert list((tmp_path / "data" / "tmp").iterdir()) == []
    code, out = await run("fsck", cwd=tmp_path)
    assert code == 0 and "0 bad, 0 missing" in out
