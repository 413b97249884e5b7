"""Listings against the real upstream, distribution 2.8, which has no referrers API:
skopeo's list-tags and a referrers request through the mirror, with the registry up,
then stopped."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any

from tests.e2e.skopeo import skopeo
from tests.mirror import MakeMirror, Mirror
from tests.proxy.test_listings import get
from tests.upstream.client import Blob, UpstreamClient
from tests.upstream.images import OCI_INDEX, OCI_MANIFEST, build_image, push_image
from tests.upstream.registry import RegistryProcess

EMPTY = Blob.from_bytes(b"{}", "application/vnd.oci.empty.v1+json")
SBOM = "application/vnd.example.sbom.v1"
SIGNATURE = "application/vnd.example.signature.v1"
TTL = 60


def artifact(artifact_type: str, subject: dict[str, Any], note: str) -> bytes:
    """An OCI 1.1 artifact manifest: an image manifest with artifactType and subject."""
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": artifact_type,
        "config": EMPTY.descriptor(),
        "layers": [EMPTY.descriptor()],
        "subject": subject,
        "annotations": {"org.example.note": note},
    }
    return json.dumps(manifest, indent=2).encode()


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def descriptor(data: bytes, artifact_type: str, note: str) -> dict[str, Any]:
    return {
        "mediaType": OCI_MANIFEST,
        "digest": digest_of(data),
        "size": len(data),
        "artifactType": artifact_type,
        "annotations": {"org.example.note": note},
    }


async def list_tags(mirror: Mirror, name: str) -> list[str]:
    out = await skopeo("list-tags", "--tls-verify=false", f"docker://{mirror.host}/{name}")
    tags: list[str] = json.loads(out)["Tags"]
    return tags


async def test_tags_and_referrers_through_the_mirror_with_the_registry_up_then_stopped(
    registry_factory: Callable[..., RegistryProcess], make_mirror: MakeMirror
) -> None:
    registry = registry_factory(auth=True)
    client = UpstreamClient(registry)
    repo = "library/signed"
    image = push_image(registry, None, repo, "v1", build_image("signed", OCI_MANIFEST, (1024,)))
    client.push_manifest(repo, "v2", image.manifest, OCI_MANIFEST)
    subject = {"mediaType": OCI_MANIFEST, "digest": image.digest, "size": image.image.size}
    client.push_blob(repo, EMPTY)
    sbom = artifact(SBOM, subject, "sbom")
    client.push_manifest(repo, digest_of(sbom), sbom, OCI_MANIFEST)
    # distribution 2.8 keeps an artifact's bytes as pushed, subject and artifactType too.
    assert client.get_manifest(repo, digest_of(sbom), OCI_MANIFEST).body == sbom
    # A signature that a client pushed the way the spec says to for a registry without
    # the referrers API: listed in an index under the subject's referrers tag.
    signature = artifact(SIGNATURE, subject, "signature")
    client.push_manifest(repo, digest_of(signature), signature, OCI_MANIFEST)
    referrers_tag = "sha256-" + image.digest.removeprefix("sha256:")
    tag_index = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [descriptor(signature, SIGNATURE, "signature")],
    }
    client.push_manifest(repo, referrers_tag, json.dumps(tag_index).encode(), OCI_INDEX)

    entry = {"name": "docker.io", "url": registry.url, "default": True, "listing_ttl": TTL}
    mirror = await make_mirror([entry])
    tags = sorted(["v1", "v2", referrers_tag])
    assert sorted(await list_tags(mirror, "signed")) == tags
    # The sbom is pulled through the mirror (as `oras pull` would); the signature is not.
    for reference in ("v1", digest_of(sbom)):
        async with mirror.get(
            f"/v2/signed/manifests/{reference}", headers={"Accept": OCI_MANIFEST}
        ) as response:
            assert response.status == 200, reference

    path = f"/v2/signed/referrers/{image.digest}"
    status, headers, index = await get(mirror, path)
    assert (status, headers["Content-Type"]) == (200, OCI_INDEX)
    expected = sorted(
        [descriptor(sbom, SBOM, "sbom"), descriptor(signature, SIGNATURE, "signature")],
        key=lambda d: str(d["digest"]),
    )
    assert index == {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": expected}
    status, headers, only = await get(mirror, f"{path}?artifactType={SBOM}")
    assert (only["manifests"], headers["OCI-Filters-Applied"]) == (
        [descriptor(sbom, SBOM, "sbom")],
        "artifactType",
    )
    status, _, body = await get(mirror, f"/v2/no/such/referrers/{image.digest}")
    assert (status, body["errors"][0]["code"]) == (404, "NAME_UNKNOWN")
    assert await mirror.lookups("referrers", "hit") == 2

    registry.stop()
    mirror.clock.advance(TTL + 1)
    assert sorted(await list_tags(mirror, "signed")) == tags
    assert await mirror.lookups("tags", "stale") == 1
    # Past the TTL, upstream is asked (and fails): the index is built from the cache,
    # the signature coming from the referrers tag the mirror cached.
    status, headers, body = await get(mirror, path)
    assert (status, headers["Content-Type"], headers["Cache-Control"], body) == (
        200,
        OCI_INDEX,
        "no-cache",
        index,
    )
    status, headers, body = await get(mirror, f"{path}?artifactType={SIGNATURE}")
    assert body["manifests"] == [descriptor(signature, SIGNATURE, "signature")]
    assert await mirror.lookups("referrers", "stale") == 2
    # What the mirror never listed, it can't answer for while upstream is down.
    status, _, body = await get(mirror, f"/v2/other/referrers/{image.digest}")
    assert (status, body["errors"][0]["code"]) == (503, "UNAVAILABLE")
    with_error = await skopeo_fails(
        "list-tags", "--tls-verify=false", f"docker://{mirror.host}/other"
    )
    assert "503" in with_error or "UNAVAILABLE" in with_error.upper()


async def skopeo_fails(*args: str) -> str:
    try:
        await skopeo(*args)
    except AssertionError as failure:
        return str(failure)
    raise AssertionError(f"skopeo {' '.join(args)} succeeded")
