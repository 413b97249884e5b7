"""A circuit breaker per upstream, so that an outage costs a client one timeout, not one
per layer.

    closed ──(connect failure, or `threshold` 5xx/timeouts in a row)──▶ open
    open ──(interval elapsed; the next request is let through as the probe)──▶ half_open
    half_open ──(probe succeeds)──▶ closed        interval back to `min_open`
    half_open ──(probe fails)──▶ open             interval doubled, up to `max_open`

While open, requests fail at once with `UpstreamUnavailable`, so callers go straight to
stale content or a 503.

What moves which breaker (`UpstreamClient._record`). A client must not be able to open the
breaker for everyone by asking for something upstream chokes on, so only upstream-wide
signals move the upstream's breaker: refused connections and timeouts (any request), and
5xx from requests about no repository (`/v2/`) or from the token service. A 5xx about one
repository moves a breaker of that repository's own, kept in a bounded LRU map: after
`threshold` in a row, that repository alone fails fast. This is simpler than confirming
with a `/v2/` probe before opening (an extra request, made from a synchronous
bookkeeping step), and it still spares upstream a repository that keeps failing. Any other
answer closes both. A probe that ends neither way is released (`attempt`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from proxy.errors import UpstreamUnavailable

STATES = ("closed", "open", "half_open")


@dataclass(frozen=True)
class BreakerSettings:
    threshold: int = 3
    min_open: float = 2.0
    max_open: float = 60.0


class CircuitBreaker:
    def __init__(
        self,
        name: str,
        settings: BreakerSettings = BreakerSettings(),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.settings = settings
        self.clock = clock
        self.state = "closed"
        self.failures = 0
        self.interval = settings.min_open
        self.opened_at = 0.0
        self._probing = False

    @contextmanager
    def attempt(self) -> Iterator[None]:
        """One exchange, let through by `before_request`. The body settles it with
        `success` or `failure`; a probe that ends neither way (its task cancelled, an
        unexpected error, an answer that tells nothing about the upstream) is released on
        the way out, so that the next request probes instead of the breaker refusing forever."""
        probe = self.before_request()
        try:
            yield
        finally:
            if probe and self.state == "half_open" and self._probing:
                self._probing = False

    def before_request(self) -> bool:
        """Raise at once if upstream is marked down; otherwise let the request go, and
        say whether it is the one probe of a half-open breaker."""
        if self.state == "closed":
            return False
        if self.state == "open" and self.clock() - self.opened_at >= self.interval:
            self.state = "half_open"
            self._probing = False
        if self.state == "half_open" and not self._probing:
            self._probing = True  # this request is the one probe
            return True
        remaining = max(0.0, self.opened_at + self.interval - self.clock())
        raise UpstreamUnavailable(
            f"upstream {self.name} is marked down after repeated failures;"
            f" next try in {remaining:.0f}s"
        )

    def success(self) -> None:
        self.state = "closed"
        self.failures = 0
        self.interval = self.settings.min_open
        self._probing = False

    def failure(self, *, unreachable: bool = False) -> None:
        """Record a failure. `unreachable` (refused, connect timeout) opens at once."""
        self.failures += 1
        if self.state == "half_open":
            self.interval = min(self.interval * 2, self.settings.max_open)
            self._open()
        elif self.state == "closed" and (unreachable or self.failures >= self.settings.threshold):
            self._open()

    def _open(self) -> None:
        self.state = "open"
        self.opened_at = self.clock()
        self._probing = False
