"""Streaming a blob to a client, from a committed file or a fill in progress.

Over plain HTTP every span of a blob file, committed or still growing, goes out from
the app's `FileSender` threads (figures in `proxy.file_sender`), which read it in bursts, so
8 clients following one fill cost no buffers beyond a burst's. Small spans, over TLS
all spans, are read with pread on the loop; pass-through bytes held in memory are
written as they are.

A client that takes no bytes for `client_timeout` is cut off, wherever the response is:
otherwise a client that stops reading would hold its socket, a file and a dup of the
socket (and, on a pass-through download, memory) for as long as it likes.
"""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from cache.errors import FillFailed
from cache.fill import read_span, spans
from cache.store import OpenBlob
from proxy.keys import CONFIG, SENDER
from proxy.observe import BODY_BYTES
from proxy.ranges import parse_range
from proxy.stall import unsent, while_taking

log = logging.getLogger("pullthrough.responses")

# Spans up to this size are read and written on the event loop: handing them to a
# sender thread costs more than copying them (a config blob; the last byte of a fill,
# held back until it verifies). Measured in tests/bench/README.md.
INLINE_SPAN = 64 << 10


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
    except TimeoutError:
        log.info("cutting off %s: the client took nothing for its timeout", request.rel_url.path)
        _cut(request, response)
        return response
    except FillFailed as exc:
        # The download went bad after we began answering: cut the connection, so that the
        # client can't take a short or wrong body for a whole one.
        log.warning("aborting %s: %s", request.rel_url.path, exc)
        _cut(request, response)
        return response
    await response.write_eof()
    return response


def _cut(request: web.Request, response: web.StreamResponse) -> None:
    if request.transport is not None:
        request.transport.abort()
    response.force_close()


async def _send(
    request: web.Request, response: web.StreamResponse, blob: OpenBlob, start: int, stop: int
) -> None:
    transport = request.transport
    plain = isinstance(transport, asyncio.Transport) and not transport.get_extra_info("sslcontext")
    socket = (
        transport if plain else None
    )  # over TLS, writing to the socket would bypass the encryption
    sender = request.app[SENDER]
    stall = request.app[CONFIG].current.client_timeout

    async def write(data: bytes) -> None:
        await while_taking(response.write(data), lambda: unsent(transport), stall)
        request[BODY_BYTES] += len(data)

    async for part in spans(start, stop, blob.fill, blob.reader):
        if isinstance(part, bytes):
            await write(part)
        elif socket is not None and part[1] > INLINE_SPAN:
            request[BODY_BYTES] += await sender.send(socket, blob.fd, part, stall)
        else:
            for data in read_span(blob.fd, part):
                await write(data)
