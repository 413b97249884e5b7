"""Plain records of what the fake servers saw, for tests to assert on."""

from __future__ import annotations

from dataclasses import dataclass, field

from aiohttp import web


@dataclass(frozen=True)
class RecordedRequest:
    """One HTTP request as received by a fake server.

    ``headers`` is a plain dict keyed by the header name exactly as the client
    sent it; use :meth:`header` for a case-insensitive lookup.
    """

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    raw_query: str = ""

    @classmethod
    def from_request(cls, request: web.BaseRequest) -> RecordedRequest:
        headers: dict[str, str] = {}
        for name, value in request.headers.items():
            # A repeated header is folded into one comma-joined value, as
            # RFC 9110 allows, so nothing the client sent is silently lost.
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        return cls(
            method=request.method,
            path=request.path,
            query=dict(request.query),
            headers=headers,
            raw_query=request.query_string,
        )

    def header(self, name: str) -> str | None:
        """Case-insensitive header lookup."""
        wanted = name.lower()
        for key, value in self.headers.items():
            if key.lower() == wanted:
                return value
        return None

    @property
    def authorization(self) -> str | None:
        """The ``Authorization`` header, if the client sent one."""
        return self.header("Authorization")


@dataclass
class TokenGrant:
    """A bearer token handed out by the fake token endpoint."""

    token: str
    scopes: tuple[str, ...]
    service: str | None
    username: str | None  # None for anonymous tokens
    expires_at: float | None = None  # loop.time() deadline; None = never
    # Parsed (type, name, action) triples, used to check access.
    grants: frozenset[tuple[str, str, str]] = field(default_factory=frozenset)

    def allows(self, repository: str, action: str = "pull") -> bool:
        return ("repository", repository, action) in self.grants
