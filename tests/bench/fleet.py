"""The fleet phase: N clients pull one cold image through 3 replicas behind haproxy, and
the same image through the bench's one mirror (cold there too), order rotated per rep.

The replicas are `pullthrough serve` processes with their own caches, haproxy runs
deploy/fleet/haproxy.cfg with their addresses (master-worker mode, as in the fleet test).
Two figures, both ratios within the run:

- upstream bytes over the image's bytes, for the fleet and for one replica. Both must be
  1.0x: a digest routes every request for a blob to one replica, which fetches it once.
- the fleet's wall time over one replica's. On the build machine's 2 shared cores it says
  little: 3 replicas and haproxy share the cores one replica had to itself, beside N
  skopeos hashing and writing, so what a fleet adds (NICs, disks, cores) cannot show.
"""

from __future__ import annotations

import contextlib
import csv
import http.client
import io
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tests.bench.measure import CpuMeter, median, skopeo_many
from tests.bench.peers import Mirror
from tests.bench.report import Target
from tests.e2e.fleet import haproxy_config
from tests.upstream.registry import free_port

if TYPE_CHECKING:
    from tests.bench.run import Bench

REPLICAS = 3
SIDES = ("fleet", "single")


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class Haproxy:
    """`haproxy -W -db -f <config>` in front of `servers`; stopped by the master's PID."""

    def __init__(self, workdir: Path, servers: list[str]) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.port, self.stats_port = free_port(), free_port()
        self.config = workdir / "haproxy.cfg"
        self.config.write_text(haproxy_config(servers, self.port, self.stats_port))
        self.log_path = workdir / "haproxy.log"
        self.servers = len(servers)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 15.0) -> None:
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(
                ["haproxy", "-W", "-db", "-f", str(self.config)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while self.servers_up() < self.servers:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"haproxy: not every replica is up:\n{self.log_tail()}")
            time.sleep(0.1)

    def servers_up(self) -> int:
        conn = http.client.HTTPConnection("127.0.0.1", self.stats_port, timeout=2)
        try:
            conn.request("GET", "/stats;csv")
            text = conn.getresponse().read().decode()
        except OSError:
            return 0
        finally:
            conn.close()
        rows = csv.DictReader(io.StringIO(text.removeprefix("# ")))
        return sum(
            1
            for row in rows
            if row["pxname"] == "replicas" and row["svname"] != "BACKEND" and row["status"] == "UP"
        )

    def stop(self) -> None:
        """SIGTERM to the master, which stops its workers; SIGKILL if it lingers."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def log_tail(self) -> str:
        with contextlib.suppress(FileNotFoundError):
            return self.log_path.read_text(errors="replace")[-3000:]
        return ""


@contextlib.contextmanager
def running_fleet(
    work: Path, upstream_url: str, env: dict[str, str]
) -> Iterator[tuple[Haproxy, list[Mirror]]]:
    """3 replicas (each its own cache) and haproxy, stopped in reverse order afterwards."""
    with contextlib.ExitStack() as stack:
        replicas = []
        for i in range(REPLICAS):
            replica = Mirror(work / f"replica-{i}", upstream_url)
            replica.start(env=env)
            stack.callback(replica.stop)
            replicas.append(replica)
        balancer = Haproxy(work / "haproxy", [r.host for r in replicas])
        balancer.start()
        stack.callback(balancer.stop)
        yield balancer, replicas


def run(bench: Bench) -> None:
    """Per repetition a fresh image: N skopeo clients through the fleet and through the
    bench's mirror (one replica), each cold, with the upstream bytes of each window."""
    n = bench.s.clients
    runs: dict[str, list[dict[str, Any]]] = {side: [] for side in SIDES}
    bench.raw["fleet"] = runs
    fleet = running_fleet(bench.work / "fleet", bench.upstream.url, bench.s.mirror_env)
    with fleet as (haproxy, replicas):
        assert haproxy.proc is not None
        hosts = {"fleet": haproxy.host, "single": bench.mirror.host}
        cpu = CpuMeter(
            {"single": bench.mirror.pid} | {f"replica-{i}": r.pid for i, r in enumerate(replicas)},
            trees={"haproxy": haproxy.proc.pid},
        )
        for rep in range(bench.s.reps):
            img = bench.image(f"bench-fleet-{rep + 1}")
            order = list(SIDES[rep % 2 :] + SIDES[: rep % 2])
            for side in order:
                bench.log.settle()
                mark, before, load = bench.log.mark(), cpu.snapshot(), os.getloadavg()[0]
                dests = [bench.out(f"fleet-{side}-{i}") for i in range(n)]
                wall, each = skopeo_many(img.ref(hosts[side]), dests, img.blobs)
                bench.log.settle()
                traffic = bench.log.since(mark)
                used = cpu.since(before)
                servers = used["single"] if side == "single" else _fleet_cpu(used)
                runs[side].append(
                    {
                        "rep": rep + 1,
                        "clients": n,
                        "loadavg_1m": load,
                        "image": img.repo,
                        "image_bytes": img.size,
                        "upstream_blob_bytes": traffic.blob_bytes,
                        "upstream_ratio": traffic.blob_bytes / img.size,
                        "upstream_requests": traffic.summary(),
                        "wall_seconds": round(wall, 4),
                        "client_seconds": [round(x, 4) for x in each],
                        "server_cpu_seconds": round(servers, 3),
                        "cpu_seconds": used,
                    }
                )
                log(
                    f"{n} clients through {side:6} rep {rep + 1}: {wall:.2f} s,"
                    f" upstream {runs[side][-1]['upstream_ratio']:.3f}x"
                )


def _fleet_cpu(used: dict[str, float]) -> float:
    return sum(v for k, v in used.items() if k.startswith("replica-") or k == "haproxy")


# -- the report ----------------------------------------------------------------------


def summarize(raw: dict[str, Any]) -> dict[str, Any]:
    """Medians per side and the same-run ratios; empty when the phase did not run."""
    runs = raw.get("fleet")
    if not runs:
        return {}
    s: dict[str, Any] = {}
    for side in SIDES:
        for key in ("wall_seconds", "server_cpu_seconds", "upstream_ratio"):
            values = [r[key] for r in runs[side]]
            s[f"fleet_{side}_{key}"] = median(values) if values else None
        # Exactly 1.0 in every repetition, or the worst one is what is reported.
        ratios = [float(r["upstream_ratio"]) for r in runs[side]]
        s[f"fleet_{side}_upstream_ratio_worst"] = (
            max(ratios, key=lambda r: abs(r - 1.0)) if ratios else None
        )
    haproxy = [r["cpu_seconds"]["haproxy"] for r in runs["fleet"]]
    s["fleet_haproxy_cpu_seconds"] = median(haproxy) if haproxy else None
    fleet, single = s["fleet_fleet_wall_seconds"], s["fleet_single_wall_seconds"]
    s["fleet_wall_vs_single"] = fleet / single if fleet and single else None
    return s


def targets(raw: dict[str, Any], s: dict[str, Any]) -> list[Target]:
    if "fleet" not in raw:
        return []
    clients = raw["settings"]["clients"]
    return [
        Target(
            f"fleet upstream bytes == 1.0x image, {clients} clients",
            s.get("fleet_fleet_upstream_ratio_worst"),
            "==",
            1.0,
        )
    ]


def table(raw: dict[str, Any], s: dict[str, Any], checks: list[Target]) -> str:
    """The phase's own rows, below the main table; empty when it did not run."""
    if "fleet" not in raw:
        return ""
    (target,) = targets(raw, s)
    verdict = next(t for t in checks if t.name == target.name)
    n, cores = raw["settings"]["clients"], raw.get("environment", {}).get("cores")

    def x(value: float | None, unit: str = "x", fmt: str = ".3f") -> str:
        return "n/a" if value is None else f"{value:{fmt}}{unit}"

    rows = [
        ("fleet phase", f"{REPLICAS} replicas + haproxy", "1 replica", "ratio", "target"),
        (
            f"upstream bytes / image bytes, {n} clients",
            x(s.get("fleet_fleet_upstream_ratio_worst")),
            x(s.get("fleet_single_upstream_ratio_worst")),
            "",
            f"== 1: {'PASS' if verdict.passed else 'FAIL'}",
        ),
        (
            f"wall time, {n} cold pulls at once",
            x(s.get("fleet_fleet_wall_seconds"), " s", ".2f"),
            x(s.get("fleet_single_wall_seconds"), " s", ".2f"),
            x(s.get("fleet_wall_vs_single"), "x", ".2f"),
            "info",
        ),
        (
            "server CPU (replicas + haproxy)",
            x(s.get("fleet_fleet_server_cpu_seconds"), " s", ".2f")
            + f" (haproxy {x(s.get('fleet_haproxy_cpu_seconds'), ' s', '.2f')})",
            x(s.get("fleet_single_server_cpu_seconds"), " s", ".2f"),
            "",
            "info",
        ),
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append(
        f"fleet: the wall ratio says little on {cores} shared cores: the replicas and haproxy"
        " share the cores one replica had to itself; a fleet adds NICs, disks and cores"
    )
    return "\n".join(["", *lines])
