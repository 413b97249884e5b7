"""pytest fixtures for a real upstream registry; use ``from tests.upstream.fixtures import *``.

Session-scoped registries are shared by all tests: never stop them or change
their content in place; push into a fresh repo from ``unique_repo`` instead,
and use ``restartable_registry`` / ``registry_factory`` for outage tests.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.upstream.images import (
    PushedImage,
    big_blob_image,
    docker_manifest_list_image,
    multi_layer_image,
    oci_index_image,
)
from tests.upstream.registry import RegistryProcess
from tests.upstream.token_server import TokenServer

__all__ = [
    "UpstreamImages",
    "big_image",
    "plain_registry",
    "pushed_images",
    "registry_factory",
    "restartable_registry",
    "session_token_server",
    "token_registry",
    "token_server",
    "unique_repo",
    "unique_repo_factory",
]


@dataclass(frozen=True)
class UpstreamImages:
    """The images ``pushed_images`` put upstream (all tagged ``v1``)."""

    multi: PushedImage  # token_registry library/multi:v1, Docker schema2, 3 layers
    oci_index: PushedImage  # token_registry library/ociindex:v1, OCI index amd64+arm64
    docker_list: PushedImage  # token_registry library/dockerlist:v1, Docker manifest list
    plain_multi: PushedImage  # plain_registry library/multi:v1, same bytes/digests as ``multi``


@pytest.fixture(scope="session")
def session_token_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TokenServer]:
    """The token server behind ``token_registry`` for the whole session."""
    with TokenServer(workdir=tmp_path_factory.mktemp("token-server")) as ts:
        yield ts


@pytest.fixture
def token_server(session_token_server: TokenServer) -> Iterator[TokenServer]:
    """``session_token_server``: request log cleared before the test, knobs reset after it."""
    session_token_server.clear_requests()
    yield session_token_server
    session_token_server.reset()


@pytest.fixture(scope="session")
def token_registry(
    session_token_server: TokenServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RegistryProcess]:
    """distribution 2.8 with ``auth: token`` via ``session_token_server``."""
    with RegistryProcess(tmp_path_factory.mktemp("token-registry"), session_token_server) as reg:
        yield reg


@pytest.fixture(scope="session")
def plain_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryProcess]:
    """distribution 2.8 without any auth."""
    with RegistryProcess(tmp_path_factory.mktemp("plain-registry")) as reg:
        yield reg


@pytest.fixture(scope="session")
def pushed_images(
    token_registry: RegistryProcess,
    plain_registry: RegistryProcess,
    session_token_server: TokenServer,
) -> UpstreamImages:
    """One image of each kind in ``token_registry``, plus ``multi`` again in ``plain_registry``."""
    multi = multi_layer_image(token_registry, session_token_server, "library/multi", "v1")
    return UpstreamImages(
        multi=multi,
        oci_index=oci_index_image(token_registry, session_token_server, "library/ociindex", "v1"),
        docker_list=docker_manifest_list_image(
            token_registry, session_token_server, "library/dockerlist", "v1"
        ),
        # Same seed as in token_registry, so digests are identical in both upstreams.
        plain_multi=multi_layer_image(
            plain_registry, None, "library/multi", "v1", seed="library/multi:v1"
        ),
    )


@pytest.fixture(scope="session")
def big_image(
    token_registry: RegistryProcess,
    session_token_server: TokenServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> PushedImage:
    """``library/big:v1`` in ``token_registry``: one ~50 MiB random layer.

    The layer is a file on disk: ``big_image.layers[0].path``.
    """
    return big_blob_image(
        token_registry,
        session_token_server,
        "library/big",
        "v1",
        workdir=tmp_path_factory.mktemp("big"),
    )


_repo_counter = itertools.count(1)


def _sanitize(text: str) -> str:
    # Repository path components: lowercase alphanumerics joined by separators.
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40].strip("-") or "t"


@pytest.fixture
def unique_repo_factory(request: pytest.FixtureRequest) -> Callable[[str], str]:
    """Returns ``make(prefix="r") -> "test/<test-name>-<prefix>-<n>"``, unique in the session."""

    def make(prefix: str = "r") -> str:
        return f"test/{_sanitize(request.node.name)}-{_sanitize(prefix)}-{next(_repo_counter)}"

    return make


@pytest.fixture
def unique_repo(unique_repo_factory: Callable[[str], str]) -> str:
    """A repository name no other test uses, so upstream request counts don't interfere."""
    return unique_repo_factory("r")


@pytest.fixture
def registry_factory(tmp_path: Path) -> Iterator[Callable[..., RegistryProcess]]:
    """``make(auth=True) -> RegistryProcess``: fresh, started registries owned by this test.

    With ``auth=True`` each gets its own TokenServer (``registry.token_server``).
    Everything is stopped at teardown, so tests may stop/start them freely.
    """
    made: list[tuple[RegistryProcess, TokenServer | None]] = []

    def make(auth: bool = True) -> RegistryProcess:
        n = len(made)
        ts = TokenServer(workdir=tmp_path / f"token-{n}").start() if auth else None
        reg = RegistryProcess(tmp_path / f"registry-{n}", ts)
        made.append((reg, ts))
        return reg.start()

    yield make
    for reg, ts in made:
        reg.close()
        if ts is not None:
            ts.close()


@pytest.fixture
def restartable_registry(registry_factory: Callable[..., RegistryProcess]) -> RegistryProcess:
    """A token-auth registry (own storage and token server) that the test may stop()/start()."""
    return registry_factory(auth=True)
