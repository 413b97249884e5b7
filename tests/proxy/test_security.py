"""Access control, TLS on both sides, and what a hostile upstream can't do to the cache."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import os
import ssl
from pathlib import Path

import aiohttp
import bcrypt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.e2e.skopeo import skopeo
from tests.fake_upstream.fixtures import MakeFakeUpstream
from tests.fake_upstream.server import FakeUpstream, Fault
from tests.mirror import MakeMirror, Mirror
from tests.secrets import SECRET

REPO = "library/app"


def htpasswd(tmp_path: Path, users: dict[str, str]) -> str:
    path = tmp_path / "htpasswd"
    lines = [
        f"{u}:{bcrypt.hashpw(p.encode(), bcrypt.gensalt(4)).decode()}" for u, p in users.items()
    ]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def self_signed(tmp_path: Path, name: str) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(__import__("ipaddress").ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / f"{name}.crt", tmp_path / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


async def status_of(mirror: Mirror, path: str, **kwargs: object) -> tuple[int, str | None]:
    async with mirror.get(path, **kwargs) as response:
        body = await response.read()
        code = None
        if response.status >= 400 and response.content_type == "application/json":
            code = __import__("json").loads(body)["errors"][0]["code"]
        return response.status, code


async def test_htpasswd_logins(
    fake_upstream: FakeUpstream, make_mirror: MakeMirror, tmp_path: Path
) -> None:
    digest = fake_upstream.add_blob(REPO, b"layer")
    mirror = await make_mirror(
        [{"name": "docker.io", "url": fake_upstream.url, "default": True}],
        auth={"htpasswd": htpasswd(tmp_path, {"alice": SECRET})},
    )
    async with mirror.get("/v2/") as response:
        assert response.status == 401
        assert response.headers["WWW-Authenticate"] == 'Basic realm="pullthrough"'
        assert (await response.json())["errors"][0]["code"] == "UNAUTHORIZED"
    wrong = {"Authorization": aiohttp.encode_basic_auth("alice", "nope")}
    right = {"Authorization": aiohttp.encode_basic_auth("alice", SECRET)}
    blob = f"/v2/app/blobs/{digest}"
    assert await status_of(mirror, blob, headers=wrong) == (401, "UNAUTHORIZED")
    assert await status_of(mirror, blob, headers=right) == (200, None)
    assert fake_upstream.count("GET", f"/v2/{REPO}/blobs/{digest}") == 1  # only the logged in
    assert await status_of(mirror, "/healthz") == (200, None)
    assert await status_of(mirror, "/metrics") == (200, None)  # not protected unless asked


async def test_a_real_client_logs_in(
    fake_upstream: FakeUpstream, make_mirror: MakeMirror, tmp_path: Path
) -> None:
    image = fake_upstream.add_image(REPO, "v1", layers=(os.urandom(1000),))
    mirror = await make_mirror(
        [{"name": "docker.io", "url": fake_upstream.url, "default": True}],
        auth={"htpasswd": htpasswd(tmp_path, {"bob": SECRET}), "metrics": True},
    )
    out = await skopeo(
        "inspect", "--tls-verify=false", "--creds", f"bob:{SECRET}", "--raw",
        f"docker://{mirror.host}/app:v1",
    )  # fmt: skip
    assert out.encode() == image.manifest
    with pytest.raises(AssertionError, match=r"401|unauthorized|authentication required"):
        await skopeo("inspect", "--tls-verify=false", "--raw", f"docker://{mirror.host}/app:v1")
    assert await status_of(mirror, "/metrics") == (401, "UNAUTHORIZED")


async def test_allow_and_deny_lists_refuse_without_asking_upstream(
    fake_upstream: FakeUpstream, make_mirror: MakeMirror
) -> None:
    mirror = await make_mirror(
        [
            {
                "name": "docker.io",
                "url": fake_upstream.url,
                "default": True,
                "allow": ["library/*", "myorg/*"],
                "deny": ["library/evil*"],
            }
        ]
    )
    for path in (
        "/v2/other/app/manifests/v1",
        "/v2/evil/manifests/v1",
        "/v2/library/evil-x/tags/list",
    ):
        assert await status_of(mirror, path) == (403, "DENIED"), path
    assert await status_of(mirror, "/v2/alpine/manifests/v1") == (404, "MANIFEST_UNKNOWN")
    assert await status_of(mirror, "/v2/myorg/app/manifests/v1") == (404, "MANIFEST_UNKNOWN")
    assert all("evil" not in r.path and "other" not in r.path for r in fake_upstream.requests)


async def test_tls_listener(
    fake_upstream: FakeUpstream, make_mirror: MakeMirror, tmp_path: Path
) -> None:
    cert, key = self_signed(tmp_path, "mirror")
    mirror = await make_mirror(
        [{"name": "docker.io", "url": fake_upstream.url, "default": True}],
        tls={"cert": str(cert), "key": str(key)},
    )
    trusted = ssl.create_default_context(cafile=str(cert))
    https = mirror.url.replace("http://", "https://")
    async with mirror.session.get(https + "/v2/", ssl=trusted) as response:
        assert response.status == 200
    with pytest.raises(aiohttp.ClientError):
        async with mirror.session.get(mirror.url + "/v2/") as response:
            await response.read()


async def test_upstream_tls_is_verified_unless_told_otherwise(
    make_fake_upstream: MakeFakeUpstream,
    make_mirror: MakeMirror,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    cert, key = self_signed(tmp_path, "upstream")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    upstream = FakeUpstream()
    upstream.ssl_context = context
    async with upstream:
        digest = upstream.add_blob(REPO, b"over tls")
        path = f"/v2/app/blobs/{digest}"
        entry = {"name": "docker.io", "url": upstream.url, "default": True}
        assert upstream.url.startswith("https://")

        strict = await make_mirror([entry])
        assert await status_of(strict, path) == (503, "UNAVAILABLE")  # unknown CA: refused
        with_ca = await make_mirror([{**entry, "ca_bundle": str(cert)}])
        assert await status_of(with_ca, path) == (200, None)
        caplog.set_level(logging.WARNING, logger="pullthrough.tls")
        careless = await make_mirror([{**entry, "insecure": True}])
        assert await status_of(careless, path) == (200, None)
        assert "TLS verification is OFF for upstream docker.io" in caplog.text


@pytest.mark.parametrize(
    ("fault", "expected"),
    [
        (Fault(redirect=302, redirect_location="/v2/library/app/blobs/LOOP"), 502),
        (Fault(redirect=307, redirect_location="ftp://127.0.0.1/blob"), 502),
        (Fault(redirect=307, redirect_location="file:///etc/passwd"), 502),
        (Fault(endless=True), 502),
        (Fault(wrong_length=-100), None),  # more bytes than announced: cut off, digest fails
    ],
    ids=["redirect-loop", "redirect-ftp", "redirect-file", "endless-body", "longer-than-announced"],
)
async def test_hostile_upstream_blobs_are_refused_and_never_cached(
    fake_upstream: FakeUpstream, make_mirror: MakeMirror, fault: Fault, expected: int | None
) -> None:
    data = os.urandom(50_000)
    digest = fake_upstream.add_blob(REPO, data)
    if fault.redirect_location and "LOOP" in fault.redirect_location:
        fault.redirect_location = f"{fake_upstream.url}/v2/{REPO}/blobs/{digest}"
    fake_upstream.set_fault(digest, fault)
    mirror = await make_mirror([{"name": "docker.io", "url": fake_upstream.url, "default": True}])
    try:
        status = (await asyncio.wait_for(status_of(mirror, f"/v2/app/blobs/{digest}"), 10))[0]
    except aiohttp.ClientPayloadError:
        status = None  # cut off mid-body: also a failure the client can see
    # Any clean failure will do: a cut-off body, a 502, or a 503 when the connection broke.
    assert status in ((expected,) if expected is not None else (None, 502, 503)), status
    await mirror.fills_ended()
    assert digest not in mirror.stored_blobs()
    assert mirror.temp_files() == []


async def test_endless_or_mismatched_manifests_are_refused(
    fake_upstream: FakeUpstream, make_mirror: MakeMirror
) -> None:
    endless = fake_upstream.add_manifest(
        REPO, "endless", b'{"a":1}', "application/vnd.oci.image.manifest.v1+json"
    )
    fake_upstream.set_fault("endless", Fault(endless=True))
    other = fake_upstream.add_manifest(
        REPO, "other", b'{"b":2}', "application/vnd.oci.image.manifest.v1+json"
    )
    fake_upstream.set_fault(other, Fault(corrupt=True))
    mirror = await make_mirror([{"name": "docker.io", "url": fake_upstream.url, "default": True}])
    assert await asyncio.wait_for(status_of(mirror, "/v2/app/manifests/endless"), 10) == (
        502,
        "MANIFEST_INVALID",
    )
    assert await status_of(mirror, f"/v2/app/manifests/{other}") == (502, "UNKNOWN")
    assert endless not in mirror.stored_blobs() and other not in mirror.stored_blobs()


async def test_oversized_request_lines_and_headers_are_4xx(
    fake_upstream: FakeUpstream, make_mirror: MakeMirror
) -> None:
    mirror = await make_mirror([{"name": "docker.io", "url": fake_upstream.url, "default": True}])
    host, port = mirror.host.split(":")
    for request in (
        b"GET /v2/" + b"a" * 10_000 + b"/manifests/v1 HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /v2/ HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 10_000 + b"\r\n\r\n",
        b"GET /v2/ HTTP/1.1\r\nHost: x\r\n"
        + b"".join(b"X-%d: 1\r\n" % i for i in range(200))
        + b"\r\n",
    ):
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(request)
        status = (await asyncio.wait_for(reader.readline(), 5)).split()[1]
        writer.close()
        assert status.startswith(b"4"), (request[:40], status)


async def test_idle_and_slowloris_clients_are_cut_off(
    fake_upstream: FakeUpstream, make_mirror: MakeMirror
) -> None:
    mirror = await make_mirror(
        [{"name": "docker.io", "url": fake_upstream.url, "default": True}], client_timeout=0.5
    )
    host, port = mirror.host.split(":")
    loop = asyncio.get_running_loop()

    async def seconds_until_closed(drip: bytes) -> float:
        reader, writer = await asyncio.open_connection(host, int(port))
        started = loop.time()

        async def trickle() -> None:  # one byte every 0.1 s: never a complete request
            with contextlib.suppress(ConnectionError):
                for byte in drip:
                    writer.write(bytes([byte]))
                    await asyncio.sleep(0.1)

        dripping = asyncio.create_task(trickle())
        try:
            with contextlib.suppress(ConnectionError):
                assert await asyncio.wait_for(reader.read(), 10) == b""
            return loop.time() - started
        finally:
            dripping.cancel()
            writer.close()

    assert await seconds_until_closed(b"") < 2  # idle: says nothing at all
    assert await seconds_until_closed(b"GET /v2/ HTTP/1.1\r\nHost: x\r\nX-Slow: 12345") < 3
    async with mirror.get("/v2/") as response:  # and ordinary clients are unaffected
        assert response.status == 200
