"""Client authentication: Basic auth against an htpasswd file of bcrypt entries.

Anonymous pulls are the default; with `auth.htpasswd` set, every `/v2/` request (and
`/metrics` with `auth.metrics`) needs a login, and `/v2/` answers the `Basic` challenge
that `docker login` and `podman login` expect. Health checks stay open.

bcrypt is slow on purpose (~0.1 s), and Docker sends credentials with every request, so a
successful check is remembered for a while by a digest of the credentials; the password
itself is never kept.
"""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import aiohttp
import bcrypt
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from cachetools import TTLCache

from proxy.config import AuthConfig, ConfigError
from proxy.errors import Unauthorized

VERIFIED_FOR = 300.0  # seconds a verified login is trusted without re-running bcrypt
_BCRYPT_PREFIXES = ("$2a$", "$2b$", "$2y$")


def load_htpasswd(path: Path) -> dict[str, bytes]:
    users: dict[str, bytes] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, hashed = line.partition(":")
        if not sep or not user or not hashed.startswith(_BCRYPT_PREFIXES):
            # Only bcrypt: htpasswd's MD5 and SHA1 formats are too weak to accept.
            raise ConfigError(f"auth.htpasswd line {number}", "must be user:bcrypt-hash")
        users[user] = hashed.encode()
    return users


class Authenticator:
    def __init__(self, users: dict[str, bytes], realm: str) -> None:
        self.users = users
        self.challenge = f'Basic realm="{realm}"'
        self._verified: TTLCache[bytes, str] = TTLCache(maxsize=1024, ttl=VERIFIED_FOR)

    async def user(self, header: str | None) -> str | None:
        """The user a `Basic` Authorization header logs in, or None."""
        credentials = _basic_credentials(header)
        if credentials is None:
            return None
        user, password = credentials
        key = hashlib.sha256(f"{user}\0{password}".encode()).digest()
        if self._verified.get(key) == user:
            return user
        hashed = self.users.get(user)
        if hashed is None:
            return None
        ok = await asyncio.to_thread(bcrypt.checkpw, password.encode(), hashed)
        if ok:
            self._verified[key] = user
        return user if ok else None

    def middleware(self, protect_metrics: bool) -> Middleware:
        @web.middleware
        async def require_login(request: web.Request, handler: Handler) -> web.StreamResponse:
            path = request.path
            guarded = path.startswith("/v2") or (protect_metrics and path == "/metrics")
            if guarded and await self.user(request.headers.get("Authorization")) is None:
                raise Unauthorized(
                    "log in to this mirror first", headers={"WWW-Authenticate": self.challenge}
                )
            return await handler(request)

        return require_login


def _basic_credentials(header: str | None) -> tuple[str, str] | None:
    if not header:
        return None
    # RFC 9110 allows more than one space after the scheme; BasicAuth.decode takes one.
    scheme, _, encoded = header.partition(" ")
    try:
        credentials = aiohttp.BasicAuth.decode(f"{scheme} {encoded.strip()}", encoding="utf-8")
    except ValueError:  # not Basic, not ASCII base64, not UTF-8, or no colon
        return None
    return credentials.login, credentials.password


def authenticator(config: AuthConfig) -> Authenticator | None:
    if config.htpasswd is None:
        return None
    return Authenticator(load_htpasswd(config.htpasswd), config.realm)
