"""How each upstream is reached: its TLS context, its timeouts, and the share of the
connection pool that blob downloads may hold.

The pool itself is the one `aiohttp.ClientSession`'s connector, capped per host at
`connections`; this module only decides who may wait on it.
"""

from __future__ import annotations

import asyncio
import ssl

import aiohttp

from proxy.config import UpstreamConfig
from proxy.tls import upstream_ssl

# Connections to each upstream kept for everything but blob downloads (manifests, tokens,
# HEADs, listings): a quarter of the pool, at least one and at most this many.
RESERVED_CONNECTIONS = 4


class UpstreamConnections:
    """Per-upstream connection settings, each built once on first use."""

    def __init__(self, connections: int = 32) -> None:
        self.connections = connections
        # By UpstreamConfig.access: a reload that changes ca_bundle or insecure builds anew.
        self._ssl_contexts: dict[tuple[object, ...], ssl.SSLContext | bool] = {}
        self._download_slots: dict[str, asyncio.Semaphore] = {}

    def ssl_context(self, upstream: UpstreamConfig) -> ssl.SSLContext | bool:
        if upstream.access not in self._ssl_contexts:
            self._ssl_contexts[upstream.access] = upstream_ssl(upstream)
        return self._ssl_contexts[upstream.access]

    def timeout(self, upstream: UpstreamConfig) -> aiohttp.ClientTimeout:
        return aiohttp.ClientTimeout(
            total=None, sock_connect=upstream.connect_timeout, sock_read=upstream.read_timeout
        )

    def download_slot(self, upstream: UpstreamConfig) -> asyncio.Semaphore:
        """Held for a whole blob download. Downloads get the pool less a reserve, so the
        other requests to this upstream never queue behind them (a download may stall for
        as long as its slowest client allows)."""
        if upstream.name not in self._download_slots:
            reserve = min(RESERVED_CONNECTIONS, self.connections // 4) or 1
            self._download_slots[upstream.name] = asyncio.Semaphore(
                max(1, self.connections - reserve)
            )
        return self._download_slots[upstream.name]
