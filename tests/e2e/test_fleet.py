"""A fleet: 3 `pullthrough serve` processes, each with its own cache, behind haproxy running
deploy/fleet/haproxy.cfg (addresses substituted), in front of the real registry with token
auth. The clients are real skopeo processes, 8 of them pulling at once.

- Each blob is fetched from upstream once per fleet: its digest is the routing key, so every
  request for it reaches the same replica, which coalesces them into one download.
- The same layers under a second repository cost no upstream blob GET: they route to the
  replica that already stores them, which only confirms the new repository (a HEAD).
- A 4th replica joining moves only the keys it takes over (to it, and to no other replica);
  the share that moved is printed, not asserted, since it depends on where the digests
  fall on the ring (consistent hashing makes it about 1/4 on average).

Killing a replica mid-pull is not tested here.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from pathlib import Path

import aiohttp

from tests.e2e.fleet import REPLICA_HEADER, HaproxyProcess
from tests.e2e.skopeo import copy_to_dir, manifest_digest, verify_dir
from tests.e2e.support import require_binary
from tests.mirror_process import MirrorProcess
from tests.upstream.images import build_image, push_image
from tests.upstream.registry import RegistryProcess
from tests.upstream.token_server import TokenServer

CLIENTS = 8
# Many small layers: enough digests to spread over the ring, little data to move.
LAYER_SIZES = tuple(4096 * (n + 1) for n in range(20))


def stored(replica: MirrorProcess) -> set[str]:
    root = replica.workdir / "data" / "blobs"
    return {f"{p.parent.parent.name}:{p.name}" for p in root.glob("*/*/*") if p.is_file()}


async def owners(replicas: list[MirrorProcess], digests: set[str]) -> dict[str, int]:
    """digest -> index of the one replica storing it (each is committed a moment after its
    last byte went out, so wait for that)."""
    deadline = asyncio.get_running_loop().time() + 5
    while True:
        holders = {d: [i for i, r in enumerate(replicas) if d in stored(r)] for d in digests}
        if all(holders.values()):
            break
        assert asyncio.get_running_loop().time() < deadline, f"not stored: {holders}"
        await asyncio.sleep(0.05)
    assert all(len(h) == 1 for h in holders.values()), f"stored more than once: {holders}"
    return {d: h[0] for d, h in holders.items()}


async def routed_to(balancer: HaproxyProcess, repo: str, digests: set[str]) -> dict[str, int]:
    """digest -> index of the replica haproxy sends a request for it to."""
    routes = {}
    async with aiohttp.ClientSession() as session:
        for digest in digests:
            async with session.head(f"{balancer.url}/v2/{repo}/blobs/{digest}") as response:
                routes[digest] = int(response.headers[REPLICA_HEADER].removeprefix("replica-"))
    return routes


def upstream_blob_gets(registry: RegistryProcess, digest: str) -> int:
    """Successful GETs of `digest`, under any repository name."""
    return sum(
        1
        for e in registry.requests("GET", f"/blobs/{digest}")
        if e.path.endswith(f"/blobs/{digest}") and e.status // 100 == 2
    )


async def test_a_fleet_fetches_each_blob_once(
    token_registry: RegistryProcess,
    token_server: TokenServer,
    unique_repo_factory: Callable[[str], str],
    tmp_path: Path,
) -> None:
    require_binary("haproxy")
    require_binary("skopeo")
    first, second = unique_repo_factory("first"), unique_repo_factory("second")
    image = build_image(first, layer_sizes=LAYER_SIZES)  # fresh bytes: cold everywhere
    pushed = push_image(token_registry, token_server, first, "v1", image)
    push_image(token_registry, token_server, second, "v1", image)
    blobs = {blob.digest for blob in pushed.blobs}

    replicas: list[MirrorProcess] = []
    balancers: list[HaproxyProcess] = []

    async def add_replica() -> MirrorProcess:
        workdir = tmp_path / f"replica-{len(replicas)}"
        workdir.mkdir()
        replicas.append(MirrorProcess(workdir, token_registry.url))
        await replicas[-1].start()
        return replicas[-1]

    async def start_balancer() -> HaproxyProcess:
        workdir = tmp_path / f"haproxy-{len(balancers)}"
        workdir.mkdir()
        balancers.append(HaproxyProcess(workdir, [f"127.0.0.1:{r.port}" for r in replicas]))
        await balancers[-1].start()
        return balancers[-1]

    try:
        await asyncio.gather(*(add_replica() for _ in range(3)))
        balancer = await start_balancer()
        host = f"127.0.0.1:{balancer.port}"

        # 1. Eight clients pull the cold image at once: one upstream GET per blob.
        dests = await asyncio.gather(
            *(copy_to_dir(f"{host}/{first}:v1", tmp_path / f"pull-{n}") for n in range(CLIENTS))
        )
        for dest in dests:
            assert manifest_digest(dest) == pushed.digest
            assert set(verify_dir(dest)) == blobs
        gets = {digest: upstream_blob_gets(token_registry, digest) for digest in blobs}
        assert gets == dict.fromkeys(blobs, 1)
        owner = await owners(replicas, blobs)
        print(
            f"\nfleet: {len(blobs)} blobs over 3 replicas:",
            [list(owner.values()).count(i) for i in range(3)],
        )

        # 2. The same layers under a second repository: confirmed (HEAD), never fetched.
        dest = await copy_to_dir(f"{host}/{second}:v1", tmp_path / "pull-second")
        assert manifest_digest(dest) == pushed.digest
        assert set(verify_dir(dest)) == blobs
        assert {digest: upstream_blob_gets(token_registry, digest) for digest in blobs} == gets
        heads = {d: token_registry.count("HEAD", f"/v2/{second}/blobs/{d}", 2) for d in blobs}
        assert heads == dict.fromkeys(blobs, 1)
        assert await owners(replicas, blobs) == owner

        # 3. A 4th replica joins (haproxy restarted with it last): keys move only to it.
        await add_replica()
        await balancer.stop()
        balancer = await start_balancer()
        route = await routed_to(balancer, first, blobs)
        moved = {digest for digest in blobs if route[digest] != owner[digest]}
        assert {route[digest] for digest in moved} <= {3}
        print(
            f"fleet: a 4th replica took over {len(moved)} of {len(blobs)} cached digests "
            f"({len(moved) / len(blobs):.0%}; consistent hashing expects about 25%)"
        )
    finally:
        for balancer in balancers:
            await balancer.stop()
            balancer.config.unlink(missing_ok=True)
        for replica in replicas:
            if replica.process is not None and replica.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    await replica.kill()
