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

    def render(self) -> bytes:
        return generate_latest(self.registry)


def metrics_response(metrics: Metrics) -> web.Response:
    response = web.Response(body=metrics.render())
    response.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return response
