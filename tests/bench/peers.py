"""The processes under test, each started by us on 127.0.0.1 and stopped by its own PID.

- ``Mirror``: ``pullthrough serve`` with its normal settings (manifest_ttl 5 min).
- ``Peer``: distribution's own proxy mode, the same ``docker-registry`` binary as the
  upstream, with ``proxy.remoteurl`` at the upstream. It panics at start-up when the
  upstream is unreachable, so start it after the upstream.
- ``Nginx``: the physical limit, serving the mirror's committed blob files with sendfile
  under the registry's blob URL, ``/v2/<name>/blobs/sha256:<hex>``.
- ``Relay``: the physical limit of a caching hop, a second nginx with ``proxy_cache``
  in front of the upstream. It caches to disk and checks no digests, so it does the
  least a pull-through cache can do; nginx is C, so what it costs is the machine's.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import IO

from tests.upstream.registry import RegistryProcess, free_port
from tests.upstream.token_server import TokenServer

REPO_ROOT = Path(__file__).resolve().parents[2]
PULLTHROUGH = REPO_ROOT / ".venv" / "bin" / "pullthrough"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


def http_status(port: int, path: str, timeout: float = 2.0) -> int | None:
    """The status of ``GET path`` on 127.0.0.1:port, or None if nothing answers."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        resp.read()
        return resp.status
    except OSError:
        return None
    finally:
        conn.close()


def _stop(proc: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM) -> None:
    """Signal the one process we started (by its PID), kill it if it lingers."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)
    if proc.poll() is None:
        proc.kill()
        proc.wait()


class _Process:
    """A subprocess with its output in ``log_path``, ready when ``ready_path`` answers."""

    name = "process"
    ready_path = "/"
    ready_status = (200,)

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / f"{self.name}.log"
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def argv(self) -> list[str]:
        raise NotImplementedError

    def start(self, timeout: float = 30.0, env: dict[str, str] | None = None) -> None:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            self.argv(),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
            env={**os.environ, **(env or {})},
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited at start-up:\n{self.log_tail()}")
            if http_status(self.port, self.ready_path) in self.ready_status:
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self.name} did not answer within {timeout}s:\n{self.log_tail()}")

    def stop(self) -> None:
        _stop(self.proc)
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


class Mirror(_Process):
    """``pullthrough serve`` with the default settings but for listen, cache and upstream."""

    name = "mirror"
    ready_path = "/v2/"

    def __init__(self, workdir: Path, upstream_url: str) -> None:
        super().__init__(workdir)
        self.cache_dir = workdir / "cache"
        self.config_path = workdir / "mirror.yaml"
        self.config_path.write_text(
            f"listen: 127.0.0.1:{self.port}\n"
            f"cache: {{path: {self.cache_dir}, max_size: 50GiB}}\n"
            f"upstreams: [{{name: docker.io, url: '{upstream_url}', default: true}}]\n"
        )

    def argv(self) -> list[str]:
        return [str(PULLTHROUGH), "serve", "--config", str(self.config_path)]


class Peer(RegistryProcess):
    """distribution 2.8's proxy mode (pull-through cache) in front of ``upstream``.

    Reuses :class:`RegistryProcess` for start/stop, the port and the access log; only
    the configuration differs. Like Debian's stock config it keeps the in-memory blob
    descriptor cache. ``credentials`` None pulls anonymously through the token server.
    """

    def __init__(
        self,
        workdir: Path,
        upstream: RegistryProcess,
        credentials: tuple[str, str] | None = None,
    ) -> None:
        super().__init__(workdir, token_server=None)
        self.upstream = upstream
        self.credentials = credentials

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def _config_yaml(self) -> str:
        creds = ""
        if self.credentials is not None:
            creds = f"  username: {self.credentials[0]}\n  password: {self.credentials[1]}\n"
        return (
            "version: 0.1\n"
            "log:\n"
            "  level: info\n"
            "  formatter: json\n"
            "storage:\n"
            "  cache:\n"
            "    blobdescriptor: inmemory\n"
            "  filesystem:\n"
            f"    rootdirectory: {self.storage_dir}\n"
            "  maintenance:\n"
            "    uploadpurging:\n"
            "      enabled: false\n"
            "http:\n"
            f"  addr: 127.0.0.1:{self.port}\n"
            "  secret: pullthrough-bench-secret\n"
            "proxy:\n"
            f"  remoteurl: {self.upstream.url}\n"
            f"{creds}"
        )


def _nginx_conf(workdir: Path, workers: int, http: str) -> str:
    """A foreground nginx with every file it writes under ``workdir`` and ``http`` as the
    rest of its http block (the server)."""
    return f"""daemon off;
master_process on;
worker_processes {workers};
user root;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    keepalive_requests 100000;
    client_body_temp_path {workdir}/temp/body;
    proxy_temp_path {workdir}/temp/proxy;
    fastcgi_temp_path {workdir}/temp/fastcgi;
    uwsgi_temp_path {workdir}/temp/uwsgi;
    scgi_temp_path {workdir}/temp/scgi;
{http}}}
"""


class _NginxProcess(_Process):
    """An nginx master and its workers; ready when ``/nginx-ready`` answers 200 (the
    relay's ``/v2/`` is the upstream's 401, so that cannot be the readiness check)."""

    ready_path = "/nginx-ready"

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.config_path = workdir / "nginx.conf"
        for temp in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (workdir / "temp" / temp).mkdir(parents=True, exist_ok=True)

    def argv(self) -> list[str]:
        return [
            NGINX,
            "-p",
            str(self.workdir),
            "-e",
            str(self.workdir / "error.log"),
            "-c",
            str(self.config_path),
        ]

    def stop(self) -> None:
        _stop(self.proc, signal.SIGQUIT)  # graceful: the master stops its workers
        if self._log is not None:
            self._log.close()
            self._log = None


class Nginx(_NginxProcess):
    """nginx with sendfile, serving ``blob_root``/sha256/<xx>/<hex> as registry blob URLs."""

    name = "nginx"

    def __init__(self, workdir: Path, blob_root: Path, workers: int = 1) -> None:
        super().__init__(workdir)
        self.config_path.write_text(
            _nginx_conf(
                workdir,
                workers,
                f"""    sendfile on;
    # No tcp_nopush: on loopback, corking costs nginx ~40% (1.7 vs 3.0 GB/s here).
    default_type application/octet-stream;
    types {{ }}
    server {{
        listen 127.0.0.1:{self.port};
        location = /nginx-ready {{ return 200 "ok"; }}
        location ~ "^/v2/.+/blobs/sha256:(?<h2>[0-9a-f]{{2}})(?<rest>[0-9a-f]{{62}})$" {{
            alias {blob_root}/sha256/$h2/$h2$rest;
        }}
    }}
""",
            )
        )


class Relay(_NginxProcess):
    """nginx ``proxy_cache`` in front of ``upstream_host``: caches to disk, checks no digests.

    The token auth goes through untouched: nginx passes the upstream's 401 and its
    WWW-Authenticate on, the client gets its token from the token server itself and
    sends it here, and nginx forwards the Authorization header. Only 200s are cached,
    keyed by path alone (an image's bytes do not depend on who asks or what it accepts).
    One fetch per key at a time (``proxy_cache_lock``), so the upstream serves each blob
    once.
    """

    name = "relay"

    def __init__(self, workdir: Path, upstream_host: str, workers: int = 1) -> None:
        super().__init__(workdir)
        self.cache_dir = workdir / "cache"
        self.config_path.write_text(
            _nginx_conf(
                workdir,
                workers,
                f"""    proxy_cache_path {self.cache_dir} levels=1:2 keys_zone=relay:10m
                     max_size=50g inactive=1d use_temp_path=off;
    server {{
        listen 127.0.0.1:{self.port};
        location = /nginx-ready {{ return 200 "ok"; }}
        location / {{
            proxy_pass http://{upstream_host};
            proxy_http_version 1.1;
            proxy_set_header Host $http_host;
            proxy_cache relay;
            proxy_cache_valid 200 1d;
            proxy_cache_key $uri;
            proxy_ignore_headers Cache-Control Set-Cookie Expires;
            proxy_cache_lock on;
        }}
    }}
""",
            )
        )


def registry_pid(registry: RegistryProcess) -> int:
    """The PID of a running RegistryProcess (for CPU and memory readings)."""
    proc = registry._proc
    assert proc is not None
    return proc.pid


def start_upstream(workdir: Path) -> tuple[TokenServer, RegistryProcess]:
    """The tests' upstream: distribution 2.8 with token auth behind our token server."""
    token_server = TokenServer(workdir=workdir / "token").start()
    registry = RegistryProcess(workdir / "upstream", token_server)
    registry.start()
    return token_server, registry
