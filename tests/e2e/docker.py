"""A private Docker daemon (Debian's docker.io, dockerd 20.10) that pulls through the mirror.

``start_dockerd(mirror_host)`` is a factory fixture: the mirror has to be serving
before dockerd starts, because its address goes into ``registry-mirrors``.

Everything the daemon owns is private to the test:

- ``--config-file`` is our own daemon.json, so /etc/docker/daemon.json is never read,
  and its ``deprecated-key-path`` keeps the trust key out of /etc/docker/key.json;
- ``--data-root`` (images, the managed containerd's root) is under ``tmp_path``;
- ``--exec-root``, ``--pidfile`` and the API socket are in a short /tmp/dkd-* directory,
  because containerd puts unix sockets under the exec root (~108 byte path limit);
- no ``--containerd``: dockerd starts and stops its own containerd, whose sockets,
  state and pid file live in ``<exec-root>/containerd``;
- ``--iptables=false --bridge=none --ip-forward=false``: no host networking changes;
- ``--storage-driver vfs``: plain directories, no overlay mounts in a sandbox.

dockerd treats 127.0.0.0/8 as insecure anyway; ``--insecure-registry`` says so explicitly.
If the mirror fails, dockerd falls back to registry-1.docker.io, which is unreachable here.

dockerd and the CLI run with ``asyncio.create_subprocess_exec`` because the mirror
serves from the test's own event loop.  Teardown stops dockerd by its PID (SIGTERM,
then SIGKILL), then makes sure the managed containerd (by the PID in its pid file)
and any mounts under our directories are gone too.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

__all__ = ["DOCKER", "DOCKERD", "Dockerd", "StartDockerd", "start_dockerd"]

DOCKERD = shutil.which("dockerd") or "/usr/sbin/dockerd"
# The CLI from the docker.io package; a newer CLI elsewhere on PATH (e.g. /usr/local/bin)
# works too, but the packaged one matches the daemon's API version exactly.
DOCKER = (
    "/usr/bin/docker" if os.path.exists("/usr/bin/docker") else shutil.which("docker") or "docker"
)

START_TIMEOUT = 30.0
STOP_TIMEOUT = 20.0
COMMAND_TIMEOUT = 120.0

_PROXY_VARS = ("http_proxy", "https_proxy", "no_proxy", "all_proxy")


def _clean_env(**extra: str) -> dict[str, str]:
    """The environment without proxy settings or Docker client/daemon overrides."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k.lower() not in _PROXY_VARS and not k.startswith("DOCKER_")
    }
    env.update(extra)
    return env


def _alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except (FileNotFoundError, ProcessLookupError):
        return ""


def _mounts_under(*dirs: Path) -> list[str]:
    """Mount points at or below any of ``dirs`` (deepest first)."""
    prefixes = [str(d) for d in dirs]
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if any(point == p or point.startswith(p + "/") for p in prefixes):
            points.append(point)
    return sorted(points, key=len, reverse=True)


@dataclass
class Dockerd:
    """A running private dockerd; ``await dockerd.docker("pull", "x")`` runs the CLI."""

    run_dir: Path  # short: socket, pid file, exec root
    data_root: Path
    log_path: Path
    mirror_url: str
    process: asyncio.subprocess.Process
    client_config: Path
    containerd_pid: int | None = None

    @property
    def socket(self) -> Path:
        return self.run_dir / "docker.sock"

    @property
    def exec_root(self) -> Path:
        return self.run_dir / "exec"

    @property
    def host(self) -> str:
        return f"unix://{self.socket}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self, lines: int = 60) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        # The managed containerd's gRPC chatter drowns everything else.
        keep = [line for line in text.splitlines() if "module=grpc" not in line]
        return "\n".join(keep[-lines:])

    async def docker(self, *args: str, check: bool = True, seconds: float = COMMAND_TIMEOUT) -> str:
        """Run ``docker -H unix://<sock> ARGS``; stdout, or AssertionError with both logs."""
        returncode, out, err = await self._run_cli(args, seconds)
        if check and returncode != 0:
            raise AssertionError(
                f"docker {' '.join(args)} exited {returncode}:\n{err.strip()[-2000:]}\n"
                f"--- dockerd log (tail) ---\n{self.log_tail()}"
            )
        return out

    async def _run_cli(self, args: tuple[str, ...], seconds: float) -> tuple[int, str, str]:
        process = await asyncio.create_subprocess_exec(
            DOCKER,
            "-H",
            self.host,
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=_clean_env(DOCKER_CONFIG=str(self.client_config)),
        )
        try:
            out, err = await asyncio.wait_for(process.communicate(), seconds)
        except TimeoutError:
            process.kill()
            await process.wait()
            raise
        assert process.returncode is not None
        return process.returncode, out.decode(errors="replace"), err.decode(errors="replace")

    async def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        last = ""
        while time.monotonic() < deadline:
            if self.process.returncode is not None:
                raise AssertionError(
                    f"dockerd exited {self.process.returncode} while starting:\n{self.log_tail()}"
                )
            code, out, err = await self._run_cli(("info", "--format", "{{json .}}"), 10)
            # `docker info --format` exits 0 even when the daemon is unreachable: it
            # reports that in ServerErrors instead.
            info: dict[str, Any] = json.loads(out) if code == 0 else {"ServerErrors": [err]}
            if not info.get("ServerErrors"):
                mirrors = info.get("RegistryConfig", {}).get("Mirrors") or []
                assert self.mirror_url + "/" in mirrors, mirrors
                assert info["DockerRootDir"] == str(self.data_root), info["DockerRootDir"]
                # No --containerd: dockerd must have started its own, in our exec root.
                self.containerd_pid = self._read_containerd_pid()
                assert self.containerd_pid is not None and _alive(self.containerd_pid)
                assert str(self.exec_root) in _cmdline(self.containerd_pid)
                return
            last = "; ".join(info["ServerErrors"])
            await asyncio.sleep(0.2)
        raise AssertionError(
            f"dockerd not ready after {START_TIMEOUT}s ({last}):\n{self.log_tail()}"
        )

    def _read_containerd_pid(self) -> int | None:
        try:
            return int((self.exec_root / "containerd" / "containerd.pid").read_text().strip())
        except (FileNotFoundError, ValueError):
            return None

    async def stop(self) -> None:
        """SIGTERM dockerd by PID, SIGKILL if it lingers; then stop its containerd, unmount."""
        containerd_pid = self.containerd_pid or self._read_containerd_pid()
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), STOP_TIMEOUT)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        # dockerd stops its managed containerd on a clean shutdown, but not if it was
        # killed; that containerd is ours (its command line names our exec root).
        if containerd_pid is not None and str(self.exec_root) in _cmdline(containerd_pid):
            await _stop_pid(containerd_pid)
        for point in _mounts_under(self.run_dir, self.data_root):
            umount = await asyncio.create_subprocess_exec("umount", "--lazy", point)
            await umount.wait()

    def leftovers(self) -> list[str]:
        """Anything of this daemon still alive or mounted (empty after a good ``stop``)."""
        left = [f"dockerd pid {self.pid}"] if _alive(self.pid) else []
        if self.containerd_pid is not None and _alive(self.containerd_pid):
            left.append(f"containerd pid {self.containerd_pid}: {_cmdline(self.containerd_pid)}")
        left += [f"mount {p}" for p in _mounts_under(self.run_dir, self.data_root)]
        return left


async def _stop_pid(pid: int) -> None:
    """SIGTERM ``pid`` (not our child, so poll /proc), SIGKILL after STOP_TIMEOUT."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + STOP_TIMEOUT
        while time.monotonic() < deadline:
            if not _alive(pid):
                return
            await asyncio.sleep(0.1)


StartDockerd = Callable[[str], Awaitable[Dockerd]]


@pytest_asyncio.fixture
async def start_dockerd(tmp_path: Path) -> AsyncIterator[StartDockerd]:
    """Factory: ``dockerd = await start_dockerd(mirror.host)``; stopped at test end."""
    started: list[Dockerd] = []
    run_dirs: list[Path] = []

    async def start(mirror_host: str) -> Dockerd:
        if not os.access(DOCKERD, os.X_OK) or not os.access(DOCKER, os.X_OK):
            pytest.fail(f"need {DOCKERD} and {DOCKER}: apt-get install docker.io", pytrace=False)
        n = len(run_dirs)
        run_dir = Path(tempfile.mkdtemp(prefix="dkd-", dir="/tmp"))
        run_dirs.append(run_dir)
        base = tmp_path / f"dockerd{n}"
        data_root = base / "data"
        client_config = base / "client"
        for d in (data_root, client_config):
            d.mkdir(parents=True)
        mirror_url = f"http://{mirror_host}"
        config = base / "daemon.json"
        # Only settings without a command-line flag here; a setting in both is an error.
        config.write_text(json.dumps({"deprecated-key-path": str(base / "key.json")}))
        log_path = base / "dockerd.log"
        log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            process = await asyncio.create_subprocess_exec(
                DOCKERD,
                "--config-file", str(config),
                "--data-root", str(data_root),
                "--exec-root", str(run_dir / "exec"),
                "--pidfile", str(run_dir / "docker.pid"),
                "--host", f"unix://{run_dir / 'docker.sock'}",
                "--storage-driver", "vfs",
                "--iptables=false",
                "--ip-forward=false",
                "--ip-masq=false",
                "--bridge", "none",
                "--registry-mirror", mirror_url,
                "--insecure-registry", mirror_host,
                "--debug",  # logs each registry request it makes; see Dockerd.log_tail
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log_fd,
                stderr=asyncio.subprocess.STDOUT,
                env=_clean_env(),
                start_new_session=True,  # a ^C to pytest reaches pytest only; teardown stops it
            )  # fmt: skip
        finally:
            os.close(log_fd)  # dockerd has its own copy
        dockerd = Dockerd(run_dir, data_root, log_path, mirror_url, process, client_config)
        started.append(dockerd)
        await dockerd.wait_ready()
        return dockerd

    yield start

    problems: list[str] = []
    for dockerd in reversed(started):
        try:
            await dockerd.stop()
        except Exception as e:  # keep going: the others must be stopped too
            problems.append(f"stopping dockerd {dockerd.pid}: {e!r}")
        problems += dockerd.leftovers()
    for run_dir in run_dirs:
        if not _mounts_under(run_dir):
            shutil.rmtree(run_dir, ignore_errors=True)
    assert not problems, f"dockerd left behind: {problems}"
