"""The `pullthrough` command: `serve` and `fsck`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from aiohttp import web

from cache.integrity import Report, fsck
from cache.store import Budget, Cache
from proxy.app import make_app
from proxy.config import Config, ConfigError, load_config

EXIT_PROBLEMS = 1
EXIT_USAGE = 2


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"pullthrough: {exc}", file=sys.stderr)
        return EXIT_USAGE
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    if args.command == "fsck":
        return asyncio.run(_fsck(config, args.repair))
    web.run_app(
        make_app(config),
        host=config.listen_host,
        port=config.listen_port,
        print=lambda msg: logging.getLogger("pullthrough").info(msg.strip()),
    )
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pullthrough", description="A registry mirror.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve the mirror")
    check = commands.add_parser("fsck", help="re-hash every cached blob and report")
    check.add_argument("--repair", action="store_true", help="remove bad blobs and stale rows")
    for command in (serve, check):
        command.add_argument("--config", default="mirror.yaml", help="config file (./mirror.yaml)")
        command.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING"])
    return parser


async def _fsck(config: Config, repair: bool) -> int:
    if not (config.cache.path / "index.db").exists():
        print(f"pullthrough: no cache at {config.cache.path}", file=sys.stderr)
        return EXIT_USAGE
    cache = Cache(config.cache.path, Budget(config.cache.max_size))
    await cache.open(clear_debris=False)  # a server may be running on this cache
    try:
        report = await fsck(cache, repair=repair)
    finally:
        await cache.close()
    _print_report(report, repair)
    return 0 if report.clean or repair else EXIT_PROBLEMS


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
