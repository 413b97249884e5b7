"""A Docker-Hub-like bearer token server for distribution's ``auth: token``.

The registry never talks to this server: it only verifies the JWTs we sign
against the certificate we hand it via ``rootcertbundle``.  Clients (the
proxy, skopeo, the test pusher) follow the registry's
``WWW-Authenticate: Bearer realm=...,service=...,scope=...`` challenge here.
"""

from __future__ import annotations

import base64
import datetime
import json
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

DEFAULT_USERS: dict[str, str] = {"pusher": "pushpass"}


def b64url(data: bytes) -> str:
    """JWT flavour of base64: urlsafe alphabet, no padding."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


@dataclass(frozen=True)
class Scope:
    """One parsed ``type:name:actions`` scope, e.g. ``repository:library/x:pull,push``."""

    type: str
    name: str
    actions: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> Scope | None:
        # The name may itself contain ':' (e.g. a host:port prefix), so the type
        # is everything before the first ':' and the actions after the last one.
        first, last = text.find(":"), text.rfind(":")
        if first < 0 or first == last:
            return None
        actions = tuple(a for a in text[last + 1 :].split(",") if a)
        return cls(text[:first], text[first + 1 : last], actions)


@dataclass(frozen=True)
class TokenRequest:
    """What the token server saw for one request (recorded for assertions)."""

    method: str
    path: str
    params: dict[str, list[str]]
    had_authorization: bool
    username: str | None
    status: int
    scopes: tuple[str, ...] = field(default=())
    time: float = field(default_factory=time.time)


class _Server(ThreadingHTTPServer):
    # The default backlog of 5 drops connections when many clients burst at once.
    request_queue_size = 128
    daemon_threads = True
    token_server: TokenServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients hanging up mid-response are expected in tests; stay quiet.
        pass


class _Handler(BaseHTTPRequestHandler):
    # HTTP/1.0: one request per connection, so that once stop() returns no
    # lingering keep-alive connection can still be answered.
    protocol_version = "HTTP/1.0"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        if url.path != "/token":
            self._send(404, {"errors": [{"code": "NOT_FOUND", "message": "not found"}]})
            return
        self.server.token_server._handle(self, "GET", url.path, parse_qs(url.query), oauth=False)

    def do_POST(self) -> None:
        url = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length).decode("utf-8", "replace")
        if url.path != "/token":
            self._send(404, {"errors": [{"code": "NOT_FOUND", "message": "not found"}]})
            return
        self.server.token_server._handle(self, "POST", url.path, parse_qs(body), oauth=True)

    def _send(
        self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None
    ) -> None:
        raw = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(raw)


class TokenServer:
    """Issues RS256 JWTs that distribution 2.8's ``auth: token`` accepts.

    - Anonymous ``GET /token`` gets ``pull`` on every requested repository
      (unless ``require_auth`` or the repo is in ``private_repos``).
    - Basic credentials from ``users`` get every requested action; wrong ones get 401.
    - ``POST /token`` (OAuth2 form) is supported too: ``grant_type=password``, and
      ``grant_type=refresh_token`` for the refresh tokens in ``refresh_tokens``
      (token -> user), the identity tokens a credential helper hands out.
    - Every request is recorded in ``requests`` (thread-safe) for assertions.

    Knobs meant to be flipped by tests at run time: ``require_auth``, ``users``,
    ``refresh_tokens``, ``private_repos``, ``expires_in``, ``claim_lifetime`` (JWT ``exp`` offset,
    independent of the advertised ``expires_in``; negative makes the registry
    reject the token) and ``fail_status`` (answer every request with it).
    """

    def __init__(
        self,
        users: dict[str, str] | None = None,
        *,
        require_auth: bool = False,
        expires_in: int = 300,
        service: str = "pullthrough-test-registry",
        issuer: str = "pullthrough-test-issuer",
        workdir: Path | None = None,
    ) -> None:
        self._defaults = (dict(DEFAULT_USERS if users is None else users), require_auth, expires_in)
        self.users: dict[str, str] = {}
        self.refresh_tokens: dict[str, str] = {}
        self.require_auth = require_auth
        self.expires_in = expires_in
        self.claim_lifetime: int | None = None
        self.fail_status: int | None = None
        self.private_repos: set[str] = set()
        self.reset()
        self.service = service
        self.issuer = issuer
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="pullthrough-token-")
            workdir = Path(self._tmp.name)
        workdir.mkdir(parents=True, exist_ok=True)
        self.cert_path = workdir / "token-cert.pem"
        self._key, self._cert_der = self._make_key_and_cert()
        self._lock = threading.Lock()
        self._requests: list[TokenRequest] = []
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    def reset(self) -> None:
        """Put every run-time knob back to its constructor value (recorded requests are kept)."""
        users, self.require_auth, self.expires_in = self._defaults
        self.users = dict(users)
        self.refresh_tokens = {}
        self.claim_lifetime = None
        self.fail_status = None
        self.private_repos = set()

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> TokenServer:
        if self._server is not None:
            return self
        # Re-use the port across stop()/start() so a registry's realm stays valid.
        server = _Server(("127.0.0.1", self.port), _Handler)
        server.token_server = self
        self.port = server.server_address[1]
        self._server = server
        # A short poll interval makes stop() (shutdown()) return quickly.
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"token-server-{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join(timeout=5)

    def close(self) -> None:
        """stop() and remove the temporary directory holding the certificate."""
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> TokenServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def running(self) -> bool:
        return self._server is not None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def realm(self) -> str:
        return self.url + "/token"

    # -- recorded requests -------------------------------------------------

    @property
    def requests(self) -> list[TokenRequest]:
        """A snapshot copy of all recorded token requests."""
        with self._lock:
            return list(self._requests)

    def clear_requests(self) -> None:
        with self._lock:
            self._requests.clear()

    def count(self, scope_contains: str | None = None) -> int:
        """How many token requests were recorded (with a scope containing ``scope_contains``)."""
        return sum(
            1
            for r in self.requests
            if scope_contains is None or any(scope_contains in s for s in r.scopes)
        )

    # -- tokens ------------------------------------------------------------

    def issue_token(
        self, access: list[dict[str, Any]], subject: str = "", lifetime: int | None = None
    ) -> str:
        """Sign a JWT granting ``access`` (list of {type, name, actions})."""
        now = int(time.time())
        life = self.expires_in if lifetime is None else lifetime
        header = {
            "typ": "JWT",
            "alg": "RS256",
            "x5c": [base64.b64encode(self._cert_der).decode("ascii")],
        }
        claims = {
            "iss": self.issuer,
            "sub": subject,
            "aud": self.service,
            "exp": now + life,
            # Back-date nbf/iat a little: the registry checks nbf with leeway,
            # but a fresh token must never look "not yet valid".
            "nbf": now - 10,
            "iat": now - 10,
            "jti": uuid.uuid4().hex,
            "access": access,
        }
        signing_input = (
            f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}"
        )
        signature = self._key.sign(
            signing_input.encode("ascii"), padding.PKCS1v15(), hashes.SHA256()
        )
        return f"{signing_input}.{b64url(signature)}"

    def _make_key_and_cert(self) -> tuple[rsa.RSAPrivateKey, bytes]:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pullthrough test token signer")])
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256())
        )
        self.cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return key, cert.public_bytes(serialization.Encoding.DER)

    # -- request handling (runs in server threads) --------------------------

    def _handle(
        self, h: _Handler, method: str, path: str, params: dict[str, list[str]], oauth: bool
    ) -> None:
        auth_header = h.headers.get("Authorization")
        scopes_raw = [s for value in params.get("scope", []) for s in value.split(" ") if s]
        username, status, body = self._decide(auth_header, params, scopes_raw, oauth)
        with self._lock:
            self._requests.append(
                TokenRequest(
                    method,
                    path,
                    params,
                    auth_header is not None,
                    username,
                    status,
                    tuple(scopes_raw),
                )
            )
        headers = {"WWW-Authenticate": f'Basic realm="{self.realm}"'} if status == 401 else None
        h._send(status, body, headers)

    def _decide(
        self,
        auth_header: str | None,
        params: dict[str, list[str]],
        scopes_raw: list[str],
        oauth: bool,
    ) -> tuple[str | None, int, dict[str, Any]]:
        if self.fail_status is not None:
            return None, self.fail_status, {"details": "injected failure"}
        username, password = self._credentials(auth_header, params, oauth)
        if oauth and (params.get("grant_type") or [""])[0] == "refresh_token":
            username = self.refresh_tokens.get((params.get("refresh_token") or [""])[0])
            if username is None:
                return None, 401, {"details": "invalid refresh token"}
        elif username is not None:
            if self.users.get(username) != password:
                return username, 401, {"details": "incorrect username or password"}
        elif self.require_auth:
            return None, 401, {"details": "authentication required"}
        service = (params.get("service") or [self.service])[0]
        if service != self.service:
            return username, 400, {"details": f"unknown service {service!r}"}
        access = [
            a for a in (self._grant(Scope.parse(s), username) for s in scopes_raw) if a is not None
        ]
        token = self.issue_token(access, subject=username or "", lifetime=self.claim_lifetime)
        issued_at = datetime.datetime.now(datetime.UTC).isoformat().replace("+00:00", "Z")
        body: dict[str, Any] = {
            "access_token": token,
            "expires_in": self.expires_in,
            "issued_at": issued_at,
        }
        if oauth:  # RFC 6749 fields of an OAuth2 token response
            body.update(token_type="Bearer", scope=" ".join(scopes_raw))
        else:
            body["token"] = token  # Docker Hub's GET answer carries both names
        return username, 200, body

    def _credentials(
        self, auth_header: str | None, params: dict[str, list[str]], oauth: bool
    ) -> tuple[str | None, str | None]:
        if auth_header and auth_header.lower().startswith("basic "):
            try:
                user, _, pw = base64.b64decode(auth_header[6:].strip()).decode().partition(":")
            except ValueError:
                return "", None  # undecodable: treated as wrong credentials
            return user, pw
        if oauth and (params.get("grant_type") or [""])[0] == "password":
            return (params.get("username") or [""])[0], (params.get("password") or [""])[0]
        return None, None

    def _grant(self, scope: Scope | None, username: str | None) -> dict[str, Any] | None:
        if scope is None:
            return None
        if username is not None:
            actions = list(scope.actions)  # an authenticated user may do anything asked
        elif (
            scope.type == "repository"
            and scope.name not in self.private_repos
            and "pull" in scope.actions
        ):
            actions = ["pull"]
        else:
            actions = []
        # Like Docker Hub, deny by issuing a token with empty actions rather than an error.
        return {"type": scope.type, "name": scope.name, "actions": actions}
