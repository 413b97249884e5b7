"""Errors a client can see, each with its OCI `code` and HTTP `status`.

    RegistryError                      500 UNKNOWN
    ├── NameInvalid                    400 NAME_INVALID
    ├── TagInvalid                     400 TAG_INVALID
    ├── DigestInvalid                  400 DIGEST_INVALID
    ├── RangeNotSatisfiable            416 RANGE_INVALID
    ├── Unauthorized                   401 UNAUTHORIZED
    ├── Denied                         403 DENIED
    ├── NameUnknown                    404 NAME_UNKNOWN
    ├── ManifestUnknown                404 MANIFEST_UNKNOWN
    ├── BlobUnknown                    404 BLOB_UNKNOWN
    ├── RouteUnknown                   404 NOT_FOUND
    ├── Unsupported                    405 UNSUPPORTED
    ├── ManifestTooLarge               502 MANIFEST_INVALID
    ├── UpstreamFailed                 (upstream gave no answer: a cached one may stand in)
    │   ├── UpstreamUnavailable        503 UNAVAILABLE
    │   │   ├── UpstreamServerError    503 UNAVAILABLE (upstream answered 5xx)
    │   │   └── UpstreamOffline        503 UNAVAILABLE (`offline: true`: never asked)
    │   ├── UpstreamRateLimited        429 TOOMANYREQUESTS
    │   └── UpstreamBadResponse        502 UNKNOWN

One middleware (`error_middleware`) renders every error, including aiohttp's own and any
unexpected exception, as `{"errors":[{"code","message","detail"}]}`. Never a traceback.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

log = logging.getLogger("pullthrough.errors")


class RegistryError(Exception):
    status: int = 500
    code: str = "UNKNOWN"
    default_message: str = "internal error"

    def __init__(
        self,
        message: str | None = None,
        detail: Any = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.message = message or self.default_message
        super().__init__(self.message)
        self.detail = detail
        self.headers = headers or {}

    def envelope(self) -> dict[str, Any]:
        return {"errors": [{"code": self.code, "message": self.message, "detail": self.detail}]}


class NameInvalid(RegistryError):
    status, code, default_message = 400, "NAME_INVALID", "invalid repository name"


class TagInvalid(RegistryError):
    status, code, default_message = 400, "TAG_INVALID", "invalid tag"


class DigestInvalid(RegistryError):
    status, code, default_message = 400, "DIGEST_INVALID", "invalid digest"


class RangeNotSatisfiable(RegistryError):
    status, code, default_message = 416, "RANGE_INVALID", "requested range not satisfiable"


class Unauthorized(RegistryError):
    status, code, default_message = 401, "UNAUTHORIZED", "authentication required"


class Denied(RegistryError):
    status, code, default_message = 403, "DENIED", "requested access to the resource is denied"


class NameUnknown(RegistryError):
    status, code, default_message = 404, "NAME_UNKNOWN", "repository name not known to registry"


class ManifestUnknown(RegistryError):
    status, code, default_message = 404, "MANIFEST_UNKNOWN", "manifest unknown"


class BlobUnknown(RegistryError):
    status, code, default_message = 404, "BLOB_UNKNOWN", "blob unknown to registry"


class RouteUnknown(RegistryError):
    status, code, default_message = 404, "NOT_FOUND", "no such endpoint"


class Unsupported(RegistryError):
    status, code, default_message = 405, "UNSUPPORTED", "this mirror is read-only"


class ManifestTooLarge(RegistryError):
    status, code, default_message = 502, "MANIFEST_INVALID", "upstream manifest is too large"


class UpstreamFailed(RegistryError):
    """Upstream could not give an answer (as opposed to answering "no such thing")."""

    status, code, default_message = 503, "UNAVAILABLE", "upstream registry is unavailable"


class UpstreamUnavailable(UpstreamFailed):
    pass


class UpstreamServerError(UpstreamUnavailable):
    pass


class UpstreamOffline(UpstreamUnavailable):
    """The upstream is configured `offline: true`, so it was not asked at all. A kind of
    unavailable, so that every stale-if-error path serves what the cache has; but no
    failure of upstream's: it moves no breaker and counts no upstream error."""


class UpstreamRateLimited(UpstreamFailed):
    status, code, default_message = 429, "TOOMANYREQUESTS", "upstream registry rate limit reached"


class UpstreamBadResponse(UpstreamFailed):
    status, code, default_message = 502, "UNKNOWN", "upstream registry sent an invalid response"


def error_response(error: RegistryError) -> web.Response:
    # For HEAD, aiohttp sends the headers (Content-Length included) and drops the body.
    return web.Response(
        status=error.status,
        body=json.dumps(error.envelope()).encode(),
        content_type="application/json",
        headers=error.headers,
    )


def _from_http_exception(exc: web.HTTPException) -> RegistryError:
    if exc.status == 405:
        return Unsupported(f"method not allowed: {exc.reason}")
    if exc.status == 404:
        return RouteUnknown()
    error = RegistryError(exc.reason)
    error.status = exc.status
    error.code = "UNKNOWN" if exc.status >= 500 else "UNSUPPORTED"
    return error


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except RegistryError as exc:
        return error_response(exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error_response(_from_http_exception(exc))
    except ConnectionResetError:
        raise  # the client went away mid-response: nothing to answer, nothing to log
    except Exception:
        log.exception("unexpected error on %s %s", request.method, request.rel_url.path)
        return error_response(RegistryError())
