"""A fake blob CDN, the target of the registry's blob redirects.

Real registries (Docker Hub, GHCR, Quay) answer blob GETs with a redirect to
pre-signed object-storage URLs.  Those URLs carry their own authorization in
the query string and must *not* receive the registry's ``Authorization``
header; this server records every request so tests can check that.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable

from aiohttp import web

from .faults import Fault, FaultTable
from .records import RecordedRequest
from .serving import LoopbackServer, error_response, fault_status_response, hang, serve_bytes

SIGNATURE_PARAM = "X-Amz-Signature"


class FakeCdn(LoopbackServer):
    """Serves ``GET/HEAD /blobs/<digest>?X-Amz-Signature=<sig>`` without auth.

    The signature must be one minted by :meth:`location_for`, so a client
    that mangles the redirect URL's query gets a 403 like it would from S3.
    Faults set here (:meth:`set_fault`) apply to the redirected download.
    """

    def __init__(self, lookup: Callable[[str], bytes | None]) -> None:
        super().__init__()
        self.requests: list[RecordedRequest] = []
        self.faults = FaultTable()
        self._lookup = lookup
        self._signatures: set[str] = set()

    @property
    def saw_authorization(self) -> bool:
        """True if any request to the CDN carried an Authorization header."""
        return any(r.authorization is not None for r in self.requests)

    def location_for(self, digest: str) -> str:
        signature = secrets.token_hex(16)
        self._signatures.add(signature)
        return f"{self.url}/blobs/{digest}?{SIGNATURE_PARAM}={signature}"

    def set_fault(self, key: str, fault: Fault) -> Fault:
        """Replace the faults for a digest (or a path) on the CDN."""
        return self.faults.set(key, _no_redirect(fault))

    def add_fault(self, key: str, fault: Fault) -> Fault:
        """Queue a fault for a digest (or a path) after existing ones."""
        return self.faults.add(key, _no_redirect(fault))

    def count(self, method: str, path: str) -> int:
        return sum(1 for r in self.requests if r.method == method.upper() and r.path == path)

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(RecordedRequest.from_request(request))
        if request.method not in ("GET", "HEAD"):
            return error_response(405, "UNSUPPORTED", "CDN is read-only")
        prefix = "/blobs/"
        if not request.path.startswith(prefix):
            return error_response(404, "NOT_FOUND", "no such object")
        digest = request.path[len(prefix) :]
        if request.query.get(SIGNATURE_PARAM) not in self._signatures:
            return error_response(403, "DENIED", "SignatureDoesNotMatch")
        data = self._lookup(digest)
        if data is None:
            return error_response(404, "NOT_FOUND", "no such object")

        fault = self.faults.take([request.path, digest], request.method)
        if fault is not None and fault.status is not None:
            return fault_status_response(fault)
        if fault is not None and fault.hang:
            return await hang(request, self.closing)
        headers = {"Content-Type": "application/octet-stream"}
        return await serve_bytes(request, data, headers=headers, fault=fault, closing=self.closing)


def _no_redirect(fault: Fault) -> Fault:
    if fault.redirect is not None:
        raise ValueError("the fake CDN does not redirect further")
    return fault
