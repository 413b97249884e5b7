"""Prometheus metrics, in a registry the app owns (never the global default registry,
so that several apps in one process, as in tests, keep separate counts)."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    generate_latest,
)

from cache.store import Cache


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.digest_mismatches = Counter(
            "pullthrough_digest_mismatches_total",
            "Downloads discarded because their bytes did not match the digest",
            ["kind", "upstream"],
            registry=self.registry,
        )
        self.stale = Counter(
            "pullthrough_stale_total",
            "Cached answers served because upstream failed (stale-if-error)",
            ["kind", "upstream"],
            registry=self.registry,
        )
        self.ratelimit_remaining = Gauge(
            "pullthrough_upstream_ratelimit_remaining",
            "The last ratelimit-remaining an upstream (Docker Hub) reported",
            ["upstream"],
            registry=self.registry,
        )

        self.evictions = Counter(
            "pullthrough_evictions_total",
            "Blobs evicted from the cache, by reason (size, ttl)",
            ["reason"],
            registry=self.registry,
        )
        self.evicted_bytes = Counter(
            "pullthrough_evicted_bytes_total",
            "Bytes evicted from the cache, by reason (size, ttl)",
            ["reason"],
            registry=self.registry,
        )
        self.cache_bytes = Gauge(
            "pullthrough_cache_size_bytes", "Bytes in the cache", registry=self.registry
        )
        self.cache_blobs = Gauge(
            "pullthrough_cache_blobs", "Blobs and manifests in the cache", registry=self.registry
        )
        self.disk_full = Gauge(
            "pullthrough_disk_full_events",
            "Downloads passed through uncached because the disk or budget was full",
            registry=self.registry,
        )
        self.fills_in_progress = Gauge(
            "pullthrough_fills_in_progress",
            "Blob downloads into the cache in progress",
            registry=self.registry,
        )

    def watch_cache(self, cache: Cache) -> None:
        """Read sizes off the cache at scrape time rather than tracking every change."""
        self.cache_bytes.set_function(lambda: cache.used)
        self.cache_blobs.set_function(lambda: cache.count)
        self.disk_full.set_function(lambda: cache.disk_full_events)
        self.fills_in_progress.set_function(lambda: cache.fills_in_progress)

    def evicted(self, reason: str, blobs: int, size: int) -> None:
        self.evictions.labels(reason).inc(blobs)
        self.evicted_bytes.labels(reason).inc(size)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def metrics_response(metrics: Metrics) -> web.Response:
    response = web.Response(body=metrics.render())
    response.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return response
