"""The current config, and reloading it on SIGHUP without dropping anything.

`LiveConfig` is the one owner of the `Config` a request is served with. A request reads
`current` once, when it comes in (`proxy.routing.resolve` puts that upstream's settings
in its `Target`), and keeps that snapshot to its end, so a download in flight finishes
under the settings it began with. A reload parses the file into a whole new `Config` and
swaps it in with one assignment: no request ever sees half of each.

    reloaded on SIGHUP                       needs a restart (logged at WARNING)
    upstreams: every setting, and            listen, cache.*, auth.*, tls.*,
      upstreams added or removed             log.format, client_timeout,
    offline (the global one)                 upstream_connections, shutdown_grace,
    log.level (unless --log-level is given)  trusted_proxies, warm (read at start-up)

What needs a restart keeps its running value in `current`, so that `current` always says
what the mirror does. A file that doesn't parse is refused, with an error logged, and the
running config stays. Upstream tokens, challenges, helper answers and TLS contexts are
kept under `UpstreamConfig.access` (proxy/upstream.py), so new credentials are used from
the next request on; the breakers and the cache are kept by upstream name.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from proxy.config import Config, ConfigError, effective, load_config
from proxy.metrics import Metrics
from proxy.tls import warn_insecure

log = logging.getLogger("pullthrough.reload")


class LiveConfig:
    """The config requests are served with now; replaced whole by `swap`."""

    def __init__(self, config: Config) -> None:
        self._current = config

    @property
    def current(self) -> Config:
        return self._current

    def swap(self, config: Config) -> None:
        self._current = config


class Reloader:
    """Reads the config file again and applies what can change while serving.

    `level_override` is the `--log-level` given on the command line: it wins over the
    file's `log.level`, on a reload too."""

    def __init__(
        self,
        live: LiveConfig,
        path: str | os.PathLike[str],
        metrics: Metrics,
        level_override: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.live = live
        self.path = path
        self.metrics = metrics
        self.level_override = level_override
        self.env = env

    def reload(self) -> bool:
        """Apply the file's config now; False (logged) if it was refused."""
        try:
            new = load_config(self.path, self.env)
        except ConfigError as exc:
            log.error("config reload refused, still serving the previous config: %s", exc)
            return False
        old = self.live.current
        applied = _reloadable(old, new)
        # Whatever the file changed beyond that keeps its running value until a restart.
        needs_restart = _changed(effective(applied), effective(new))
        if needs_restart:
            log.warning(
                "config reload: %s changed, needs a restart (still running with the old"
                " value until then)",
                ", ".join(needs_restart),
            )
        if self.level_override is not None:  # --log-level wins over the file
            applied = replace(applied, log=old.log)
        self._apply_side_effects(old, applied)
        self.live.swap(applied)
        log.info("config reloaded from %s: %s", self.path, _summary(old, applied))
        return True

    def _apply_side_effects(self, old: Config, new: Config) -> None:
        self.metrics.prepare([u.name for u in new.upstreams if old.upstream(u.name) is None])
        insecure_before = {u.name for u in old.upstreams if u.insecure}
        newly = tuple(u for u in new.upstreams if u.insecure and u.name not in insecure_before)
        warn_insecure(replace(new, upstreams=newly))
        if new.log.level != old.log.level:
            logging.getLogger().setLevel(new.log.level)


def _reloadable(old: Config, new: Config) -> Config:
    """The running config with what a reload may change taken from the file: every
    upstream setting, the global offline, and the log level."""
    level = replace(old.log, level=new.log.level)
    return replace(old, upstreams=new.upstreams, offline=new.offline, log=level)


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = prefix + key
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _changed(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The YAML paths whose values differ."""
    before, after = _flatten(old), _flatten(new)
    return [
        name for name in dict.fromkeys([*before, *after]) if before.get(name) != after.get(name)
    ]


def _summary(old: Config, new: Config) -> str:
    """Which upstreams were added, removed or changed, and which are offline."""
    parts = []
    added = [u.name for u in new.upstreams if old.upstream(u.name) is None]
    removed = [u.name for u in old.upstreams if new.upstream(u.name) is None]
    changed = [
        u.name for u in new.upstreams if (was := old.upstream(u.name)) is not None and was != u
    ]
    for what, names in (("added", added), ("removed", removed), ("changed", changed)):
        if names:
            parts.append(f"upstreams {what}: {', '.join(names)}")
    offline = [u.name for u in new.upstreams if u.offline]
    parts.append(f"offline: {', '.join(offline) if offline else 'none'}")
    return "; ".join(parts)
