"""Which upstream a request is for, and the repository name there.

    how the client asks                      upstream                  repository
    ?ns=ghcr.io (containerd hosts.toml)      ghcr.io                   the whole name
    /v2/ghcr.io/org/app/... (path prefix)    ghcr.io                   org/app
    /v2/org/app/... (registry-mirrors)       the default upstream      org/app
    /v2/alpine/... for docker.io             docker.io                 library/alpine

A first segment that looks like a host (has a dot or a colon, or is `localhost`: Docker's
own rule) but names no configured upstream is refused rather than sent to the default.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase

from proxy.config import Config, UpstreamConfig
from proxy.errors import Denied, NameUnknown
from proxy.references import check_repository


@dataclass(frozen=True, slots=True)
class Target:
    upstream: UpstreamConfig
    repo: str  # the name at the upstream
    name: str  # the name as the client sent it
    namespace: str | None  # the `ns` query parameter, echoed as OCI-Namespace

    @property
    def key(self) -> str:
        return f"{self.upstream.name}/{self.repo}"

    @property
    def link(self) -> tuple[str, str]:
        """The (upstream, repository) pair cached content is scoped to (`Cache.is_linked`)."""
        return (self.upstream.name, self.repo)


def resolve(config: Config, name: str, ns: str | None) -> Target:
    if ns is not None:
        upstream = config.upstream(ns)
        if upstream is None:
            raise _unknown(config, f"namespace {ns[:100]!r}")
        return _target(upstream, name, name, ns)
    first, slash, rest = name.partition("/")
    upstream = config.upstream(first) if slash else None
    if upstream is not None:
        return _target(upstream, rest, name, None)
    if slash and _looks_like_host(first):
        raise _unknown(config, f"registry {first[:100]!r}")
    default = config.default_upstream
    if default is None:
        raise _unknown(config, "names without a registry prefix (no default upstream)")
    return _target(default, name, name, None)


def client_name(upstream: UpstreamConfig, repo: str, default: UpstreamConfig | None) -> str:
    """The name under which a client of the path-prefix scheme finds `repo`."""
    return repo if upstream is default else f"{upstream.name}/{repo}"


def _target(upstream: UpstreamConfig, repo: str, name: str, ns: str | None) -> Target:
    check_repository(repo)
    if upstream.is_docker_hub and "/" not in repo:
        # Checked again with the prefix: a 255-character name is 263 upstream, where it
        # would be refused with a 500 that counts against the upstream.
        repo = check_repository(f"library/{repo}")
    if not allowed(upstream, repo):
        raise Denied(f"{upstream.name}/{repo} is not served by this mirror")
    return Target(upstream, repo, name, ns)


def allowed(upstream: UpstreamConfig, repo: str) -> bool:
    """Deny wins; with an allow list, only what it matches is served."""
    if any(fnmatchcase(repo, pattern) for pattern in upstream.deny):
        return False
    return not upstream.allow or any(fnmatchcase(repo, p) for p in upstream.allow)


def _looks_like_host(segment: str) -> bool:
    return "." in segment or ":" in segment or segment == "localhost"


def _unknown(config: Config, what: str) -> NameUnknown:
    names = ", ".join(u.name for u in config.upstreams)
    return NameUnknown(f"this mirror does not serve {what}; configured upstreams: {names}")
