"""deploy/fleet/haproxy.cfg with test addresses, and haproxy running it as a subprocess."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import re
import signal
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
    """`haproxy -W -db -f <config>`: a master process in the foreground, and its worker.

    `reload` rewrites the config and sends the master SIGUSR2, as an operator would: the
    master re-executes itself (same PID), a new worker takes over the listening sockets
    and the old one finishes its connections. Stopped by the master's PID (SIGTERM, which
    the master passes on to its workers)."""

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
                "haproxy", "-W", "-db", "-f", str(self.config),
                stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log,
            )  # fmt: skip
        await self.wait_up(self.servers, within)

    async def reload(self, servers: list[str], within: float = 15.0) -> None:
        """Serve `servers` from now on (same ports); return once a new worker has every
        one of them up."""
        assert self.process is not None and self.process.returncode is None
        old_workers = self.workers()
        self.config.write_text(haproxy_config(servers, self.port, self.stats_port))
        self.servers = len(servers)
        self.process.send_signal(signal.SIGUSR2)
        async with asyncio.timeout(within):
            while not self.workers() - old_workers:
                assert self.process.returncode is None, self.log_tail()
                await asyncio.sleep(0.05)
        await self.wait_up(self.servers, within)

    async def wait_up(self, count: int, within: float = 15.0) -> set[str]:
        """Wait until `count` replicas pass their health check; return their names."""
        assert self.process is not None
        async with aiohttp.ClientSession() as session, asyncio.timeout(within):
            while len(up := await self.servers_up(session)) != count:
                assert self.process.returncode is None, self.log_tail()
                await asyncio.sleep(0.1)
        return up

    async def servers_up(self, session: aiohttp.ClientSession) -> set[str]:
        """The replicas the stats page shows UP (a new connection: after a reload, the new
        worker answers it)."""
        url = f"http://127.0.0.1:{self.stats_port}/stats;csv"
        try:
            async with session.get(url, headers={"Connection": "close"}) as response:
                text = await response.text()
        except aiohttp.ClientConnectionError:
            return set()
        rows = csv.DictReader(io.StringIO(text.removeprefix("# ")))
        return {
            row["svname"]
            for row in rows
            if row["pxname"] == "replicas" and row["svname"] != "BACKEND" and row["status"] == "UP"
        }

    def workers(self) -> set[int]:
        """PIDs of the master's children: its workers, the old one too while it drains."""
        assert self.process is not None
        master, found = str(self.process.pid), set()
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError):
                if stat.read_text().rsplit(")", 1)[1].split()[1] == master:
                    found.add(int(stat.parent.name))
        return found

    async def stop(self) -> None:
        if self.process is None or self.process.returncode is not None:
            return
        self.process.terminate()
        try:
            async with asyncio.timeout(10):
                await self.process.wait()
        except TimeoutError:
            self.process.kill()
            await self.process.wait()

    def log_tail(self) -> str:
        path = self.workdir / "haproxy.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""
