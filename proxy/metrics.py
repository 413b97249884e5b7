"""Prometheus metrics, in a registry the app owns (never the global default registry,
so that several apps in one process, as in tests, keep separate counts).

Hit ratio, by count and by bytes:

    sum(rate(pullthrough_cache_requests_total{result!="miss"}[5m]))
      / sum(rate(pullthrough_cache_requests_total[5m]))
    sum(rate(pullthrough_served_bytes_total{source="cache"}[5m]))
      / sum(rate(pullthrough_served_bytes_total[5m]))
"""

from __future__ import annotations

from collections.abc import Callable
from typing import get_args

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from cache.store import Cache, LookupResult
from proxy.breaker import STATES, CircuitBreaker

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "pullthrough_http_requests_total",
            "Requests served, by route kind, method and status code",
            ["route", "method", "status"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "pullthrough_http_request_duration_seconds",
            "Time to serve a request, to the last byte",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.cache_requests = Counter(
            "pullthrough_cache_requests_total",
            "Cache lookups by kind and upstream: hit, miss, coalesced (joined a download"
            " in progress), stale (served because upstream failed) or confirmed (served"
            " from the cache once upstream confirmed this repository holds it)",
            ["kind", "upstream", "result"],
            registry=r,
        )
        self.served_bytes = Counter(
            "pullthrough_served_bytes_total",
            "Body bytes sent to clients, by source (cache or upstream)",
            ["source"],
            registry=r,
        )
        self.upstream_bytes = Counter(
            "pullthrough_upstream_bytes_total",
            "Body bytes fetched from each upstream",
            ["upstream"],
            registry=r,
        )
        self.upstream_seconds = Histogram(
            "pullthrough_upstream_request_duration_seconds",
            "Time until an upstream answered (headers), by upstream and outcome",
            ["upstream", "outcome"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_errors = Counter(
            "pullthrough_upstream_errors_total",
            "Failed upstream requests, by upstream and class",
            ["upstream", "class"],
            registry=r,
        )
        self.upstream_offline = Counter(
            "pullthrough_upstream_offline_total",
            "Upstream requests not made because the upstream is offline (offline: true)",
            ["upstream"],
            registry=r,
        )
        self.breaker_state = Gauge(
            "pullthrough_upstream_breaker_state",
            "Circuit-breaker state per upstream: 1 for the current state",
            ["upstream", "state"],
            registry=r,
        )
        self.ratelimit_remaining = Gauge(
            "pullthrough_upstream_ratelimit_remaining",
            "The last ratelimit-remaining an upstream (Docker Hub) reported",
            ["upstream"],
            registry=r,
        )
        self.token_fetches = Counter(
            "pullthrough_token_fetches_total",
            "Bearer tokens fetched from upstream token services",
            ["upstream", "outcome"],
            registry=r,
        )
        self.fills_in_progress = Gauge(
            "pullthrough_fills_in_progress", "Blob downloads into the cache now", registry=r
        )
        self.cache_bytes = Gauge("pullthrough_cache_size_bytes", "Bytes in the cache", registry=r)
        self.cache_blobs = Gauge(
            "pullthrough_cache_blobs", "Blobs and manifests in the cache", registry=r
        )
        self.cache_max_bytes = Gauge(
            "pullthrough_cache_max_size_bytes", "The cache's size budget", registry=r
        )
        self.evictions = Counter(
            "pullthrough_evictions_total",
            "Blobs evicted, by reason (size, ttl)",
            ["reason"],
            registry=r,
        )
        self.evicted_bytes = Counter(
            "pullthrough_evicted_bytes_total",
            "Bytes evicted, by reason (size, ttl)",
            ["reason"],
            registry=r,
        )
        self.disk_full = Counter(
            "pullthrough_disk_full",
            "Downloads passed through uncached because the disk or the budget was full",
            registry=r,
        )
        self.digest_mismatches = Counter(
            "pullthrough_digest_mismatches_total",
            "Downloads discarded because their bytes did not match the digest",
            ["kind", "upstream"],
            registry=r,
        )

    def prepare(self, upstreams: list[str]) -> None:
        """Export every per-upstream series at 0 from the start, so that `increase()` and
        the alert rules see the first event too."""
        for upstream in upstreams:
            for kind in ("manifest", "blob"):
                self.digest_mismatches.labels(kind, upstream)
            for kind in ("manifest", "blob", "tags", "referrers"):
                for result in get_args(LookupResult):
                    self.cache_requests.labels(kind, upstream, result)
            for error in ("unreachable", "server_error", "rate_limited", "bad_response"):
                self.upstream_errors.labels(upstream, error)
            self.upstream_bytes.labels(upstream)
            self.upstream_offline.labels(upstream)
        for reason in ("size", "ttl"):
            self.evictions.labels(reason)
            self.evicted_bytes.labels(reason)
        for source in ("cache", "upstream"):
            self.served_bytes.labels(source)

    def watch_cache(self, cache: Cache) -> None:
        """Read sizes off the cache at scrape time rather than tracking every change."""
        self.cache_bytes.set_function(lambda: cache.used)
        self.cache_blobs.set_function(lambda: cache.count)
        self.cache_max_bytes.set(cache.budget.max_size)
        self.fills_in_progress.set_function(lambda: cache.fills_in_progress)
        cache.on_disk_full = self.disk_full.inc

    def watch_breaker(self, breaker: CircuitBreaker) -> None:
        for state in STATES:
            self.breaker_state.labels(breaker.name, state).set_function(_is_state(breaker, state))

    def evicted(self, reason: str, blobs: int, size: int) -> None:
        self.evictions.labels(reason).inc(blobs)
        self.evicted_bytes.labels(reason).inc(size)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _is_state(breaker: CircuitBreaker, state: str) -> Callable[[], float]:
    return lambda: float(breaker.state == state)


def metrics_response(metrics: Metrics) -> web.Response:
    response = web.Response(body=metrics.render())
    response.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return response
