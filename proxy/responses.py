"""Streaming a blob to a client, from a committed file or a fill in progress."""

from __future__ import annotations

import logging

from aiohttp import web

from cache.errors import FillFailed
from cache.fill import read_range
from cache.store import OpenBlob
from proxy.observe import BODY_BYTES
from proxy.ranges import parse_range

log = logging.getLogger("pullthrough.responses")


async def send_blob(
    request: web.Request, blob: OpenBlob, headers: dict[str, str]
) -> web.StreamResponse:
    assert blob.size is not None
    span = parse_range(request.headers.get("Range"), blob.size)
    start, stop = span if span is not None else (0, blob.size)
    response = web.StreamResponse(status=206 if span else 200, headers=headers)
    response.content_type = "application/octet-stream"
    response.content_length = stop - start
    response.headers["Accept-Ranges"] = "bytes"
    if span is not None:
        response.headers["Content-Range"] = f"bytes {start}-{stop - 1}/{blob.size}"
    await response.prepare(request)
    request[BODY_BYTES] = 0
    try:
        async for chunk in read_range(blob.fd, start, stop, blob.fill):
            await response.write(chunk)
            request[BODY_BYTES] += len(chunk)
    except ConnectionResetError:
        return response  # the client hung up; a fill it started carries on regardless
    except FillFailed as exc:
        # The download went bad after we began answering: cut the connection, so that the
        # client can't take a short or wrong body for a whole one.
        log.warning("aborting %s: %s", request.rel_url.path, exc)
        if request.transport is not None:
            request.transport.abort()
        response.force_close()
        return response
    await response.write_eof()
    return response
