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
    # The loopback target's bound: a direct pull sharing the cores with a verifier's work.
    s["cold_speed_vs_verifier"] = _ratio(
        s.get("cold_verifier_seconds"), s.get("cold_mirror_seconds")
    )
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
    # N curl clients through a cache against one direct fetch of the same blobs: over a
    # slow link the bytes cross it once either way.
    s["concurrent_curl_time_vs_one_direct"] = _ratio(
        s.get("concurrent_curl_mirror_wall_seconds"), s.get("concurrent_curl_direct_wall_seconds")
    )
    s["concurrent_curl_peer_time_vs_one_direct"] = _ratio(
        s.get("concurrent_curl_peer_wall_seconds"), s.get("concurrent_curl_direct_wall_seconds")
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
    s["warm_skopeo_speed_vs_direct"] = _ratio(
        s.get("warm_skopeo_direct_seconds"), s.get("warm_skopeo_mirror_seconds")
    )
    s["warm_curl_one_vs_peer"] = _ratio(
        s.get("warm_curl_one_peer_seconds"), s.get("warm_curl_one_mirror_seconds")
    )
    s["warm_curl_one_vs_nginx"] = _ratio(
        s.get("warm_curl_one_nginx_seconds"), s.get("warm_curl_one_mirror_seconds")
    )
    for state, by_who in raw.get("small_images", {}).items():
        for who, runs in by_who.items():
            s[f"small_{state}_{who}_seconds"] = _med(runs, "seconds")
            s[f"small_{state}_{who}_tokens"] = _med(runs, "token_requests")
        for who in ("direct", "peer"):
            s[f"small_{state}_speed_vs_{who}"] = _ratio(
                s.get(f"small_{state}_{who}_seconds"), s.get(f"small_{state}_mirror_seconds")
            )
    if "wan" in raw:
        s["wan"] = summarize(raw["wan"])
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


def _exact(raw: dict[str, Any], section: str) -> float | None:
    """The mirror's upstream bytes per image: exactly 1.0 in every repetition, or the
    worst one is what is reported."""
    runs = raw.get(section, {}).get("mirror", [])
    if not runs:
        return None
    ratios: list[float] = [float(r["upstream_ratio"]) for r in runs]
    return max(ratios, key=lambda r: abs(r - 1.0))


def targets(raw: dict[str, Any], s: dict[str, Any]) -> list[Target]:
    def exact(section: str) -> float | None:
        return _exact(raw, section)

    return [
        Target(
            "cold pull >= 0.95x a direct pull beside the verifier",
            s.get("cold_speed_vs_verifier"),
            ">=",
            0.95,
        ),
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
        *_warm_targets(s),
        *_wan_targets(raw, s),
    ]


def _warm_targets(s: dict[str, Any]) -> list[Target]:
    """Warm pulls by real clients, and small images (rows v[9] to v[13])."""
    return [
        Target("warm skopeo pull >= 1.0x peer", s.get("warm_skopeo_speed_vs_peer"), ">=", 1.0),
        Target(
            "warm skopeo pull >= 0.95x direct", s.get("warm_skopeo_speed_vs_direct"), ">=", 0.95
        ),
        Target("warm single curl stream >= 1.0x peer", s.get("warm_curl_one_vs_peer"), ">=", 1.0),
        Target("small images warm >= 1.5x direct", s.get("small_warm_speed_vs_direct"), ">=", 1.5),
        Target("small images cold >= 1.0x direct", s.get("small_cold_speed_vs_direct"), ">=", 1.0),
    ]


def _wan_targets(raw: dict[str, Any], s: dict[str, Any]) -> list[Target]:
    """The slow-link profile (rows w[0] to w[3] of the WAN table); none without it."""
    if "wan" not in raw:
        return []
    w, n = s["wan"], raw["settings"]["clients"]
    return [
        Target("wan: cold pull >= 0.97x direct", w.get("cold_speed_vs_direct"), ">=", 0.97),
        Target(
            f"wan: {n} curl clients <= 1.15x one direct fetch",
            w.get("concurrent_curl_time_vs_one_direct"),
            "<=",
            1.15,
        ),
        Target(
            "wan: upstream bytes == 1.0x image, 1 client", _exact(raw["wan"], "cold"), "==", 1.0
        ),
        Target(
            f"wan: upstream bytes == 1.0x image, {n} clients",
            _worst(_exact(raw["wan"], "concurrent"), _exact(raw["wan"], "concurrent_curl")),
            "==",
            1.0,
        ),
    ]


def _worst(*ratios: float | None) -> float | None:
    """The upstream ratio furthest from 1.0 of those measured."""
    known = [r for r in ratios if r is not None]
    return max(known, key=lambda r: abs(r - 1.0)) if known else None


# -- the table -----------------------------------------------------------------------


Row = tuple[str, str, str, str, str, str]
Verdict = tuple[str, str]  # the target and PASS or FAIL; or "" and "info"
HEADER: Row = ("measurement", "pullthrough", "compared with", "ratio", "target", "result")
INFO: Verdict = ("", "info")


def _f(value: float | None, fmt: str, unit: str = "") -> str:
    return "n/a" if value is None else f"{value:{fmt}}{unit}"


def _x(value: float | None) -> str:
    return _f(value, ".2f", "x")


def _s(value: float | None) -> str:
    return _f(value, ".2f", " s")


def _mb_s(value: float | None) -> str:
    return _f(value, ".0f", " MB/s")


def _pace(s: dict[str, Any], prefix: str) -> str:
    """Seconds and MB/s of one kind of pull, ``prefix`` being e.g. ``cold_mirror``."""
    return f"{_s(s.get(f'{prefix}_seconds'))} {_mb_s(s.get(f'{prefix}_mb_per_s'))}"


def _gets_text(gets: dict[str, float | None] | None) -> str:
    gets = gets or {}
    return f"{_f(gets.get('manifest'), '.0f')} manifest, {_f(gets.get('blob'), '.0f')} blob"


def _server_cpu(s: dict[str, Any], phase: str, who: str) -> str:
    """CPU seconds ``who`` spent serving its own pulls in ``phase``."""
    return _s((s.get(f"{phase}_{who}_cpu") or {}).get(who))


def _manifest_cpu(s: dict[str, Any], who: str) -> str:
    tag = _f(s.get(f"manifest_tag_{who}_cpu_us"), ".0f", " us")
    digest = _f(s.get(f"manifest_digest_{who}_cpu_us"), ".0f", " us")
    return f"tag {tag}, digest {digest}"


def _verdicts(checks: list[Target]) -> list[Verdict]:
    """Target and result of each check, in the order ``targets`` returns them: the rows
    take theirs by position."""
    by_name = {t.name: t for t in checks}
    return [(f"{t.op} {t.threshold:g}", "PASS" if t.passed else "FAIL") for t in by_name.values()]


def _cold_rows(s: dict[str, Any], verdict: Verdict) -> list[Row]:
    """One client pulling a cold image, set against direct, the peer and the relay;
    ``verdict`` is on the first row's ratio (against direct)."""
    return [
        (
            "cold pull, 1 client (skopeo)",
            _pace(s, "cold_mirror"),
            f"direct {_pace(s, 'cold_direct')}",
            _x(s.get("cold_speed_vs_direct")),
            *verdict,
        ),
        (
            "cold pull vs the peer",
            _s(s.get("cold_mirror_seconds")),
            f"peer {_pace(s, 'cold_peer')} ({_x(s.get('cold_peer_speed_vs_direct'))} direct)",
            _x(s.get("cold_speed_vs_peer")),
            *INFO,
        ),
        (
            "cold pull vs nginx proxy_cache",
            _s(s.get("cold_mirror_seconds")),
            f"relay, no digest checks: {_pace(s, 'cold_relay')}"
            f" ({_x(s.get('cold_relay_speed_vs_direct'))} direct)",
            _x(s.get("cold_speed_vs_relay")),
            *INFO,
        ),
    ]


def _verifier_rows(s: dict[str, Any], verdict: Verdict) -> list[Row]:
    """What checking the bytes costs: to a client beside the verifier, and to sha256;
    the loopback target: the mirror against a direct pull beside the verifier."""
    return [
        (
            "cold pull vs direct beside the verifier",
            _s(s.get("cold_mirror_seconds")),
            f"direct beside the verifier {_s(s.get('cold_verifier_seconds'))}",
            _x(s.get("cold_speed_vs_verifier")),
            *verdict,
        ),
        (
            "direct pull beside the verifier",
            _s(s.get("cold_verifier_seconds")),
            f"direct {_s(s.get('cold_direct_seconds'))}; verifier"
            f" {_f(s.get('cold_verifier_cpu_seconds'), '.2f', ' CPU s')}",
            _x(s.get("cold_verifier_speed_vs_direct")),
            *INFO,
        ),
        (
            "sha256 of the image, CPU",
            _f(s.get("cold_sha256_cpu_seconds"), ".3f", " s"),
            f"what a verifying mirror must spend: {_mb_s(s.get('cold_sha256_mb_per_s'))} on 1 core",
            "",
            *INFO,
        ),
    ]


def _upstream_rows(s: dict[str, Any], n: int, one: Verdict, many: Verdict) -> list[Row]:
    """Bytes the upstream sent per image pulled, with 1 client and with ``n``."""
    return [
        (
            "upstream bytes / image, 1 client",
            _x(s.get("cold_mirror_upstream_ratio_max")),
            f"peer {_x(s.get('cold_peer_upstream_ratio'))}, "
            f"relay {_x(s.get('cold_relay_upstream_ratio'))}, "
            f"direct {_x(s.get('cold_direct_upstream_ratio'))}",
            "",
            *one,
        ),
        (
            f"upstream bytes / image, {n} clients",
            _x(s.get("concurrent_mirror_upstream_ratio_max")),
            f"peer {_x(s.get('concurrent_peer_upstream_ratio'))}",
            "",
            *many,
        ),
    ]


def _concurrent_rows(s: dict[str, Any], n: int, cores: Any, verdict: Verdict) -> list[Row]:
    """``n`` clients pulling one cold image at once: the wall time against the peer's,
    against direct pulls, and the floor that the clients' own CPU sets."""
    return [
        (
            f"{n} clients, one cold image: wall",
            _s(s.get("concurrent_mirror_wall_seconds")),
            f"peer {_s(s.get('concurrent_peer_wall_seconds'))}",
            _x(s.get("concurrent_time_vs_peer")),
            *verdict,
        ),
        (
            f"{n} clients, one cold image: direct",
            _s(s.get("concurrent_mirror_wall_seconds")),
            f"direct from upstream {_s(s.get('concurrent_direct_wall_seconds'))}"
            f" ({_x(s.get('concurrent_direct_vs_peer'))} the peer's wall)",
            _x(s.get("concurrent_time_vs_direct")),
            *INFO,
        ),
        (
            f"{n} skopeo clients' own CPU / cores",
            f"{_s(s.get('concurrent_clients_cpu_floor_seconds'))} = "
            f"{_s(s.get('concurrent_clients_cpu_seconds'))} / {cores}",
            f"peer wall {_s(s.get('concurrent_peer_wall_seconds'))}:"
            " best ratio any server can reach",
            _x(s.get("concurrent_floor_vs_peer")),
            *INFO,
        ),
    ]


def _concurrent_info_rows(s: dict[str, Any], n: int) -> list[Row]:
    """Beside the ``n``-client pulls: the upstream GETs they caused, and the same load
    from curl clients, which neither hash nor write to disk."""

    def curl(who: str) -> str:
        prefix = f"concurrent_curl_{who}"
        return f"{_s(s.get(f'{prefix}_wall_seconds'))} {_x(s.get(f'{prefix}_upstream_ratio'))}"

    return [
        (
            f"upstream GETs, {n} clients",
            _gets_text(s.get("concurrent_mirror_upstream_gets")),
            "peer " + _gets_text(s.get("concurrent_peer_upstream_gets")),
            "",
            *INFO,
        ),
        (
            f"{n} clients, curl to /dev/null: wall",
            f"{curl('mirror')} upstream",
            f"peer {curl('peer')} upstream",
            _x(s.get("concurrent_curl_time_vs_peer")),
            *INFO,
        ),
    ]


def _warm_rows(s: dict[str, Any], parallel: Verdict, sequential: Verdict) -> list[Row]:
    """An image already cached: the layers by curl against nginx."""

    def curl(mode: str, how: str, verdict: Verdict) -> Row:
        return (
            f"warm layers, curl in {how}",
            _mb_s(s.get(f"warm_{mode}_mirror_mb_per_s")),
            f"nginx {_mb_s(s.get(f'warm_{mode}_nginx_mb_per_s'))}",
            _x(s.get(f"warm_{mode}_vs_nginx")),
            *verdict,
        )

    return [
        curl("curl_parallel", "parallel", parallel),
        curl("curl_sequential", "sequence", sequential),
    ]


def _warm_client_rows(s: dict[str, Any], v: list[Verdict]) -> list[Row]:
    """A cached image by skopeo, against the peer and direct; one curl stream of its
    largest layer against the peer (and nginx); ``v``: the verdicts v[9] to v[11]."""
    return [
        (
            "warm pull (skopeo)",
            _pace(s, "warm_skopeo_mirror"),
            f"peer {_pace(s, 'warm_skopeo_peer')}",
            _x(s.get("warm_skopeo_speed_vs_peer")),
            *v[0],
        ),
        (
            "warm pull (skopeo) vs direct",
            _s(s.get("warm_skopeo_mirror_seconds")),
            f"direct {_pace(s, 'warm_skopeo_direct')}",
            _x(s.get("warm_skopeo_speed_vs_direct")),
            *v[1],
        ),
        (
            "warm layer, one curl stream",
            _mb_s(s.get("warm_curl_one_mirror_mb_per_s")),
            f"peer {_mb_s(s.get('warm_curl_one_peer_mb_per_s'))}",
            _x(s.get("warm_curl_one_vs_peer")),
            *v[2],
        ),
        (
            "warm layer, one curl stream vs nginx",
            _mb_s(s.get("warm_curl_one_mirror_mb_per_s")),
            f"nginx {_mb_s(s.get('warm_curl_one_nginx_mb_per_s'))}",
            _x(s.get("warm_curl_one_vs_nginx")),
            *INFO,
        ),
    ]


def _small_rows(s: dict[str, Any], n: int, v: list[Verdict]) -> list[Row]:
    """``n`` small images by skopeo one after another, cold and warm; ``v``: v[12], v[13]."""

    def row(state: str, verdict: Verdict) -> list[Row]:
        tokens = (
            f"tokens: mirror {_f(s.get(f'small_{state}_mirror_tokens'), '.0f')},"
            f" direct {_f(s.get(f'small_{state}_direct_tokens'), '.0f')}"
        )
        return [
            (
                f"{n} small images, {state} (skopeo)",
                _s(s.get(f"small_{state}_mirror_seconds")),
                f"direct {_s(s.get(f'small_{state}_direct_seconds'))}; {tokens}",
                _x(s.get(f"small_{state}_speed_vs_direct")),
                *verdict,
            ),
            (
                f"{n} small images, {state}, vs the peer",
                _s(s.get(f"small_{state}_mirror_seconds")),
                f"peer {_s(s.get(f'small_{state}_peer_seconds'))}",
                _x(s.get(f"small_{state}_speed_vs_peer")),
                *INFO,
            ),
        ]

    return [*row("cold", v[1]), *row("warm", v[0])]


def _manifest_row(s: dict[str, Any], kind: str, conns: int, verdict: Verdict) -> Row:
    """Manifest requests per second, by ``kind`` (tag or digest)."""
    return (
        f"manifest by {kind}, {conns} conns",
        _f(s.get(f"manifest_{kind}_mirror_rps"), ".0f", " req/s"),
        f"peer {_f(s.get(f'manifest_{kind}_peer_rps'), '.0f', ' req/s')}",
        _x(s.get(f"manifest_{kind}_vs_peer")),
        *verdict,
    )


def _server_cost_rows(s: dict[str, Any], n: int, rss: Verdict) -> list[Row]:
    """What the servers spent: CPU per pull and per manifest request, and memory."""
    return [
        (
            "server CPU per cold pull",
            _server_cpu(s, "cold", "mirror"),
            f"peer {_server_cpu(s, 'cold', 'peer')}, relay {_server_cpu(s, 'cold', 'relay')}",
            "",
            *INFO,
        ),
        (
            f"server CPU per cold pull, {n} clients",
            _server_cpu(s, "concurrent", "mirror"),
            f"peer {_server_cpu(s, 'concurrent', 'peer')}",
            "",
            *INFO,
        ),
        (
            "server CPU per manifest request",
            _manifest_cpu(s, "mirror"),
            f"peer: {_manifest_cpu(s, 'peer')}",
            "",
            *INFO,
        ),
        (
            "peak RSS (highest phase)",
            _f(s.get("rss_mirror_peak_mb"), ".1f", " MB"),
            f"peer {_f(s.get('rss_peer_peak_mb'), '.1f', ' MB')}",
            "",
            *rss,
        ),
    ]


def _rows(raw: dict[str, Any], s: dict[str, Any], checks: list[Target]) -> list[Row]:
    """The rows in printed order; ``v[i]`` is the verdict on the i-th of ``targets``."""
    v = _verdicts(checks)
    n = raw["settings"]["clients"]
    conns = raw["settings"]["connections"]
    cores = raw.get("environment", {}).get("cores")
    return [
        *_cold_rows(s, INFO),
        *_verifier_rows(s, v[0]),
        *_upstream_rows(s, n, v[1], v[2]),
        *_concurrent_rows(s, n, cores, v[3]),
        *_concurrent_info_rows(s, n),
        *_warm_client_rows(s, v[9:12]),
        *_warm_rows(s, v[4], v[5]),
        *_small_rows(s, raw["settings"].get("small_images", 0), v[12:14]),
        _manifest_row(s, "tag", conns, v[6]),
        _manifest_row(s, "digest", conns, v[7]),
        *_server_cost_rows(s, n, v[8]),
    ]


def _wan_rows(raw: dict[str, Any], s: dict[str, Any], w: list[Verdict]) -> list[Row]:
    """The WAN table: the cold phases with the upstream behind the slow link."""
    n = raw["settings"]["clients"]
    curl_direct = s.get("concurrent_curl_direct_wall_seconds")
    return [
        *_cold_rows(s, w[0]),
        *_upstream_rows(s, n, w[2], w[3]),
        (
            f"{n} curl clients, one cold image",
            _s(s.get("concurrent_curl_mirror_wall_seconds")),
            f"one direct fetch of its blobs {_s(curl_direct)}",
            _x(s.get("concurrent_curl_time_vs_one_direct")),
            *w[1],
        ),
        (
            f"{n} curl clients through the peer",
            _s(s.get("concurrent_curl_peer_wall_seconds")),
            f"one direct fetch {_s(curl_direct)}",
            _x(s.get("concurrent_curl_peer_time_vs_one_direct")),
            *INFO,
        ),
        (
            f"{n} skopeo clients, one cold image",
            _s(s.get("concurrent_mirror_wall_seconds")),
            f"peer {_s(s.get('concurrent_peer_wall_seconds'))}",
            _x(s.get("concurrent_time_vs_peer")),
            *INFO,
        ),
        (
            "server CPU per cold pull",
            _server_cpu(s, "cold", "mirror"),
            f"peer {_server_cpu(s, 'cold', 'peer')}, relay {_server_cpu(s, 'cold', 'relay')}",
            "",
            *INFO,
        ),
    ]


def _aligned(rows: list[Row]) -> list[str]:
    """The header, a rule and the rows, each column as wide as its widest cell."""
    widths = [max(len(r[i]) for r in [HEADER, *rows]) for i in range(len(HEADER))]

    def line(cells: Row) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    return [line(HEADER), "  ".join("-" * w for w in widths), *(line(r) for r in rows)]


def _notes(s: dict[str, Any], checks: list[Target]) -> list[str]:
    """Below the table: memory by phase, what the relay and the verifier are, the count."""
    phases = s.get("rss_mirror_by_phase_mb") or {}
    peer_phases = s.get("rss_peer_by_phase_mb") or {}
    by_phase = ", ".join(
        f"{k} {v:.1f} (peer {peer_phases.get(k, 0):.1f})" for k, v in phases.items()
    )
    passed = sum(t.passed for t in checks)
    return [
        "",
        "peak RSS by phase (MB): " + by_phase,
        "relay: nginx proxy_cache (C) in front of the upstream; caches to disk, checks no"
        " digests: the physical limit of a caching hop on this machine",
        "verifier: a process that only hashes, writes and fsyncs the image's bytes, beside a"
        " direct pull: the least any verifying cache adds to a client on the same cores",
        f"targets: {passed} of {len(checks)} pass",
    ]


def table(raw: dict[str, Any], s: dict[str, Any], checks: list[Target]) -> str:
    """The printed report: a row per measurement, then the notes and the targets met;
    with the WAN profile, its table after the loopback one."""
    lines = ["profile loopback: everything on 127.0.0.1", *_aligned(_rows(raw, s, checks))]
    if "wan" in raw:
        link = raw["wan"].get("link", {})
        w = _verdicts(checks)[len(_verdicts(checks)) - len(_wan_targets(raw, s)) :]
        lines += [
            "",
            f"profile wan: the upstream behind a {link.get('rate', '?')} link"
            " (its own network namespace, a veth pair, htb; no added delay)",
            *_aligned(_wan_rows(raw, s["wan"], w)),
        ]
    return "\n".join([*lines, *_notes(s, checks)])


def markdown(raw: dict[str, Any], s: dict[str, Any], checks: list[Target]) -> str:
    """The same tables as ``table``, as Markdown (for tests/bench/README.md)."""

    def rows(title: str, body: list[Row]) -> list[str]:
        cells = [HEADER, ("---",) * len(HEADER), *body]
        return [f"{title}", "", *("| " + " | ".join(c or " " for c in r) + " |" for r in cells)]

    lines = rows("Profile loopback:", _rows(raw, s, checks))
    if "wan" in raw:
        w = _verdicts(checks)[len(checks) - len(_wan_targets(raw, s)) :]
        rate = raw["wan"].get("link", {}).get("rate", "?")
        lines += [
            "",
            *rows(f"Profile wan, the upstream behind {rate}:", _wan_rows(raw, s["wan"], w)),
        ]
    return "\n".join(lines) + "\n"


def write(raw: dict[str, Any], out_dir: Path, stamp: str) -> Path:
    """The raw numbers as JSON and, once summarized, the tables as Markdown; each also
    as latest.*."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"bench-{stamp}.json"
    path.write_text(json.dumps(raw, indent=2, sort_keys=False) + "\n")
    shutil.copyfile(path, out_dir / "latest.json")
    if "summary" in raw:
        checks = [
            Target(t["name"], t["value"], t["op"], t["threshold"]) for t in raw.get("targets", [])
        ]
        md = path.with_suffix(".md")
        md.write_text(markdown(raw, raw["summary"], checks))
        shutil.copyfile(md, out_dir / "latest.md")
    return path
