"""Run Debian's distribution 2.8 registry (``docker-registry``) as a test upstream.

The registry writes two kinds of lines into the one log file we give it:

- JSON application logs (``formatter: json``) on stderr, e.g.
  ``{"http.request.method":"GET",...,"msg":"response completed",...}``.
  These are *not* written for every request (e.g. a 401 challenge gets none),
  so we do not count from them.
- The access log (gorilla's CombinedLoggingHandler, wrapped around the whole
  app) on stdout, one line per served HTTP request, in Apache combined format::

      127.0.0.1 - - [23/Nov/2026:15:00:52 +0000] "GET /v2/ HTTP/1.1" 200 2 "" "curl/7.88.1"

  That is what :meth:`RegistryProcess.requests` parses.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO

from tests.upstream.token_server import TokenServer

REGISTRY_BINARY = shutil.which("docker-registry") or "/usr/bin/docker-registry"

# host ident user [time] "METHOD URI PROTO" status bytes "referer" "user-agent"
_ACCESS_LINE = re.compile(
    r"^(?P<host>\S+) \S+ (?P<user>\S+) \[(?P<time>[^\]]+)\] "
    r'"(?P<method>[A-Z]+) (?P<uri>\S+) (?P<proto>[^"]+)" '
    r"(?P<status>\d{3}) (?P<size>\d+|-)"
    r'(?: "(?P<referer>(?:[^"\\]|\\.)*)" "(?P<agent>(?:[^"\\]|\\.)*)")?\s*$'
)
# Query marker of the requests sync_log() sends; they are hidden from requests().
_SYNC_MARKER = "__pullthrough_log_sync"


@dataclass(frozen=True)
class AccessLogEntry:
    """One request the registry served, as parsed from its access log."""

    method: str
    uri: str  # path plus query string, as sent by the client
    status: int
    size: int  # response body bytes written
    user_agent: str

    @property
    def path(self) -> str:
        return self.uri.split("?", 1)[0]


def free_port() -> int:
    """A port that was free a moment ago (bind to 0, read it, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _all_threads_stopped(pid: int) -> bool:
    """True when every thread of ``pid`` is in state T (stopped), per /proc."""
    try:
        states = [
            (task / "stat").read_text().rsplit(")", 1)[1].split()[0]
            for task in Path(f"/proc/{pid}/task").iterdir()
        ]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return all(s in ("T", "t") for s in states)


def parse_access_log(text: str) -> list[AccessLogEntry]:
    """Parse combined-format access lines, ignoring JSON and any other lines."""
    entries = []
    for line in text.splitlines():
        m = _ACCESS_LINE.match(line)
        if m is None:
            continue
        size = m["size"]
        entries.append(
            AccessLogEntry(
                method=m["method"],
                uri=m["uri"],
                status=int(m["status"]),
                size=0 if size == "-" else int(size),
                user_agent=m["agent"] or "",
            )
        )
    return entries


class RegistryProcess:
    """A ``docker-registry serve`` subprocess on 127.0.0.1 with its own storage.

    With a :class:`TokenServer` it uses ``auth: token`` (the Docker Hub flow);
    without, no auth at all.  ``stop()``/``start()`` keep port, storage and log
    file, so tests can simulate an upstream outage.
    """

    def __init__(
        self, workdir: Path | None = None, token_server: TokenServer | None = None
    ) -> None:
        self.token_server = token_server
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="pullthrough-registry-")
            workdir = Path(self._tmp.name)
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.storage_dir = workdir / "storage"
        self.config_path = workdir / "config.yml"
        self.log_path = workdir / "registry.log"
        self.port = 0
        # Where it listens, and what its command runs under (the bench's WAN profile
        # puts it in a network namespace of its own: `ip netns exec NAME`).
        self.address = "127.0.0.1"
        self.command_prefix: list[str] = []
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    @property
    def host(self) -> str:
        return f"{self.address}:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def blob_path(self, digest: str) -> Path:
        """Where distribution's filesystem storage keeps a blob's bytes."""
        hex_digest = digest.removeprefix("sha256:")
        return (
            self.storage_dir
            / "docker/registry/v2/blobs/sha256"
            / hex_digest[:2]
            / hex_digest
            / "data"
        )

    # -- lifecycle ---------------------------------------------------------

    def start(self, timeout: float = 15.0) -> RegistryProcess:
        """Start (or restart, on the same port) and wait until ``/v2/`` answers."""
        if self.running:
            return self
        if self.port:
            self._spawn_and_wait(timeout)
            return self
        # First start: a port picked by free_port() can be taken in between by
        # someone else, so retry with a fresh one a few times.
        for attempt in range(3):
            self.port = free_port()
            try:
                self._spawn_and_wait(timeout)
                return self
            except RuntimeError:
                if attempt == 2 or "address already in use" not in self._log_tail():
                    raise
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM the process we started (SIGKILL if it lingers); ``timeout=0`` kills at once.

        distribution drains for ``http.draintimeout`` (0 here), so open
        connections, e.g. a blob download in flight, are cut immediately.
        """
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGCONT)  # a paused process could not act on SIGTERM
            if timeout > 0:
                proc.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=timeout)
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def pause(self) -> None:
        """SIGSTOP: the port still accepts connections but nothing is answered (hung upstream)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGSTOP)
            # Delivery is asynchronous: wait until every thread is really stopped,
            # or a request sent right after pause() may still be answered.
            deadline = time.monotonic() + 5
            while not _all_threads_stopped(self._proc.pid) and time.monotonic() < deadline:
                time.sleep(0.005)

    def resume(self) -> None:
        """SIGCONT after :meth:`pause`."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGCONT)

    def close(self) -> None:
        """stop() and delete the working directory if we created it."""
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> RegistryProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _spawn_and_wait(self, timeout: float) -> None:
        self.config_path.write_text(self._config_yaml())
        # Append, so counts survive a restart; stdout (access log) and stderr
        # (JSON app log) share one file description, hence whole-line writes.
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self._proc = subprocess.Popen(
            [*self.command_prefix, REGISTRY_BINARY, "serve", str(self.config_path)],
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
            env={k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")},
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"docker-registry exited early:\n{self._log_tail()}")
            if self._ping(f"?{_SYNC_MARKER}=ready"):
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"docker-registry did not answer within {timeout}s:\n{self._log_tail()}")

    def _ping(self, query: str = "") -> bool:
        conn = http.client.HTTPConnection(self.address, self.port, timeout=2)
        try:
            conn.request("GET", "/v2/" + query)
            resp = conn.getresponse()
            resp.read()
            return resp.status in (200, 401)
        except OSError:
            return False
        finally:
            conn.close()

    def _log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""

    def _config_yaml(self) -> str:
        auth = ""
        if self.token_server is not None:
            ts = self.token_server
            auth = (
                "auth:\n"
                "  token:\n"
                f"    realm: {ts.realm}\n"
                f"    service: {ts.service}\n"
                f"    issuer: {ts.issuer}\n"
                f"    rootcertbundle: {ts.cert_path}\n"
            )
        # A fixed http.secret keeps upload state valid across restarts (and
        # silences the warning); upload purging is off so nothing runs in the
        # background; no blobdescriptor cache, so deletes are seen at once.
        return (
            "version: 0.1\n"
            "log:\n"
            "  level: info\n"
            "  formatter: json\n"
            "  accesslog:\n"
            "    disabled: false\n"
            "storage:\n"
            "  filesystem:\n"
            f"    rootdirectory: {self.storage_dir}\n"
            "  delete:\n"
            "    enabled: true\n"
            "  maintenance:\n"
            "    uploadpurging:\n"
            "      enabled: false\n"
            "http:\n"
            f"  addr: {self.host}\n"
            "  secret: pullthrough-test-secret\n"
            f"{auth}"
        )

    # -- access log ----------------------------------------------------------

    def sync_log(self, timeout: float = 5.0) -> None:
        """Wait until requests already answered are in the log file.

        The access line is written just *after* the response, so a client can
        see its response before the line exists.  We send a marked request and
        wait for its line; by then earlier requests are logged too.
        """
        if not self.running:
            return
        marker = uuid.uuid4().hex
        if not self._ping(f"?{_SYNC_MARKER}={marker}"):
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if marker in self.log_path.read_text(errors="replace"):
                return
            time.sleep(0.01)

    def requests(
        self, method: str | None = None, path_contains: str | None = None, *, sync: bool = True
    ) -> list[AccessLogEntry]:
        """Requests the registry served (across restarts), oldest first."""
        if sync:
            self.sync_log()
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return []
        return [
            e
            for e in parse_access_log(text)
            if _SYNC_MARKER not in e.uri
            and (method is None or e.method == method.upper())
            and (path_contains is None or path_contains in e.uri)
        ]

    def count(self, method: str, path: str, status: int | None = None) -> int:
        """How many ``method`` requests for exactly ``path`` (query ignored) were served.

        ``status``: only those answered with it; ``2`` (or any 1-digit class) means any 2xx.
        """
        return sum(
            1
            for e in self.requests(method, path)
            if e.path == path
            and (
                status is None or e.status == status or (status < 10 and e.status // 100 == status)
            )
        )

    def blob_gets(self, repo: str, digest: str) -> int:
        """Successful (200, or 206 for a Range) ``GET /v2/<repo>/blobs/<digest>`` count.

        This is what a pull-through cache should keep at 1 however many clients pull.
        """
        return self.count("GET", f"/v2/{repo}/blobs/{digest}", status=2)

    def wait_for_count(self, method: str, path: str, expected: int, timeout: float = 5.0) -> int:
        """Poll until ``count(method, path) >= expected`` or timeout; returns the last count."""
        deadline = time.monotonic() + timeout
        while True:
            n = self.count(method, path)
            if n >= expected or time.monotonic() >= deadline:
                return n
            time.sleep(0.05)
