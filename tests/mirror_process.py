"""The mirror as a real `python -m proxy serve` subprocess, for signals and restarts."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp

from tests.upstream.registry import free_port


class MirrorProcess:
    def __init__(self, workdir: Path, upstream_url: str, extra: str = "") -> None:
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        (workdir / "mirror.yaml").write_text(
            f"listen: 127.0.0.1:{self.port}\n"
            "cache: {path: ./data}\n"
            f"upstreams: [{{name: docker.io, url: '{upstream_url}', default: true}}]\n" + extra
        )
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        with (self.workdir / "mirror.log").open("ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "proxy", "serve", "--config", "mirror.yaml",
                cwd=self.workdir, stdout=asyncio.subprocess.DEVNULL, stderr=log,
            )  # fmt: skip
        async with aiohttp.ClientSession() as session, asyncio.timeout(20):
            while True:
                try:
                    async with session.get(self.url + "/v2/") as response:
                        if response.status == 200:
                            return
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.05)

    async def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        await self.process.wait()

    @property
    def temp_files(self) -> list[Path]:
        return list((self.workdir / "data" / "tmp").iterdir())

    async def terminate(self) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return await self.process.wait()


@contextlib.asynccontextmanager
async def mirror_processes(
    workdir: Path, upstream_url: str, extra: str = ""
) -> AsyncIterator[Callable[[], MirrorProcess]]:
    """A factory of mirror processes on one cache; all are killed at the end."""
    made: list[MirrorProcess] = []

    def make() -> MirrorProcess:
        made.append(MirrorProcess(workdir, upstream_url, extra))
        return made[-1]

    try:
        yield make
    finally:
        for mirror in made:
            if mirror.process is not None and mirror.process.returncode is None:
                await mirror.kill()
