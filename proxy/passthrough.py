"""Endpoints answered by upstream every time: tag lists and referrers."""

from __future__ import annotations

import re
from dataclasses import dataclass

from proxy.errors import ManifestUnknown, NameUnknown, RegistryError, UpstreamBadResponse
from proxy.routing import Target
from proxy.upstream import UpstreamClient

MAX_LISTING_SIZE = 8 * 1024 * 1024
_PASSED_HEADERS = ("Content-Type", "OCI-Filters-Applied")
_LINK_PATH = re.compile(r"<(?:https?://[^/>]+)?/v2/(.+?)/(tags/list|referrers/[^?>]*)(\?[^>]*)?>")


@dataclass(frozen=True, slots=True)
class Listing:
    body: bytes
    headers: dict[str, str]


class Passthrough:
    def __init__(self, client: UpstreamClient) -> None:
        self.client = client

    async def tags(self, target: Target, params: dict[str, str]) -> Listing:
        return await self._get(
            target, "tags/list", params, NameUnknown(detail={"name": target.name})
        )

    async def referrers(self, target: Target, digest: str, params: dict[str, str]) -> Listing:
        not_found = ManifestUnknown(detail={"name": target.name, "digest": digest})
        return await self._get(target, f"referrers/{digest}", params, not_found)

    async def _get(
        self, target: Target, endpoint: str, params: dict[str, str], not_found: RegistryError
    ) -> Listing:
        response = await self.client.request(
            target.upstream,
            "GET",
            f"/v2/{target.repo}/{endpoint}",
            repo=target.repo,
            params=params,
        )
        async with response:
            self.client.check(target.upstream, response, not_found)
            if (response.content_length or 0) > MAX_LISTING_SIZE:
                raise UpstreamBadResponse(f"upstream {target.upstream.name} sent too large a list")
            body = await response.content.read(MAX_LISTING_SIZE + 1)
            if len(body) > MAX_LISTING_SIZE:
                raise UpstreamBadResponse(f"upstream {target.upstream.name} sent too large a list")
            headers = {h: response.headers[h] for h in _PASSED_HEADERS if h in response.headers}
            link = response.headers.get("Link")
        if link:
            headers["Link"] = rewrite_link(link, target)
        return Listing(body, headers)


def rewrite_link(link: str, target: Target) -> str:
    """Point upstream's pagination link at this mirror, under the name the client used."""

    def local(match: re.Match[str]) -> str:
        query = match[3] or ""
        if target.namespace is not None:
            query += ("&" if query else "?") + f"ns={target.namespace}"
        return f"</v2/{target.name}/{match[2]}{query}>"

    return _LINK_PATH.sub(local, link)
