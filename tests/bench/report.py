"""From raw runs to medians, ratios, pass/fail targets, one printed table and a JSON file.

Ratios are taken between medians measured in the same run. Throughput is in MB/s
(10^6 bytes); memory in MB (10^6 bytes) as well, so "60 MB" means 60,000,000 bytes.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.bench.measure import MB, median

RSS_LIMIT_MB = 60.0


@dataclass(frozen=True)
class Target:
    name: str
    value: float | None
    op: str  # ">=", "<=" or "=="
    threshold: float

    @property
    def passed(self) -> bool:
        if self.value is None:
            return False
        if self.op == ">=":
            return self.value >= self.threshold
        if self.op == "<=":
            return self.value <= self.threshold
        return self.value == self.threshold

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "value": self.value,
            "op": self.op,
            "threshold": self.threshold,
            "passed": self.passed,
        }


def _med(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return median(values) if values else None


def _cpu(runs: list[dict[str, Any]], who: str) -> float | None:
    values = [r["cpu_seconds"][who] for r in runs if who in r.get("cpu_seconds", {})]
    return median(values) if values else None


def _gets(runs: list[dict[str, Any]], kind: str) -> float | None:
    """Median count of successful upstream GETs of ``kind`` (manifest or blob) per run."""
    values = [
        sum(n for key, n in r["upstream_requests"].items() if key.startswith(f"GET {kind} 2"))
        for r in runs
        if "upstream_requests" in r
    ]
    return median(values) if values else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def summarize(raw: dict[str, Any]) -> dict[str, Any]:
    """Medians of every measurement and the ratios the targets are about."""
    s: dict[str, Any] = {}
    cold = raw.get("cold", {})
    for who, runs in cold.items():
        s[f"cold_{who}_seconds"] = _med(runs, "seconds")
        s[f"cold_{who}_mb_per_s"] = _med(runs, "mb_per_s")
        s[f"cold_{who}_upstream_ratio"] = _med(runs, "upstream_ratio")
        s[f"cold_{who}_upstream_ratio_max"] = max((r["upstream_ratio"] for r in runs), default=None)
        s[f"cold_{who}_cpu"] = {
            k: _cpu(runs, k) for k in ("mirror", "peer", "relay", "upstream", "clients")
        }
    s["cold_speed_vs_direct"] = _ratio(s.get("cold_direct_seconds"), s.get("cold_mirror_seconds"))
    s["cold_speed_vs_peer"] = _ratio(s.get("cold_peer_seconds"), s.get("cold_mirror_seconds"))
    s["cold_peer_speed_vs_direct"] = _ratio(
        s.get("cold_direct_seconds"), s.get("cold_peer_seconds")
    )
    # The relay (nginx proxy_cache) is the fastest a caching hop gets on this machine.
    s["cold_relay_speed_vs_direct"] = _ratio(
        s.get("cold_direct_seconds"), s.get("cold_relay_seconds")
    )
    s["cold_speed_vs_relay"] = _ratio(s.get("cold_relay_seconds"), s.get("cold_mirror_seconds"))
    # A direct pull beside the verifier: what checking and storing the bytes, with no
    # network or HTTP at all, costs a client on the same cores.
    s["cold_verifier_speed_vs_direct"] = _ratio(
        s.get("cold_direct_seconds"), s.get("cold_verifier_seconds")
    )
    s["cold_verifier_cpu_seconds"] = _med(cold.get("verifier", []), "verifier_cpu_seconds")
    hashes = raw.get("cold_sha256", [])
    s["cold_sha256_cpu_seconds"] = _med(hashes, "cpu_seconds")
    s["cold_sha256_mb_per_s"] = _med(hashes, "mb_per_s")
    for who, runs in raw.get("concurrent", {}).items():
        s[f"concurrent_{who}_wall_seconds"] = _med(runs, "wall_seconds")
        s[f"concurrent_{who}_upstream_ratio"] = _med(runs, "upstream_ratio")
        s[f"concurrent_{who}_upstream_ratio_max"] = max(
            (r["upstream_ratio"] for r in runs), default=None
        )
        s[f"concurrent_{who}_upstream_gets"] = {k: _gets(runs, k) for k in ("manifest", "blob")}
        s[f"concurrent_{who}_cpu"] = {
            k: _cpu(runs, k) for k in ("mirror", "peer", "upstream", "clients")
        }
    for who, runs in raw.get("concurrent_curl", {}).items():
        s[f"concurrent_curl_{who}_wall_seconds"] = _med(runs, "wall_seconds")
        s[f"concurrent_curl_{who}_upstream_ratio"] = _med(runs, "upstream_ratio")
    s["concurrent_curl_time_vs_peer"] = _ratio(
        s.get("concurrent_curl_mirror_wall_seconds"), s.get("concurrent_curl_peer_wall_seconds")
    )
    s["concurrent_time_vs_peer"] = _ratio(
        s.get("concurrent_mirror_wall_seconds"), s.get("concurrent_peer_wall_seconds")
    )
    # The clients' own work, whichever server fed them (the lowest of the medians),
    # spread over every core: no server can make N clients finish sooner than this.
    client_cpu = [
        cpu["clients"]
        for who in ("direct", "mirror", "peer")
        if (cpu := s.get(f"concurrent_{who}_cpu") or {}).get("clients") is not None
    ]
    s["concurrent_clients_cpu_seconds"] = min(client_cpu) if client_cpu else None
    s["concurrent_time_vs_direct"] = _ratio(
        s.get("concurrent_mirror_wall_seconds"), s.get("concurrent_direct_wall_seconds")
    )
    s["concurrent_direct_vs_peer"] = _ratio(
        s.get("concurrent_direct_wall_seconds"), s.get("concurrent_peer_wall_seconds")
    )
    s["concurrent_clients_cpu_floor_seconds"] = _ratio(
        s["concurrent_clients_cpu_seconds"], raw.get("environment", {}).get("cores")
    )
    s["concurrent_floor_vs_peer"] = _ratio(
        s.get("concurrent_clients_cpu_floor_seconds"), s.get("concurrent_peer_wall_seconds")
    )
    for mode, by_who in raw.get("warm", {}).items():
        for who, runs in by_who.items():
            s[f"warm_{mode}_{who}_seconds"] = _med(runs, "seconds")
            s[f"warm_{mode}_{who}_mb_per_s"] = _med(runs, "mb_per_s")
    s["warm_skopeo_speed_vs_peer"] = _ratio(
        s.get("warm_skopeo_peer_seconds"), s.get("warm_skopeo_mirror_seconds")
    )
    for mode in ("curl_parallel", "curl_sequential"):
        s[f"warm_{mode}_vs_nginx"] = _ratio(
            s.get(f"warm_{mode}_nginx_seconds"), s.get(f"warm_{mode}_mirror_seconds")
        )
    for kind, by_who in raw.get("manifests", {}).items():
        for who, runs in by_who.items():
            s[f"manifest_{kind}_{who}_rps"] = _med(runs, "rps")
            s[f"manifest_{kind}_{who}_cpu_us"] = _med(runs, "server_cpu_us_per_request")
        s[f"manifest_{kind}_vs_peer"] = _ratio(
            s.get(f"manifest_{kind}_mirror_rps"), s.get(f"manifest_{kind}_peer_rps")
        )
    for who, phases in raw.get("rss", {}).items():
        peaks = {phase: m["peak_kb"] * 1024 / MB for phase, m in phases.items()}
        s[f"rss_{who}_peak_mb"] = max(peaks.values(), default=None)
        s[f"rss_{who}_by_phase_mb"] = {k: round(v, 1) for k, v in peaks.items()}
    return s


def targets(raw: dict[str, Any], s: dict[str, Any]) -> list[Target]:
    def exact(section: str) -> float | None:
        runs = raw.get(section, {}).get("mirror", [])
        if not runs:
            return None
        ratios: list[float] = [float(r["upstream_ratio"]) for r in runs]
        # Exactly 1.0 in every repetition, or the worst one is what is reported.
        return max(ratios, key=lambda r: abs(r - 1.0))

    return [
        Target("cold pull >= 0.95x direct speed", s.get("cold_speed_vs_direct"), ">=", 0.95),
        Target("upstream bytes == 1.0x image, 1 client", exact("cold"), "==", 1.0),
        Target(
            f"upstream bytes == 1.0x image, {raw['settings']['clients']} clients",
            exact("concurrent"),
            "==",
            1.0,
        ),
        Target(
            f"{raw['settings']['clients']} cold pulls <= 0.6x peer wall time",
            s.get("concurrent_time_vs_peer"),
            "<=",
            0.6,
        ),
        Target(
            "warm pull >= 0.95x nginx (curl, layers in parallel)",
            s.get("warm_curl_parallel_vs_nginx"),
            ">=",
            0.95,
        ),
        Target(
            "warm pull >= 0.95x nginx (curl, layers in sequence)",
            s.get("warm_curl_sequential_vs_nginx"),
            ">=",
            0.95,
        ),
        Target("manifest by tag >= 3x peer req/s", s.get("manifest_tag_vs_peer"), ">=", 3.0),
        Target(
            "manifest by digest >= 1.5x peer req/s", s.get("manifest_digest_vs_peer"), ">=", 1.5
        ),
        Target("peak RSS <= 60 MB", s.get("rss_mirror_peak_mb"), "<=", RSS_LIMIT_MB),
    ]


# -- the table -----------------------------------------------------------------------


def _f(value: float | None, fmt: str, unit: str = "") -> str:
    return "n/a" if value is None else f"{value:{fmt}}{unit}"


def _x(value: float | None) -> str:
    return _f(value, ".2f", "x")


def _gets_text(gets: dict[str, float | None] | None) -> str:
    gets = gets or {}
    return f"{_f(gets.get('manifest'), '.0f')} manifest, {_f(gets.get('blob'), '.0f')} blob"


def table(raw: dict[str, Any], s: dict[str, Any], checks: list[Target]) -> str:
    by_name = {t.name: t for t in checks}
    names = list(by_name)

    def verdict(i: int) -> tuple[str, str]:
        t = by_name[names[i]]
        return f"{t.op} {t.threshold:g}", "PASS" if t.passed else "FAIL"

    n = raw["settings"]["clients"]
    conns = raw["settings"]["connections"]
    rows: list[tuple[str, str, str, str, str, str]] = [
        (
            "cold pull, 1 client (skopeo)",
            f"{_f(s.get('cold_mirror_seconds'), '.2f', ' s')} "
            f"{_f(s.get('cold_mirror_mb_per_s'), '.0f', ' MB/s')}",
            f"direct {_f(s.get('cold_direct_seconds'), '.2f', ' s')} "
            f"{_f(s.get('cold_direct_mb_per_s'), '.0f', ' MB/s')}",
            _x(s.get("cold_speed_vs_direct")),
            *verdict(0),
        ),
        (
            "cold pull vs the peer",
            _f(s.get("cold_mirror_seconds"), ".2f", " s"),
            f"peer {_f(s.get('cold_peer_seconds'), '.2f', ' s')} "
            f"{_f(s.get('cold_peer_mb_per_s'), '.0f', ' MB/s')}"
            f" ({_x(s.get('cold_peer_speed_vs_direct'))} direct)",
            _x(s.get("cold_speed_vs_peer")),
            "",
            "info",
        ),
        (
            "cold pull vs nginx proxy_cache",
            _f(s.get("cold_mirror_seconds"), ".2f", " s"),
            f"relay, no digest checks: {_f(s.get('cold_relay_seconds'), '.2f', ' s')} "
            f"{_f(s.get('cold_relay_mb_per_s'), '.0f', ' MB/s')}"
            f" ({_x(s.get('cold_relay_speed_vs_direct'))} direct)",
            _x(s.get("cold_speed_vs_relay")),
            "",
            "info",
        ),
        (
            "direct pull beside the verifier",
            _f(s.get("cold_verifier_seconds"), ".2f", " s"),
            f"direct {_f(s.get('cold_direct_seconds'), '.2f', ' s')}; verifier"
            f" {_f(s.get('cold_verifier_cpu_seconds'), '.2f', ' CPU s')}",
            _x(s.get("cold_verifier_speed_vs_direct")),
            "",
            "info",
        ),
        (
            "sha256 of the image, CPU",
            _f(s.get("cold_sha256_cpu_seconds"), ".3f", " s"),
            "what a verifying mirror must spend: "
            f"{_f(s.get('cold_sha256_mb_per_s'), '.0f', ' MB/s')} on 1 core",
            "",
            "",
            "info",
        ),
        (
            "upstream bytes / image, 1 client",
            _x(s.get("cold_mirror_upstream_ratio_max")),
            f"peer {_x(s.get('cold_peer_upstream_ratio'))}, "
            f"relay {_x(s.get('cold_relay_upstream_ratio'))}, "
            f"direct {_x(s.get('cold_direct_upstream_ratio'))}",
            "",
            *verdict(1),
        ),
        (
            f"upstream bytes / image, {n} clients",
            _x(s.get("concurrent_mirror_upstream_ratio_max")),
            f"peer {_x(s.get('concurrent_peer_upstream_ratio'))}",
            "",
            *verdict(2),
        ),
        (
            f"{n} clients, one cold image: wall",
            _f(s.get("concurrent_mirror_wall_seconds"), ".2f", " s"),
            f"peer {_f(s.get('concurrent_peer_wall_seconds'), '.2f', ' s')}",
            _x(s.get("concurrent_time_vs_peer")),
            *verdict(3),
        ),
        (
            f"{n} clients, one cold image: direct",
            _f(s.get("concurrent_mirror_wall_seconds"), ".2f", " s"),
            f"direct from upstream {_f(s.get('concurrent_direct_wall_seconds'), '.2f', ' s')}"
            f" ({_x(s.get('concurrent_direct_vs_peer'))} the peer's wall)",
            _x(s.get("concurrent_time_vs_direct")),
            "",
            "info",
        ),
        (
            f"{n} skopeo clients' own CPU / cores",
            f"{_f(s.get('concurrent_clients_cpu_floor_seconds'), '.2f', ' s')} = "
            f"{_f(s.get('concurrent_clients_cpu_seconds'), '.2f', ' s')}"
            f" / {raw.get('environment', {}).get('cores')}",
            f"peer wall {_f(s.get('concurrent_peer_wall_seconds'), '.2f', ' s')}:"
            " best ratio any server can reach",
            _x(s.get("concurrent_floor_vs_peer")),
            "",
            "info",
        ),
        (
            f"upstream GETs, {n} clients",
            _gets_text(s.get("concurrent_mirror_upstream_gets")),
            "peer " + _gets_text(s.get("concurrent_peer_upstream_gets")),
            "",
            "",
            "info",
        ),
        (
            f"{n} clients, curl to /dev/null: wall",
            f"{_f(s.get('concurrent_curl_mirror_wall_seconds'), '.2f', ' s')} "
            f"{_x(s.get('concurrent_curl_mirror_upstream_ratio'))} upstream",
            f"peer {_f(s.get('concurrent_curl_peer_wall_seconds'), '.2f', ' s')} "
            f"{_x(s.get('concurrent_curl_peer_upstream_ratio'))} upstream",
            _x(s.get("concurrent_curl_time_vs_peer")),
            "",
            "info",
        ),
        (
            "warm pull (skopeo)",
            f"{_f(s.get('warm_skopeo_mirror_seconds'), '.2f', ' s')} "
            f"{_f(s.get('warm_skopeo_mirror_mb_per_s'), '.0f', ' MB/s')}",
            f"peer {_f(s.get('warm_skopeo_peer_seconds'), '.2f', ' s')} "
            f"{_f(s.get('warm_skopeo_peer_mb_per_s'), '.0f', ' MB/s')}",
            _x(s.get("warm_skopeo_speed_vs_peer")),
            "",
            "info",
        ),
        (
            "warm layers, curl in parallel",
            _f(s.get("warm_curl_parallel_mirror_mb_per_s"), ".0f", " MB/s"),
            f"nginx {_f(s.get('warm_curl_parallel_nginx_mb_per_s'), '.0f', ' MB/s')}",
            _x(s.get("warm_curl_parallel_vs_nginx")),
            *verdict(4),
        ),
        (
            "warm layers, curl in sequence",
            _f(s.get("warm_curl_sequential_mirror_mb_per_s"), ".0f", " MB/s"),
            f"nginx {_f(s.get('warm_curl_sequential_nginx_mb_per_s'), '.0f', ' MB/s')}",
            _x(s.get("warm_curl_sequential_vs_nginx")),
            *verdict(5),
        ),
        (
            f"manifest by tag, {conns} conns",
            _f(s.get("manifest_tag_mirror_rps"), ".0f", " req/s"),
            f"peer {_f(s.get('manifest_tag_peer_rps'), '.0f', ' req/s')}",
            _x(s.get("manifest_tag_vs_peer")),
            *verdict(6),
        ),
        (
            f"manifest by digest, {conns} conns",
            _f(s.get("manifest_digest_mirror_rps"), ".0f", " req/s"),
            f"peer {_f(s.get('manifest_digest_peer_rps'), '.0f', ' req/s')}",
            _x(s.get("manifest_digest_vs_peer")),
            *verdict(7),
        ),
        (
            "server CPU per cold pull",
            _f((s.get("cold_mirror_cpu") or {}).get("mirror"), ".2f", " s"),
            f"peer {_f((s.get('cold_peer_cpu') or {}).get('peer'), '.2f', ' s')}, "
            f"relay {_f((s.get('cold_relay_cpu') or {}).get('relay'), '.2f', ' s')}",
            "",
            "",
            "info",
        ),
        (
            f"server CPU per cold pull, {n} clients",
            _f((s.get("concurrent_mirror_cpu") or {}).get("mirror"), ".2f", " s"),
            f"peer {_f((s.get('concurrent_peer_cpu') or {}).get('peer'), '.2f', ' s')}",
            "",
            "",
            "info",
        ),
        (
            "server CPU per manifest request",
            f"tag {_f(s.get('manifest_tag_mirror_cpu_us'), '.0f', ' us')}, "
            f"digest {_f(s.get('manifest_digest_mirror_cpu_us'), '.0f', ' us')}",
            f"peer: tag {_f(s.get('manifest_tag_peer_cpu_us'), '.0f', ' us')}, "
            f"digest {_f(s.get('manifest_digest_peer_cpu_us'), '.0f', ' us')}",
            "",
            "",
            "info",
        ),
        (
            "peak RSS (highest phase)",
            _f(s.get("rss_mirror_peak_mb"), ".1f", " MB"),
            f"peer {_f(s.get('rss_peer_peak_mb'), '.1f', ' MB')}",
            "",
            *verdict(8),
        ),
    ]
    header = ("measurement", "pullthrough", "compared with", "ratio", "target", "result")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(header, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    phases = s.get("rss_mirror_by_phase_mb") or {}
    peer_phases = s.get("rss_peer_by_phase_mb") or {}
    lines.append("")
    lines.append(
        "peak RSS by phase (MB): "
        + ", ".join(f"{k} {v:.1f} (peer {peer_phases.get(k, 0):.1f})" for k, v in phases.items())
    )
    lines.append(
        "relay: nginx proxy_cache (C) in front of the upstream; caches to disk, checks no"
        " digests: the physical limit of a caching hop on this machine"
    )
    lines.append(
        "verifier: a process that only hashes, writes and fsyncs the image's bytes, beside a"
        " direct pull: the least any verifying cache adds to a client on the same cores"
    )
    passed = sum(t.passed for t in checks)
    lines.append(f"targets: {passed} of {len(checks)} pass")
    return "\n".join(lines)


def write(raw: dict[str, Any], out_dir: Path, stamp: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"bench-{stamp}.json"
    path.write_text(json.dumps(raw, indent=2, sort_keys=False) + "\n")
    shutil.copyfile(path, out_dir / "latest.json")
    return path
