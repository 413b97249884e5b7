"""Plumbing shared by the fake registry and its fake CDN.

* :class:`LoopbackServer`: an aiohttp server on 127.0.0.1, ephemeral port,
  with every request routed to one ``_dispatch`` method (registry names may
  contain slashes, so the fakes parse paths themselves).
* :func:`serve_bytes`: sends a blob/manifest body, honouring ``Range`` and the
  body-level parts of a :class:`~tests.fake_upstream.faults.Fault`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import ssl
import struct
from typing import Any

from aiohttp import web

from .faults import Fault

# close() wakes every parked handler first, so this only bounds a bug.
SHUTDOWN_TIMEOUT = 2.0

OCI_ERROR_CODES = {
    401: "UNAUTHORIZED",
    403: "DENIED",
    404: "NOT_FOUND",
    429: "TOOMANYREQUESTS",
    503: "UNAVAILABLE",
}


class LoopbackServer:
    """An aiohttp server bound to 127.0.0.1 on a port chosen by the kernel.

    Subclasses implement ``_dispatch``.  ``closing`` is set at the start of
    :meth:`close`; handlers that park (hang, gate) wait on it so shutdown
    never has to wait for a test that forgot to open a gate.
    """

    def __init__(self) -> None:
        self.closing = asyncio.Event()
        self.ssl_context: ssl.SSLContext | None = None  # set before start() to serve https
        # Headers added to every response, e.g. Docker Hub's ratelimit-remaining.
        self.extra_headers: dict[str, str] = {}
        self._runner: web.AppRunner | None = None
        self._port: int | None = None

    async def start(self) -> None:
        if self._runner is not None or self.closing.is_set():
            raise RuntimeError(f"{type(self).__name__} can only be started once")
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        app.on_response_prepare.append(self._add_extra_headers)
        runner = web.AppRunner(
            app,
            access_log=None,
            handle_signals=False,
            shutdown_timeout=SHUTDOWN_TIMEOUT,
        )
        await runner.setup()
        try:
            site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=self.ssl_context)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self._port = runner.addresses[0][1]

    async def _add_extra_headers(self, request: web.Request, response: web.StreamResponse) -> None:
        response.headers.update(self.extra_headers)

    async def close(self) -> None:
        """Stop the server; parked handlers are released first.  Idempotent."""
        self.closing.set()
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> Any:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError(f"{type(self).__name__} is not started")
        return self._port

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT``, i.e. the registry host as used in image refs."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"{'https' if self.ssl_context else 'http'}://{self.host}"

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        raise NotImplementedError


# --------------------------------------------------------------------------
# Small response helpers


def error_response(
    status: int,
    code: str,
    message: str,
    headers: dict[str, str] | None = None,
) -> web.Response:
    """An OCI distribution-spec error response."""
    body = {"errors": [{"code": code, "message": message, "detail": None}]}
    return web.Response(
        status=status,
        body=json.dumps(body).encode(),
        content_type="application/json",
        headers=headers,
    )


def fault_status_response(fault: Fault) -> web.Response:
    assert fault.status is not None
    headers = {}
    if fault.retry_after is not None:
        headers["Retry-After"] = str(fault.retry_after)
    code = OCI_ERROR_CODES.get(fault.status, "UNKNOWN")
    return error_response(fault.status, code, f"injected fault: HTTP {fault.status}", headers)


async def hang(request: web.BaseRequest, closing: asyncio.Event) -> web.StreamResponse:
    """Never answer; when the server closes, drop the connection."""
    await closing.wait()
    drop_connection(request)
    # Nothing can be written any more; aiohttp swallows the write error.
    return web.Response()


def drop_connection(request: web.BaseRequest, *, hard: bool = False) -> None:
    """Close the client connection now.

    Soft: flush what was written, then FIN (client sees a premature EOF).
    Hard: SO_LINGER 0 + abort, so the kernel sends RST (ECONNRESET).
    """
    transport = request.transport
    if transport is None or transport.is_closing():
        return
    if hard:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()
    else:
        transport.close()


async def wait_gate(gate: asyncio.Event, closing: asyncio.Event) -> bool:
    """Wait until ``gate`` or ``closing`` is set; True if the gate opened."""
    if not gate.is_set() and not closing.is_set():
        waiters = [asyncio.ensure_future(gate.wait()), asyncio.ensure_future(closing.wait())]
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            # Reap both helpers so none is left pending at loop shutdown.
            for waiter in waiters:
                waiter.cancel()
            await asyncio.gather(*waiters, return_exceptions=True)
    return gate.is_set() and not closing.is_set()


async def sleep_unless_closing(delay: float, closing: asyncio.Event) -> bool:
    """Sleep ``delay`` seconds; return False early if the server is closing."""
    try:
        await asyncio.wait_for(closing.wait(), delay)
    except TimeoutError:
        return True
    return False


# --------------------------------------------------------------------------
# Range handling

_RANGE_RE = re.compile(r"^bytes=(\d*)-(\d*)$")


class RangeNotSatisfiable(Exception):
    pass


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """Parse a single ``bytes=`` range into ``(start, end_exclusive)``.

    Returns None (serve everything) for no header or forms we don't support,
    such as multiple ranges; a server may always ignore Range.
    """
    if not header:
        return None
    match = _RANGE_RE.match(header.strip())
    if not match or match.group(1) == match.group(2) == "":
        return None
    first, last = match.groups()
    if first == "":  # suffix range: the last N bytes
        length = int(last)
        if length == 0:
            raise RangeNotSatisfiable
        return max(0, size - length), size
    start = int(first)
    end = size if last == "" else min(int(last) + 1, size)
    if start >= size or end <= start:
        raise RangeNotSatisfiable
    return start, end


# --------------------------------------------------------------------------
# Body sending


def flip_middle_byte(data: bytes) -> bytes:
    if not data:
        return data
    i = len(data) // 2
    return data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1 :]


async def endless(request: web.BaseRequest, closing: asyncio.Event) -> web.StreamResponse:
    """200 and a chunked body that goes on until the client or the server gives up."""
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    response.enable_chunked_encoding()
    await response.prepare(request)
    chunk = b"\xab" * 65536
    with contextlib.suppress(ConnectionError):
        while not closing.is_set():
            await response.write(chunk)
            await asyncio.sleep(0)
    return response


async def serve_bytes(
    request: web.BaseRequest,
    data: bytes,
    *,
    headers: dict[str, str],
    fault: Fault | None,
    closing: asyncio.Event,
    ranges: bool = True,
) -> web.StreamResponse:
    """Answer a GET/HEAD with ``data`` (or a byte range of it).

    ``corrupt`` is applied to the whole object before slicing, like a bad
    object stored upstream; the other body faults act on what is sent.
    """
    if fault is not None and fault.corrupt:
        data = flip_middle_byte(data)
    headers = dict(headers)
    status = 200
    if ranges:
        headers["Accept-Ranges"] = "bytes"
        total = len(data)
        try:
            span = parse_range(request.headers.get("Range"), total)
        except RangeNotSatisfiable:
            return error_response(
                416,
                "RANGE_INVALID",
                "requested range not satisfiable",
                {"Content-Range": f"bytes */{total}"},
            )
        if span is not None:
            start, end = span
            data = data[start:end]
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{total}"

    if fault is None or not fault.has_body_fault:
        # web.Response sets Content-Length and omits the body for HEAD.
        return web.Response(status=status, body=data, headers=headers)
    return await _send_with_body_fault(request, data, status, headers, fault, closing)


async def _send_with_body_fault(
    request: web.BaseRequest,
    body: bytes,
    status: int,
    headers: dict[str, str],
    fault: Fault,
    closing: asyncio.Event,
) -> web.StreamResponse:
    declared = max(0, len(body) + fault.wrong_length)
    resp = web.StreamResponse(status=status, headers=headers)
    resp.content_length = declared
    breaks_connection = fault.reset_after is not None or fault.wrong_length != 0
    if breaks_connection:
        # Tell the client not to reuse the connection we are about to break.
        resp.force_close()
    # StreamResponse.prepare() sends the headers immediately.
    await resp.prepare(request)
    if request.method == "HEAD":
        await resp.write_eof()
        return resp

    limit = len(body) if fault.reset_after is None else min(fault.reset_after, len(body))
    sent = 0
    try:
        if fault.gate_after is not None:
            gate_at = min(fault.gate_after, limit)
            if not await _write(resp, body[:gate_at], fault, closing):
                drop_connection(request)
                return resp
            sent = gate_at
            fault.gate_reached.set()
            if not await wait_gate(fault.gate, closing):
                drop_connection(request)
                return resp
        if not await _write(resp, body[sent:limit], fault, closing):
            drop_connection(request)
            return resp
        if fault.reset_after is not None:
            drop_connection(request, hard=fault.hard_reset)
            return resp
        if fault.wrong_length < 0 and request.transport is not None:
            # aiohttp clips writes at the declared Content-Length; put the
            # surplus on the wire behind its back, as a buggy server would.
            request.transport.write(body[declared:])
        if fault.wrong_length != 0:
            drop_connection(request)
            return resp
    except ConnectionError:
        # The client went away mid-body; nothing more to do.
        drop_connection(request)
        return resp
    await resp.write_eof()
    return resp


async def _write(
    resp: web.StreamResponse, data: bytes, fault: Fault, closing: asyncio.Event
) -> bool:
    """Write ``data`` in ``fault.chunk_size`` pieces; False if closing."""
    step = fault.chunk_size or max(len(data), 1)
    for offset in range(0, len(data), step):
        if closing.is_set():
            return False
        await resp.write(data[offset : offset + step])
        if fault.delay > 0 and not await sleep_unless_closing(fault.delay, closing):
            return False
    return True
