"""Config parsing: defaults, validation naming the YAML path, env overrides, secrets."""

from __future__ import annotations

import asyncio
import re
import sys
from collections.abc import Callable
from dataclasses import MISSING, Field, fields
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.config import ConfigError, Secret, effective, load_config, parse_config
from proxy.settings import (
    AuthConfig,
    CacheConfig,
    Config,
    LogConfig,
    TlsConfig,
    UpstreamConfig,
)
from tests.secrets import SECRET

MINIMAL = """
upstreams:
  - name: docker.io
    url: https://registry-1.docker.io
    default: true
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "mirror.yaml"
    path.write_text(text)
    return path


def test_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, MINIMAL), env={})
    assert (config.listen_host, config.listen_port) == ("0.0.0.0", 5000)
    assert config.cache.path == Path("./data")
    assert config.cache.max_size == 50 * 1024**3
    upstream = config.upstreams[0]
    assert upstream.default and upstream.is_docker_hub
    assert (upstream.connect_timeout, upstream.read_timeout, upstream.manifest_ttl) == (3, 30, 300)


def test_a_minimal_config_is_the_dataclass_defaults(tmp_path: Path) -> None:
    # The parser writes no default of its own: what a config leaves out is what
    # `proxy.settings` says, so a default changed in one place only fails here.
    text = "upstreams: [{name: a.io, url: https://a.io}]"
    upstream = UpstreamConfig(name="a.io", url="https://a.io")
    assert load_config(write(tmp_path, text), env={}) == Config(upstreams=(upstream,))


def test_the_shipped_mirror_yaml_parses() -> None:
    config = load_config(Path(__file__).parents[2] / "mirror.yaml", env={})
    assert [u.name for u in config.upstreams] == ["docker.io", "ghcr.io", "quay.io"]
    assert config.default_upstream is config.upstreams[0]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("upstreams: []", "upstreams: must be a non-empty list"),
        (
            "upstreams: [{name: a.io, url: https://a.io}, {name: b.io, url: ftp://b.io}]",
            "upstreams[1].url: must be an http(s) URL",
        ),
        ("upstreams: [{name: 'Bad Name', url: https://a.io}]", "upstreams[0].name:"),
        (
            "upstreams: [{name: a.io, url: https://a.io, username: u}]",
            "upstreams[0]: username and password must be given together",
        ),
        (
            "upstreams: [{name: a.io, url: https://a.io, username: 'a:b', password: p}]",
            "upstreams[0].username: must not contain ':'",
        ),
        (
            "upstreams: [{name: a.io, url: https://a.io, username: u, password: p,"
            " share_when_down: true}]",
            "upstreams[0].share_when_down: only for an upstream without credentials",
        ),
        (
            "upstreams: [{name: a.io, url: https://a.io, username: u, password: p,"
            " credential_helper: ecr-login}]",
            "upstreams[0].credential_helper: cannot be combined with username and password",
        ),
        (
            "upstreams: [{name: a.io, url: https://a.io, credential_helper: ../bin/sh}]",
            "upstreams[0].credential_helper: must be the NAME of docker-credential-NAME",
        ),
        (
            "upstreams: [{name: a.io, url: https://a.io, credential_lifetime: soon}]",
            "upstreams[0].credential_lifetime: must be a duration",
        ),
        ("upstreams: [{name: a.io, url: https://a.io, colour: red}]", "upstreams[0].colour:"),
        ("listen: nowhere\n" + MINIMAL, "listen: must be HOST:PORT"),
        ("cache: {max_size: lots}\n" + MINIMAL, "cache.max_size: must be a size"),
        ("version: 2\n" + MINIMAL, "version: must be 1"),
        (
            "upstreams: [{name: a.io, url: https://a.io, default: true},"
            " {name: b.io, url: https://b.io, default: true}]",
            "upstreams: at most one upstream may be the default",
        ),
        ("upstreams: [{name: a.io, url: https://a.io, read_timeout: -1}]", "read_timeout"),
        ("upstream_defaults: {read_timeout: soon}\n" + MINIMAL, "upstream_defaults.read_timeout"),
        ("upstream_defaults: {retries: 3}\n" + MINIMAL, "upstream_defaults.retries: unknown"),
        ("cache: {high_watermark: 1.5}\n" + MINIMAL, "cache.high_watermark: must be a fraction"),
        (
            "cache: {high_watermark: 0.5, low_watermark: 0.6}\n" + MINIMAL,
            "cache.low_watermark: must be below",
        ),
        ("cache: {blob_ttl: forever}\n" + MINIMAL, "cache.blob_ttl: must be a duration"),
        ("{{{", "not valid YAML at line 1"),
        ("trusted_proxies: 10.0.0.0/8\n" + MINIMAL, "trusted_proxies: must be a list of CIDRs"),
        (
            "trusted_proxies: [10.0.0.0/8, 10.0.0.1/8]\n" + MINIMAL,
            "trusted_proxies[1]: '10.0.0.1/8' is not a CIDR",
        ),
        ("trusted_proxies: [proxy.lan]\n" + MINIMAL, "trusted_proxies[0]: 'proxy.lan' is not"),
    ],
)
def test_errors_name_the_yaml_path(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text), env={})
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_upstream_defaults_and_durations(tmp_path: Path) -> None:
    text = (
        "upstream_defaults: {manifest_ttl: 10m, read_timeout: 5s}\n"
        "cache: {blob_ttl: 7d}\n"
        "upstreams:\n"
        "  - {name: a.io, url: https://a.io}\n"
        "  - {name: b.io, url: https://b.io, manifest_ttl: 0, connect_timeout: 500ms}\n"
    )
    config = load_config(write(tmp_path, text), env={})
    a, b = config.upstreams
    assert (a.manifest_ttl, a.read_timeout, a.connect_timeout) == (600, 5, 3)
    assert (b.manifest_ttl, b.read_timeout, b.connect_timeout) == (0, 5, 0.5)
    assert config.cache.blob_ttl == 7 * 86400
    assert (config.cache.high_watermark, config.cache.low_watermark) == (0.9, 0.8)


def test_sizes(tmp_path: Path) -> None:
    for text, size in [("1GiB", 1024**3), ("500MB", 500 * 1000**2), ("1024", 1024)]:
        config = load_config(write(tmp_path, f"cache: {{max_size: {text}}}\n{MINIMAL}"), env={})
        assert config.cache.max_size == size


def test_secrets_come_from_the_environment_and_never_print(tmp_path: Path) -> None:
    text = MINIMAL + "    username: ${HUB_USER}\n    password: ${HUB_TOKEN}\n"
    config = load_config(write(tmp_path, text), env={"HUB_USER": "me", "HUB_TOKEN": SECRET})
    upstream = config.upstreams[0]
    assert upstream.username == "me"
    assert upstream.password == Secret(SECRET)
    assert upstream.password is not None and upstream.password.reveal() == SECRET
    assert SECRET not in repr(config) and SECRET not in str(config)
    with pytest.raises(ConfigError, match=r"upstreams\[0\].password: environment variable"):
        load_config(write(tmp_path, text), env={"HUB_USER": "me"})


def test_environment_overrides(tmp_path: Path) -> None:
    env = {"PULLTHROUGH_LISTEN": "127.0.0.1:6000", "PULLTHROUGH_CACHE__PATH": "/srv/cache"}
    config = load_config(write(tmp_path, MINIMAL), env=env)
    assert (config.listen_host, config.listen_port) == ("127.0.0.1", 6000)
    assert config.cache.path == Path("/srv/cache")


def test_trusted_proxies_are_networks_and_print_as_cidrs(tmp_path: Path) -> None:
    text = "trusted_proxies: [10.0.0.0/8, '2001:db8::/32', 192.168.1.7]\n" + MINIMAL
    config = load_config(write(tmp_path, text), env={})
    assert [str(n) for n in config.trusted_proxies] == [
        "10.0.0.0/8",
        "2001:db8::/32",
        "192.168.1.7/32",
    ]
    assert effective(config)["trusted_proxies"] == ["10.0.0.0/8", "2001:db8::/32", "192.168.1.7/32"]
    assert load_config(write(tmp_path, MINIMAL), env={}).trusted_proxies == ()


async def run(*argv: str, cwd: Path) -> tuple[int | None, str]:
    process = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=cwd
    )
    _, err = await asyncio.wait_for(process.communicate(), 30)
    return process.returncode, err.decode()


async def test_cli_bad_config_is_one_clear_line_and_exit_2(tmp_path: Path) -> None:
    write(tmp_path, "upstreams: [{name: a.io, url: nope}]")
    # `python -m proxy` with the default ./mirror.yaml, from the config's directory.
    code, err = await run(sys.executable, "-m", "proxy", "serve", cwd=tmp_path)
    assert (code, err) == (2, "pullthrough: upstreams[0].url: must be an http(s) URL\n")


async def test_console_script_reports_a_missing_config(tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "pullthrough"
    code, err = await run(str(script), "serve", "--config", "absent.yaml", cwd=tmp_path)
    assert code == 2
    assert err.startswith("pullthrough: cannot read config 'absent.yaml'")
    assert "Traceback" not in err


README = Path(__file__).parents[2] / "README.md"
# Each section of the settings: the README's prefix, its dataclass, and where a parsed
# Config keeps it.
SECTIONS: dict[str, tuple[type[Any], Callable[[Config], Any]]] = {
    "": (Config, lambda config: config),
    "cache.": (CacheConfig, lambda config: config.cache),
    "upstreams[].": (UpstreamConfig, lambda config: config.upstreams[0]),
    "auth.": (AuthConfig, lambda config: config.auth),
    "tls.": (TlsConfig, lambda config: config.tls),
    "log.": (LogConfig, lambda config: config.log),
}
NESTED = {"upstreams", "cache", "auth", "tls", "log"}  # sections, not settings
RENAMED = {"listen_host": "listen", "listen_port": "listen"}  # YAML's `listen: HOST:PORT`


def setting_fields() -> dict[str, list[tuple[str, Field[Any]]]]:
    """Each setting's YAML path, e.g. `cache.max_size`, → its section and field(s)."""
    found: dict[str, list[tuple[str, Field[Any]]]] = {}
    for prefix, (cls, _) in SECTIONS.items():
        for f in fields(cls):
            if f.name not in NESTED:
                found.setdefault(prefix + RENAMED.get(f.name, f.name), []).append((prefix, f))
    return found


def readme_table() -> dict[str, str]:
    """The README's settings table: each setting's YAML path → the default it states. A
    row may pair settings (`upstreams[].allow` / `deny`); each gets its own entry."""
    section = README.read_text().split("\n## Configuration", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        if line.startswith("| `"):
            setting, default, _meaning = line.strip("| ").split(" | ", 2)
            first, *others = re.findall(r"`([^`]+)`", setting)
            prefix = first[: first.rfind(".") + 1]
            for name in [first, *others]:
                rows[name if "." in name else prefix + name] = default.strip("`")
    return rows


def test_every_setting_is_in_the_readme_reference() -> None:
    for name, pairs in setting_fields().items():
        for _, f in pairs:
            assert f.metadata.get("help"), f"{name} has no help text"
    table = readme_table()
    # `upstream_defaults.*` ("as above") is the one row that is no field of its own.
    assert table.pop("upstream_defaults.*") == "as above"
    assert set(table) == set(setting_fields())


def with_readme_default(name: str, text: str) -> Config:
    """A config setting `name` to the README's default `text`, parsed as a config is, so
    that `5m` reads as 300.0 and `50GiB` as bytes; `none` leaves it unset."""
    upstream: dict[str, Any] = {"name": "a.io", "url": "https://a.io"}
    raw: dict[str, Any] = {"upstreams": [upstream]}
    prefix, _, key = name.rpartition(".")
    if prefix == "upstreams[]":
        target = upstream
    elif prefix:
        target = raw.setdefault(prefix, {})
    else:
        target = raw
    target[key] = None if text == "none" else yaml.safe_load(text)
    return parse_config(raw, env={})


def default_of(f: Field[Any]) -> Any:
    """A dataclass field's default, or MISSING for a required one."""
    return f.default_factory() if f.default_factory is not MISSING else f.default


def test_the_readme_defaults_are_the_dataclass_defaults() -> None:
    table = readme_table()
    wrong = []
    for name, pairs in setting_fields().items():
        text = table.get(name, "(no row)")
        for prefix, f in pairs:
            expected = default_of(f)
            if expected is MISSING:
                if text != "required":
                    wrong.append(f"{name}: README says {text}, but it is required")
                continue
            try:
                parsed = getattr(SECTIONS[prefix][1](with_readme_default(name, text)), f.name)
            except ConfigError as exc:
                wrong.append(f"{name}: README's {text} does not parse ({exc})")
                continue
            if parsed != expected:
                wrong.append(f"{name}: README says {text}, the default is {expected!r}")
    assert wrong == []
