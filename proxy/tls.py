"""TLS: the listener's certificate, and how each upstream's certificate is checked."""

from __future__ import annotations

import logging
import ssl

from proxy.config import Config, UpstreamConfig

log = logging.getLogger("pullthrough.tls")


def server_context(config: Config) -> ssl.SSLContext | None:
    if config.tls.cert is None or config.tls.key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(config.tls.cert, config.tls.key)
    return context


def upstream_ssl(upstream: UpstreamConfig) -> ssl.SSLContext | bool:
    """What aiohttp's `ssl=` gets: verification on (True), a CA bundle, or off (False)."""
    if upstream.insecure:
        return False
    if upstream.ca_bundle is not None:
        return ssl.create_default_context(cafile=str(upstream.ca_bundle))
    return True


def warn_insecure(config: Config) -> None:
    for upstream in config.upstreams:
        if upstream.insecure:
            log.warning(
                "TLS verification is OFF for upstream %s (insecure: true): anyone on the path"
                " can serve it content",
                upstream.name,
            )
