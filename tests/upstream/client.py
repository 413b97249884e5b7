"""A tiny synchronous registry API client for pushing test content upstream.

Plain ``http.client`` so the bytes on the wire are exactly ours (stable digests)
and nothing is left unclosed (tests run with ``-W error``).
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO
from urllib.parse import urlencode, urlsplit

from tests.upstream.registry import RegistryProcess
from tests.upstream.token_server import TokenServer

OCTET_STREAM = "application/octet-stream"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Blob:
    """A content-addressed blob: small ones hold ``data``, big ones live at ``path``."""

    digest: str
    size: int
    media_type: str = OCTET_STREAM
    data: bytes | None = field(default=None, repr=False)
    path: Path | None = None

    @classmethod
    def from_bytes(cls, data: bytes, media_type: str = OCTET_STREAM) -> Blob:
        return cls("sha256:" + hashlib.sha256(data).hexdigest(), len(data), media_type, data=data)

    @classmethod
    def from_path(cls, path: Path, media_type: str = OCTET_STREAM) -> Blob:
        h = hashlib.sha256()
        size = 0
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
                size += len(chunk)
        return cls("sha256:" + h.hexdigest(), size, media_type, path=path)

    def read_bytes(self) -> bytes:
        if self.data is not None:
            return self.data
        assert self.path is not None
        return self.path.read_bytes()

    def descriptor(self) -> dict[str, object]:
        """The OCI/Docker descriptor for use inside a manifest."""
        return {"mediaType": self.media_type, "size": self.size, "digest": self.digest}


@dataclass(frozen=True)
class Response:
    status: int
    headers: dict[str, str]  # lower-cased names
    body: bytes

    def json(self) -> object:
        return json.loads(self.body)


class UpstreamClient:
    """Talks to one :class:`RegistryProcess`, authenticating via its token server.

    ``token_server=None`` means "the registry's own" (``registry.token_server``),
    which is None for a no-auth registry.  Tokens are fetched with Basic
    ``credentials`` (the pusher) and cached per repository for this client.
    """

    def __init__(
        self,
        registry: RegistryProcess,
        token_server: TokenServer | None = None,
        credentials: tuple[str, str] | None = ("pusher", "pushpass"),
    ) -> None:
        self.registry = registry
        self.token_server = token_server if token_server is not None else registry.token_server
        self.credentials = credentials
        self._tokens: dict[str, str] = {}

    # -- low level -----------------------------------------------------------

    def token(self, repo: str, actions: str = "pull,push,delete") -> str | None:
        if self.token_server is None:
            return None
        key = f"{repo}:{actions}"
        if key not in self._tokens:
            query = urlencode(
                {"service": self.token_server.service, "scope": f"repository:{repo}:{actions}"}
            )
            headers = {}
            if self.credentials is not None:
                basic = base64.b64encode(":".join(self.credentials).encode()).decode()
                headers["Authorization"] = f"Basic {basic}"
            resp = http_request(
                "127.0.0.1", self.token_server.port, "GET", f"/token?{query}", headers
            )
            if resp.status != 200:
                raise RuntimeError(f"token request failed: {resp.status} {resp.body!r}")
            self._tokens[key] = str(json.loads(resp.body)["token"])
        return self._tokens[key]

    def request(
        self,
        method: str,
        target: str,
        repo: str,
        body: bytes | IO[bytes] | None = None,
        headers: dict[str, str] | None = None,
    ) -> Response:
        """One request to the registry; ``target`` is a path or an absolute URL on it."""
        url = urlsplit(target)
        path = url.path + (f"?{url.query}" if url.query else "")
        all_headers = dict(headers or {})
        token = self.token(repo)
        if token is not None:
            all_headers["Authorization"] = f"Bearer {token}"
        return http_request("127.0.0.1", self.registry.port, method, path, all_headers, body)

    # -- API -------------------------------------------------------------------

    def blob_exists(self, repo: str, digest: str) -> bool:
        return self.request("HEAD", f"/v2/{repo}/blobs/{digest}", repo).status == 200

    def push_blob(self, repo: str, blob: Blob) -> Blob:
        """Monolithic upload (POST then PUT with ``digest=``), skipped if already there."""
        if self.blob_exists(repo, blob.digest):
            return blob
        start = self.request("POST", f"/v2/{repo}/blobs/uploads/", repo)
        if start.status != 202:
            raise RuntimeError(f"upload start failed: {start.status} {start.body!r}")
        location = start.headers["location"]
        sep = "&" if "?" in location else "?"
        target = f"{location}{sep}{urlencode({'digest': blob.digest})}"
        headers = {"Content-Type": OCTET_STREAM, "Content-Length": str(blob.size)}
        if blob.data is not None:
            done = self.request("PUT", target, repo, blob.data, headers)
        else:
            assert blob.path is not None
            with open(blob.path, "rb") as f:  # streamed, never held in memory
                done = self.request("PUT", target, repo, f, headers)
        if done.status != 201:
            raise RuntimeError(f"upload of {blob.digest} failed: {done.status} {done.body!r}")
        return blob

    def push_manifest(self, repo: str, reference: str, manifest: bytes, media_type: str) -> str:
        """PUT the exact manifest bytes under a tag or digest; returns the digest."""
        resp = self.request(
            "PUT", f"/v2/{repo}/manifests/{reference}", repo, manifest, {"Content-Type": media_type}
        )
        if resp.status != 201:
            raise RuntimeError(
                f"manifest push {repo}:{reference} failed: {resp.status} {resp.body!r}"
            )
        digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
        assert resp.headers.get("docker-content-digest") == digest, resp.headers
        return digest

    def get_manifest(self, repo: str, reference: str, accept: str | list[str]) -> Response:
        accept_value = accept if isinstance(accept, str) else ", ".join(accept)
        return self.request(
            "GET", f"/v2/{repo}/manifests/{reference}", repo, headers={"Accept": accept_value}
        )

    def get_blob(self, repo: str, digest: str) -> Response:
        return self.request("GET", f"/v2/{repo}/blobs/{digest}", repo)

    def delete_manifest(self, repo: str, digest: str) -> Response:
        """Delete a manifest by digest (registry 2.8 cannot delete by tag); untags it too."""
        return self.request("DELETE", f"/v2/{repo}/manifests/{digest}", repo)


def http_request(
    host: str,
    port: int,
    method: str,
    path: str,
    headers: dict[str, str],
    body: bytes | IO[bytes] | None = None,
    timeout: float = 60,
) -> Response:
    """One request on a fresh connection, always closed; never raises for HTTP errors."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout, blocksize=_CHUNK)
    try:
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        return Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, data)
    finally:
        conn.close()


def push_blob(
    registry: RegistryProcess,
    token_server: TokenServer | None,
    repo: str,
    data_or_path: bytes | Path | Blob,
    media_type: str = OCTET_STREAM,
) -> Blob:
    """Push raw bytes, a file (streamed) or a :class:`Blob`; returns the Blob."""
    if isinstance(data_or_path, Blob):
        blob = data_or_path
    elif isinstance(data_or_path, Path):
        blob = Blob.from_path(data_or_path, media_type)
    else:
        blob = Blob.from_bytes(data_or_path, media_type)
    return UpstreamClient(registry, token_server).push_blob(repo, blob)


def push_manifest(
    registry: RegistryProcess,
    token_server: TokenServer | None,
    repo: str,
    reference: str,
    manifest: bytes,
    media_type: str,
) -> str:
    """Push exact manifest bytes under ``reference`` (tag or digest); returns its digest."""
    return UpstreamClient(registry, token_server).push_manifest(
        repo, reference, manifest, media_type
    )
