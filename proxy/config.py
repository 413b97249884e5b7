"""Configuration: `mirror.yaml` parsed once, at start-up, into the frozen dataclasses of
`proxy.settings`. Errors name the YAML path of the bad value (`upstreams[1].url: must be an
http(s) URL`).

Environment overrides follow one scheme: `PULLTHROUGH_<KEY>` with `__` between the
levels of a mapping, e.g. `PULLTHROUGH_LISTEN=127.0.0.1:5001` or
`PULLTHROUGH_CACHE__PATH=/var/cache/pullthrough`. Values are read as YAML scalars.
Strings may name secrets as `${ENV_VAR}`; those are read from the environment.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import MISSING, fields
from ipaddress import IPv4Network, IPv6Network, ip_network
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from proxy.settings import (
    AuthConfig,
    CacheConfig,
    Config,
    ConfigError,
    LogConfig,
    Secret,
    TagTtl,
    TlsConfig,
    UpstreamConfig,
    WarmEntry,
    effective,
    host_platform,
)

__all__ = [
    "AuthConfig",
    "CacheConfig",
    "Config",
    "ConfigError",
    "LogConfig",
    "Secret",
    "TagTtl",
    "TlsConfig",
    "UpstreamConfig",
    "WarmEntry",
    "effective",
    "host_platform",
    "load_config",
    "parse_config",
    "parse_duration",
    "parse_size",
]

ENV_PREFIX = "PULLTHROUGH_"
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    "B": 1,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
    "TB": 1000**4,
    "KIB": 1024,
    "MIB": 1024**2,
    "GIB": 1024**3,
    "TIB": 1024**4,
}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
# Per-upstream settings that `upstream_defaults` may set for all upstreams at once.
_TUNABLE = ("connect_timeout", "read_timeout", "manifest_ttl", "listing_ttl")
# Of those, the lifetimes whose 0 means "always ask upstream".
_MAY_BE_ZERO = ("manifest_ttl", "listing_ttl")
# An upstream name is the registry host clients ask for: a hostname, optionally with a port.
_UPSTREAM_NAME = re.compile(r"^[a-z0-9]([a-z0-9.-]*[a-z0-9])?(:[0-9]{1,5})?$")
# The NAME of `docker-credential-NAME`: a file name, never a path.
_HELPER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def _names(cls: type[Any]) -> set[str]:
    """The settings a section of the YAML may hold: its dataclass's field names."""
    return {f.name for f in fields(cls)}


def _default(cls: type[Any], name: str) -> Any:
    """The default of field `cls.name`, from `proxy.settings`, the one place defaults are
    written. It is a parsed value (seconds, bytes, a Path, a tuple): the checks below let
    such values through as they are."""
    (field,) = (f for f in fields(cls) if f.name == name)
    if field.default_factory is not MISSING:
        return field.default_factory()
    if field.default is MISSING:
        raise TypeError(f"{cls.__name__}.{name} is required; it has no default")
    return field.default


def _get(raw: Mapping[str, Any], cls: type[Any], name: str) -> Any:
    """The value the YAML gives `name`, or else the field's default."""
    return raw[name] if name in raw else _default(cls, name)


# The YAML spells `listen_host` and `listen_port` as one `listen: HOST:PORT`, and has
# `upstream_defaults`, which no dataclass keeps: it only fills in each upstream.
_TOP_LEVEL = (_names(Config) - {"listen_host", "listen_port"}) | {"listen", "upstream_defaults"}


def load_config(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> Config:
    """Read, override from the environment, and parse a config file."""
    env = os.environ if env is None else env
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError("", f"cannot read config {str(path)!r}: {exc.strerror}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError("", f"{path}: not valid YAML{where}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError("", "the top level must be a mapping")
    _apply_env_overrides(raw, env)
    return parse_config(raw, env)


def _apply_env_overrides(raw: dict[str, Any], env: Mapping[str, str]) -> None:
    for key, value in env.items():
        if not key.startswith(ENV_PREFIX):
            continue
        parts = key[len(ENV_PREFIX) :].lower().split("__")
        target = raw
        for part in parts[:-1]:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise ConfigError(".".join(parts), f"cannot override from {key}")
        target[parts[-1]] = yaml.safe_load(value) if value else value


def parse_config(raw: Mapping[str, Any], env: Mapping[str, str]) -> Config:
    _reject_unknown(raw, _TOP_LEVEL, "")
    version = _get(raw, Config, "version")
    if version != 1:
        raise ConfigError("version", "must be 1")
    if "listen" in raw:
        host, port = _parse_listen(raw["listen"])
    else:
        host, port = _default(Config, "listen_host"), _default(Config, "listen_port")
    offline = _flag(_get(raw, Config, "offline"), "offline")
    upstreams = _parse_upstreams(
        raw.get("upstreams"), raw.get("upstream_defaults", {}), env, offline
    )
    return Config(
        version=1,
        listen_host=host,
        listen_port=port,
        cache=_parse_cache(raw.get("cache", {})),
        upstreams=upstreams,
        log=_parse_log(raw.get("log", {})),
        shutdown_grace=parse_duration(_get(raw, Config, "shutdown_grace"), "shutdown_grace"),
        warm=_parse_warm(raw["warm"]) if "warm" in raw else _default(Config, "warm"),
        auth=_parse_auth(raw.get("auth", {})),
        tls=_parse_tls(raw.get("tls", {})),
        client_timeout=parse_duration(_get(raw, Config, "client_timeout"), "client_timeout"),
        upstream_connections=_count(
            _get(raw, Config, "upstream_connections"), "upstream_connections"
        ),
        trusted_proxies=_networks(_get(raw, Config, "trusted_proxies"), "trusted_proxies"),
        offline=offline,
    )


def _networks(value: Any, path: str) -> tuple[IPv4Network | IPv6Network, ...]:
    """CIDRs such as `10.0.0.0/8`; a bare address is a /32 (or /128). Host bits set
    (`10.0.0.1/8`) are refused: such a typo would trust more than was meant."""
    if value is None:  # `trusted_proxies:` with nothing after it
        return ()
    # A tuple is the dataclass default; YAML gives lists.
    if not isinstance(value, list | tuple):
        raise ConfigError(path, "must be a list of CIDRs such as [10.0.0.0/8]")
    networks = []
    for i, item in enumerate(value):
        try:
            networks.append(ip_network(item if isinstance(item, str) else ""))
        except ValueError:
            raise ConfigError(
                f"{path}[{i}]", f"{item!r} is not a CIDR such as 10.0.0.0/8"
            ) from None
    return tuple(networks)


def _flag(value: Any, path: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(path, "must be true or false")
    return value


def _count(value: Any, path: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(path, "must be a whole number of at least 1")
    return value


def _parse_auth(raw: Any) -> AuthConfig:
    if not isinstance(raw, dict):
        raise ConfigError("auth", "must be a mapping")
    _reject_unknown(raw, _names(AuthConfig), "auth")
    htpasswd = _readable_file(_get(raw, AuthConfig, "htpasswd"), "auth.htpasswd")
    realm = _get(raw, AuthConfig, "realm")
    if not isinstance(realm, str) or not realm or '"' in realm or "\\" in realm:
        raise ConfigError("auth.realm", "must be a plain string")
    metrics = _flag(_get(raw, AuthConfig, "metrics"), "auth.metrics")
    if metrics and htpasswd is None:
        raise ConfigError("auth.metrics", "needs auth.htpasswd")
    return AuthConfig(htpasswd=htpasswd, realm=realm, metrics=metrics)


def _parse_tls(raw: Any) -> TlsConfig:
    if not isinstance(raw, dict):
        raise ConfigError("tls", "must be a mapping")
    _reject_unknown(raw, _names(TlsConfig), "tls")
    cert = _readable_file(_get(raw, TlsConfig, "cert"), "tls.cert")
    key = _readable_file(_get(raw, TlsConfig, "key"), "tls.key")
    if (cert is None) != (key is None):
        raise ConfigError("tls", "cert and key must be given together")
    return TlsConfig(cert=cert, key=key)


def _readable_file(value: Any, path: str) -> Path | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ConfigError(path, "must be a file path")
    if not os.access(value, os.R_OK) or not Path(value).is_file():
        raise ConfigError(path, f"cannot read {value!r}")
    return Path(value)


def _patterns(value: Any, path: str) -> tuple[str, ...]:
    if value is None:  # `allow:` with nothing after it
        return ()
    # A tuple is the dataclass default; YAML gives lists.
    if not isinstance(value, list | tuple) or not all(isinstance(p, str) and p for p in value):
        raise ConfigError(path, "must be a list of patterns such as library/*")
    return tuple(value)


def _parse_warm(raw: Any) -> tuple[WarmEntry, ...]:
    """Entries are `IMAGE` (for this host's platform) or `{image, platforms | all_platforms}`."""
    if not isinstance(raw, list):
        raise ConfigError("warm", "must be a list of images")
    entries = []
    for i, item in enumerate(raw):
        path = f"warm[{i}]"
        if isinstance(item, str):
            item = {"image": item}
        if not isinstance(item, dict):
            raise ConfigError(path, "must be an image or a mapping with image")
        _reject_unknown(item, _names(WarmEntry) | {"all_platforms"}, path)
        image = item.get("image")
        if not isinstance(image, str) or not image or any(c.isspace() for c in image):
            raise ConfigError(f"{path}.image", "must be an image reference such as alpine:3")
        platforms = item.get("platforms", [host_platform()])
        if not isinstance(platforms, list) or not all(isinstance(p, str) for p in platforms):
            raise ConfigError(f"{path}.platforms", "must be a list such as [linux/amd64]")
        everything = item.get("all_platforms", False) is True
        entries.append(WarmEntry(image, None if everything else frozenset(platforms)))
    return tuple(entries)


def _parse_log(raw: Any) -> LogConfig:
    if not isinstance(raw, dict):
        raise ConfigError("log", "must be a mapping")
    _reject_unknown(raw, _names(LogConfig), "log")
    form = _get(raw, LogConfig, "format")
    if form not in ("text", "json"):
        raise ConfigError("log.format", "must be text or json")
    level = str(_get(raw, LogConfig, "level")).upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError("log.level", "must be DEBUG, INFO, WARNING or ERROR")
    return LogConfig(format=form, level=level)


def _reject_unknown(raw: Mapping[str, Any], known: set[str], path: str) -> None:
    for key in raw:
        if key not in known:
            where = f"{path}.{key}" if path else str(key)
            raise ConfigError(where, f"unknown setting (known: {', '.join(sorted(known))})")


def _parse_listen(value: Any) -> tuple[str, int]:
    text = str(value)
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError("listen", "must be HOST:PORT, e.g. 0.0.0.0:5000")
    return host.strip("[]") or _default(Config, "listen_host"), int(port)


def _parse_cache(raw: Any) -> CacheConfig:
    if not isinstance(raw, dict):
        raise ConfigError("cache", "must be a mapping")
    _reject_unknown(raw, _names(CacheConfig), "cache")
    path = _get(raw, CacheConfig, "path")  # a Path already when defaulted
    if not isinstance(path, Path) and (not isinstance(path, str) or not path):
        raise ConfigError("cache.path", "must be a directory path")
    high = _fraction(_get(raw, CacheConfig, "high_watermark"), "cache.high_watermark")
    low = _fraction(_get(raw, CacheConfig, "low_watermark"), "cache.low_watermark")
    if low >= high:
        raise ConfigError("cache.low_watermark", "must be below cache.high_watermark")
    return CacheConfig(
        path=Path(path),
        max_size=parse_size(_get(raw, CacheConfig, "max_size"), "cache.max_size"),
        blob_ttl=parse_duration(_get(raw, CacheConfig, "blob_ttl"), "cache.blob_ttl"),
        high_watermark=high,
        low_watermark=low,
    )


def _fraction(value: Any, path: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
        raise ConfigError(path, "must be a fraction between 0 and 1, e.g. 0.9")
    return float(value)


def parse_size(value: Any, path: str, *, allow_zero: bool = False) -> int:
    """`50GiB`, `500MB`, `1024` (bytes) → bytes."""
    if isinstance(value, int) and not isinstance(value, bool) and value > (-1 if allow_zero else 0):
        return value
    match = _SIZE.fullmatch(str(value)) if isinstance(value, str) else None
    if match is None:
        raise ConfigError(path, "must be a size such as 50GiB, 500MB or a byte count")
    size = int(float(match[1]) * _SIZE_UNITS[(match[2] or "B").upper()])
    if size < 0 or (size == 0 and not allow_zero):
        raise ConfigError(path, "must be larger than zero")
    return size


def _parse_upstreams(
    raw: Any, defaults: Any, env: Mapping[str, str], offline: bool
) -> tuple[UpstreamConfig, ...]:
    if not isinstance(raw, list) or not raw:
        raise ConfigError("upstreams", "must be a non-empty list")
    if not isinstance(defaults, dict):
        raise ConfigError("upstream_defaults", "must be a mapping")
    _reject_unknown(defaults, {*_TUNABLE, "tag_ttl"}, "upstream_defaults")
    _tunables({}, "upstream_defaults", defaults)  # report bad defaults under their own path
    if "tag_ttl" in defaults:  # parsed once, here, for every upstream that inherits it
        defaults = {
            **defaults,
            "tag_ttl": _tag_ttl(defaults["tag_ttl"], "upstream_defaults.tag_ttl"),
        }
    upstreams = tuple(
        _parse_upstream(item, f"upstreams[{i}]", defaults, env, offline)
        for i, item in enumerate(raw)
    )
    seen: set[str] = set()
    for i, upstream in enumerate(upstreams):
        if upstream.name in seen:
            raise ConfigError(f"upstreams[{i}].name", f"duplicate upstream {upstream.name!r}")
        seen.add(upstream.name)
    if sum(u.default for u in upstreams) > 1:
        raise ConfigError("upstreams", "at most one upstream may be the default")
    return upstreams


def _parse_upstream(
    raw: Any, path: str, defaults: dict[str, Any], env: Mapping[str, str], offline: bool
) -> UpstreamConfig:
    if not isinstance(raw, dict):
        raise ConfigError(path, "must be a mapping with name and url")
    _reject_unknown(raw, _names(UpstreamConfig), path)
    name = raw.get("name")
    if not isinstance(name, str) or not _UPSTREAM_NAME.fullmatch(name):
        raise ConfigError(f"{path}.name", "must be a registry host such as docker.io")
    url = _expand(raw.get("url"), f"{path}.url", env)
    parts = urlsplit(url or "")
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query:
        raise ConfigError(f"{path}.url", "must be an http(s) URL")
    default = _flag(_get(raw, UpstreamConfig, "default"), f"{path}.default")
    insecure = _flag(_get(raw, UpstreamConfig, "insecure"), f"{path}.insecure")
    username = _expand(_get(raw, UpstreamConfig, "username"), f"{path}.username", env)
    password = _expand(_get(raw, UpstreamConfig, "password"), f"{path}.password", env)
    if (username is None) != (password is None):
        raise ConfigError(path, "username and password must be given together")
    if username is not None and ":" in username:  # Basic auth could not carry it (RFC 7617)
        raise ConfigError(f"{path}.username", "must not contain ':'")
    helper = _credential_helper(raw, path, username is not None)
    share = _flag(_get(raw, UpstreamConfig, "share_when_down"), f"{path}.share_when_down")
    if share and (username is not None or helper is not None):
        # Its cache may then hold private content: only upstream may say who sees it.
        raise ConfigError(f"{path}.share_when_down", "only for an upstream without credentials")
    # The global `offline` unless it says.
    own_offline = _flag(raw.get("offline", offline), f"{path}.offline")
    tag_ttl = raw.get("tag_ttl", _get(defaults, UpstreamConfig, "tag_ttl"))
    return UpstreamConfig(
        name=name,
        url=(url or "").rstrip("/"),
        default=default,
        username=username,
        password=Secret(password) if password is not None else None,
        credential_helper=helper,
        credential_lifetime=parse_duration(
            _get(raw, UpstreamConfig, "credential_lifetime"), f"{path}.credential_lifetime"
        ),
        allow=_patterns(_get(raw, UpstreamConfig, "allow"), f"{path}.allow"),
        deny=_patterns(_get(raw, UpstreamConfig, "deny"), f"{path}.deny"),
        ca_bundle=_readable_file(_get(raw, UpstreamConfig, "ca_bundle"), f"{path}.ca_bundle"),
        insecure=insecure,
        share_when_down=share,
        tag_ttl=_tag_ttl(tag_ttl, f"{path}.tag_ttl"),
        offline=own_offline,
        **_tunables(raw, path, defaults),
    )


def _tag_ttl(value: Any, path: str) -> tuple[TagTtl, ...]:
    """`[{match: GLOB, ttl: DURATION} | {match: GLOB, immutable: true}, ...]`, in order."""
    if value is None:  # `tag_ttl:` with nothing after it
        return ()
    # A tuple is the dataclass default, or upstream_defaults' rules already parsed; YAML
    # gives lists.
    if isinstance(value, tuple) and all(isinstance(rule, TagTtl) for rule in value):
        return value
    if not isinstance(value, list):
        raise ConfigError(path, "must be a list such as [{match: 'v*', immutable: true}]")
    return tuple(_tag_ttl_rule(rule, f"{path}[{i}]") for i, rule in enumerate(value))


def _tag_ttl_rule(raw: Any, path: str) -> TagTtl:
    if not isinstance(raw, dict):
        raise ConfigError(
            path, "must be {match: GLOB, ttl: DURATION} or {match: GLOB, immutable: true}"
        )
    _reject_unknown(raw, _names(TagTtl) | {"immutable"}, path)
    match = raw.get("match")
    if not isinstance(match, str) or not match:
        raise ConfigError(f"{path}.match", "must be a glob of tags such as 'v*' or latest")
    immutable = _flag(raw.get("immutable", False), f"{path}.immutable")
    if immutable == ("ttl" in raw):
        raise ConfigError(path, "give either ttl or immutable: true")
    if immutable:
        return TagTtl(match, None)
    return TagTtl(match, parse_duration(raw["ttl"], f"{path}.ttl", allow_zero=True))


def _credential_helper(raw: dict[str, Any], path: str, has_password: bool) -> str | None:
    helper = _get(raw, UpstreamConfig, "credential_helper")
    if helper is None:
        return None
    if not isinstance(helper, str) or not _HELPER_NAME.fullmatch(helper):
        raise ConfigError(
            f"{path}.credential_helper",
            "must be the NAME of docker-credential-NAME, e.g. ecr-login",
        )
    if has_password:
        raise ConfigError(
            f"{path}.credential_helper", "cannot be combined with username and password"
        )
    return helper


def _tunables(raw: dict[str, Any], path: str, defaults: dict[str, Any]) -> dict[str, float]:
    values = {key: raw.get(key, _get(defaults, UpstreamConfig, key)) for key in _TUNABLE}
    return {
        key: parse_duration(value, f"{path}.{key}", allow_zero=key in _MAY_BE_ZERO)
        for key, value in values.items()
    }


def parse_duration(value: Any, path: str, *, allow_zero: bool = False) -> float:
    """`30` (seconds), `500ms`, `30s`, `5m`, `2h`, `30d` → seconds."""
    seconds: float | None = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and (match := _DURATION.fullmatch(value.strip())):
        seconds = float(match[1]) * _DURATION_UNITS[match[2]]
    if seconds is None or seconds < 0 or (seconds == 0 and not allow_zero):
        lower = "zero or more" if allow_zero else "more than zero"
        raise ConfigError(path, f"must be a duration of {lower}, e.g. 30s, 5m, 2h, 30d")
    return seconds


def _expand(value: Any, path: str, env: Mapping[str, str]) -> str | None:
    """Substitute `${ENV_VAR}` references; a missing variable is an error, not ''."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise ConfigError(path, "must be a string")

    def lookup(match: re.Match[str]) -> str:
        name = match[1]
        if name not in env:
            raise ConfigError(path, f"environment variable {name} is not set")
        return env[name]

    return _ENV_REF.sub(lookup, value)
