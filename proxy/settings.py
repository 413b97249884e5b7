"""The settings a config file can hold: frozen dataclasses, parsed by `proxy.config`.

Every setting's default and help text sit together in `field(metadata=...)`, so the
README's reference can be checked against this module. These are the only defaults:
`proxy.config` reads them from the fields, and tests/proxy/test_config.py checks the
README's settings table against them.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass, field, fields
from fnmatch import fnmatchcase
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path
from typing import Any


class ConfigError(Exception):
    """A bad configuration; `str()` is one line naming the YAML path."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path


class Secret:
    """A credential that never prints itself: repr and str are masked."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass(frozen=True)
class TagTtl:
    """One `tag_ttl` rule: tags matching the glob `match` stay fresh for `ttl` seconds,
    or, with `ttl` None (`immutable: true`), for good: never revalidated once cached."""

    match: str
    ttl: float | None

    @property
    def immutable(self) -> bool:
        return self.ttl is None


@dataclass(frozen=True)
class UpstreamConfig:
    """One upstream registry that the mirror serves."""

    name: str = field(metadata=_help("registry host clients ask for, e.g. docker.io"))
    url: str = field(metadata=_help("base URL of the registry API, e.g. https://ghcr.io"))
    default: bool = field(default=False, metadata=_help("names with no upstream prefix go here"))
    username: str | None = field(default=None, metadata=_help("user for upstream token/Basic"))
    password: Secret | None = field(default=None, metadata=_help("password or token; ${ENV}"))
    credential_helper: str | None = field(
        default=None,
        metadata=_help("runs docker-credential-NAME get for the credentials (not with username)"),
    )
    credential_lifetime: float = field(
        default=300.0, metadata=_help("seconds a credential helper's answer is reused")
    )
    connect_timeout: float = field(default=3.0, metadata=_help("seconds to open a connection"))
    read_timeout: float = field(default=30.0, metadata=_help("seconds a read may sit idle"))
    manifest_ttl: float = field(
        default=300.0, metadata=_help("seconds a tag's answer is served without asking upstream")
    )
    tag_ttl: tuple[TagTtl, ...] = field(
        default=(),
        metadata=_help(
            "ordered {match: GLOB, ttl: DURATION} or {match: GLOB, immutable: true}; the"
            " first whose glob matches the tag wins, manifest_ttl is the fallback"
        ),
    )
    offline: bool = field(
        default=False,
        metadata=_help(
            "never contact this upstream, only serve what is cached (unset: the global offline)"
        ),
    )
    listing_ttl: float = field(
        default=300.0,
        metadata=_help("seconds a tags/list or referrers answer is served without asking upstream"),
    )
    allow: tuple[str, ...] = field(
        default=(), metadata=_help("glob patterns of repositories served (empty: all)")
    )
    deny: tuple[str, ...] = field(
        default=(), metadata=_help("glob patterns of repositories refused")
    )
    ca_bundle: Path | None = field(
        default=None, metadata=_help("CA certificates to verify this upstream's TLS with")
    )
    insecure: bool = field(
        default=False, metadata=_help("skip TLS verification of this upstream (warned at start)")
    )
    share_when_down: bool = field(
        default=False,
        metadata=_help(
            "while upstream is down, serve cached content to any of its repositories"
            " (only for an upstream without credentials)"
        ),
    )

    @property
    def is_docker_hub(self) -> bool:
        return self.name in ("docker.io", "registry-1.docker.io", "index.docker.io")

    def tag_lifetime(self, tag: str) -> float | None:
        """Seconds an answer for `tag` is served without asking upstream; None: for good."""
        for rule in self.tag_ttl:
            if fnmatchcase(tag, rule.match):
                return rule.ttl
        return self.manifest_ttl

    @property
    def access(self) -> tuple[object, ...]:
        """What the upstream's tokens, challenges, helper answers and TLS context depend
        on: state kept under this key is never used again once a reload changes one."""
        return (
            self.name,
            self.url,
            self.username,
            self.password,
            self.credential_helper,
            self.ca_bundle,
            self.insecure,
        )


@dataclass(frozen=True)
class CacheConfig:
    path: Path = field(default=Path("./data"), metadata=_help("directory of blobs and index"))
    max_size: int = field(default=50 * 1024**3, metadata=_help("size budget, e.g. 50GiB"))
    blob_ttl: float = field(
        default=30 * 86400.0, metadata=_help("content unused this long is evicted, e.g. 30d")
    )
    high_watermark: float = field(
        default=0.9, metadata=_help("share of max_size that starts an eviction")
    )
    low_watermark: float = field(default=0.8, metadata=_help("share of max_size it evicts down to"))


@dataclass(frozen=True)
class WarmEntry:
    """An image `serve` pre-fetches at start-up (`warm:` in the config)."""

    image: str
    platforms: frozenset[str] | None  # None: every platform of an index


def host_platform() -> str:
    machine = platform.machine().lower()
    return "linux/" + {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm"}.get(machine, machine)


@dataclass(frozen=True)
class AuthConfig:
    htpasswd: Path | None = field(
        default=None, metadata=_help("htpasswd file of bcrypt entries; unset: anonymous pulls")
    )
    realm: str = field(default="pullthrough", metadata=_help("realm in the Basic challenge"))
    metrics: bool = field(default=False, metadata=_help("/metrics needs a login too"))


@dataclass(frozen=True)
class TlsConfig:
    cert: Path | None = field(default=None, metadata=_help("PEM certificate chain to serve"))
    key: Path | None = field(default=None, metadata=_help("PEM private key"))


@dataclass(frozen=True)
class LogConfig:
    format: str = field(default="text", metadata=_help("access and app logs: text or json"))
    level: str = field(default="INFO", metadata=_help("DEBUG, INFO, WARNING or ERROR"))


@dataclass(frozen=True)
class Config:
    upstreams: tuple[UpstreamConfig, ...]
    version: int = field(default=1, metadata=_help("config format version; only 1 exists"))
    listen_host: str = field(
        default="0.0.0.0", metadata=_help("listen address (listen: host:port)")
    )
    listen_port: int = field(default=5000, metadata=_help("listen port (listen: host:port)"))
    cache: CacheConfig = field(default_factory=CacheConfig)
    log: LogConfig = field(default_factory=LogConfig)
    shutdown_grace: float = field(
        default=30.0, metadata=_help("on SIGTERM, time in-flight responses get to finish")
    )
    warm: tuple[WarmEntry, ...] = field(
        default=(), metadata=_help("images to pre-fetch in the background at start-up")
    )
    auth: AuthConfig = field(default_factory=AuthConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)
    client_timeout: float = field(
        default=60.0,
        metadata=_help(
            "a client connection idle this long, or this slow to send a request, is cut"
        ),
    )
    upstream_connections: int = field(
        default=32, metadata=_help("concurrent connections to each upstream host")
    )
    offline: bool = field(
        default=False,
        metadata=_help("never contact any upstream that doesn't set its own offline"),
    )
    trusted_proxies: tuple[IPv4Network | IPv6Network, ...] = field(
        default=(),
        metadata=_help(
            "CIDRs of proxies whose X-Forwarded-For / Forwarded give the logged client address"
        ),
    )

    def upstream(self, name: str) -> UpstreamConfig | None:
        for upstream in self.upstreams:
            if upstream.name == name:
                return upstream
        return None

    @property
    def default_upstream(self) -> UpstreamConfig | None:
        return next((u for u in self.upstreams if u.default), None)


def effective(config: Config) -> dict[str, Any]:
    """The config as plain data, for printing: every default filled in, secrets masked."""

    def plain(value: Any) -> Any:
        if isinstance(value, Secret):
            return "***"
        if isinstance(value, TagTtl):  # as the YAML spells it
            if value.immutable:
                return {"match": value.match, "immutable": True}
            return {"match": value.match, "ttl": value.ttl}
        if isinstance(value, Path | IPv4Network | IPv6Network):
            return str(value)
        if isinstance(value, frozenset):
            return sorted(value)
        if isinstance(value, tuple | list):
            return [plain(v) for v in value]
        if hasattr(value, "__dataclass_fields__"):
            return {f.name: plain(getattr(value, f.name)) for f in fields(value)}
        return value

    data: dict[str, Any] = plain(config)
    listen = f"{data.pop('listen_host')}:{data.pop('listen_port')}"
    return {"version": data.pop("version"), "listen": listen, **data}
