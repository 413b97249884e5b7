"""Fault descriptions for the fake upstream and its CDN.

A :class:`Fault` is plain data; the servers interpret it.  Faults are stored
per *key* in a :class:`FaultTable`:

* a digest (``"sha256:..."``): applies to blob and manifest requests for it;
* a manifest tag (``"latest"``): applies to manifest requests by that tag;
* a path starting with ``/`` (``"/token"``, ``"/v2/"``): applies to any
  request for exactly that path, before auth; only ``status``/``hang`` make
  sense there.

Several faults may be queued on one key; the first one that still has uses
left and matches the request method wins, which lets a test script "503 once,
then reset once, then succeed".
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Literal

RedirectTarget = Literal["cdn", "self"]


@dataclass(eq=False)
class Fault:
    """What to do wrong when serving one request.

    Response-level (decided before any body is sent; mutually exclusive):

    * ``status``: answer with this status (429, 500, 502, 503, ...) and an OCI
      error body; ``retry_after`` adds a ``Retry-After`` header.
    * ``hang``: accept the request and never answer (until the server closes).
    * ``redirect``: answer with this redirect status (301/302/303/307/308).
      ``redirect_to="cdn"`` points ``Location`` at the separate CDN server
      (which needs no auth); ``"self"`` points it at another path on the
      registry itself.  Body faults for the redirected download are set on
      the CDN (``upstream.cdn.set_fault``), not here.

    Body-level (may be combined):

    * ``corrupt``: flip one byte (the middle one); length stays correct.
    * ``reset_after``: send the full ``Content-Length`` header, write this
      many bytes, then drop the connection.  ``hard_reset=True`` sends a TCP
      RST (the client sees ECONNRESET) instead of a FIN (premature EOF).
    * ``chunk_size``/``delay``: send the body in small chunks with a sleep
      between them ("slow").
    * ``gate_after``: send this many bytes, set ``gate_reached``, then wait
      until the test sets ``gate`` before sending the rest.  This makes
      "a download is in progress" a deterministic state.
    * ``wrong_length``: declared ``Content-Length`` = actual length + this.
      Positive: fewer bytes arrive than announced, then the connection
      closes.  Negative: all real bytes are written to the socket anyway, so a
      client trusting ``Content-Length`` silently gets a truncated body.

    Matching:

    * ``times``: apply to the first N matching requests only (None = always).
    * ``methods``: which request methods the fault applies to.  GET only by
      default, so a client's HEAD probe does not use up a ``times=1`` fault.

    ``hits`` counts how many requests the fault was applied to.
    """

    status: int | None = None
    retry_after: int | str | None = None
    hang: bool = False
    endless: bool = False  # 200 with a chunked body that never ends
    redirect: int | None = None
    redirect_to: RedirectTarget = "cdn"
    redirect_location: str | None = None  # overrides redirect_to: any Location at all

    corrupt: bool = False
    reset_after: int | None = None
    hard_reset: bool = False
    chunk_size: int | None = None
    delay: float = 0.0
    gate_after: int | None = None
    wrong_length: int = 0

    times: int | None = None
    methods: tuple[str, ...] = ("GET",)

    gate: asyncio.Event = field(default_factory=asyncio.Event)
    gate_reached: asyncio.Event = field(default_factory=asyncio.Event)
    hits: int = 0

    def __post_init__(self) -> None:
        response_level = [
            name
            for name, on in (
                ("status", self.status is not None),
                ("hang", self.hang),
                ("endless", self.endless),
                ("redirect", self.redirect is not None),
            )
            if on
        ]
        if len(response_level) > 1:
            raise ValueError(f"Fault: {response_level} are mutually exclusive")
        if response_level and self.has_body_fault:
            raise ValueError(f"Fault: {response_level[0]} cannot be combined with body faults")
        if self.redirect is not None and self.redirect not in (301, 302, 303, 307, 308):
            raise ValueError(f"Fault: not a redirect status: {self.redirect}")
        if self.redirect_to not in ("cdn", "self"):
            raise ValueError("Fault: redirect_to must be 'cdn' or 'self'")
        if self.times is not None and self.times < 1:
            raise ValueError("Fault: times must be >= 1 (or None for always)")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ValueError("Fault: chunk_size must be >= 1")
        self.methods = tuple(m.upper() for m in self.methods)

    @property
    def has_body_fault(self) -> bool:
        return (
            self.corrupt
            or self.reset_after is not None
            or self.chunk_size is not None
            or self.delay > 0
            or self.gate_after is not None
            or self.wrong_length != 0
        )

    @property
    def exhausted(self) -> bool:
        return self.times is not None and self.hits >= self.times


class FaultTable:
    """Faults queued per key, consumed as requests arrive."""

    def __init__(self) -> None:
        self._faults: dict[str, list[Fault]] = {}

    def set(self, key: str, fault: Fault) -> Fault:
        """Replace all faults on ``key`` with ``fault``."""
        self._faults[key] = [fault]
        return fault

    def add(self, key: str, fault: Fault) -> Fault:
        """Queue ``fault`` on ``key`` after any faults already there."""
        self._faults.setdefault(key, []).append(fault)
        return fault

    def remove(self, key: str) -> None:
        self._faults.pop(key, None)

    def clear(self) -> None:
        self._faults.clear()

    def take(self, keys: list[str], method: str) -> Fault | None:
        """Return the fault to apply to this request (counting the hit)."""
        for key in keys:
            queue = self._faults.get(key)
            if not queue:
                continue
            for fault in queue:
                if fault.exhausted or method not in fault.methods:
                    continue
                fault.hits += 1
                return fault
        return None
