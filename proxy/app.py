"""The aiohttp application: routes, middleware, and the resources it owns.

Resources are created in `cleanup_ctx` order and closed in reverse: the sendfile threads,
the cache, then the upstream client, then the services with their background tasks. So
at shutdown the fills are cancelled first, then the HTTP session closes, then the index,
and the threads stop last.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Callable

import aiohttp
from aiohttp import web

from cache.eviction import Evictor
from cache.integrity import reconcile
from cache.store import Budget, Cache
from proxy import handlers
from proxy.blobs import UPSTREAM_CHUNK, BlobService
from proxy.client_auth import authenticator
from proxy.config import CacheConfig, Config
from proxy.errors import error_middleware
from proxy.file_sender import FileSender
from proxy.keys import (
    BLOBS,
    CACHE,
    CONFIG,
    EVICTOR,
    LISTINGS,
    MANIFESTS,
    METRICS,
    SENDER,
    SESSION,
    TASKS,
    UPSTREAM,
)
from proxy.listings import ListingService
from proxy.logs import quiet_protocol_errors
from proxy.manifests import ManifestService
from proxy.metrics import Metrics
from proxy.observe import add_request_id, observe_middleware
from proxy.reload import LiveConfig, Reloader
from proxy.tasks import BackgroundTasks
from proxy.tls import warn_insecure
from proxy.upstream import UpstreamClient
from proxy.upstream_auth import TokenCache
from proxy.warm import Warmer, skip_offline, warm_all

log = logging.getLogger("pullthrough")

NAME = r"{name:[^{}]+?}"


def make_app(
    config: Config, clock: Callable[[], float] = time.time, serving: bool = True
) -> web.Application:
    """The mirror for `config`. `clock` decides every TTL, so tests can move time.

    `serving` is False for CLI commands that borrow the services (`warm`): they must not
    clear tmp/ or start the background jobs that belong to the one serving process.
    """
    quiet_protocol_errors()
    warn_insecure(config)
    metrics = Metrics()
    observe = observe_middleware(metrics, config.log.format == "json", config.trusted_proxies)
    middlewares = [observe, error_middleware]
    logins = authenticator(config.auth)
    if logins is not None:
        middlewares.append(logins.middleware(protect_metrics=config.auth.metrics))
    app = web.Application(middlewares=middlewares)
    app[CONFIG] = LiveConfig(config)
    app[METRICS] = metrics
    metrics.prepare([upstream.name for upstream in config.upstreams])
    app.on_response_prepare.append(_api_version_header)
    app.on_response_prepare.append(add_request_id)
    app[handlers.SHUTTING_DOWN] = asyncio.Event()
    if serving:
        app.on_shutdown.append(_shutting_down)
    app.cleanup_ctx.append(_sender)
    app.cleanup_ctx.append(lambda app: _cache(app, clock, serving))
    app.cleanup_ctx.append(lambda app: _upstream(app, clock))
    app.cleanup_ctx.append(lambda app: _services(app, clock, serving))
    _add_routes(app)
    return app


def reload_on_sighup(
    app: web.Application, path: str | os.PathLike[str], level_override: str | None = None
) -> None:
    """`serve`: on SIGHUP, reload the config file `path` (`proxy.reload`)."""

    async def handle_sighup(app: web.Application) -> AsyncIterator[None]:
        reloader = Reloader(app[CONFIG], path, app[METRICS], level_override)
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, reloader.reload)
        yield
        loop.remove_signal_handler(signal.SIGHUP)

    app.cleanup_ctx.append(handle_sighup)


def _add_routes(app: web.Application) -> None:
    """Each path is a resource named by its kind: the `route` label of the request metrics."""

    def resource(path: str, kind: str) -> web.Resource:
        return app.router.add_resource(path, name=kind)

    resource("/metrics", "metrics").add_route("GET", handlers.metrics)
    resource("/healthz", "health").add_route("GET", handlers.healthz)
    resource("/readyz", "ready").add_route("GET", handlers.readyz)
    resource("/v2/", "ping").add_route("GET", handlers.ping)
    resource("/v2/_catalog", "catalog").add_route("GET", handlers.catalog)
    resource(f"/v2/{NAME}/blobs/uploads/{{rest:.*}}", "uploads").add_route(
        "*", handlers.unsupported
    )
    for kind, path, handler in (
        ("manifest", f"/v2/{NAME}/manifests/{{reference}}", handlers.manifest),
        ("blob", f"/v2/{NAME}/blobs/{{digest}}", handlers.blob),
    ):
        reads_only = resource(path, kind)
        for method in ("GET", "HEAD"):
            reads_only.add_route(method, handler)
        # Writes are matched explicitly so that they get UNSUPPORTED, not 404.
        for method in ("PUT", "POST", "PATCH", "DELETE"):
            reads_only.add_route(method, handlers.unsupported)
    resource(f"/v2/{NAME}/tags/list", "tags").add_route("GET", handlers.tags)
    resource(f"/v2/{NAME}/referrers/{{digest}}", "referrers").add_route("GET", handlers.referrers)


async def _shutting_down(app: web.Application) -> None:
    """on_shutdown: the first hook aiohttp runs once it has closed the listening sockets
    and asked every connection to close after its current response."""
    app[handlers.SHUTTING_DOWN].set()
    grace = app[CONFIG].current.shutdown_grace
    log.info("shutting down: /readyz answers 503; responses in flight get %gs to finish", grace)


async def _api_version_header(request: web.Request, response: web.StreamResponse) -> None:
    if request.path.startswith("/v2"):
        response.headers["Docker-Distribution-API-Version"] = "registry/2.0"


def new_cache(settings: CacheConfig, clock: Callable[[], float] = time.time) -> Cache:
    """The cache a config describes (not yet opened)."""
    budget = Budget(settings.max_size, settings.high_watermark, settings.low_watermark)
    return Cache(settings.path, budget, clock=clock)


async def _sender(app: web.Application) -> AsyncIterator[None]:
    sender = FileSender()
    app[SENDER] = sender
    yield
    await asyncio.to_thread(sender.close)  # waits for the bursts in flight, each short


async def _cache(
    app: web.Application, clock: Callable[[], float], serving: bool
) -> AsyncIterator[None]:
    settings = app[CONFIG].current.cache
    cache = new_cache(settings, clock)
    await cache.open(clear_debris=serving)
    app[CACHE] = cache
    metrics = app[METRICS]
    metrics.watch_cache(cache)
    app[EVICTOR] = Evictor(cache, settings.blob_ttl, clock, on_evict=metrics.evicted)
    yield
    await cache.close()


async def _upstream(app: web.Application, clock: Callable[[], float]) -> AsyncIterator[None]:
    connections = app[CONFIG].current.upstream_connections
    session = aiohttp.ClientSession(
        auto_decompress=False,
        # Bytes must arrive as upstream stored them, or their digests won't match.
        headers={"Accept-Encoding": "identity", "User-Agent": "pullthrough/0.1"},
        # With the default 64 KiB, aiohttp pauses and resumes the upstream socket every
        # 128 KiB; a buffer the size of our reads lets them fill without that churn.
        read_bufsize=UPSTREAM_CHUNK,
        # The pool caps connections per upstream host (a CDN a blob redirects to is its own
        # host), so one busy upstream can't take every socket.
        connector=aiohttp.TCPConnector(limit=0, limit_per_host=connections),
    )
    app[SESSION] = session
    client = UpstreamClient(
        session, app[METRICS], TokenCache(), clock=clock, connections=connections
    )
    for upstream in app[CONFIG].current.upstreams:
        client.breaker(upstream)  # so every upstream's state is exported from the start
    app[UPSTREAM] = client
    yield
    await session.close()


async def _services(
    app: web.Application, clock: Callable[[], float], serving: bool
) -> AsyncIterator[None]:
    tasks = BackgroundTasks()
    app[TASKS] = tasks
    app[MANIFESTS] = ManifestService(app[CACHE], app[UPSTREAM], app[METRICS], clock)
    app[BLOBS] = BlobService(app[CACHE], app[EVICTOR], app[UPSTREAM], tasks, app[METRICS])
    if serving:
        tasks.spawn(reconcile(app[CACHE]), name="reconcile")
        tasks.spawn(app[CACHE].index_subjects(), name="index-subjects")
        tasks.spawn(app[EVICTOR].run_forever(), name="evictor")
        config = app[CONFIG].current
        warm = skip_offline(config, config.warm)
        if warm:
            warmer = Warmer(config, app[MANIFESTS], app[BLOBS])
            tasks.spawn(warm_all(warmer, warm), name="warm")
    blob_ttl = app[
        CONFIG
    ].current.cache.blob_ttl  # how long listings upstream no longer renews stay
    app[LISTINGS] = ListingService(app[CACHE], app[UPSTREAM], app[MANIFESTS], blob_ttl, clock)
    yield
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(5):
            await app[CACHE].finish_commits()
    await tasks.close()
