"""A private containerd daemon for end-to-end pulls with ``ctr``.

Each test gets its own daemon (it boots in ~20 ms): root, state, config and log
live under the test's tmp_path, the gRPC socket in a short private directory
under /tmp (unix socket paths are limited to 108 bytes, pytest's tmp paths can
be longer).  Nothing touches /var/lib/containerd or /run/containerd, and the
daemon is stopped by its PID at teardown.

Only the plugins a pull needs are loaded: CRI, the runtimes/task service and
every snapshotter but ``native`` (no overlayfs needed) are disabled.

Registry access is configured per pull with ``ctr images pull --hosts-dir``:
``DIR/<registry>/hosts.toml`` names the mirror as the only host, so containerd
sends ``?ns=<registry>`` to the mirror and never falls back to the real registry.
``ctr`` 1.6 always unpacks after a pull (every platform with
``--all-platforms``), hence ``--snapshotter native``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO

import pytest

from tests.e2e.support import Result, require_binary, run

__all__ = ["Containerd", "containerd"]

NAMESPACE = "pullthrough-e2e"
SNAPSHOTTER = "native"
DISABLED_PLUGINS = (
    "io.containerd.grpc.v1.cri",
    "io.containerd.grpc.v1.tasks",
    "io.containerd.internal.v1.opt",
    "io.containerd.internal.v1.restart",
    "io.containerd.monitor.v1.cgroups",
    "io.containerd.runtime.v1.linux",
    "io.containerd.runtime.v2.task",
    "io.containerd.service.v1.tasks-service",
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.snapshotter.v1.overlayfs",
    "io.containerd.snapshotter.v1.zfs",
)


def _toml_list(items: Iterable[str]) -> str:
    return "[" + ", ".join(f'"{i}"' for i in items) + "]"


class Containerd:
    """One ``containerd`` process with private root, state and socket."""

    def __init__(self, workdir: Path) -> None:
        self.containerd = require_binary("containerd")
        self.ctr_binary = require_binary("ctr")
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = workdir / "containerd.toml"
        self.log_path = workdir / "containerd.log"
        self._sockdir = Path(tempfile.mkdtemp(prefix="ctrd-", dir="/tmp"))
        self.address = self._sockdir / "containerd.sock"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    # -- lifecycle ---------------------------------------------------------

    def config(self) -> str:
        return (
            "version = 2\n"
            f'root = "{self.workdir / "root"}"\n'
            f'state = "{self.workdir / "state"}"\n'
            f"disabled_plugins = {_toml_list(DISABLED_PLUGINS)}\n"
            "[grpc]\n"
            f'  address = "{self.address}"\n'
            "[ttrpc]\n"
            f'  address = "{self.address}.ttrpc"\n'
            "[debug]\n"
            '  address = ""\n'
            "[metrics]\n"
            '  address = ""\n'
        )

    def start(self, timeout: float = 15.0) -> Containerd:
        self.config_path.write_text(self.config())
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self._proc = subprocess.Popen(
            [self.containerd, "--config", str(self.config_path)],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"containerd exited early:\n{self.log_tail()}")
            if self._answers():
                return self
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"containerd did not come up within {timeout}s:\n{self.log_tail()}")

    def _answers(self) -> bool:
        if not self.address.exists():
            return False
        with socket.socket(socket.AF_UNIX) as s:
            try:
                s.connect(str(self.address))
            except OSError:
                return False
        return True

    def stop(self, timeout: float = 10.0) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=timeout)
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        shutil.rmtree(self._sockdir, ignore_errors=True)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""

    # -- registry configuration --------------------------------------------

    def hosts_dir(
        self, mirror_host: str, registries: Iterable[str] = ("docker.io", "ghcr.io")
    ) -> Path:
        """A ``--hosts-dir`` that sends every listed registry to the mirror, and only there."""
        directory = self.workdir / f"hosts-{mirror_host.replace(':', '_')}"
        for registry in registries:
            (directory / registry).mkdir(parents=True, exist_ok=True)
            (directory / registry / "hosts.toml").write_text(
                f'server = "http://{mirror_host}"\n'
                "\n"
                f'[host."http://{mirror_host}"]\n'
                '  capabilities = ["pull", "resolve"]\n'
            )
        return directory

    # -- ctr -----------------------------------------------------------------

    async def ctr(self, *args: str, check: bool = True, time_limit: float = 60.0) -> Result:
        return await run(
            self.ctr_binary,
            "--address",
            str(self.address),
            "--namespace",
            NAMESPACE,
            *args,
            env={**os.environ, "CONTAINERD_SNAPSHOTTER": SNAPSHOTTER},
            check=check,
            time_limit=time_limit,
        )

    async def pull(
        self,
        ref: str,
        hosts_dir: Path,
        *,
        platform: str | None = "linux/amd64",
        check: bool = True,
    ) -> Result:
        """``ctr images pull``; ``platform=None`` means ``--all-platforms``."""
        where = ["--all-platforms"] if platform is None else ["--platform", platform]
        return await self.ctr(
            "images",
            "pull",
            "--hosts-dir",
            str(hosts_dir),
            "--snapshotter",
            SNAPSHOTTER,
            *where,
            ref,
            check=check,
        )

    async def images(self) -> dict[str, str]:
        """``{ref: target digest}`` from ``ctr images ls``."""
        out = (await self.ctr("images", "ls")).stdout.splitlines()
        # REF TYPE DIGEST SIZE PLATFORMS LABELS; the size column has a space in it.
        return {line.split()[0]: line.split()[2] for line in out[1:] if line.strip()}

    async def content(self) -> set[str]:
        """Digests in the content store (``ctr content ls -q``)."""
        return set((await self.ctr("content", "ls", "-q")).stdout.split())

    async def remove_image(self, ref: str) -> None:
        """``ctr images rm --sync``: the image and, by garbage collection, its content."""
        await self.ctr("images", "rm", "--sync", ref)


@pytest.fixture
def containerd(tmp_path: Path) -> Iterator[Containerd]:
    """A started private containerd, stopped (by PID) at teardown."""
    daemon = Containerd(tmp_path / "containerd").start()
    try:
        yield daemon
    finally:
        daemon.stop()
