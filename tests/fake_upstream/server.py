"""A fake upstream container registry that misbehaves on request.

Usage::

    async with FakeUpstream(auth="ghcr") as up:
        digest = up.add_blob("library/alpine", b"layer bytes")
        up.set_fault(digest, Fault(reset_after=3, times=1))
        ...  # point the proxy at up.url, pull, then:
        assert up.count("GET", f"/v2/library/alpine/blobs/{digest}") == 2

It speaks just enough of the OCI distribution spec (read side) for a
pull-through proxy, and records every request it receives.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field

from aiohttp import web

from .auth import Authenticator, AuthMode
from .cdn import FakeCdn
from .faults import Fault, FaultTable
from .records import RecordedRequest, TokenGrant
from .serving import (
    LoopbackServer,
    endless,
    error_response,
    fault_status_response,
    hang,
    serve_bytes,
)

__all__ = [
    "FakeCdn",
    "FakeUpstream",
    "Fault",
    "PushedImage",
    "RecordedRequest",
    "TokenGrant",
    "sha256_digest",
]

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"

_DIGEST_RE = re.compile(r"^[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]+$")
# Greedy names: "a/manifests/b/manifests/x" -> name "a/manifests/b", ref "x".
_ROUTES = [
    ("tags", re.compile(r"^(?P<name>.+)/tags/list$")),
    ("manifests", re.compile(r"^(?P<name>.+)/manifests/(?P<ref>[^/]+)$")),
    ("blobs", re.compile(r"^(?P<name>.+)/blobs/(?P<ref>[^/]+)$")),
    ("referrers", re.compile(r"^(?P<name>.+)/referrers/(?P<ref>[^/]+)$")),
]
_SELF_REDIRECT_PREFIX = "/_redirected/blobs/"


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def is_digest(reference: str) -> bool:
    return bool(_DIGEST_RE.match(reference))


@dataclass
class _Repository:
    blobs: dict[str, bytes] = field(default_factory=dict)
    manifests: dict[str, tuple[bytes, str]] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    referrers: dict[str, list[dict[str, object]]] = field(default_factory=dict)


@dataclass(frozen=True)
class PushedImage:
    """Digests of an image created by :meth:`FakeUpstream.add_image`."""

    name: str
    tag: str
    manifest_digest: str
    manifest: bytes
    config_digest: str
    layer_digests: tuple[str, ...]


class FakeUpstream(LoopbackServer):
    """Fake OCI registry on 127.0.0.1 with auth flavours and fault injection.

    Args:
        auth: None, "ghcr", "quay", "dockerhub" or "basic" (see ``auth.py``).
        credentials: (user, password).  Required for "basic"; for bearer
            modes it makes the token endpoint demand these Basic credentials
            (anonymous tokens are refused).
        token_expires_in: ``expires_in`` reported (and enforced) in
            "dockerhub" mode.
        tags_page_size: if set, ``tags/list`` never returns more than this
            many tags per page, even if the client asked for more or did not
            pass ``n`` (as some registries do).

    Faults are keyed by digest, manifest tag or exact path; see
    :class:`~tests.fake_upstream.faults.Fault`.  ``cdn`` is the second
    server that ``Fault(redirect=...)`` sends blob downloads to.
    """

    def __init__(
        self,
        *,
        auth: AuthMode | None = None,
        credentials: tuple[str, str] | None = None,
        token_expires_in: int = 300,
        tags_page_size: int | None = None,
    ) -> None:
        super().__init__()
        self.auth = Authenticator(auth, credentials, token_expires_in)
        self.tags_page_size = tags_page_size
        self.requests: list[RecordedRequest] = []
        self.token_requests: list[RecordedRequest] = []
        self.faults = FaultTable()
        self._repos: dict[str, _Repository] = {}
        # digest -> bytes across all repos, for the CDN / self redirects.
        self._content: dict[str, bytes] = {}
        self.cdn = FakeCdn(self._content.get)

    # ------------------------------------------------------------------
    # Lifecycle

    async def start(self) -> None:
        await super().start()
        try:
            await self.cdn.start()
        except BaseException:
            await super().close()
            raise

    async def close(self) -> None:
        # Release parked handlers on both servers before waiting on either.
        self.cdn.closing.set()
        await super().close()
        await self.cdn.close()

    # ------------------------------------------------------------------
    # Content

    def _repo(self, name: str) -> _Repository:
        return self._repos.setdefault(name, _Repository())

    def add_blob(self, name: str, data: bytes, *, digest: str | None = None) -> str:
        """Store a blob in repository ``name``; returns its digest.

        Pass ``digest`` to serve ``data`` under a digest it doesn't match.
        """
        digest = digest or sha256_digest(data)
        self._repo(name).blobs[digest] = data
        self._content[digest] = data
        return digest

    def add_manifest(
        self,
        name: str,
        reference: str,
        data: bytes,
        media_type: str,
        *,
        digest: str | None = None,
    ) -> str:
        """Store a manifest, served by digest and (if ``reference`` is a tag)
        by tag; returns its digest.

        If the manifest has a ``subject``, it is listed by the referrers API.
        """
        if digest is None:
            digest = reference if is_digest(reference) else sha256_digest(data)
        repo = self._repo(name)
        repo.manifests[digest] = (data, media_type)
        self._content[digest] = data
        if not is_digest(reference):
            repo.tags[reference] = digest
        self._index_referrer(name, digest, data, media_type)
        return digest

    def add_referrer(self, name: str, subject: str, descriptor: dict[str, object]) -> None:
        """List ``descriptor`` as a referrer of ``subject`` in ``name``."""
        listed = self._repo(name).referrers.setdefault(subject, [])
        if descriptor not in listed:
            listed.append(descriptor)

    def _index_referrer(self, name: str, digest: str, data: bytes, media_type: str) -> None:
        try:
            manifest = json.loads(data)
        except ValueError:
            return
        if not isinstance(manifest, dict) or not isinstance(manifest.get("subject"), dict):
            return
        subject = manifest["subject"].get("digest")
        if not isinstance(subject, str):
            return
        descriptor: dict[str, object] = {
            "mediaType": media_type,
            "digest": digest,
            "size": len(data),
        }
        config = manifest.get("config")
        artifact_type = manifest.get("artifactType") or (
            config.get("mediaType") if isinstance(config, dict) else None
        )
        if artifact_type:
            descriptor["artifactType"] = artifact_type
        if manifest.get("annotations"):
            descriptor["annotations"] = manifest["annotations"]
        self.add_referrer(name, subject, descriptor)

    def add_image(
        self,
        name: str,
        tag: str,
        layers: list[bytes] | tuple[bytes, ...] = (b"layer",),
        *,
        config: bytes = b'{"architecture":"amd64","os":"linux"}',
    ) -> PushedImage:
        """Convenience: store config + layers + an OCI image manifest."""
        config_digest = self.add_blob(name, config)
        layer_digests = tuple(self.add_blob(name, layer) for layer in layers)
        manifest = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config)},
            "layers": [
                {"mediaType": OCI_LAYER, "digest": d, "size": len(layer)}
                for d, layer in zip(layer_digests, layers, strict=True)
            ],
        }
        data = json.dumps(manifest, separators=(",", ":")).encode()
        digest = self.add_manifest(name, tag, data, OCI_MANIFEST)
        return PushedImage(name, tag, digest, data, config_digest, layer_digests)

    # ------------------------------------------------------------------
    # Faults, tokens, records

    def set_fault(self, key: str, fault: Fault) -> Fault:
        """Replace the faults on ``key`` (digest, tag or "/path") with one."""
        return self.faults.set(key, _check_key(key, fault))

    def add_fault(self, key: str, fault: Fault) -> Fault:
        """Queue ``fault`` on ``key`` behind faults already there."""
        return self.faults.add(key, _check_key(key, fault))

    def clear_faults(self) -> None:
        self.faults.clear()
        self.cdn.faults.clear()

    def revoke_tokens(self) -> None:
        """Invalidate every token issued so far (their next use gets 401)."""
        self.auth.revoke()

    @property
    def token_grants(self) -> list[TokenGrant]:
        """Every token issued, in order, with its scopes and username."""
        return self.auth.grants

    def count(self, method: str, path: str) -> int:
        """How many ``method`` requests for exactly ``path`` were received."""
        return sum(1 for r in self.requests if r.method == method.upper() and r.path == path)

    def clear(self) -> None:
        """Forget recorded requests (registry, token endpoint and CDN)."""
        self.requests.clear()
        self.token_requests.clear()
        self.cdn.requests.clear()

    # ------------------------------------------------------------------
    # Request handling

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        record = RecordedRequest.from_request(request)
        self.requests.append(record)
        path = request.path
        token_path = self.auth.token_path
        if path == token_path:
            self.token_requests.append(record)

        # Path-keyed faults fire before anything else, auth included.
        fault = self.faults.take([path], request.method)
        if fault is not None:
            early = await self._response_fault(request, fault, digest=None)
            if early is not None:
                return early

        if path == token_path:
            return self.auth.issue(request)
        if request.method not in ("GET", "HEAD"):
            return error_response(405, "UNSUPPORTED", "this fake registry is read-only")
        if path.startswith(_SELF_REDIRECT_PREFIX):
            return self._serve_redirected(request, path[len(_SELF_REDIRECT_PREFIX) :])
        if path in ("/v2", "/v2/"):
            denied = self.auth.authorize(request, None, self.url)
            return denied or web.json_response(
                {}, headers={"Docker-Distribution-API-Version": "registry/2.0"}
            )
        if path.startswith("/v2/"):
            for kind, pattern in _ROUTES:
                match = pattern.match(path[len("/v2/") :])
                if match:
                    name, ref = match.group("name"), match.groupdict().get("ref") or ""
                    denied = self.auth.authorize(request, name, self.url)
                    if denied is not None:
                        return denied
                    if kind == "tags":
                        return self._handle_tags(request, name)
                    if kind == "referrers":
                        return self._handle_referrers(request, name, ref)
                    if kind == "manifests":
                        return await self._handle_manifests(request, name, ref)
                    return await self._handle_blobs(request, name, ref)
        return error_response(404, "NAME_UNKNOWN", f"no route for {path}")

    async def _response_fault(
        self, request: web.Request, fault: Fault, digest: str | None
    ) -> web.StreamResponse | None:
        """Apply a status/hang/redirect fault; None if it is a body fault."""
        if fault.status is not None:
            return fault_status_response(fault)
        if fault.hang:
            return await hang(request, self.closing)
        if fault.endless:
            return await endless(request, self.closing)
        if fault.redirect is not None and fault.redirect_location is not None:
            headers = {"Location": fault.redirect_location}
            return web.Response(status=fault.redirect, headers=headers)
        if fault.redirect is not None and digest is not None:
            if fault.redirect_to == "cdn":
                location = self.cdn.location_for(digest)
            else:
                location = f"{self.url}{_SELF_REDIRECT_PREFIX}{digest}"
            return web.Response(status=fault.redirect, headers={"Location": location})
        return None

    async def _handle_manifests(
        self, request: web.Request, name: str, ref: str
    ) -> web.StreamResponse:
        repo = self._repos.get(name)
        digest = ref if is_digest(ref) else (repo.tags.get(ref) if repo else None)
        if repo is None or digest is None or digest not in repo.manifests:
            return error_response(404, "MANIFEST_UNKNOWN", f"manifest unknown: {name}:{ref}")
        data, media_type = repo.manifests[digest]
        fault = self.faults.take(list(dict.fromkeys([ref, digest])), request.method)
        if fault is not None:
            early = await self._response_fault(request, fault, digest)
            if early is not None:
                return early
        headers = {"Content-Type": media_type, "Docker-Content-Digest": digest}
        return await serve_bytes(
            request, data, headers=headers, fault=fault, closing=self.closing, ranges=False
        )

    async def _handle_blobs(self, request: web.Request, name: str, ref: str) -> web.StreamResponse:
        repo = self._repos.get(name)
        if repo is None or ref not in repo.blobs:
            return error_response(404, "BLOB_UNKNOWN", f"blob unknown: {name}@{ref}")
        fault = self.faults.take([ref], request.method)
        if fault is not None:
            early = await self._response_fault(request, fault, ref)
            if early is not None:
                return early
        headers = {"Content-Type": "application/octet-stream", "Docker-Content-Digest": ref}
        return await serve_bytes(
            request, repo.blobs[ref], headers=headers, fault=fault, closing=self.closing
        )

    def _serve_redirected(self, request: web.Request, digest: str) -> web.Response:
        # The same-host redirect target: plain bytes, no auth, no faults
        # beyond path-keyed ones (which already ran in _dispatch).
        data = self._content.get(digest)
        if data is None:
            return error_response(404, "BLOB_UNKNOWN", f"blob unknown: {digest}")
        return web.Response(body=data, headers={"Content-Type": "application/octet-stream"})

    def _handle_tags(self, request: web.Request, name: str) -> web.Response:
        repo = self._repos.get(name)
        if repo is None:
            return error_response(404, "NAME_UNKNOWN", f"repository name not known: {name}")
        tags = sorted(repo.tags)
        last = request.query.get("last")
        if last:
            tags = [t for t in tags if t > last]
        limit: int | None = None
        if "n" in request.query:
            try:
                limit = int(request.query["n"])
            except ValueError:
                limit = -1
            if limit < 0:
                return error_response(400, "PAGINATION_NUMBER_INVALID", "invalid n")
        if self.tags_page_size is not None:
            limit = self.tags_page_size if limit is None else min(limit, self.tags_page_size)
        page = tags if limit is None else tags[:limit]
        headers = {}
        if len(page) < len(tags) and page:
            headers["Link"] = f'</v2/{name}/tags/list?n={limit}&last={page[-1]}>; rel="next"'
        return web.json_response({"name": name, "tags": page}, headers=headers)

    def _handle_referrers(self, request: web.Request, name: str, ref: str) -> web.Response:
        if not is_digest(ref):
            return error_response(400, "DIGEST_INVALID", f"invalid digest {ref!r}")
        repo = self._repos.get(name)
        # The spec forbids 404 here: unknown subjects have an empty index.
        descriptors = list(repo.referrers.get(ref, [])) if repo else []
        headers = {"Content-Type": OCI_INDEX}
        artifact_type = request.query.get("artifactType")
        if artifact_type:
            descriptors = [d for d in descriptors if d.get("artifactType") == artifact_type]
            headers["OCI-Filters-Applied"] = "artifactType"
        body = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": descriptors}
        return web.Response(body=json.dumps(body).encode(), headers=headers)


def _check_key(key: str, fault: Fault) -> Fault:
    if key.startswith("/") and (fault.has_body_fault or fault.redirect is not None):
        raise ValueError("path-keyed faults support only status= and hang=")
    return fault
