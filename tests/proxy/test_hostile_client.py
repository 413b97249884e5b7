"""Thousands of random and malformed requests, over raw sockets, to a running mirror.

Afterwards: no answer was a 5xx (an upstream 503 aside), the server still serves a
correct pull, and the cache verifies.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import random

import pytest

from cache.integrity import fsck
from proxy.keys import CACHE
from tests.fake_upstream.server import FakeUpstream
from tests.mirror import MakeMirror

REQUESTS = 3000
SEED = 20261123

METHODS = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "get", "G\x00T",
           "BREW", "X" * 300, ""]  # fmt: skip
DIGEST = "sha256:" + "ab" * 32
NAMES = ["app", "library/app", "a/b/c", "ghcr.io/org/x", "nowhere.io/x", "UPPER", "a..b",
         "a/../b", "%2e%2e/x", "a%2Fb", "a%00b", "caf%C3%A9", "é", "x" * 300, "", "/", "a//b",
         "_catalog", "-lead", "a__b", "a___b"]  # fmt: skip
REFS = ["v1", "latest", DIGEST, "sha256:" + "AB" * 32, "sha256:zz", "sha512:" + "0" * 128,
        "md5:abc", "t" * 129, "bad!tag", "%00", "..", "", "x" * 5000]  # fmt: skip
KINDS = ["manifests", "blobs", "tags/list", "referrers", "blobs/uploads/", "blobs/uploads/u1"]
QUERIES = ["", "?ns=docker.io", "?ns=", "?ns=evil.io", "?n=-1", "?n=99999999999999999999",
           "?n=abc&last=%ff", "?last=" + "z" * 2000, "?digest=" + DIGEST, "?%%%",
           "?ns=a&ns=b"]  # fmt: skip
RANGES = ["bytes=0-0", "bytes=-1", "bytes=5-", "bytes=9-1", "bytes=0-1,3-4", "bytes=", "bytes",
          "items=0-1", "bytes=99999999999999999999-", "bytes=-0", "bytes=a-b",
          "bytes=0-" + "9" * 40]  # fmt: skip
HEADERS = [
    ("Accept", "application/vnd.oci.image.manifest.v1+json"),
    ("Accept", "*/*;q=abc, ,,"),
    ("Accept", "\x7f" * 10),
    ("Authorization", "Basic !!!notbase64"),
    ("Authorization", "Bearer " + "a" * 4000),
    ("X-Request-ID", "../../etc/passwd"),
    ("Content-Length", "-5"),
    ("Content-Length", "10\r\nContent-Length: 20"),
    ("Transfer-Encoding", "chunked"),
    ("Transfer-Encoding", "gzip, chunked"),
    ("Expect", "100-continue"),
    ("Connection", "upgrade"),
    ("Host", ""),
    ("X-Huge", "h" * 9000),
]


def random_request(rng: random.Random) -> bytes:
    if rng.random() < 0.05:  # plain garbage
        return bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 400)))
    method = rng.choice(METHODS)
    kind = rng.choice(KINDS)
    ref = "" if kind.startswith("tags") or kind.startswith("blobs/uploads") else rng.choice(REFS)
    path = f"/v2/{rng.choice(NAMES)}/{kind}" + (f"/{ref}" if ref else "")
    path = rng.choice([path, path, "/v2/", "/v2/_catalog", "/metrics", "/healthz", "/readyz",
                       "*", "http://evil/v2/", "/" + "a/" * 2000, "/v2/%", "//v2//"])  # fmt: skip
    lines = [
        f"{method} {path}{rng.choice(QUERIES)} {rng.choice(['HTTP/1.1', 'HTTP/1.0', 'HTTP/9', ''])}"
    ]
    lines.append("Host: 127.0.0.1")
    if rng.random() < 0.5:
        lines.append(f"Range: {rng.choice(RANGES)}")
    for name, value in rng.sample(HEADERS, rng.randint(0, 3)):
        lines.append(f"{name}: {value}")
    body = b""
    if rng.random() < 0.3:
        body = os.urandom(rng.randint(0, 200))
        declared = len(body) + rng.choice([0, 0, 50])  # sometimes a truncated body
        lines.append(f"Content-Length: {declared}")
    lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape") + body


async def send(host: str, port: int, payload: bytes) -> int | None:
    """The status code of the answer, or None if the server closed without one."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(payload)
        line = await asyncio.wait_for(reader.readline(), 5)
    except (ConnectionError, OSError, TimeoutError):
        return None  # closed on us, or waiting for a body we never sent
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await writer.wait_closed()
    parts = line.split()
    return int(parts[1]) if len(parts) >= 2 and parts[1].isdigit() else None


async def test_thousands_of_hostile_requests_leave_the_server_whole(
    fake_upstream: FakeUpstream, make_mirror: MakeMirror, caplog: pytest.LogCaptureFixture
) -> None:
    data = os.urandom(300_000)
    digest = fake_upstream.add_blob("library/app", data)
    image = fake_upstream.add_image("library/app", "v1", layers=(os.urandom(20_000),))
    mirror = await make_mirror(
        [
            {"name": "docker.io", "url": fake_upstream.url, "default": True},
            {"name": "ghcr.io", "url": fake_upstream.url},
        ]
    )
    host, port = mirror.host.split(":")
    rng = random.Random(SEED)
    payloads = [random_request(rng) for _ in range(REQUESTS)]
    # A few real requests in the mix, so that fills and hits happen under fire too.
    payloads[::100] = [
        f"GET /v2/app/blobs/{digest} HTTP/1.1\r\nHost: x\r\nRange: bytes=-{n}\r\n"
        "Connection: close\r\n\r\n".encode()
        for n in range(1, len(payloads[::100]) + 1)
    ]

    semaphore = asyncio.Semaphore(32)

    async def one(payload: bytes) -> tuple[int | None, bytes]:
        async with semaphore:
            return await send(host, int(port), payload), payload

    results = await asyncio.gather(*(one(p) for p in payloads))
    bad = [
        (status, payload[:120])
        for status, payload in results
        if status and status >= 500 and status != 503
    ]
    assert bad == []
    assert sum(1 for status, _ in results if status is not None) > REQUESTS * 0.9
    # Bad requests are the client's problem: no tracebacks, nothing at ERROR.
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], errors[0].getMessage() if errors else ""

    # Still alive, and still correct.
    async with mirror.get(f"/v2/app/blobs/{digest}") as response:
        assert hashlib.sha256(await response.read()).hexdigest() == digest[7:]
    accept = {"Accept": "application/vnd.oci.image.manifest.v1+json"}
    async with mirror.get("/v2/app/manifests/v1", headers=accept) as response:
        assert response.headers["Docker-Content-Digest"] == image.manifest_digest
    for layer in image.layer_digests:
        async with mirror.get(f"/v2/app/blobs/{layer}") as response:
            assert hashlib.sha256(await response.read()).hexdigest() == layer[7:]
    await mirror.wait_committed(digest, *image.layer_digests)
    report = await fsck(mirror.app[CACHE])
    assert report.clean and report.checked >= 3
