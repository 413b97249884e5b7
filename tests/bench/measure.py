"""Measuring: real clients timed as processes, upstream bytes, RSS, and the manifest load.

- ``skopeo``/``skopeo_many``: wall time of ``skopeo copy docker://... dir:...`` processes.
- ``verifier_beside``: ``tests.bench.verifier`` running while a pull runs.
- ``curl_blobs``: wall time of curl fetching blob URLs, in parallel or one after another.
- ``UpstreamLog``: what the upstream served between two marks, from its access log.
- ``RssSampler``: VmRSS every 50 ms and VmHWM (reset per phase) of the watched PIDs.
- ``wrk``: requests per second of one URL with the headers a Docker client sends.
- ``Profiler``: optional ``py-spy record`` of the mirror during a phase (BENCH_PROFILE).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.upstream.client import Blob
from tests.upstream.registry import AccessLogEntry, RegistryProcess

MB = 1_000_000  # throughput is reported in MB/s of 10^6 bytes
# What a Docker client sends when it pulls by tag or digest.
DOCKER_ACCEPT = ", ".join(
    (
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.oci.image.index.v1+json",
    )
)


class CommandFailed(RuntimeError):
    pass


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def settle_disk() -> None:
    """Flush dirty pages before a timed run, so writeback of earlier work stays out of it."""
    os.sync()


# -- skopeo --------------------------------------------------------------------------


def _skopeo_argv(ref: str, dest: Path) -> list[str]:
    return ["skopeo", "copy", "--quiet", "--src-tls-verify=false", f"docker://{ref}", f"dir:{dest}"]


def check_pulled(dest: Path, blobs: Sequence[Blob]) -> None:
    """The dir: output holds the manifest and every blob at its size (skopeo checked digests)."""
    if not (dest / "manifest.json").is_file():
        raise CommandFailed(f"no manifest.json in {dest}")
    for blob in blobs:
        path = dest / blob.digest.split(":", 1)[1]
        size = path.stat().st_size if path.exists() else -1
        if size != blob.size:
            raise CommandFailed(f"{path}: {size} bytes, expected {blob.size}")


def skopeo(ref: str, dest: Path, blobs: Sequence[Blob]) -> float:
    """Seconds one ``skopeo copy`` of ``ref`` into a new dir takes; the output is removed."""
    return skopeo_many(ref, [dest], blobs)[0]


def skopeo_many(
    ref: str, dests: Sequence[Path], blobs: Sequence[Blob]
) -> tuple[float, list[float]]:
    """Start one skopeo per dest at once: (wall seconds until the last exits, each one's)."""
    for dest in dests:
        shutil.rmtree(dest, ignore_errors=True)
        dest.parent.mkdir(parents=True, exist_ok=True)
    settle_disk()
    done: list[float] = [0.0] * len(dests)
    errors: list[str] = []
    started = time.perf_counter()
    procs = [
        subprocess.Popen(
            _skopeo_argv(ref, dest),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for dest in dests
    ]

    def wait(i: int, proc: subprocess.Popen[bytes]) -> None:
        _, err = proc.communicate()
        done[i] = time.perf_counter() - started
        if proc.returncode != 0:
            errors.append(f"skopeo {ref} exited {proc.returncode}: {err.decode()[-1500:]}")

    waiters = [threading.Thread(target=wait, args=(i, p)) for i, p in enumerate(procs)]
    for t in waiters:
        t.start()
    for t in waiters:
        t.join()
    wall = time.perf_counter() - started
    try:
        if errors:
            raise CommandFailed("\n".join(errors))
        for dest in dests:
            check_pulled(dest, blobs)
    finally:
        for dest in dests:
            shutil.rmtree(dest, ignore_errors=True)
    return wall, done


@contextlib.contextmanager
def verifier_beside(
    files: Sequence[tuple[Path, str]], bytes_per_second: float, scratch: Path
) -> Iterator[dict[str, float]]:
    """Run ``tests.bench.verifier`` over ``files`` (path, digest) while the body runs. The
    yielded dict gets the verifier's own CPU seconds and wall time once it has finished."""
    scratch.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "tests.bench.verifier", str(bytes_per_second), str(scratch)]
    argv += [f"{path}={digest}" for path, digest in files]
    repo_root = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen(argv, cwd=repo_root, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    result: dict[str, float] = {}
    try:
        yield result
    except BaseException:
        proc.kill()
        proc.communicate()
        raise
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise CommandFailed(f"verifier exited {proc.returncode}: {err.decode()[-1500:]}")
    result.update(json.loads(out))


# -- curl ----------------------------------------------------------------------------


def curl_blobs(
    clients: Sequence[Sequence[str]], sizes: dict[str, int], headers: Sequence[str] = ()
) -> float:
    """Seconds for one curl process per entry of ``clients``, all started at once, each
    GETting its URLs in turn on one kept-alive connection to /dev/null. Every answer must
    be a 200 of the expected size (``sizes``: URL -> bytes)."""
    fmt = "%{http_code} %{size_download}\\n"
    argvs = []
    for urls in clients:
        argv = ["curl", "-sS", "-w", fmt]
        for header in headers:
            argv += ["-H", header]
        for url in urls:
            argv += ["-o", "/dev/null", url]
        argvs.append(argv)
    started = time.perf_counter()
    procs = [
        subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE) for argv in argvs
    ]
    outputs = [p.communicate()[0].decode() for p in procs]
    wall = time.perf_counter() - started
    for urls, out, proc in zip(clients, outputs, procs, strict=True):
        got = [tuple(int(x) for x in line.split()) for line in out.splitlines() if line.strip()]
        expected = [(200, sizes[url]) for url in urls]
        if proc.returncode != 0 or got != expected:
            raise CommandFailed(f"curl {urls}: got {got}, expected {expected}")
    return wall


# -- upstream accounting -------------------------------------------------------------


@dataclass
class Traffic:
    """What the upstream served in one window of its access log."""

    entries: list[AccessLogEntry]

    @property
    def blob_gets(self) -> list[AccessLogEntry]:
        return [
            e
            for e in self.entries
            if e.method == "GET" and "/blobs/" in e.path and e.status in (200, 206)
        ]

    @property
    def blob_bytes(self) -> int:
        """Body bytes of successful blob GETs: the access log's size field."""
        return sum(e.size for e in self.blob_gets)

    def summary(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for e in self.entries:
            kind = (
                "blob"
                if "/blobs/" in e.path
                else "manifest"
                if "/manifests/" in e.path
                else "other"
            )
            key = f"{e.method} {kind} {e.status}"
            counts[key] = counts.get(key, 0) + 1
        return dict(sorted(counts.items()))


class UpstreamLog:
    """Windows of the upstream's access log: ``mark()`` before, ``since(mark)`` after."""

    def __init__(self, registry: RegistryProcess) -> None:
        self.registry = registry

    def mark(self) -> int:
        return len(self.registry.requests())

    def settle(self, quiet: float = 1.0, limit: float = 30.0) -> None:
        """Wait until the upstream has served nothing new for ``quiet`` seconds (a cache
        may go on fetching after its client is done)."""
        deadline = time.monotonic() + limit
        last, since = self.mark(), time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(0.2)
            now = self.mark()
            if now != last:
                last, since = now, time.monotonic()
            elif time.monotonic() - since >= quiet:
                return

    def since(self, mark: int) -> Traffic:
        return Traffic(self.registry.requests()[mark:])


# -- CPU ------------------------------------------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float | None:
    """User plus system CPU seconds of all of a process's threads so far."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime


def child_pids(pid: int) -> list[int]:
    """The live children of ``pid``: from /proc/PID/task/*/children, or, on kernels
    without that file, from every process's parent PID."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return []
    children: list[int] = []
    try:
        for tid in tasks:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                children += [int(c) for c in f.read().split()]
        return children
    except FileNotFoundError:
        pass
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError), open(f"/proc/{entry}/stat") as f:
            if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:  # ppid
                children.append(int(entry))
    return children


def tree_cpu_seconds(pid: int) -> float | None:
    """CPU seconds of a process and its live children: an nginx master does nothing,
    its workers (and cache manager) do the work, and they are not reaped until the end."""
    own = cpu_seconds(pid)
    if own is None:
        return None
    return own + sum(cpu_seconds(child) or 0.0 for child in child_pids(pid))


class CpuMeter:
    """CPU seconds spent by the servers (by PID) and by the clients we ran and reaped
    (skopeo, curl, wrk: RUSAGE_CHILDREN) between ``snapshot()`` and ``since()``.
    ``trees`` are masters whose children's CPU counts as theirs (nginx)."""

    def __init__(self, pids: dict[str, int], trees: dict[str, int] | None = None) -> None:
        self.pids = pids
        self.trees = trees or {}

    def snapshot(self) -> dict[str, float]:
        snap = {name: cpu_seconds(pid) or 0.0 for name, pid in self.pids.items()}
        snap |= {name: tree_cpu_seconds(pid) or 0.0 for name, pid in self.trees.items()}
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        snap["clients"] = usage.ru_utime + usage.ru_stime
        return snap

    def since(self, before: dict[str, float]) -> dict[str, float]:
        now = self.snapshot()
        return {name: round(now[name] - before[name], 3) for name in now}


# -- memory --------------------------------------------------------------------------


def proc_status_kb(pid: int, key: str) -> int | None:
    """A /proc/PID/status field in kB (VmRSS, VmHWM); None once the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def reset_peak(pid: int) -> bool:
    """Reset VmHWM to the current RSS (``clear_refs`` 5, Linux >= 4.0); False if refused."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@dataclass
class PhaseMemory:
    sampled_max_kb: int = 0  # highest VmRSS seen by sampling every 50 ms
    hwm_kb: int | None = None  # VmHWM at the end of the phase, reset at its start
    hwm_reset: bool = False

    @property
    def peak_kb(self) -> int:
        return max(self.sampled_max_kb, self.hwm_kb or 0) if self.hwm_reset else self.sampled_max_kb

    def as_dict(self) -> dict[str, object]:
        return {
            "peak_kb": self.peak_kb,
            "sampled_max_kb": self.sampled_max_kb,
            "hwm_kb": self.hwm_kb,
            "hwm_reset": self.hwm_reset,
        }


class RssSampler:
    """Samples VmRSS of named PIDs every ``interval`` seconds, per phase."""

    def __init__(self, pids: dict[str, int], interval: float = 0.05) -> None:
        self.pids = pids
        self.interval = interval
        self.phases: dict[str, dict[str, PhaseMemory]] = {name: {} for name in pids}
        self._current: str | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def start(self) -> RssSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with self._lock:
                phase = self._current
                if phase is None:
                    continue
                for name, pid in self.pids.items():
                    rss = proc_status_kb(pid, "VmRSS")
                    memory = self.phases[name][phase]
                    if rss is not None and rss > memory.sampled_max_kb:
                        memory.sampled_max_kb = rss

    @contextlib.contextmanager
    def phase(self, phase: str) -> Iterator[None]:
        with self._lock:
            for name, pid in self.pids.items():
                memory = self.phases[name].setdefault(phase, PhaseMemory())
                memory.hwm_reset = reset_peak(pid)
                memory.sampled_max_kb = max(
                    memory.sampled_max_kb, proc_status_kb(pid, "VmRSS") or 0
                )
            self._current = phase
        try:
            yield
        finally:
            with self._lock:
                self._current = None
                for name, pid in self.pids.items():
                    memory = self.phases[name][phase]
                    memory.hwm_kb = proc_status_kb(pid, "VmHWM")
                    rss = proc_status_kb(pid, "VmRSS") or 0
                    memory.sampled_max_kb = max(memory.sampled_max_kb, rss)

    def report(self) -> dict[str, dict[str, dict[str, object]]]:
        return {
            name: {phase: m.as_dict() for phase, m in phases.items()}
            for name, phases in self.phases.items()
        }

    def peak_kb(self, name: str) -> int:
        return max((m.peak_kb for m in self.phases[name].values()), default=0)


# -- manifest load -------------------------------------------------------------------

_WRK_RPS = re.compile(r"Requests/sec:\s+([\d.]+)")
_WRK_TOTAL = re.compile(r"(\d+) requests in ([\d.]+)(\w+)")
_WRK_NON2XX = re.compile(r"Non-2xx or 3xx responses:\s+(\d+)")
_WRK_ERRORS = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
_WRK_PCT = re.compile(r"^\s+(50|90|99)%\s+([\d.]+)(us|ms|s)\s*$", re.MULTILINE)
_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


@dataclass
class Load:
    rps: float
    requests: int
    non_2xx: int
    socket_errors: int
    latency_ms: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        return {
            "rps": round(self.rps, 1),
            "requests": self.requests,
            "non_2xx": self.non_2xx,
            "socket_errors": self.socket_errors,
            "latency_ms": self.latency_ms,
        }


def write_wrk_script(path: Path, accept: str = DOCKER_ACCEPT) -> Path:
    path.write_text(f'wrk.method = "GET"\nwrk.headers["Accept"] = "{accept}"\n')
    return path


def wrk(url: str, script: Path, connections: int, seconds: float, threads: int = 2) -> Load:
    """``wrk`` against one URL; raises if any answer was not 2xx."""
    argv = [
        "wrk",
        f"-t{min(threads, connections)}",
        f"-c{connections}",
        f"-d{seconds:g}s",
        "--latency",
        "-s",
        str(script),
        url,
    ]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
    if out.returncode != 0 or not (m := _WRK_RPS.search(out.stdout)):
        raise CommandFailed(f"{' '.join(argv)} failed:\n{out.stdout}\n{out.stderr}")
    total = _WRK_TOTAL.search(out.stdout)
    non2xx = _WRK_NON2XX.search(out.stdout)
    errors = _WRK_ERRORS.search(out.stdout)
    load = Load(
        rps=float(m.group(1)),
        requests=int(total.group(1)) if total else 0,
        non_2xx=int(non2xx.group(1)) if non2xx else 0,
        socket_errors=sum(int(g) for g in errors.groups()) if errors else 0,
        latency_ms={
            f"p{p}": round(float(v) * _UNITS[u], 3) for p, v, u in _WRK_PCT.findall(out.stdout)
        },
    )
    if load.non_2xx:
        raise CommandFailed(f"{url}: {load.non_2xx} of {load.requests} answers were not 2xx")
    return load


# -- profiling -----------------------------------------------------------------------


class Profiler:
    """``py-spy record`` of one PID while a phase runs, if BENCH_PROFILE=1 and py-spy is
    installed (``.venv/bin/pip install py-spy``); otherwise does nothing.

    Writes the collapsed stacks (``profile-<phase>.txt``, one line per stack with its
    sample count, loadable by speedscope or flamegraph.pl) and a summary of where the
    samples fall (``profile-<phase>-top.txt``). Idle samples (the loop waiting in epoll)
    are left out, so the shares are of the time the mirror was busy.
    """

    def __init__(self, pid: int, out_dir: Path, rate: int = 250) -> None:
        self.pid = pid
        self.out_dir = out_dir
        self.rate = rate
        venv_spy = Path(__file__).resolve().parents[2] / ".venv" / "bin" / "py-spy"
        self.binary = str(venv_spy) if venv_spy.exists() else shutil.which("py-spy")
        self.enabled = os.environ.get("BENCH_PROFILE", "") == "1" and self.binary is not None
        self.files: list[str] = []

    @contextlib.contextmanager
    def record(self, phase: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        assert self.binary is not None
        self.out_dir.mkdir(parents=True, exist_ok=True)
        raw = self.out_dir / f"profile-{phase}.txt"
        argv = [self.binary, "record", "--pid", str(self.pid), "--rate", str(self.rate)]
        argv += ["--nonblocking", "--threads", "--idle", "--format", "raw", "-o", str(raw)]
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)  # let py-spy attach
        started = time.perf_counter()
        try:
            yield
        finally:
            seconds = time.perf_counter() - started
            proc.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=30)
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if raw.exists():
                top = raw.with_name(f"profile-{phase}-top.txt")
                top.write_text(summarize_profile(raw, seconds * self.rate))
                self.files += [str(raw), str(top)]


# Leaf frames of a thread that waits for work: the loop in epoll, executor threads and
# aiosqlite's thread on their queues.
_IDLE_LEAVES = (
    "EpollSelector.select",
    "_worker (concurrent/futures/thread.py:81)",  # work_queue.get()
    "_connection_worker_thread (aiosqlite/core.py:59)",  # tx.get()
    "wait (",
)
_LINE = re.compile(r":\d+\)$")


def _function(frame: str) -> str:
    return _LINE.sub(")", frame)


def _area(frame: str) -> str:
    """The package a frame belongs to: proxy, cache, aiohttp, asyncio, ..."""
    match = re.search(r"\(([^)]*)\)$", _function(frame))
    path = match.group(1) if match else ""
    if "site-packages/" in path:
        return path.split("site-packages/", 1)[1].split("/", 1)[0]
    return path.split("/", 1)[0] if "/" in path else path.removesuffix(".py") or "?"


def summarize_profile(raw: Path, expected_samples: float, n: int = 25) -> str:
    """Busy share per thread, by package, and the functions with the most samples."""
    stacks: list[tuple[list[str], int]] = []
    idle = 0
    for line in raw.read_text().splitlines():
        stack, _, samples = line.rpartition(" ")
        if not stack or not samples.isdigit():
            continue
        frames = stack.split(";")
        if any(frames[-1].startswith(leaf) for leaf in _IDLE_LEAVES):
            idle += int(samples)
            continue
        stacks.append((frames, int(samples)))
    total = sum(c for _, c in stacks) or 1
    threads: dict[str, int] = {}
    own: dict[str, int] = {}
    areas: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    for frames, count in stacks:
        threads[frames[0]] = threads.get(frames[0], 0) + count
        leaf = _function(frames[-1])
        own[leaf] = own.get(leaf, 0) + count
        areas[_area(frames[-1])] = areas.get(_area(frames[-1]), 0) + count
        for frame in {_function(f) for f in frames[1:]}:
            inclusive[frame] = inclusive.get(frame, 0) + count

    def top(counts: dict[str, int], k: int, base: float) -> list[str]:
        ranked = sorted(counts.items(), key=lambda kv: -kv[1])[:k]
        return [f"  {c:7d}  {c / base:6.1%}  {name}" for name, c in ranked]

    return (
        "\n".join(
            [
                f"{total} busy samples ({idle} more waiting for work) of"
                f" ~{expected_samples:.0f} wall-clock samples per thread;"
                " busy = on the CPU, or blocked in I/O or on the GIL",
                "",
                "busy samples by thread (share of the phase's wall-clock time):",
                *top(threads, 10, expected_samples),
                "",
                "busy samples by the package of the running function:",
                *top(areas, 12, total),
                "",
                f"top {n} functions by own samples:",
                *top(own, n, total),
                "",
                f"top {n} functions by inclusive samples:",
                *top(inclusive, n, total),
            ]
        )
        + "\n"
    )
