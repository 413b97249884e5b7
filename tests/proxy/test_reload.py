"""SIGHUP reloads the config of a real `pullthrough serve` process: downloads in flight
and kept-alive connections carry on, `offline` switches for the next request, a bad file
is refused, and what needs a restart is named."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path

import aiohttp

from tests.fake_upstream.server import FakeUpstream, Fault
from tests.mirror_process import MirrorProcess, mirror_processes
from tests.upstream.fixtures import UpstreamImages
from tests.upstream.registry import RegistryProcess


def configure(mirror: MirrorProcess, upstream_url: str, extra: str = "") -> None:
    """Rewrite the mirror's config file (as MirrorProcess writes it, plus `extra`)."""
    (mirror.workdir / "mirror.yaml").write_text(
        f"listen: 127.0.0.1:{mirror.port}\n"
        "cache: {path: ./data}\n"
        f"upstreams: [{{name: docker.io, url: '{upstream_url}', default: true}}]\n" + extra
    )


async def sighup(mirror: MirrorProcess) -> str:
    """Send SIGHUP and wait for the reload's outcome in the log; returns the new lines."""
    log = mirror.workdir / "mirror.log"
    seen = len(log.read_text())
    assert mirror.process is not None
    mirror.process.send_signal(signal.SIGHUP)
    async with asyncio.timeout(5):
        while True:
            new = log.read_text()[seen:]
            if "config reloaded from" in new or "config reload refused" in new:
                return new
            await asyncio.sleep(0.02)


class KeptAlive:
    """One client connection, reused for request after request (HTTP/1.1 keep-alive)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> KeptAlive:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    async def get(self, path: str) -> tuple[int, bytes]:
        self.writer.write(f"GET {path} HTTP/1.1\r\nHost: mirror\r\n\r\n".encode())
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        length = next(
            int(line.split(":", 1)[1])
            for line in lines
            if line.lower().startswith("content-length")
        )
        assert not any(line.lower() == "connection: close" for line in lines)
        return int(lines[0].split()[1]), await self.reader.readexactly(length)

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


async def test_a_download_and_a_kept_alive_connection_outlive_a_reload(
    fake_upstream: FakeUpstream, tmp_path: Path
) -> None:
    """The reload switches the upstream offline in the middle of a slow download: the
    download already has its connection and finishes whole, and is then served from the
    cache with the upstream offline."""
    data = os.urandom(1_500_000)
    digest = fake_upstream.add_blob("library/app", data)
    fake_upstream.set_fault(digest, Fault(chunk_size=65_536, delay=0.05))  # ~1.2 s in all
    async with mirror_processes(tmp_path, fake_upstream.url) as make:
        mirror = make()
        await mirror.start()
        client = await KeptAlive.open(mirror.port)
        assert await client.get("/v2/") == (200, b"{}")
        blob = f"{mirror.url}/v2/app/blobs/{digest}"
        async with aiohttp.ClientSession() as session, session.get(blob) as response:
            first = await response.content.readexactly(65_536)
            configure(mirror, fake_upstream.url, "offline: true\n")
            logged = await sighup(mirror)
            assert "offline: docker.io" in logged and "needs a restart" not in logged
            assert await client.get("/v2/") == (200, b"{}")  # the same connection
            assert first + await response.read() == data
        await client.close()
        async with aiohttp.ClientSession() as session, asyncio.timeout(5):
            while True:  # committed just after the last byte went out
                async with session.get(blob) as response:
                    if response.status == 200:
                        assert await response.read() == data
                        break
                await asyncio.sleep(0.05)
        assert fake_upstream.count("GET", f"/v2/library/app/blobs/{digest}") == 1
        assert await mirror.terminate() == 0


async def test_sighup_switches_offline_for_the_next_request(
    pushed_images: UpstreamImages, token_registry: RegistryProcess, tmp_path: Path
) -> None:
    multi = pushed_images.multi
    layer = multi.layers[0]
    async with mirror_processes(tmp_path, token_registry.url) as make:
        mirror = make()
        await mirror.start()
        async with aiohttp.ClientSession() as session:

            async def get(path: str) -> tuple[int, bytes]:
                async with session.get(mirror.url + path) as response:
                    return response.status, await response.read()

            assert await get("/v2/multi/manifests/v1") == (200, multi.manifest)
            assert await get(f"/v2/multi/blobs/{layer.digest}") == (200, layer.read_bytes())
            configure(mirror, token_registry.url, "offline: true\n")
            await sighup(mirror)
            asked = len(token_registry.requests())

            assert await get("/v2/multi/manifests/v1") == (200, multi.manifest)
            assert await get(f"/v2/multi/blobs/{layer.digest}") == (200, layer.read_bytes())
            status, body = await get("/v2/ociindex/manifests/v1")  # never pulled
            assert status == 503
            (error,) = json.loads(body)["errors"]
            assert error["code"] == "UNAVAILABLE"
            assert error["message"].startswith("upstream docker.io is offline (offline: true)")
            async with session.get(f"{mirror.url}/readyz") as response:
                assert response.status == 200
            assert len(token_registry.requests()) == asked

            configure(mirror, token_registry.url)  # online again
            await sighup(mirror)
            status, _ = await get("/v2/ociindex/manifests/v1")
            assert status == 200
            assert len(token_registry.requests()) > asked


async def test_a_bad_file_is_refused_and_restart_only_changes_are_named(
    fake_upstream: FakeUpstream, tmp_path: Path
) -> None:
    fake_upstream.add_image("library/app", "v1")
    async with mirror_processes(tmp_path, fake_upstream.url) as make:
        mirror = make()
        await mirror.start()
        configure(mirror, fake_upstream.url, "offline: maybe\n")
        logged = await sighup(mirror)
        assert "ERROR" in logged and "config reload refused" in logged
        assert "offline: must be true or false" in logged
        manifest = f"{mirror.url}/v2/app/manifests/v1"
        async with aiohttp.ClientSession() as session:
            async with session.get(manifest) as response:  # still online
                assert response.status == 200
            assert fake_upstream.count("GET", "/v2/library/app/manifests/v1") == 1

            elsewhere = mirror.port + 1
            (mirror.workdir / "mirror.yaml").write_text(
                f"listen: 127.0.0.1:{elsewhere}\n"
                "cache: {path: ./elsewhere, max_size: 1GiB}\n"
                f"upstreams: [{{name: docker.io, url: '{fake_upstream.url}', default: true,"
                " manifest_ttl: 0}]\n"
            )
            logged = await sighup(mirror)
            assert "WARNING" in logged
            assert "listen, cache.path, cache.max_size changed, needs a restart" in logged
            # Still listening where it was, and the upstream change took effect.
            async with session.get(manifest) as response:
                assert response.status == 200
                assert response.headers["Cache-Control"] == "no-cache"  # manifest_ttl: 0
            assert fake_upstream.count("HEAD", "/v2/library/app/manifests/v1") == 1
        assert not (mirror.workdir / "elsewhere").exists()
        assert await mirror.terminate() == 0
