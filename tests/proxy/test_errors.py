"""Every client-visible error renders the OCI envelope with its own status and code."""

from __future__ import annotations

import json

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from proxy import errors
from proxy.errors import RegistryError, error_middleware

OCI_CODES = {
    "BLOB_UNKNOWN", "DIGEST_INVALID", "MANIFEST_INVALID", "MANIFEST_UNKNOWN", "NAME_INVALID",
    "NAME_UNKNOWN", "TAG_INVALID", "UNAUTHORIZED", "DENIED", "UNSUPPORTED", "TOOMANYREQUESTS",
    # distribution's own additions, which Docker clients understand:
    "UNAVAILABLE", "UNKNOWN", "RANGE_INVALID", "NOT_FOUND",
}  # fmt: skip


def all_error_classes() -> list[type[RegistryError]]:
    found, queue = [], [RegistryError]
    while queue:
        cls = queue.pop()
        found.append(cls)
        queue.extend(cls.__subclasses__())
    return sorted(found, key=lambda c: c.__name__)


def test_every_error_class_is_in_the_tree_drawn_in_the_module_docstring() -> None:
    for cls in all_error_classes():
        assert cls.__name__ in (errors.__doc__ or ""), cls.__name__


@pytest.mark.parametrize("cls", all_error_classes(), ids=lambda c: c.__name__)
async def test_envelope(cls: type[RegistryError]) -> None:
    async def handler(request: web.Request) -> web.Response:
        raise cls("something specific", detail={"k": "v"})

    app = web.Application(middlewares=[error_middleware])
    app.router.add_get("/x", handler)
    async with TestClient(TestServer(app)) as client:
        response = await client.get("/x")
        assert response.status == cls.status
        assert response.content_type == "application/json"
        body = json.loads(await response.read())
    assert body == {
        "errors": [{"code": cls.code, "message": "something specific", "detail": {"k": "v"}}]
    }
    assert cls.code in OCI_CODES
    assert 400 <= cls.status < 600


async def test_an_unexpected_exception_is_a_500_envelope_not_a_traceback() -> None:
    async def handler(request: web.Request) -> web.Response:
        raise ZeroDivisionError("boom")

    app = web.Application(middlewares=[error_middleware])
    app.router.add_get("/x", handler)
    async with TestClient(TestServer(app)) as client:
        response = await client.get("/x")
        text = await response.text()
    assert response.status == 500
    assert json.loads(text)["errors"][0]["code"] == "UNKNOWN"
    assert "Traceback" not in text and "boom" not in text
