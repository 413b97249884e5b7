"""The `pullthrough` command.

    serve          run the mirror; SIGHUP reloads the config (proxy/reload.py)
    check-config   validate a config and print the effective one, secrets masked, and
                   which upstreams are offline
    warm IMAGE...  pre-fetch images through the same services as a pull
    stats          size, blob count, top repositories, hit ratio of a running server
    gc             one reconcile and eviction pass (TTL, then the size watermarks)
    evict --to N   evict least recently used content down to N bytes
    fsck           re-hash every cached blob; --repair removes the bad ones
    export IMAGE... -o FILE.tar|DIR   cached images as an OCI image layout
    import FILE.tar|DIR [--as IMAGE]  an OCI image layout's images into the cache

Exit status: 0 done, 1 problems found or work failed, 2 bad input.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import re
import signal
import sys
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from cache.errors import CacheError
from cache.eviction import Evictor
from cache.integrity import Report, fsck, reconcile
from cache.store import Cache
from proxy import logs
from proxy.app import make_app, new_cache, reload_on_sighup
from proxy.config import (
    Config,
    ConfigError,
    WarmEntry,
    effective,
    host_platform,
    load_config,
    parse_size,
)
from proxy.errors import RegistryError
from proxy.keys import BLOBS, MANIFESTS
from proxy.layout import LayoutError
from proxy.layout_export import Exporter
from proxy.layout_import import Importer
from proxy.progress import Progress, mb
from proxy.tls import server_context
from proxy.warm import Warmer, parse_image, warm_all

EXIT_PROBLEMS = 1
EXIT_USAGE = 2
PLATFORM = re.compile(r"[a-z0-9]+/[a-z0-9_]+(/[a-z0-9]+)?")


class UsageError(Exception):
    """Bad input on the command line: one line on stderr, exit status 2."""


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = load_config(args.config)
        logs.configure(args.log_level or config.log.level, config.log.format == "json")
        if args.command == "serve":
            return _serve(config, args.config, args.log_level)
        return asyncio.run(COMMANDS[args.command](config, args))
    except (ConfigError, UsageError) as exc:
        print(f"pullthrough: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pullthrough", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("serve", help="run the mirror")
    commands.add_parser("check-config", help="validate and print the effective config")
    warm = commands.add_parser("warm", help="pre-fetch images into the cache")
    warm.add_argument("images", nargs="+", metavar="IMAGE")
    warm.add_argument("--platform", action="append", default=[], metavar="OS/ARCH")
    warm.add_argument("--all-platforms", action="store_true")
    stats = commands.add_parser("stats", help="what the cache holds, and the hit ratio")
    stats.add_argument("--server", help="URL of the running mirror (default: from listen)")
    stats.add_argument("--top", type=int, default=10, help="repositories to list (10)")
    commands.add_parser("gc", help="one reconcile and eviction pass")
    evict = commands.add_parser("evict", help="evict least recently used content")
    evict.add_argument("--to", required=True, metavar="SIZE", help="e.g. 20GiB")
    check = commands.add_parser("fsck", help="re-hash every cached blob and report")
    check.add_argument("--repair", action="store_true", help="remove bad blobs and stale rows")
    export = commands.add_parser("export", help="write cached images as an OCI image layout")
    export.add_argument("images", nargs="+", metavar="IMAGE")
    export.add_argument("-o", "--output", required=True, type=Path, metavar="FILE.tar|DIR")
    export.add_argument("--platform", metavar="OS/ARCH[/VARIANT]", help="one platform's manifest")
    load = commands.add_parser("import", help="add an OCI image layout's images to the cache")
    load.add_argument("layout", type=Path, metavar="FILE.tar|DIR")
    load.add_argument("--as", dest="as_image", metavar="IMAGE", help="the image it stands for")
    for command in commands.choices.values():
        command.add_argument("--config", default="mirror.yaml", help="config file (./mirror.yaml)")
        command.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser


def _serve(config: Config, path: str, level_override: str | None) -> int:
    # Until the reload handler is installed, a SIGHUP (a `systemctl reload` racing the
    # start) must not kill the server, which is SIGHUP's default action.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    app = make_app(config)
    reload_on_sighup(app, path, level_override)
    # run_app stops accepting on SIGTERM, gives in-flight responses `shutdown_timeout`
    # to finish, and then runs cleanup: fills are cancelled and their temp files removed.
    web.run_app(
        app,
        host=config.listen_host,
        port=config.listen_port,
        shutdown_timeout=config.shutdown_grace,
        # aiohttp closes a connection with no complete request by this deadline: the
        # cut-off for idle clients and for slowloris (headers sent a byte at a time).
        keepalive_timeout=config.client_timeout,
        ssl_context=server_context(config),
        access_log=None,  # proxy.observe writes the access log
        print=lambda message: logging.getLogger("pullthrough").info(message.strip()),
    )
    return 0


async def _check_config(config: Config, args: argparse.Namespace) -> int:
    print(yaml.safe_dump(effective(config), sort_keys=False), end="")
    # A comment, so that the output stays a config that parses.
    for upstream in config.upstreams:
        state = "offline: never contacted" if upstream.offline else "online"
        print(f"# upstream {upstream.name}: {state}")
    return 0


async def _warm(config: Config, args: argparse.Namespace) -> int:
    platforms = None if args.all_platforms else frozenset(args.platform or [host_platform()])
    entries = [WarmEntry(image, platforms) for image in args.images]
    for entry in entries:
        try:
            parse_image(config, entry.image)
        except RegistryError as exc:
            raise UsageError(f"{entry.image}: {exc.message}") from None
    app = make_app(config, serving=False)
    runner = web.AppRunner(app)
    await runner.setup()  # opens the cache and the upstream session; no listening socket
    try:
        warmer = Warmer(config, app[MANIFESTS], app[BLOBS], Progress())
        failed = await warm_all(warmer, entries, report=print)
    finally:
        await runner.cleanup()
    return EXIT_PROBLEMS if failed else 0


@asynccontextmanager
async def _open_cache(config: Config, must_exist: bool = True) -> AsyncIterator[Cache]:
    if must_exist and not (config.cache.path / "index.db").exists():
        raise UsageError(f"no cache at {config.cache.path}")
    cache = new_cache(config.cache)
    await cache.open(clear_debris=False)  # a server may be running on this cache
    try:
        yield cache
    finally:
        await cache.close()


async def _stats(config: Config, args: argparse.Namespace) -> int:
    async with _open_cache(config) as cache:
        top = await cache.index.top_repositories(args.top)
        print(f"size:   {cache.used / 1e9:.2f} GB of {config.cache.max_size / 1e9:.2f} GB")
        print(f"blobs:  {cache.count}")
    print("top repositories by bytes:")
    for upstream, repo, size in top:
        print(f"  {size / 1e6:10.1f} MB  {upstream}/{repo}")
    host = "127.0.0.1" if config.listen_host in ("0.0.0.0", "::") else config.listen_host
    server = args.server or f"http://{host}:{config.listen_port}"
    print(f"hit ratio since start: {await _hit_ratio(server)}")
    return 0


async def _hit_ratio(server: str) -> str:
    try:
        timeout = aiohttp.ClientTimeout(total=5)
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.get(server.rstrip("/") + "/metrics") as response,
        ):
            text = await response.text()
    except (aiohttp.ClientError, TimeoutError):
        return f"unknown (no mirror answering at {server})"
    requests = hits = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "pullthrough_cache_requests_total":
                requests += sample.value
                hits += 0 if sample.labels.get("result") == "miss" else sample.value
    return f"{hits / requests:.1%} of {requests:.0f} lookups" if requests else "no lookups yet"


async def _gc(config: Config, args: argparse.Namespace) -> int:
    async with _open_cache(config) as cache:
        report = await reconcile(cache)
        removed = await Evictor(cache, config.cache.blob_ttl).run_once()
    print(
        f"dropped {len(report.missing)} rows without files, adopted {len(report.adopted)} files,"
        f" evicted {removed['ttl']} by ttl and {removed['size']} by size"
    )
    return 0


async def _evict(config: Config, args: argparse.Namespace) -> int:
    try:
        target = parse_size(args.to, "--to", allow_zero=True)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    async with _open_cache(config) as cache:
        before = cache.used
        evicted = await Evictor(cache, config.cache.blob_ttl).shrink_to(target, "manual")
        print(
            f"evicted {evicted} blobs, {(before - cache.used) / 1e6:.1f} MB; now {cache.used} bytes"
        )
    return 0


async def _fsck(config: Config, args: argparse.Namespace) -> int:
    async with _open_cache(config) as cache:
        report = await fsck(cache, repair=args.repair)
    _print_report(report, args.repair)
    return 0 if report.clean or args.repair else EXIT_PROBLEMS


def _print_report(report: Report, repair: bool) -> None:
    for digest in report.bad:
        print(f"BAD      {digest}  bytes do not match the digest")
    for digest in report.missing:
        print(f"MISSING  {digest}  indexed but not on disk")
    summary = (
        f"checked {report.checked} blobs: {len(report.bad)} bad, {len(report.missing)} missing"
    )
    if repair:
        summary += f"; removed {len(report.removed)}"
    print(summary)


async def _export(config: Config, args: argparse.Namespace) -> int:
    if args.platform is not None and not PLATFORM.fullmatch(args.platform):
        raise UsageError(f"--platform {args.platform}: expected OS/ARCH or OS/ARCH/VARIANT")
    async with _open_cache(config) as cache:
        try:
            plan = await Exporter(config, cache, args.platform).export(args.images, args.output)
        except (LayoutError, CacheError, OSError) as exc:
            return _failed("export", exc)
    print(
        f"exported {len(plan.entries)} images ({len(plan.manifests) + len(plan.blobs)} blobs,"
        f" {mb(plan.size)}) to {args.output}"
    )
    return 0


async def _import(config: Config, args: argparse.Namespace) -> int:
    try:
        # Made if missing: an air-gapped mirror starts empty.
        async with _open_cache(config, must_exist=False) as cache:
            imported = await Importer(config, cache).run(args.layout, args.as_image)
    except (LayoutError, CacheError, OSError) as exc:
        return _failed("import", exc)
    for image in imported.images:
        print(f"imported {image} ({image.entry.digest})")
    print(f"{imported.blobs} new blobs, {mb(imported.size)}")
    return 0


def _failed(command: str, exc: Exception) -> int:
    """One line on stderr; bad input exits 2, anything else (not cached, no room) 1."""
    print(f"pullthrough: {command}: {exc}", file=sys.stderr)
    return exc.status if isinstance(exc, LayoutError) else EXIT_PROBLEMS


COMMANDS: dict[str, Callable[[Config, argparse.Namespace], Coroutine[Any, Any, int]]] = {
    "check-config": _check_config,
    "warm": _warm,
    "stats": _stats,
    "gc": _gc,
    "evict": _evict,
    "fsck": _fsck,
    "export": _export,
    "import": _import,
}
