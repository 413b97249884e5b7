"""Upstream credentials from a Docker credential helper: a real executable on PATH that
speaks Docker's protocol, rotating its answer on every run, against token services that
accept only the latest one."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from proxy.keys import UPSTREAM
from tests.fake_upstream.fixtures import MakeFakeUpstream
from tests.fake_upstream.server import FakeUpstream
from tests.mirror import MakeMirror, Mirror
from tests.secrets import SECRET
from tests.upstream.fixtures import UpstreamImages
from tests.upstream.registry import RegistryProcess
from tests.upstream.token_server import TokenServer

# Run N answers `{SECRET}-N`: each run rotates the credential. Every server URL asked
# about is appended to `asked`; the helper's stderr carries the secret, to show that
# nothing of it reaches the logs.
ROTATING = """\
import json, pathlib, sys
here = pathlib.Path(__file__).parent
runs = here / "runs"
n = int(runs.read_text()) + 1 if runs.exists() else 1
runs.write_text(str(n))
server = sys.stdin.readline().strip()
with open(here / "asked", "a") as asked:
    asked.write(server + "\\n")
print("debug: handing out {secret}-%d" % n, file=sys.stderr)
print(json.dumps({{"ServerURL": server, "Username": {user!r}, "Secret": "{secret}-%d" % n}}))
"""
NOT_FOUND = """\
import sys
print("{secret}", file=sys.stderr)
print("credentials not found in native keychain")
sys.exit(1)
"""
BAD_JSON = "print('{secret} is not JSON')\n"
HANGS = "import time\ntime.sleep(60)\n"


class Helper:
    """`docker-credential-<name>` written into a directory put first on PATH."""

    def __init__(self, directory: Path, name: str, source: str) -> None:
        self.directory = directory
        self.name = name
        path = directory / f"docker-credential-{name}"
        path.write_text(f"#!{sys.executable}\n" + source)
        path.chmod(0o755)

    @property
    def runs(self) -> int:
        runs = self.directory / "runs"
        return int(runs.read_text()) if runs.exists() else 0

    @property
    def asked(self) -> list[str]:
        return (self.directory / "asked").read_text().split()


@pytest.fixture
def helper_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = tmp_path / "bin"
    directory.mkdir()
    monkeypatch.setenv("PATH", f"{directory}{os.pathsep}{os.environ['PATH']}")
    return directory


def rotating(directory: Path, user: str) -> Helper:
    return Helper(directory, "rotating", ROTATING.format(user=user, secret=SECRET))


MakeReal = Callable[[str], Awaitable[tuple[Helper, Mirror]]]


@pytest.fixture
def make_real(
    pushed_images: UpstreamImages,
    token_registry: RegistryProcess,
    token_server: TokenServer,
    make_mirror: MakeMirror,
    helper_dir: Path,
) -> MakeReal:
    """Factory: the rotating helper answering as `user`, and a mirror of the real registry,
    whose token server refuses anonymous pulls from now on (the fixture resets it)."""

    async def make(user: str) -> tuple[Helper, Mirror]:
        helper = rotating(helper_dir, user)
        token_server.require_auth = True
        entry = {"name": "docker.io", "url": token_registry.url, "default": True}
        return helper, await make_mirror([{**entry, "credential_helper": helper.name}])

    return make


async def fake_mirror(make_mirror: MakeMirror, upstream: FakeUpstream, helper: str) -> Mirror:
    return await make_mirror(
        [{"name": "ghcr.io", "url": upstream.url, "credential_helper": helper}]
    )


MakeRotating = Callable[[str], Awaitable[tuple[Helper, FakeUpstream, Mirror]]]


@pytest.fixture
def make_rotating(
    make_fake_upstream: MakeFakeUpstream, make_mirror: MakeMirror, helper_dir: Path
) -> MakeRotating:
    """Factory: the rotating helper, a fake upstream (of an `auth` mode) that accepts the
    helper's first answer, and a mirror of it."""

    async def make(auth: str) -> tuple[Helper, FakeUpstream, Mirror]:
        helper = rotating(helper_dir, "robot")
        upstream = await make_fake_upstream(auth=auth, credentials=("robot", f"{SECRET}-1"))
        return helper, upstream, await fake_mirror(make_mirror, upstream, helper.name)

    return make


async def status_of(mirror: Mirror, path: str) -> tuple[int, str]:
    async with mirror.get(path) as response:
        body = await response.text()
        return response.status, body


async def test_a_rotated_password_runs_the_helper_again_once(
    make_real: MakeReal, token_registry: RegistryProcess, token_server: TokenServer
) -> None:
    helper, mirror = await make_real("robot")
    token_server.users = {**token_server.users, "robot": f"{SECRET}-1"}

    assert (await status_of(mirror, "/v2/multi/manifests/v1"))[0] == 200
    assert helper.runs == 1
    assert helper.asked == [token_registry.url.removeprefix("http://")]  # the host, as Docker

    # Rotated: the kept answer is refused by the token service, the helper runs once more.
    token_server.users["robot"] = f"{SECRET}-2"
    token_server.clear_requests()
    assert (await status_of(mirror, "/v2/ociindex/manifests/v1"))[0] == 200
    assert helper.runs == 2
    assert [(r.username, r.status, r.scopes) for r in token_server.requests] == [
        ("robot", 401, ("repository:library/ociindex:pull",)),
        ("robot", 200, ("repository:library/ociindex:pull",)),
    ]

    # Within its lifetime the answer is reused; after it, the helper is asked again.
    assert (await status_of(mirror, "/v2/dockerlist/manifests/v1"))[0] == 200
    assert helper.runs == 2
    token_server.users["robot"] = f"{SECRET}-3"
    mirror.clock.advance(mirror.config.upstreams[0].credential_lifetime + 1)
    token_server.clear_requests()
    assert (await status_of(mirror, "/v2/library/other/manifests/v1"))[0] == 404
    assert helper.runs == 3
    assert {(r.username, r.status) for r in token_server.requests} == {("robot", 200)}


async def test_an_identity_token_buys_tokens_with_the_oauth2_refresh_grant(
    make_real: MakeReal, token_server: TokenServer
) -> None:
    helper, mirror = await make_real("<token>")
    token_server.refresh_tokens = {f"{SECRET}-1": "robot"}

    assert (await status_of(mirror, "/v2/multi/manifests/v1"))[0] == 200
    fetched = [r for r in token_server.requests if r.status == 200]
    assert fetched and all(r.method == "POST" for r in fetched)
    assert fetched[0].params["grant_type"] == ["refresh_token"]

    token_server.refresh_tokens = {f"{SECRET}-2": "robot"}  # the old one is revoked
    assert (await status_of(mirror, "/v2/ociindex/manifests/v1"))[0] == 200
    assert helper.runs == 2


async def test_a_rotated_basic_password_runs_the_helper_again_once(
    make_rotating: MakeRotating,
) -> None:
    helper, upstream, mirror = await make_rotating("basic")
    first, second = upstream.add_blob("org/app", b"one"), upstream.add_blob("org/app", b"two")

    assert await mirror.fetch(f"/v2/ghcr.io/org/app/blobs/{first}") == b"one"
    upstream.auth.credentials = ("robot", f"{SECRET}-2")
    assert await mirror.fetch(f"/v2/ghcr.io/org/app/blobs/{second}") == b"two"
    assert helper.runs == 2


async def test_concurrent_requests_share_one_helper_run(
    make_rotating: MakeRotating,
) -> None:
    helper, upstream, mirror = await make_rotating("dockerhub")
    blobs = [os.urandom(500) for _ in range(6)]
    digests = [upstream.add_blob(f"org/app{i}", b) for i, b in enumerate(blobs)]

    paths = [f"/v2/ghcr.io/org/app{i}/blobs/{d}" for i, d in enumerate(digests)]
    assert await asyncio.gather(*(mirror.fetch(p) for p in paths)) == blobs
    assert helper.runs == 1


@pytest.mark.parametrize(
    ("source", "status", "says"),
    [
        (NOT_FOUND, 401, "has no credentials for"),
        (BAD_JSON, 503, "answered no usable credentials"),
        (HANGS, 503, "gave no answer within 0.5s"),
    ],
    ids=["not-found", "bad-json", "hangs"],
)
async def test_a_failing_helper_is_a_clear_error_that_trips_nothing(
    make_fake_upstream: MakeFakeUpstream,
    make_mirror: MakeMirror,
    helper_dir: Path,
    source: str,
    status: int,
    says: str,
) -> None:
    helper = Helper(helper_dir, "broken", source.format(secret=SECRET))
    upstream = await make_fake_upstream(auth="ghcr", credentials=("robot", SECRET))
    digest = upstream.add_blob("org/app", b"data")
    mirror = await fake_mirror(make_mirror, upstream, helper.name)
    client = mirror.app[UPSTREAM]
    client.fetcher.helpers.timeout = 0.5

    started = time.monotonic()
    for _ in range(4):  # more than the breaker's threshold
        got, body = await status_of(mirror, f"/v2/ghcr.io/org/app/blobs/{digest}")
        assert got == status
        error = json.loads(body)["errors"][0]
        assert f"docker-credential-{helper.name}" in error["message"]
        assert says in error["message"]
        assert SECRET not in body
    assert time.monotonic() - started < 8
    assert client.breaker(mirror.config.upstreams[0]).state == "closed"
    assert upstream.token_grants == []
