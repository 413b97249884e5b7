"""deploy/fleet/haproxy.cfg with test addresses, and haproxy running it as a subprocess."""

from __future__ import annotations

import asyncio
import csv
import io
import re
from pathlib import Path

import aiohttp

from tests.upstream.registry import free_port

HAPROXY_CFG = Path(__file__).resolve().parents[2] / "deploy" / "fleet" / "haproxy.cfg"
REPLICA_HEADER = "X-Pullthrough-Replica"
_SERVER_LINE = re.compile(r"^    server replica-\d+ \S+\n", re.MULTILINE)


def haproxy_config(servers: list[str], port: int, stats_port: int) -> str:
    """The shipped config, listening on 127.0.0.1 ports, with `servers` (host:port) as
    replica-0, replica-1, ... in that order (the order fixes the ring positions)."""
    text = HAPROXY_CFG.read_text(encoding="utf-8")
    shipped = _SERVER_LINE.findall(text)
    assert shipped, "no `server replica-N` lines in the shipped config"
    lines = "".join(f"    server replica-{i} {addr}\n" for i, addr in enumerate(servers))
    text = text.replace("".join(shipped), lines, 1)
    for bind, replacement in (("bind :5000", port), ("bind :8404", stats_port)):
        assert bind in text, f"no `{bind}` in the shipped config"
        text = text.replace(bind, f"bind 127.0.0.1:{replacement}", 1)
    return text


class HaproxyProcess:
    """`haproxy -db -f <config>` in the foreground; stopped by its own PID."""

    def __init__(self, workdir: Path, servers: list[str]) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.stats_port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = workdir / "haproxy.cfg"
        self.config.write_text(haproxy_config(servers, self.port, self.stats_port))
        self.servers = len(servers)
        self.process: asyncio.subprocess.Process | None = None

    async def start(self, within: float = 15.0) -> None:
        """Start, and wait until every replica passed its /readyz check."""
        with (self.workdir / "haproxy.log").open("ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                "haproxy", "-db", "-f", str(self.config),
                stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log,
            )  # fmt: skip
        async with aiohttp.ClientSession() as session, asyncio.timeout(within):
            while await self.servers_up(session) < self.servers:
                assert self.process.returncode is None, self.log_tail()
                await asyncio.sleep(0.1)

    async def servers_up(self, session: aiohttp.ClientSession) -> int:
        url = f"http://127.0.0.1:{self.stats_port}/stats;csv"
        try:
            async with session.get(url) as response:
                text = await response.text()
        except aiohttp.ClientConnectionError:
            return 0
        rows = csv.DictReader(io.StringIO(text.removeprefix("# ")))
        return sum(
            1
            for row in rows
            if row["pxname"] == "replicas" and row["svname"] != "BACKEND" and row["status"] == "UP"
        )

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            await self.process.wait()

    def log_tail(self) -> str:
        path = self.workdir / "haproxy.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""
