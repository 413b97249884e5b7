"""Upstream credentials from a Docker credential helper (`upstreams[].credential_helper`).

The protocol is Docker's: run `docker-credential-<name> get` (found on PATH), write the
server URL and a newline on its stdin, and read `{"ServerURL", "Username", "Secret"}` from
its stdout. A helper with nothing to give exits non-zero ("credentials not found in
native keychain"). A `Username` of `<token>` means `Secret` is an identity token (an
OAuth2 refresh token), not a password.

The server URL is the host the credentials are sent to, as `docker login HOST` stores it:
the host and port of the upstream's `url` (not its `name`, which is only what clients
ask for), or `https://index.docker.io/v1/` when that host is Docker Hub's.

Answers are kept for the upstream's `credential_lifetime`; concurrent requests share one
run. The helper's stderr is never read into the logs, and what it answers stays in a
`Secret`: a helper that fails says which helper failed, never what it printed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from yarl import URL

from proxy.coalesce import Expiring
from proxy.config import Secret, UpstreamConfig
from proxy.errors import Unauthorized, UpstreamUnavailable

log = logging.getLogger("pullthrough.credentials")

HELPER_TIMEOUT = 10.0  # seconds a helper may take before it is killed
IDENTITY_TOKEN_USER = "<token>"  # Docker's marker: Secret is a refresh token
DOCKER_HUB_SERVER = "https://index.docker.io/v1/"  # the key Docker keeps Hub logins under
DOCKER_HUB_HOSTS = ("registry-1.docker.io", "index.docker.io", "docker.io")


@dataclass(frozen=True, slots=True)
class Credentials:
    """What a helper answered: a username and password, or an identity token."""

    username: str
    secret: Secret

    @property
    def identity_token(self) -> bool:
        return self.username == IDENTITY_TOKEN_USER


def server_url(upstream: UpstreamConfig) -> str:
    """What the helper is asked about: the host we log in to, the way Docker asks."""
    url = URL(upstream.url)
    host = f"{url.host}:{url.explicit_port}" if url.explicit_port else str(url.host)
    return DOCKER_HUB_SERVER if host in DOCKER_HUB_HOSTS else host


class CredentialHelpers:
    """Each upstream's helper answer, kept for its `credential_lifetime`."""

    def __init__(
        self, clock: Callable[[], float] = time.monotonic, timeout: float = HELPER_TIMEOUT
    ) -> None:
        self.timeout = timeout
        # By UpstreamConfig.access: a reload that changes the helper or the URL (what it
        # is asked about) starts afresh.
        self._answers: Expiring[Credentials] = Expiring(clock)

    async def get(self, upstream: UpstreamConfig) -> Credentials | None:
        """The upstream's credentials: None without a helper; raises if its helper fails."""
        helper = upstream.credential_helper
        if helper is None:
            return None

        async def run() -> tuple[Credentials, float]:
            answer = await run_helper(helper, server_url(upstream), self.timeout)
            return answer, upstream.credential_lifetime

        return await self._answers.get_or_fetch(upstream.access, run)

    def kept(self, upstream: UpstreamConfig) -> Credentials | None:
        """The answer kept for `upstream`, if it has not expired."""
        return self._answers.get(upstream.access)

    def refused(self, upstream: UpstreamConfig, answer: Credentials) -> None:
        """Upstream refused `answer`: the next `get` runs the helper again. An answer
        already replaced by a newer run is left alone, so that many requests refused at
        once cost one run, not one each."""
        self._answers.drop(upstream.access, answer)


async def run_helper(name: str, server: str, limit: float) -> Credentials:
    """Run `docker-credential-<name> get` for `server`, killed after `limit` seconds."""
    program = f"docker-credential-{name}"
    try:
        process = await asyncio.create_subprocess_exec(
            program,
            "get",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,  # may hold anything, secrets included
        )
    except OSError as exc:
        raise UpstreamUnavailable(
            f"credential helper {program} cannot run: {exc.strerror}"
        ) from None
    try:
        async with asyncio.timeout(limit):
            stdout, _ = await process.communicate(f"{server}\n".encode())
    except TimeoutError:
        raise UpstreamUnavailable(
            f"credential helper {program} gave no answer within {limit:g}s"
        ) from None
    finally:
        if process.returncode is None:  # timed out or cancelled: don't leave it running
            process.kill()
            await process.wait()
    if process.returncode != 0:
        log.warning("credential helper %s exited with status %d", program, process.returncode)
        raise Unauthorized(f"credential helper {program} has no credentials for {server}")
    return _parse_answer(program, stdout)


def _parse_answer(program: str, stdout: bytes) -> Credentials:
    try:
        data: Any = json.loads(stdout)
        username, secret = data["Username"], data["Secret"]
    except (ValueError, TypeError, KeyError):
        username = secret = None
    if not isinstance(username, str) or not isinstance(secret, str) or not secret:
        raise UpstreamUnavailable(f"credential helper {program} answered no usable credentials")
    return Credentials(username, Secret(secret))
