"""Streaming a blob to a client, from a committed file or a fill in progress.

Measured here (tests/bench): a committed file goes out through the response in 1 MiB
views of a memory mapping (`cache.fill.map_span`), 0.9-1.3x nginx's sendfile and a
little ahead of blocking 1 MiB reads in parallel (figures there); asyncio's
`loop.sendfile` reached 0.97-1.03x but lost in sequence. A fill's file is still
growing and is never mapped: followers wait on it and are often slower than the
download, and `loop.sendfile` keeps their bytes in the kernel instead of in per-client
buffers (peak RSS 68 -> 52 MB with 8 clients). Over TLS a fill is read with pread, and
pass-through bytes held in memory are written as they are.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import BinaryIO

from aiohttp import web

from cache.errors import FillFailed
from cache.fill import map_span, read_span, spans
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
        await _send(request, response, blob, start, stop)
    except ConnectionError:
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


async def _send(
    request: web.Request, response: web.StreamResponse, blob: OpenBlob, start: int, stop: int
) -> None:
    loop = asyncio.get_running_loop()
    transport = request.transport
    zero_copy = transport is not None and transport.get_extra_info("sslcontext") is None
    # closefd=False: the OpenBlob owns the fd. asyncio seeks this file object, which is
    # harmless: the fill writer uses pwrite, and reads here are by offset.
    with os.fdopen(blob.fd, "rb", buffering=0, closefd=False) as file:
        async for part in spans(start, stop, blob.fill):
            if isinstance(part, bytes):
                await response.write(part)
                request[BODY_BYTES] += len(part)
            elif blob.fill is None:
                for view in map_span(blob.fd, part):
                    await response.write(view)
                    request[BODY_BYTES] += len(view)
            elif zero_copy and transport is not None:
                sent = await _sendfile(loop, transport, file, part)
                request[BODY_BYTES] += sent
                if sent < part[1]:
                    raise ConnectionResetError("the client stopped reading")
            else:
                for data in read_span(blob.fd, part):
                    await response.write(data)
                    request[BODY_BYTES] += len(data)


async def _sendfile(
    loop: asyncio.AbstractEventLoop,
    transport: asyncio.BaseTransport,
    file: BinaryIO,
    part: tuple[int, int],
) -> int:
    """loop.sendfile, where a client that already hung up is a ConnectionResetError like
    on every other write (asyncio says RuntimeError "Transport is closing")."""
    if transport.is_closing():
        raise ConnectionResetError("the client closed the connection")
    try:
        return await loop.sendfile(transport, file, part[0], part[1], fallback=False)  # type: ignore[arg-type]
    except RuntimeError:
        if transport.is_closing():
            raise ConnectionResetError("the client closed the connection") from None
        raise
