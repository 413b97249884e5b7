"""What a stored manifest says about the manifest it refers to (its OCI 1.1 `subject`).

The index keeps these facts next to the manifest's row, so that the referrers of a
digest can be listed from the cache alone: for an upstream without a referrers API, or
one that is down. Each fact is what the referrers API puts in a descriptor:

    field          taken from the manifest
    subject        subject.digest (a manifest without one refers to nothing)
    artifact_type  artifactType; else, for an image manifest, config.mediaType;
                   else (an index without one) none
    annotations    annotations, as JSON, or none
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Reference:
    """A manifest's `subject`, and how the referrers API describes that manifest."""

    subject: str
    artifact_type: str | None
    annotations: str | None  # a JSON object


@dataclass(frozen=True, slots=True)
class Referrer:
    """A stored manifest that refers to a subject: one descriptor of a referrers index."""

    digest: str
    media_type: str
    size: int
    artifact_type: str | None
    annotations: str | None

    def descriptor(self) -> dict[str, Any]:
        found: dict[str, Any] = {
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": self.size,
        }
        if self.artifact_type:
            found["artifactType"] = self.artifact_type
        if self.annotations:
            found["annotations"] = json.loads(self.annotations)
        return found


def reference_of(data: bytes) -> Reference | None:
    """The subject a manifest refers to, or None (no subject, or not a JSON manifest)."""
    if b'"subject"' not in data:  # most manifests: no JSON parse at all
        return None
    try:
        manifest = json.loads(data)
    except ValueError:
        return None
    if not isinstance(manifest, dict):
        return None
    subject = manifest.get("subject")
    digest = subject.get("digest") if isinstance(subject, dict) else None
    if not isinstance(digest, str) or not digest:
        return None
    artifact_type = manifest.get("artifactType")
    config = manifest.get("config")
    if not isinstance(artifact_type, str) or not artifact_type:
        config_type = config.get("mediaType") if isinstance(config, dict) else None
        artifact_type = config_type if isinstance(config_type, str) and config_type else None
    annotations = manifest.get("annotations")
    kept = json.dumps(annotations) if isinstance(annotations, dict) and annotations else None
    return Reference(digest, artifact_type, kept)
