"""``make bench``: ``.venv/bin/python -m tests.bench.run``.

Starts everything on 127.0.0.1 itself (the token server and Debian's docker-registry as
the upstream, our mirror, distribution's proxy mode as the peer, nginx serving the
mirror's blob files, and the relay: a second nginx with proxy_cache in front of the
upstream, which caches to disk and checks no digests), then runs:

    check       a small image through direct, mirror, peer and relay; the access log's
                size field checked against a blob's body bytes
    cold        per repetition a fresh image (new seed): skopeo direct, through the
                mirror, through the peer, through the relay, and direct again beside
                the verifier (order rotated); time and upstream bytes. The relay is the
                physical limit of a caching hop here; the CPU seconds sha256 takes over
                each image's bytes are what verifying them costs any mirror, and the
                pull beside the verifier (tests/bench/verifier.py: sha256, write and
                fsync of the same bytes at a direct pull's pace) is what that work,
                with its writes, costs a client on the same cores
    concurrent  per repetition a fresh image: N skopeo clients at once, mirror and peer
    concurrent_curl  the same with N curl clients to /dev/null (info: the servers' side
                without N skopeos hashing and writing to disk), and one curl fetching
                the same blobs direct (with a token)
    wan         cold, concurrent and concurrent_curl again with the upstream behind a
                slow link (tests/bench/wan.py; BENCH_PROFILES, BENCH_WAN_RATE): a second
                upstream process on the same storage, in a network namespace, with a
                mirror, a peer and a relay of its own
    warm        the first cold image again, BENCH_WARM_REPS alternating reps: skopeo
                through mirror, peer and direct; one curl of its largest layer from
                mirror, peer and nginx; curl of the 4 layer files from the mirror and
                from nginx, in parallel and in sequence
    small_images  BENCH_SMALL_IMAGES one-layer images (3 MiB), pulled one after another
                by skopeo through mirror, peer and direct: cold (a new set per rep) and
                warm (the last set again)
    manifests   wrk, 32 connections, by tag and by digest, mirror and peer
    fleet       per repetition a fresh image: N skopeo clients through 3 replicas behind
                haproxy and through the mirror alone (tests/bench/fleet.py)

Every timed run also records the CPU seconds of the mirror, the peer, the relay (its
workers), the upstream and the clients, and the 1-minute load average when it started
(the machine is shared). The N skopeo clients' own CPU over the cores, set against the
peer's wall, is the best ratio any server could reach in the concurrent phase.
The mirror's and the peer's RSS is sampled every 50 ms per phase, and VmHWM is reset at
the start of each phase. With BENCH_PROFILE=1 py-spy records the mirror. The tables (one
per profile) go to stdout; the raw numbers to bench-results/bench-<timestamp>.json and
latest.json (the WAN profile's under "wan").
Exit status 0 when everything ran (targets may fail: see the table), 1 when the
harness itself failed, 3 with BENCH_STRICT=1 when a target failed.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import importlib.metadata
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.bench import fleet, report
from tests.bench.images import BenchImage, make_image
from tests.bench.measure import (
    DOCKER_ACCEPT,
    MB,
    CpuMeter,
    Profiler,
    RssSampler,
    UpstreamLog,
    curl_blobs,
    median,
    settle_disk,
    skopeo,
    skopeo_many,
    verifier_beside,
    write_wrk_script,
    wrk,
)
from tests.bench.peers import (
    NGINX,
    PULLTHROUGH,
    Mirror,
    Nginx,
    Peer,
    Relay,
    registry_pid,
    start_upstream,
)
from tests.bench.settings import COLD_PHASES, LAYERS, REPO_ROOT, Settings
from tests.bench.wan import WanLink, WanRegistry
from tests.upstream.client import UpstreamClient
from tests.upstream.images import PushedImage, build_image, push_image
from tests.upstream.registry import REGISTRY_BINARY, RegistryProcess
from tests.upstream.token_server import TokenServer

CURL_BYTES = 2_500_000_000  # bytes per warm curl measurement
TOOLS = {
    "skopeo": "skopeo",
    "curl": "curl",
    "wrk": "wrk",
    NGINX: "nginx",
    REGISTRY_BINARY: "docker-registry",
}
WAN_TOOLS = {"ip": "iproute2", "tc": "iproute2"}  # the WAN profile's namespace and qdisc


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def rotate(items: list[str], n: int) -> list[str]:
    """Each repetition starts with the next one, so no side always goes first."""
    n %= len(items)
    return items[n:] + items[:n]


class Bench:
    def __init__(
        self,
        settings: Settings,
        work: Path,
        raw: dict[str, Any],
        token_server: TokenServer,
        upstream: RegistryProcess,
        mirror: Mirror,
        peer: Peer,
        nginx: Nginx,
        relay: Relay,
        sampler: RssSampler,
        profiler: Profiler,
        profile: str = "loopback",
    ) -> None:
        self.s = settings
        self.profile = profile
        self.wan: Bench | None = None  # the same phases over the slow link (COLD_PHASES)
        # Where images are pushed: the loopback upstream, whose storage the WAN one shares
        # (the test client that pushes speaks to 127.0.0.1 only).
        self.push_to = upstream
        self.work = work
        self.raw = raw
        self.token_server = token_server
        self.upstream = upstream
        self.mirror = mirror
        self.peer = peer
        self.nginx = nginx
        self.relay = relay
        self.sampler = sampler
        self.profiler = profiler
        self.log = UpstreamLog(upstream)
        self.cpu = CpuMeter(
            {"mirror": mirror.pid, "peer": peer.pid, "upstream": registry_pid(upstream)},
            trees={"relay": relay.pid},
        )
        self.hosts = {
            "direct": upstream.host,
            "mirror": mirror.host,
            "peer": peer.host,
            "relay": relay.host,
        }
        self.warm_image: BenchImage | None = None
        self.curl_urls: dict[str, tuple[list[str], dict[str, int]]] = {}

    def _begin(self) -> tuple[Any, Any, float]:
        """Start measuring a pull: the upstream log position, CPU times, load average."""
        self.log.settle()
        return self.log.mark(), self.cpu.snapshot(), os.getloadavg()[0]

    def _finish(self, rep: int, begun: tuple[Any, Any, float], img: BenchImage) -> dict[str, Any]:
        """The fields every pull measurement records: CPU, load and upstream traffic."""
        mark, cpu, load = begun
        self.log.settle()
        traffic = self.log.since(mark)
        return {
            "rep": rep + 1,
            "loadavg_1m": load,
            "cpu_seconds": self.cpu.since(cpu),
            "image": img.repo,
            "upstream_blob_bytes": traffic.blob_bytes,
            "image_bytes": img.size,
            "upstream_ratio": traffic.blob_bytes / img.size,
            "upstream_requests": traffic.summary(),
        }

    def image(self, name: str, layer_bytes: int | None = None) -> BenchImage:
        if self.profile != "loopback":  # the upstreams share their storage, so their tags
            name = f"{name}-{self.profile}"
        log(f"building and pushing {name}")
        img = make_image(
            self.push_to,
            self.token_server,
            self.work / "build",
            name,
            layer_bytes or self.s.layer_bytes,
            LAYERS,
        )
        self.raw["images"][name] = img.describe()
        log(
            f"  {img.size / MB:.1f} MB: built in {img.build_seconds:.1f} s,"
            f" pushed in {img.push_seconds:.1f} s"
        )
        return img

    def out(self, name: str) -> Path:
        return self.work / "out" / name

    # -- phases ----------------------------------------------------------------------

    def check(self) -> None:
        """Everything answers, anonymous pulls work through the peer, and the access
        log's size field is the body bytes of a blob GET."""
        img = self.image("bench-check", 1 << 20)
        blob = img.layers[0]
        client = UpstreamClient(self.upstream, self.token_server)
        mark = self.log.mark()
        body = client.get_blob(img.repo, blob.digest).body
        head = client.request("HEAD", f"/v2/{img.repo}/blobs/{blob.digest}", img.repo)
        traffic = self.log.since(mark)
        gets = traffic.blob_gets
        heads = [e for e in traffic.entries if e.method == "HEAD" and "/blobs/" in e.path]
        sizes = {
            "blob_size": blob.size,
            "body_bytes": len(body),
            "logged_get_size": gets[-1].size if gets else None,
            "logged_head_size": heads[-1].size if heads else None,
            "head_status": head.status,
        }
        if not (len(body) == blob.size == sizes["logged_get_size"]) or sizes["logged_head_size"]:
            raise RuntimeError(f"the access log's size is not the body bytes: {sizes}")
        self.raw["checks"]["access_log_size_is_body_bytes"] = sizes
        for who, host in self.hosts.items():
            seconds = skopeo(img.ref(host), self.out(f"check-{who}"), img.blobs)
            self.raw["checks"][f"pull_{who}_seconds"] = round(seconds, 3)
        self.raw["checks"]["peer_anonymous_pull"] = "ok"
        log("checks passed: direct, mirror, relay and anonymous peer pulls; log size = body bytes")

    def hash_cost(self, rep: int, img: BenchImage) -> dict[str, Any]:
        """CPU seconds sha256 spends on the image's blobs: what checking every digest costs
        a mirror whatever its language (the relay checks none). The bytes come from the
        upstream's storage (our layer files are gone after the push). Only the hashing is
        timed, not the reads, and only this thread (``thread_time``: the RSS sampler's
        thread would count in ``process_time``)."""
        cpu = 0.0
        for blob in img.blobs:
            h = hashlib.sha256()
            with open(self.upstream.blob_path(blob.digest), "rb") as f:
                while chunk := f.read(1 << 20):
                    started = time.thread_time()
                    h.update(chunk)
                    cpu += time.thread_time() - started
            if "sha256:" + h.hexdigest() != blob.digest:
                raise RuntimeError(f"the upstream's copy of {blob.digest} does not match")
        return {
            "rep": rep + 1,
            "image": img.repo,
            "bytes": img.size,
            "cpu_seconds": round(cpu, 4),
            "mb_per_s": round(img.size / cpu / MB, 1) if cpu else None,
        }

    def cold(self) -> None:
        runs: dict[str, list[dict[str, Any]]] = {
            "direct": [],
            "mirror": [],
            "peer": [],
            "relay": [],
            "verifier": [],
        }
        self.raw["cold"] = runs
        hashes: list[dict[str, Any]] = []
        self.raw["cold_sha256"] = hashes
        for rep in range(self.s.reps):
            img = self.image(f"bench-cold-{rep + 1}")
            if self.warm_image is None:
                self.warm_image = img
            hashes.append(self.hash_cost(rep, img))
            log(
                f"sha256 of {img.repo}: {hashes[-1]['cpu_seconds']:.3f} CPU s,"
                f" {hashes[-1]['mb_per_s']} MB/s"
            )
            # Direct goes first in the first repetition, so the verifier always has a
            # direct pull's pace to keep to.
            for who in rotate(["direct", "mirror", "peer", "relay", "verifier"], rep):
                begun = self._begin()
                extra: dict[str, Any] = {}
                if who == "verifier":
                    seconds, extra = self.pull_beside_verifier(img, runs["direct"])
                else:
                    profile = self.profiler.record("cold") if who == "mirror" and rep == 0 else None
                    with profile or contextlib.nullcontext():
                        seconds = skopeo(img.ref(self.hosts[who]), self.out(who), img.blobs)
                run = (
                    self._finish(rep, begun, img)
                    | extra
                    | {
                        "seconds": round(seconds, 4),
                        "mb_per_s": round(img.size / seconds / MB, 2),
                    }
                )
                runs[who].append(run)
                log(
                    f"cold {who:6} rep {rep + 1}: {seconds:.2f} s, {run['mb_per_s']:.0f} MB/s,"
                    f" upstream {run['upstream_ratio']:.3f}x"
                )

    def pull_beside_verifier(
        self, img: BenchImage, direct: list[dict[str, Any]]
    ) -> tuple[float, dict[str, Any]]:
        """A direct pull while the verifier hashes, writes and fsyncs the image's blobs
        (read from the upstream's storage) at the pace of the direct pulls so far."""
        pace = img.size / median([r["seconds"] for r in direct])
        files = [(self.upstream.blob_path(b.digest), b.digest) for b in img.blobs]
        with verifier_beside(files, pace, self.work / "verifier") as verifier:
            seconds = skopeo(img.ref(self.hosts["direct"]), self.out("verifier"), img.blobs)
        return seconds, {
            "verifier_cpu_seconds": verifier["cpu_seconds"],
            "verifier_seconds": verifier["seconds"],
            "verifier_bytes_per_second": round(pace),
        }

    def concurrent(self) -> None:
        """N skopeo clients at once, direct (the clients' own floor), through the mirror
        and through the peer. The first N-client run after the cold phase is slower for
        whoever goes first (the clients' 5 GB of output makes the kernel reclaim page
        cache), so an unmeasured direct run comes first. Over the slow link, N direct
        pulls would mostly measure the link (N times the image), so only the mirror and
        the peer run there."""
        n = self.s.clients
        sides = ["direct", "mirror", "peer"] if self.profile == "loopback" else ["mirror", "peer"]
        runs: dict[str, list[dict[str, Any]]] = {who: [] for who in sides}
        self.raw["concurrent"] = runs
        for rep in range(self.s.reps):
            img = self.image(f"bench-many-{rep + 1}")
            if rep == 0 and "direct" in sides:
                dests = [self.out(f"warm-up-{i}") for i in range(n)]
                wall, _ = skopeo_many(img.ref(self.hosts["direct"]), dests, img.blobs)
                log(f"{n} clients direct, unmeasured warm-up: {wall:.2f} s")
            for who in rotate(sides, rep):
                begun = self._begin()
                dests = [self.out(f"{who}-{i}") for i in range(n)]
                profile = (
                    self.profiler.record("concurrent") if who == "mirror" and rep == 0 else None
                )
                with profile or contextlib.nullcontext():
                    wall, each = skopeo_many(img.ref(self.hosts[who]), dests, img.blobs)
                run = self._finish(rep, begun, img) | {
                    "clients": n,
                    "wall_seconds": round(wall, 4),
                    "client_seconds": [round(x, 4) for x in each],
                }
                runs[who].append(run)
                log(
                    f"{n} clients {who:6} rep {rep + 1}: {wall:.2f} s,"
                    f" upstream {run['upstream_ratio']:.3f}x"
                )

    def ensure_warm_image(self) -> BenchImage:
        """The first cold image (in both caches already), or a new one pulled through
        both once when the cold phase was not run."""
        if self.warm_image is None:
            img = self.image("bench-warm")
            for who in ("mirror", "peer"):
                skopeo(img.ref(self.hosts[who]), self.out(who), img.blobs)
            self.warm_image = img
        return self.warm_image

    def warm(self) -> None:
        img = self.ensure_warm_image()
        warm: dict[str, dict[str, list[dict[str, Any]]]] = {
            "skopeo": {"mirror": [], "peer": [], "direct": []},
            "curl_one": {"mirror": [], "peer": [], "nginx": []},
            "curl_parallel": {"mirror": [], "nginx": []},
            "curl_sequential": {"mirror": [], "nginx": []},
        }
        self.raw["warm"] = warm
        self.raw["warm_image"] = img.repo
        for who in ("mirror", "peer", "direct"):  # unmeasured: the tag's TTL, the page cache
            skopeo(img.ref(self.hosts[who]), self.out(who), img.blobs)
        for rep in range(self.s.warm_reps):
            for who in rotate(["mirror", "peer", "direct"], rep):
                mark, cpu = self.log.mark(), self.cpu.snapshot()
                profile = self.profiler.record("warm") if who == "mirror" and rep == 0 else None
                with profile or contextlib.nullcontext():
                    seconds = skopeo(img.ref(self.hosts[who]), self.out(who), img.blobs)
                traffic = self.log.since(mark)
                warm["skopeo"][who].append(
                    {
                        "rep": rep + 1,
                        "loadavg_1m": os.getloadavg()[0],
                        "cpu_seconds": self.cpu.since(cpu),
                        "seconds": round(seconds, 4),
                        "mb_per_s": round(img.size / seconds / MB, 2),
                        "upstream_requests": traffic.summary(),
                    }
                )
                log(f"warm skopeo {who:6} rep {rep + 1}: {seconds:.2f} s")
        self.warm_one_stream(img, warm["curl_one"])
        # Each measurement moves ~CURL_BYTES, so that it lasts long enough to be steady.
        layers = img.layers
        total = sum(b.size for b in layers)
        rounds = max(1, min(20, round(CURL_BYTES / total)))
        self.raw["warm_curl_rounds"] = rounds
        for who, base in (("mirror", self.mirror.url), ("nginx", self.nginx.url)):
            urls = [f"{base}/v2/{img.repo}/blobs/{b.digest}" for b in layers]
            sizes = {url: b.size for url, b in zip(urls, layers, strict=True)}
            self.curl_urls[who] = (urls, sizes)
        for mode in ("curl_parallel", "curl_sequential"):
            for who in ("mirror", "nginx"):  # unmeasured warm-up
                self.curl_warm(who, mode == "curl_parallel", 1)
            for rep in range(self.s.warm_reps):
                for who in rotate(["mirror", "nginx"], rep):
                    mark, cpu = self.log.mark(), self.cpu.snapshot()
                    seconds = self.curl_warm(who, mode == "curl_parallel", rounds)
                    traffic = self.log.since(mark)
                    warm[mode][who].append(
                        {
                            "rep": rep + 1,
                            "cpu_seconds": self.cpu.since(cpu),
                            "seconds": round(seconds, 4),
                            "bytes": total * rounds,
                            "mb_per_s": round(total * rounds / seconds / MB, 2),
                            "upstream_requests": traffic.summary(),
                        }
                    )
                    rate = total * rounds / seconds / MB
                    log(f"warm {mode} {who:6} rep {rep + 1}: {rate:.0f} MB/s")

    def warm_one_stream(self, img: BenchImage, runs: dict[str, list[dict[str, Any]]]) -> None:
        """One curl, one GET of the image's largest layer: a single stream's pace, from
        the mirror, the peer and nginx (on the mirror's file), alternating."""
        blob = max(img.layers, key=lambda b: b.size)
        urls = {
            who: f"{base}/v2/{img.repo}/blobs/{blob.digest}"
            for who, base in (
                ("mirror", self.mirror.url),
                ("peer", self.peer.url),
                ("nginx", self.nginx.url),
            )
        }
        for url in urls.values():  # unmeasured warm-up
            curl_blobs([[url]], {url: blob.size})
        for rep in range(self.s.warm_reps):
            for who in rotate(list(urls), rep):
                cpu = self.cpu.snapshot()
                seconds = curl_blobs([[urls[who]]], {urls[who]: blob.size})
                runs[who].append(
                    {
                        "rep": rep + 1,
                        "loadavg_1m": os.getloadavg()[0],
                        "cpu_seconds": self.cpu.since(cpu),
                        "seconds": round(seconds, 4),
                        "bytes": blob.size,
                        "mb_per_s": round(blob.size / seconds / MB, 2),
                    }
                )
                log(f"warm one curl {who:6} rep {rep + 1}: {blob.size / seconds / MB:.0f} MB/s")

    def curl_warm(self, who: str, parallel: bool, rounds: int) -> float:
        """The 4 layers ``rounds`` times: 4 curls at once (one per layer), or one curl."""
        urls, sizes = self.curl_urls[who]
        clients = [[url] * rounds for url in urls] if parallel else [urls * rounds]
        return curl_blobs(clients, sizes)

    def concurrent_curl(self) -> None:
        """Like ``concurrent`` but the clients are curl to /dev/null (each GETs the config
        and the layers in turn): the servers' side, without 8 skopeos writing to disk.
        ``direct`` is one curl fetching the same blobs from the upstream (with a token):
        over a slow link, the time the bytes take to cross it once, the least N clients
        of any cache can take."""
        n = self.s.clients
        runs: dict[str, list[dict[str, Any]]] = {"mirror": [], "peer": [], "direct": []}
        self.raw["concurrent_curl"] = runs
        for rep in range(self.s.reps):
            img = self.image(f"bench-many-curl-{rep + 1}")
            for who in rotate(["mirror", "peer", "direct"], rep):
                base = f"http://{self.hosts[who]}"
                urls = [f"{base}/v2/{img.repo}/blobs/{b.digest}" for b in img.blobs]
                sizes = {url: b.size for url, b in zip(urls, img.blobs, strict=True)}
                clients = 1 if who == "direct" else n
                headers = [self.bearer(img.repo)] if who == "direct" else []
                settle_disk()
                begun = self._begin()
                wall = curl_blobs([urls] * clients, sizes, headers)
                run = self._finish(rep, begun, img) | {
                    "clients": clients,
                    "wall_seconds": round(wall, 4),
                }
                runs[who].append(run)
                log(
                    f"{clients} curl clients {who:6} rep {rep + 1}: {wall:.2f} s,"
                    f" upstream {run['upstream_ratio']:.3f}x"
                )

    def bearer(self, repo: str) -> str:
        """The Authorization header a direct client gets for pulling ``repo``."""
        access = [{"type": "repository", "name": repo, "actions": ["pull"]}]
        return f"Authorization: Bearer {self.token_server.issue_token(access)}"

    def small_set(self, name: str) -> list[PushedImage]:
        """``BENCH_SMALL_IMAGES`` images of one alpine-sized layer (3 MiB of random data),
        each in a repository of its own, pushed to the upstream."""
        images = []
        for i in range(self.s.small_images):
            seed = f"pullthrough-bench/{name}/{i}/{time.time_ns()}"
            image = build_image(seed, layer_sizes=(3 << 20,))
            images.append(
                push_image(self.upstream, self.token_server, f"library/{name}-{i}", "v1", image)
            )
        return images

    def pull_all(self, who: str, images: list[PushedImage]) -> dict[str, Any]:
        """skopeo pulls every image in turn: the wall time, upstream requests and tokens."""
        mark, tokens = self.log.mark(), len(self.token_server.requests)
        cpu, load = self.cpu.snapshot(), os.getloadavg()[0]
        seconds = 0.0
        for img in images:
            ref = img.docker_ref(self.hosts[who])
            seconds += skopeo(ref, self.out(f"small-{who}"), img.blobs)
        self.log.settle(quiet=0.3)
        return {
            "loadavg_1m": load,
            "cpu_seconds": self.cpu.since(cpu),
            "seconds": round(seconds, 4),
            "images": len(images),
            "token_requests": len(self.token_server.requests) - tokens,
            "upstream_requests": self.log.since(mark).summary(),
        }

    def small_images(self) -> None:
        """Small images pulled one after another by skopeo, where per-request costs
        (ping, token, manifest, config, one layer; a process per pull) are the whole
        pull. Cold: per repetition a new set, through mirror, peer and direct in turn
        (order rotated); warm: the last set again, ``BENCH_WARM_REPS`` times."""
        result: dict[str, dict[str, list[dict[str, Any]]]] = {
            "cold": {"mirror": [], "peer": [], "direct": []},
            "warm": {"mirror": [], "peer": [], "direct": []},
        }
        self.raw["small_images"] = result
        images: list[PushedImage] = []
        for rep in range(self.s.reps):
            log(f"building and pushing {self.s.small_images} small images")
            images = self.small_set(f"bench-small-{rep + 1}")
            for who in rotate(["mirror", "peer", "direct"], rep):
                run = self.pull_all(who, images) | {"rep": rep + 1}
                result["cold"][who].append(run)
                log(f"small images cold {who:6} rep {rep + 1}: {run['seconds']:.2f} s")
        for rep in range(self.s.warm_reps):
            for who in rotate(["mirror", "peer", "direct"], rep):
                run = self.pull_all(who, images) | {"rep": rep + 1}
                result["warm"][who].append(run)
                log(f"small images warm {who:6} rep {rep + 1}: {run['seconds']:.2f} s")

    def manifests(self) -> None:
        img = self.ensure_warm_image()
        script = write_wrk_script(self.work / "docker-accept.lua")
        results: dict[str, dict[str, list[dict[str, Any]]]] = {}
        self.raw["manifests"] = results
        ports = {"mirror": self.mirror.port, "peer": self.peer.port}
        for kind, reference in (("tag", img.tag), ("digest", img.digest)):
            results[kind] = {"mirror": [], "peer": []}
            path = f"/v2/{img.repo}/manifests/{reference}"
            for port in ports.values():
                _check_manifest(port, path, img.digest)  # also refreshes the tag
                wrk(f"http://127.0.0.1:{port}{path}", script, self.s.connections, 1)  # warm-up
            for rep in range(self.s.reps):
                for who in rotate(["mirror", "peer"], rep):
                    url = f"http://127.0.0.1:{ports[who]}{path}"
                    profile = (
                        self.profiler.record(f"manifest-{kind}")
                        if who == "mirror" and rep == 0
                        else None
                    )
                    cpu = self.cpu.snapshot()
                    with profile or contextlib.nullcontext():
                        load = wrk(url, script, self.s.connections, self.s.load_seconds)
                    used = self.cpu.since(cpu)
                    results[kind][who].append(
                        {
                            "rep": rep + 1,
                            **load.as_dict(),
                            "cpu_seconds": used,
                            "server_cpu_us_per_request": round(
                                used[who] / max(load.requests, 1) * 1e6, 1
                            ),
                        }
                    )
                    log(f"manifest by {kind:6} {who:6} rep {rep + 1}: {load.rps:.0f} req/s")

    def fleet_phase(self) -> None:
        """3 replicas behind haproxy against this one mirror: tests/bench/fleet.py."""
        fleet.run(self)

    def run(self) -> None:
        """The check, then the phases BENCH_PHASES names, in this order, each timed and
        with its own memory peaks."""
        phases = {
            "check": self.check,
            "cold": self.cold,
            "concurrent": self.concurrent,
            "concurrent_curl": self.concurrent_curl,
            "wan": self.run_wan,
            "warm": self.warm,
            "small_images": self.small_images,
            "manifests": self.manifests,
            "fleet": self.fleet_phase,
        }
        for name, phase in phases.items():
            if name in COLD_PHASES and "loopback" not in self.s.profiles:
                continue
            if name == "wan" and self.wan is None:
                continue
            if name not in ("check", "wan") and name not in self.s.phases:
                continue
            phase_started = time.perf_counter()
            with self.sampler.phase(name):
                phase()
            self.raw["phase_seconds"][name] = round(time.perf_counter() - phase_started, 1)

    def run_wan(self) -> None:
        """The cold phases again, with the upstream behind the slow link (``wan.py``):
        their results go to ``raw["wan"]``, laid out as the loopback ones are."""
        assert self.wan is not None
        for name in COLD_PHASES:
            if name in self.s.phases:
                phase_started = time.perf_counter()
                getattr(self.wan, name)()
                self.wan.raw["phase_seconds"][name] = round(time.perf_counter() - phase_started, 1)


def _check_manifest(port: int, path: str, digest: str) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path, headers={"Accept": DOCKER_ACCEPT})
        resp = conn.getresponse()
        resp.read()
        got = resp.getheader("Docker-Content-Digest")
        if resp.status != 200 or got != digest:
            raise RuntimeError(f"GET {path} on :{port}: {resp.status}, digest {got}")
    finally:
        conn.close()


# -- environment ---------------------------------------------------------------------


def _cmd(*argv: str) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unavailable"
    text = (out.stdout or out.stderr).strip()
    return text.splitlines()[0] if text else "unavailable"


def environment(work: Path) -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_kb = 0
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        mem_kb = int(f.readline().split()[1])
    dirty = _cmd("git", "-C", str(REPO_ROOT), "status", "--porcelain", "--", "proxy", "cache")
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_kb / 1024**2, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "aiohttp": importlib.metadata.version("aiohttp"),
        "pullthrough": importlib.metadata.version("pullthrough"),
        "git_commit": _cmd("git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"),
        "proxy_cache_uncommitted_changes": dirty not in ("", "unavailable"),
        "docker_registry": _cmd(REGISTRY_BINARY, "--version"),
        "skopeo": _cmd("skopeo", "--version"),
        "nginx": _cmd(NGINX, "-v"),
        "wrk": _cmd("wrk", "-v"),
        "curl": _cmd("curl", "--version"),
        "filesystem": _cmd("findmnt", "-no", "FSTYPE,SOURCE", "--target", str(work.parent)),
        "loadavg_start": os.getloadavg(),
    }


def _missing_tools(settings: Settings) -> list[str]:
    tools = TOOLS | (WAN_TOOLS if "wan" in settings.profiles else {})
    missing = sorted({pkg for tool, pkg in tools.items() if shutil.which(tool) is None})
    if not PULLTHROUGH.exists():
        missing.append("pullthrough (make install)")
    return missing


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


# -- one run -------------------------------------------------------------------------


@dataclass(frozen=True)
class Processes:
    """The processes ``Servers.start`` left running, stopped by its caller's stack."""

    token_server: TokenServer
    upstream: RegistryProcess
    mirror: Mirror
    peer: Peer
    nginx: Nginx
    relay: Relay
    wan: WanProcesses | None = None


@dataclass(frozen=True)
class WanProcesses:
    """The WAN profile's side: the link, the upstream behind it, and a mirror, a peer
    and a relay of their own in front of it."""

    link: WanLink
    upstream: RegistryProcess
    mirror: Mirror
    peer: Peer
    relay: Relay


class Servers:
    """Starts the processes the bench talks to. Each one's stop goes on the caller's
    stack as soon as it runs, so a failed start still stops the ones before it. The
    mirror is kept from the moment it exists: when the run fails, its log says why."""

    def __init__(self, settings: Settings, work: Path) -> None:
        self.settings = settings
        self.work = work
        self.mirror: Mirror | None = None

    def start(self, stack: contextlib.ExitStack) -> Processes:
        work, settings = self.work, self.settings
        token_server, upstream = start_upstream(work)
        stack.callback(token_server.close)
        stack.callback(upstream.close)
        mirror = self.mirror = Mirror(work / "mirror", upstream.url)
        mirror.start(env=settings.mirror_env)
        stack.callback(mirror.stop)
        peer = Peer(work / "peer", upstream)
        peer.start()  # after the upstream: it panics when the upstream is unreachable
        stack.callback(peer.close)
        nginx = Nginx(work / "nginx", mirror.cache_dir / "blobs", settings.nginx_workers)
        nginx.start()
        stack.callback(nginx.stop)
        relay = Relay(work / "relay", upstream.host, settings.nginx_workers)
        relay.start()
        stack.callback(relay.stop)
        wan = self.start_wan(stack, token_server, upstream) if "wan" in settings.profiles else None
        return Processes(token_server, upstream, mirror, peer, nginx, relay, wan)

    def start_wan(
        self, stack: contextlib.ExitStack, token_server: TokenServer, upstream: RegistryProcess
    ) -> WanProcesses:
        """The link first, so that it is removed last, after everything behind it."""
        work, settings = self.work / "wan", self.settings
        link = WanLink(settings.wan_rate)
        stack.callback(link.close)
        link.open()
        log(f"WAN link {link.netns}: upstream at {link.upstream_address}, {link.rate}")
        remote = WanRegistry(work / "upstream", token_server, upstream.storage_dir, link)
        stack.callback(remote.close)
        remote.start()
        mirror = Mirror(work / "mirror", remote.url)
        mirror.start(env=settings.mirror_env)
        stack.callback(mirror.stop)
        peer = Peer(work / "peer", remote)
        peer.start()
        stack.callback(peer.close)
        relay = Relay(work / "relay", remote.host, settings.nginx_workers)
        relay.start()
        stack.callback(relay.stop)
        return WanProcesses(link, remote, mirror, peer, relay)


def _new_raw(settings: Settings, stamp: str, work: Path) -> dict[str, Any]:
    """The raw results as they stand before anything runs: what was asked, and where."""
    return {
        "timestamp": stamp,
        "settings": {
            "image_mib": settings.image_mb,
            "layers": LAYERS,
            "layer_payload_bytes": settings.layer_bytes,
            "reps": settings.reps,
            "clients": settings.clients,
            "connections": settings.connections,
            "load_seconds": settings.load_seconds,
            "nginx_workers": settings.nginx_workers,
            "mirror_config": "defaults (manifest_ttl 5 min), cache max_size 50GiB",
            "peer_config": "docker-registry proxy mode, anonymous, blobdescriptor inmemory",
            "relay_config": "nginx proxy_cache in front of the upstream, key $uri, 200s for"
            " 1d, proxy_cache_lock on; caches to disk, checks no digests",
            "phases": list(settings.phases),
            "mirror_env": settings.mirror_env,
            "profiles": list(settings.profiles),
            "wan_rate": settings.wan_rate,
            "warm_reps": settings.warm_reps,
            "small_images": settings.small_images,
        },
        "environment": environment(work),
        "checks": {},
        "images": {},
        "phase_seconds": {},
    }


def _prepare(settings: Settings) -> tuple[str, Path, dict[str, Any]]:
    """The run's timestamp, its new work dir and its raw results so far."""
    stamp = time.strftime("%Y%m%dT%H%M%S")
    work = settings.out_dir / f".work-{stamp}"
    work.mkdir(parents=True)
    raw = _new_raw(settings, stamp, work)
    log(
        f"{settings.image_mb} MiB images in {LAYERS} layers, {settings.reps} reps,"
        f" {settings.clients} clients, work dir {work}"
    )
    return stamp, work, raw


def _measure(settings: Settings, stamp: str, raw: dict[str, Any], servers: Servers) -> None:
    """Starts the servers and runs the phases. Memory, profiles and the mirror's log are
    recorded however the phases end, while the servers still run; then everything
    started here stops, in reverse order."""
    with contextlib.ExitStack() as stack:
        up = servers.start(stack)
        raw["pids"] = {
            "mirror": up.mirror.pid,
            "peer": up.peer.pid,
            "nginx": up.nginx.pid,
            "relay": up.relay.pid,
        }
        sampler = RssSampler({"mirror": up.mirror.pid, "peer": up.peer.pid}).start()
        stack.callback(sampler.stop)
        profiler = Profiler(up.mirror.pid, settings.out_dir / f"profile-{stamp}")
        bench = Bench(
            settings,
            servers.work,
            raw,
            up.token_server,
            up.upstream,
            up.mirror,
            up.peer,
            up.nginx,
            up.relay,
            sampler,
            profiler,
        )
        if up.wan is not None:
            bench.wan = _wan_bench(bench, up.wan)
        try:
            bench.run()
        finally:
            raw["rss"] = sampler.report()
            raw["profiles"] = profiler.files + (bench.wan.profiler.files if bench.wan else [])
            raw["mirror_log"] = _log_counts(up.mirror.log_path.read_text(errors="replace"))


def _wan_bench(bench: Bench, wan: WanProcesses) -> Bench:
    """A Bench on the WAN side, writing to ``raw["wan"]``: same settings and images."""
    raw = bench.raw
    raw["wan"] = {
        "settings": raw["settings"],
        "environment": raw["environment"],
        "link": wan.link.describe(),
        "images": {},
        "phase_seconds": {},
    }
    wan_bench = Bench(
        bench.s,
        bench.work / "wan",
        raw["wan"],
        bench.token_server,
        wan.upstream,
        wan.mirror,
        wan.peer,
        bench.nginx,
        wan.relay,
        bench.sampler,
        Profiler(
            wan.mirror.pid, bench.profiler.out_dir.with_name(bench.profiler.out_dir.name + "-wan")
        ),
        profile="wan",
    )
    wan_bench.push_to = bench.upstream
    return wan_bench


def _log_counts(text: str) -> dict[str, int]:
    """Lines, and lines that report an error (plain or JSON level, or a traceback)."""
    return {
        "lines": text.count("\n"),
        "errors": sum(
            1
            for line in text.splitlines()
            if " ERROR " in line or '"ERROR"' in line or "Traceback" in line
        ),
    }


def _record_failure(raw: dict[str, Any], exc: BaseException, mirror: Mirror | None) -> None:
    raw["error"] = "".join(traceback.format_exception(exc))
    log(f"FAILED: {exc!r}")
    if mirror is not None:
        log(f"mirror log tail:\n{mirror.log_tail()}")


def _summarize(raw: dict[str, Any], started: float) -> tuple[dict[str, Any], list[report.Target]]:
    """Closes the raw results: end time, medians and the targets, kept in ``raw`` too."""
    raw["environment"]["loadavg_end"] = os.getloadavg()
    raw["total_seconds"] = round(time.perf_counter() - started, 1)
    summary = report.summarize(raw) | fleet.summarize(raw)
    checks = report.targets(raw, summary) + fleet.targets(raw, summary)
    raw["summary"] = summary
    raw["targets"] = [t.as_dict() for t in checks]
    return summary, checks


def _keep_or_remove(work: Path, keep: bool) -> None:
    if keep:
        log(f"work dir kept: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)


def _print_report(
    settings: Settings,
    stamp: str,
    raw: dict[str, Any],
    summary: dict[str, Any],
    checks: list[report.Target],
    path: Path,
) -> None:
    env = raw["environment"]
    print()
    print(
        f"pullthrough benchmark {stamp}: {settings.image_mb} MiB image in {LAYERS} layers,"
        f" median of {settings.reps}, {settings.clients} concurrent clients,"
        f" {settings.connections} connections"
    )
    print(
        f"{env['cores']} cores ({env['cpu']}), {env['memory_gib']} GiB, Linux {env['kernel']},"
        f" Python {env['python']}, aiohttp {env['aiohttp']}, commit {env['git_commit']}"
        f"{' + uncommitted proxy/cache changes' if env['proxy_cache_uncommitted_changes'] else ''}"
    )
    print(
        f"peer: {env['docker_registry']} proxy mode; {env['nginx']} (also the relay:"
        f" proxy_cache, caches to disk, checks no digests); {env['skopeo']}"
    )
    print()
    print(report.table(raw, summary, checks))
    if fleet_rows := fleet.table(raw, summary, checks):
        print(fleet_rows)
    print(
        f"\nraw numbers: {path} (and {path.parent / 'latest.json'}); took {raw['total_seconds']} s"
    )


def _exit_status(failed: bool, checks: list[report.Target]) -> int:
    if failed:
        return 1
    if os.environ.get("BENCH_STRICT") == "1" and not all(t.passed for t in checks):
        return 3
    return 0


def main() -> int:
    settings = Settings.from_env()
    missing = _missing_tools(settings)
    if missing:
        print(f"bench: missing {', '.join(missing)}; apt-get install them", file=sys.stderr)
        return 1
    if "wan" in settings.profiles and os.geteuid() != 0:
        print(
            "bench: the WAN profile makes a network namespace and a qdisc, which takes root;"
            " run as root, or set BENCH_PROFILES=loopback",
            file=sys.stderr,
        )
        return 1
    signal.signal(signal.SIGTERM, _terminate)
    stamp, work, raw = _prepare(settings)
    started = time.perf_counter()
    failed = False
    servers = Servers(settings, work)
    try:
        _measure(settings, stamp, raw, servers)
    except BaseException as exc:
        failed = True
        _record_failure(raw, exc, servers.mirror)
        if not isinstance(exc, Exception):
            raise  # Ctrl-C or SIGTERM: the report is still written, below
    finally:
        summary, checks = _summarize(raw, started)
        path = report.write(raw, settings.out_dir, stamp)
        _keep_or_remove(work, failed or settings.keep)
    _print_report(settings, stamp, raw, summary, checks, path)
    return _exit_status(failed, checks)


if __name__ == "__main__":
    sys.exit(main())
