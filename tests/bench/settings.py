"""What a benchmark run measures, read from the environment (all optional).

BENCH_IMAGE_MB       size of each image in MiB, split over 4 layers (600)
BENCH_REPS           repetitions of every measurement; the median is reported (3)
BENCH_CLIENTS        clients pulling one cold image at once (8)
BENCH_CONNECTIONS    concurrent connections of the manifest load (32)
BENCH_LOAD_SECONDS   duration of one manifest load measurement (5)
BENCH_NGINX_WORKERS  worker processes of each nginx, relay too (1, like the one-process mirror)
BENCH_PROFILES       where the cold phases run: loopback, wan or both (loopback,wan)
BENCH_WAN_RATE       the WAN profile's link to the upstream, in tc's syntax (1gbit)
BENCH_WARM_REPS      alternating repetitions of the warm and small-image phases (5, at least 5)
BENCH_SMALL_IMAGES   how many small images the small-images phase pulls one after another (20)
BENCH_OUT            where results go (<repo>/bench-results)
BENCH_KEEP           1: keep the working directory (images, caches, logs) afterwards
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
LAYERS = 4
PHASES = ("cold", "concurrent", "concurrent_curl", "warm", "small_images", "manifests", "fleet")
PROFILES = ("loopback", "wan")
# The phases that run once per profile; the others run on loopback only.
COLD_PHASES = ("cold", "concurrent", "concurrent_curl")


def _int(name: str, default: int, minimum: int = 1) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    value = int(raw)
    if value < minimum:
        raise SystemExit(f"{name} must be at least {minimum}, got {value}")
    return value


def _float(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    return float(raw) if raw else default


@dataclass(frozen=True)
class Settings:
    image_mb: int
    reps: int
    clients: int
    connections: int
    load_seconds: float
    nginx_workers: int
    out_dir: Path
    keep: bool
    phases: tuple[str, ...]
    mirror_env: dict[str, str]
    profiles: tuple[str, ...] = PROFILES
    wan_rate: str = "1gbit"
    warm_reps: int = 5
    small_images: int = 20

    @property
    def layer_bytes(self) -> int:
        """Random payload per layer: the image's MiB split over LAYERS layers."""
        return self.image_mb * 1024 * 1024 // LAYERS

    @classmethod
    def from_env(cls) -> Settings:
        return cls(
            image_mb=_int("BENCH_IMAGE_MB", 600),
            reps=_int("BENCH_REPS", 3),
            clients=_int("BENCH_CLIENTS", 8),
            connections=_int("BENCH_CONNECTIONS", 32),
            load_seconds=_float("BENCH_LOAD_SECONDS", 5.0),
            nginx_workers=_int("BENCH_NGINX_WORKERS", 1),
            out_dir=Path(os.environ.get("BENCH_OUT") or REPO_ROOT / "bench-results"),
            keep=os.environ.get("BENCH_KEEP", "") == "1",
            phases=_phases(os.environ.get("BENCH_PHASES", "")),
            mirror_env=dict(
                item.split("=", 1) for item in os.environ.get("BENCH_MIRROR_ENV", "").split()
            ),
            profiles=_profiles(os.environ.get("BENCH_PROFILES", "")),
            wan_rate=os.environ.get("BENCH_WAN_RATE", "").strip() or "1gbit",
            warm_reps=_int("BENCH_WARM_REPS", 5, minimum=5),
            small_images=_int("BENCH_SMALL_IMAGES", 20),
        )


def _phases(raw: str) -> tuple[str, ...]:
    wanted = [p.strip() for p in raw.split(",") if p.strip()]
    unknown = set(wanted) - set(PHASES)
    if unknown:
        raise SystemExit(f"BENCH_PHASES: unknown {sorted(unknown)}; choose from {PHASES}")
    return tuple(p for p in PHASES if p in wanted) if wanted else PHASES


def _profiles(raw: str) -> tuple[str, ...]:
    wanted = [p.strip() for p in raw.split(",") if p.strip()]
    unknown = set(wanted) - set(PROFILES)
    if unknown:
        raise SystemExit(f"BENCH_PROFILES: unknown {sorted(unknown)}; choose from {PROFILES}")
    return tuple(p for p in PROFILES if p in wanted) if wanted else PROFILES
