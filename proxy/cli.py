"""The `pullthrough` command."""

from __future__ import annotations

import argparse
import logging
import sys

from aiohttp import web

from proxy.app import make_app
from proxy.config import ConfigError, load_config

EXIT_USAGE = 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pullthrough", description="A registry mirror.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve the mirror")
    serve.add_argument("--config", default="mirror.yaml", help="config file (./mirror.yaml)")
    serve.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING"])
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"pullthrough: {exc}", file=sys.stderr)
        return EXIT_USAGE
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    web.run_app(
        make_app(config),
        host=config.listen_host,
        port=config.listen_port,
        print=lambda msg: logging.getLogger("pullthrough").info(msg.strip()),
    )
    return 0
