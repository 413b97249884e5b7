"""Registry auth flavours, shaped after what real registries send.

The differences matter to a client, which is the point of faking them:

========== ============================ ================ ====================
mode       challenge realm/service      scope in         token JSON
                                        challenge?
========== ============================ ================ ====================
ghcr       <url>/token, ghcr.io         yes (not /v2/)   {"token"}
quay       <url>/v2/auth, quay.io       never            {"token"}
dockerhub  <url>/token,                 yes (not /v2/)   {"token",
           registry.docker.io                            "access_token",
                                                         "expires_in",
                                                         "issued_at"}
basic      Basic realm="fake"           n/a              n/a
========== ============================ ================ ====================
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import secrets
from datetime import UTC, datetime
from typing import Literal

from aiohttp import web

from .records import TokenGrant
from .serving import error_response

AuthMode = Literal["ghcr", "quay", "dockerhub", "basic"]

_BEARER = {
    # mode: (token endpoint path, service, scope in challenge)
    "ghcr": ("/token", "ghcr.io", True),
    "quay": ("/v2/auth", "quay.io", False),
    "dockerhub": ("/token", "registry.docker.io", True),
}


def parse_scope(scope: str) -> set[tuple[str, str, str]]:
    """``repository:a/b:pull,push`` -> {(repository, a/b, pull), ...}."""
    parts = scope.split(":")
    if len(parts) < 3:
        return set()
    kind, name, actions = parts[0], ":".join(parts[1:-1]), parts[-1]
    return {(kind, name, action) for action in actions.split(",") if action}


class Authenticator:
    """Checks requests against one auth mode and runs its token endpoint."""

    def __init__(
        self,
        mode: AuthMode | None,
        credentials: tuple[str, str] | None,
        token_expires_in: int,
    ) -> None:
        if mode not in (None, "basic", *_BEARER):
            raise ValueError(f"unknown auth mode {mode!r}")
        if mode == "basic" and credentials is None:
            raise ValueError("auth='basic' needs credentials=(user, password)")
        self.mode = mode
        self.credentials = credentials
        self.token_expires_in = token_expires_in
        self.grants: list[TokenGrant] = []  # every token ever issued
        self._live: dict[str, TokenGrant] = {}  # token -> grant, until revoked

    @property
    def token_path(self) -> str | None:
        return _BEARER[self.mode][0] if self.mode in _BEARER else None

    @property
    def service(self) -> str | None:
        return _BEARER[self.mode][1] if self.mode in _BEARER else None

    def revoke(self) -> None:
        self._live.clear()

    # ------------------------------------------------------------------
    # Protected endpoints

    def challenge(self, base_url: str, repository: str | None) -> str:
        if self.mode == "basic":
            return 'Basic realm="fake"'
        token_path, service, with_scope = _BEARER[self.mode]  # type: ignore[index]
        value = f'Bearer realm="{base_url}{token_path}",service="{service}"'
        if with_scope and repository is not None:
            value += f',scope="repository:{repository}:pull"'
        return value

    def authorize(
        self, request: web.BaseRequest, repository: str | None, base_url: str
    ) -> web.Response | None:
        """None if the request may proceed, else the 401 to send.

        ``repository`` is None for ``/v2/`` itself, where any valid
        credential will do.
        """
        if self.mode is None:
            return None
        header = request.headers.get("Authorization", "")
        if self.mode == "basic":
            if self._basic_ok(header):
                return None
        else:
            grant = self._live.get(_bearer_token(header) or "")
            if (
                grant is not None
                and not self._expired(grant)
                and (repository is None or grant.allows(repository, "pull"))
            ):
                return None
        return error_response(
            401,
            "UNAUTHORIZED",
            "authentication required",
            {"WWW-Authenticate": self.challenge(base_url, repository)},
        )

    def _basic_ok(self, header: str) -> bool:
        return parse_basic(header) == self.credentials

    @staticmethod
    def _expired(grant: TokenGrant) -> bool:
        if grant.expires_at is None:
            return False
        return asyncio.get_running_loop().time() >= grant.expires_at

    # ------------------------------------------------------------------
    # Token endpoint

    def issue(self, request: web.BaseRequest) -> web.Response:
        """Handle ``GET <token_path>?service=..&scope=..``."""
        if request.method != "GET":
            return error_response(405, "UNSUPPORTED", "token endpoint is GET only")
        service = request.query.get("service")
        if service is not None and service != self.service:
            # A real auth server would not mint a usable token for another
            # service; fail loudly so a client bug shows up.
            return error_response(400, "DENIED", f"unknown service {service!r}")

        username: str | None = None
        header = request.headers.get("Authorization")
        if header:
            presented = parse_basic(header)
            if presented is None:
                return self._bad_credentials()
            if self.credentials is not None and presented != self.credentials:
                return self._bad_credentials()
            username = presented[0]
        elif self.credentials is not None:
            return self._bad_credentials()

        # Docker allows repeated scope= params; some clients space-join them.
        scopes = tuple(s for param in request.query.getall("scope", []) for s in param.split() if s)
        triples: set[tuple[str, str, str]] = set()
        for scope in scopes:
            triples |= parse_scope(scope)

        expires_at = None
        if self.mode == "dockerhub":
            expires_at = asyncio.get_running_loop().time() + self.token_expires_in
        grant = TokenGrant(
            token=secrets.token_urlsafe(24),
            scopes=scopes,
            service=service,
            username=username,
            expires_at=expires_at,
            grants=frozenset(triples),
        )
        self.grants.append(grant)
        self._live[grant.token] = grant

        body: dict[str, object] = {"token": grant.token}
        if self.mode == "dockerhub":
            issued_at = datetime.now(UTC).isoformat().replace("+00:00", "Z")
            body.update(
                access_token=grant.token,
                expires_in=self.token_expires_in,
                issued_at=issued_at,
            )
        return web.Response(body=json.dumps(body).encode(), content_type="application/json")

    def _bad_credentials(self) -> web.Response:
        return web.Response(
            status=401,
            body=json.dumps({"details": "incorrect username or password"}).encode(),
            content_type="application/json",
            headers={"WWW-Authenticate": 'Basic realm="fake token service"'},
        )


def _bearer_token(header: str) -> str | None:
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def parse_basic(header: str) -> tuple[str, str] | None:
    """``Basic <b64(user:pass)>`` -> (user, pass); None if malformed.

    Hand-rolled because aiohttp 3.14 deprecates ``BasicAuth`` (and its
    ``decode``), and pytest runs with warnings as errors.
    """
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, sep, password = decoded.partition(":")
    return (user, password) if sep else None
