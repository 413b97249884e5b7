"""Reading the mirror's own clients' `Authorization: Basic ...` headers."""

from __future__ import annotations

import asyncio
import base64
import logging
from pathlib import Path

import bcrypt
import pytest

from proxy.client_auth import Authenticator
from tests.fake_upstream.server import FakeUpstream
from tests.mirror import MakeMirror
from tests.proxy.test_security import htpasswd
from tests.secrets import SECRET


def basic(pair: bytes) -> str:
    return "Basic " + base64.b64encode(pair).decode()


ALICE = basic(f"alice:{SECRET}".encode()).removeprefix("Basic ")


@pytest.mark.parametrize(
    ("header", "user"),
    [
        pytest.param(f"Basic {ALICE}", "alice", id="ok"),
        pytest.param(f"basic {ALICE}", "alice", id="scheme-in-any-case"),
        pytest.param(f"Basic   {ALICE}", "alice", id="more-than-one-space"),
        pytest.param(basic("jürgen:pä:ss".encode()), "jürgen", id="utf8-colon-in-password"),
        pytest.param(basic(b"alice:wrong"), None, id="wrong-password"),
        pytest.param(basic(b"alice"), None, id="no-colon"),
        pytest.param(basic(b"\xff:x"), None, id="not-utf8"),
        pytest.param("Basic !!!notbase64", None, id="not-base64"),
        pytest.param("Basic", None, id="no-credentials"),
        pytest.param(f"Basic\t{ALICE}", None, id="tab-is-no-separator"),
        pytest.param(f"Bearer {ALICE}", None, id="bearer"),
        pytest.param("Basic é", None, id="not-ascii"),
        pytest.param("B\udcffasic x", None, id="undecodable-byte-as-aiohttp-hands-it-over"),
        pytest.param("", None, id="empty"),
        pytest.param(None, None, id="none"),
    ],
)
async def test_basic_headers(header: str | None, user: str | None) -> None:
    users = {"alice": SECRET, "jürgen": "pä:ss"}
    hashed = {u: bcrypt.hashpw(p.encode(), bcrypt.gensalt(4)) for u, p in users.items()}
    assert await Authenticator(hashed, "pullthrough").user(header) == user


async def test_a_non_ascii_login_is_a_401_not_a_server_error(
    fake_upstream: FakeUpstream,
    make_mirror: MakeMirror,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    mirror = await make_mirror(
        [{"name": "docker.io", "url": fake_upstream.url, "default": True}],
        auth={"htpasswd": htpasswd(tmp_path, {"alice": SECRET})},
    )
    host, port = mirror.host.split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"GET /v2/ HTTP/1.1\r\nHost: x\r\nAuthorization: Basic \xc3\xa9\r\n\r\n")
    status = await asyncio.wait_for(reader.readline(), 5)
    writer.close()
    await writer.wait_closed()
    assert status.split()[1] == b"401"
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
