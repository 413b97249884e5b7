"""Podman, run as root against private storage and private configuration.

Everything podman would read or write globally is redirected under tmp_path:

- ``--root``/``--runroot``/``--storage-driver vfs`` and ``CONTAINERS_STORAGE_CONF``
  (vfs needs no overlayfs; the runroot is a short dir under /tmp, podman refuses
  one longer than 50 characters);
- ``CONTAINERS_CONF``: file events log, cgroupfs, ``lock_type = "file"`` (else
  /dev/shm/libpod_lock), the CNI backend with a private config dir (root's
  netavark backend always creates /run/containers/networks), private tmp dirs;
- ``CONTAINERS_REGISTRIES_CONF``: the mirror configuration (see ``use_mirror``);
- ``--signature-policy``: accept anything;
- ``XDG_RUNTIME_DIR``, ``HOME``, ``TMPDIR``: private (auth files, big temp files).

Podman 4.3 has no knob for its blob-info cache, hard-coded for root to
/var/lib/containers/cache/blob-info-cache-v1.boltdb.  When we may create mount
namespaces (root with CAP_SYS_ADMIN), podman runs under
``unshare --mount --propagation private`` with a private directory bind-mounted
over /var/lib, so that file is private too; otherwise podman shares it (skopeo,
used by the other tests, writes it as well).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.support import Result, require_binary, run

__all__ = ["NotARegistry", "Podman", "podman"]


@functools.cache
def _can_unshare_mounts() -> bool:
    unshare = shutil.which("unshare")
    if unshare is None:
        return False
    with tempfile.TemporaryDirectory() as empty:
        probe = subprocess.run(
            [unshare, "--mount", "--propagation", "private", "--",
             "mount", "--bind", empty, "/var/lib"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            check=False,
        )  # fmt: skip
    return probe.returncode == 0


class _NotFound(BaseHTTPRequestHandler):
    server: _RecordingServer

    def _answer(self) -> None:
        self.server.requests.append(f"{self.command} {self.path}")
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_HEAD = _answer

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _RecordingServer(ThreadingHTTPServer):
    daemon_threads = True
    requests: list[str]

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # podman's TLS probe of this plain-HTTP server is expected


class NotARegistry:
    """A loopback HTTP server answering 404 to everything, recording what it was asked.

    It stands in for each registry's real location, behind the mirror: podman
    falls back to it only when the mirror fails, so a fallback never leaves
    the host, never succeeds, and is visible in ``requests``.  A 404 is not
    retried (a refused connection would be, 3 times with 1 s pauses).
    """

    def __init__(self) -> None:
        self._server = _RecordingServer(("127.0.0.1", 0), _NotFound)
        self._server.requests = []
        self.host = f"127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), daemon=True
        )
        self._thread.start()

    @property
    def requests(self) -> list[str]:
        return list(self._server.requests)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


class Podman:
    def __init__(self, workdir: Path) -> None:
        self.binary = require_binary("podman")
        self.workdir = workdir
        # podman refuses a runroot longer than 50 characters; pytest's tmp paths are longer.
        self.runroot = Path(tempfile.mkdtemp(prefix="podrun-", dir="/tmp"))
        for name in ("root", "tmp", "bigtmp", "home", "xdg", "net", "varlib"):
            (workdir / name).mkdir(parents=True, exist_ok=True)
        (workdir / "xdg").chmod(0o700)
        self.policy = workdir / "policy.json"
        self.policy.write_text(json.dumps({"default": [{"type": "insecureAcceptAnything"}]}))
        self.registries = workdir / "registries.conf"
        self.registries.write_text("unqualified-search-registries = []\n")
        (workdir / "storage.conf").write_text(
            "[storage]\n"
            'driver = "vfs"\n'
            f'graphroot = "{workdir / "root"}"\n'
            f'runroot = "{self.runroot}"\n'
        )
        (workdir / "containers.conf").write_text(
            "[engine]\n"
            'events_logger = "file"\n'
            f'events_logfile_path = "{workdir / "events.log"}"\n'
            'cgroup_manager = "cgroupfs"\n'
            'lock_type = "file"\n'
            f'tmp_dir = "{workdir / "tmp"}"\n'
            f'image_copy_tmp_dir = "{workdir / "bigtmp"}"\n'
            f'volume_path = "{workdir / "volumes"}"\n'
            "[network]\n"
            'network_backend = "cni"\n'
            f'network_config_dir = "{workdir / "net"}"\n'
        )
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "HOME": str(workdir / "home"),
            "XDG_RUNTIME_DIR": str(workdir / "xdg"),
            "TMPDIR": str(workdir / "bigtmp"),
            "CONTAINERS_CONF": str(workdir / "containers.conf"),
            "CONTAINERS_STORAGE_CONF": str(workdir / "storage.conf"),
            "CONTAINERS_REGISTRIES_CONF": str(self.registries),
        }
        self.prefix: list[str] = []
        if _can_unshare_mounts():
            self.prefix = [
                "unshare", "--mount", "--propagation", "private", "--",
                "sh", "-c", 'mount --bind "$0" /var/lib && exec "$@"', str(workdir / "varlib"),
            ]  # fmt: skip
        self.real_registry = NotARegistry()

    def close(self) -> None:
        self.real_registry.close()
        shutil.rmtree(self.runroot, ignore_errors=True)

    def use_mirror(self, registries: dict[str, str]) -> None:
        """``registries``: ``{registry: mirror location}``, e.g.
        ``{"docker.io": "HOST", "ghcr.io": "HOST/ghcr.io"}``.

        Each registry's own location is ``real_registry``, tried only if the mirror fails.
        """
        text = "unqualified-search-registries = []\n"
        for prefix, location in registries.items():
            text += (
                "\n[[registry]]\n"
                f'prefix = "{prefix}"\n'
                f'location = "{self.real_registry.host}/{prefix}"\n'
                "insecure = true\n"
                "[[registry.mirror]]\n"
                f'location = "{location}"\n'
                "insecure = true\n"
            )
        self.registries.write_text(text)

    async def podman(self, *args: str, check: bool = True) -> Result:
        return await run(
            *self.prefix,
            self.binary,
            "--root", str(self.workdir / "root"),
            "--runroot", str(self.runroot),
            "--storage-driver", "vfs",
            "--tmpdir", str(self.workdir / "tmp"),
            "--events-backend", "file",
            "--cgroup-manager", "cgroupfs",
            *args,
            env=self.env,
            check=check,
        )  # fmt: skip

    async def pull(self, ref: str, *, platform: str = "linux/amd64", check: bool = True) -> Result:
        return await self.podman(
            "pull",
            "--signature-policy", str(self.policy),
            "--platform", platform,
            ref,
            check=check,
        )  # fmt: skip

    async def inspect(self, ref: str) -> dict[str, Any]:
        [info] = json.loads((await self.podman("image", "inspect", ref)).stdout)
        assert isinstance(info, dict)
        return info

    async def images(self) -> list[str]:
        out = (await self.podman("images", "--format", "{{.Repository}}:{{.Tag}}")).stdout
        return out.split()

    async def remove_image(self, ref: str) -> None:
        await self.podman("rmi", ref)


@pytest.fixture
def podman(tmp_path: Path) -> Iterator[Podman]:
    """Podman with private storage and configuration; point it at a mirror with use_mirror()."""
    client = Podman(tmp_path / "podman")
    try:
        yield client
    finally:
        client.close()
