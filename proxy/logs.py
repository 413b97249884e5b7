"""Logging set-up: text lines, or one JSON object per line (`log.format: json`)."""

from __future__ import annotations

import json
import logging
import time

from aiohttp.http_exceptions import HttpProcessingError

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


class JsonLines(logging.Formatter):
    """Access-log records are JSON already (see proxy.observe); others are wrapped."""

    def format(self, record: logging.LogRecord) -> str:
        if record.name == "pullthrough.access":
            return record.getMessage()
        fields = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            fields["exception"] = self.formatException(record.exc_info)
        return json.dumps(fields)


class QuietProtocolErrors(logging.Filter):
    """aiohttp answers a malformed request with 400 itself, then logs the parser's
    exception at ERROR with a traceback: any client could flood the log that way. Such
    records become one INFO line; real server errors pass untouched."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, HttpProcessingError | ConnectionResetError):
            first_line = (str(error).strip().splitlines() or [""])[0]
            record.msg, record.args = (
                "rejected a request: %s %s",
                (type(error).__name__, first_line),
            )
            record.exc_info, record.exc_text = None, None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


def quiet_protocol_errors() -> None:
    server_log = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, QuietProtocolErrors) for f in server_log.filters):
        server_log.addFilter(QuietProtocolErrors())


def configure(level: str, json_lines: bool) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonLines() if json_lines else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
