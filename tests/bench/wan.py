"""The WAN profile: the upstream as a host of its own, behind a rate-limited link.

    host network namespace                     namespace ptbench-<pid>
    mirror, peer, relay, clients  ---veth---   docker-registry (the loopback upstream's
    10.254.N.1/30                              storage), 10.254.N.2/30; what it sends
                                               goes through an htb class of BENCH_WAN_RATE

Only bandwidth is limited: this kernel has htb and tbf but no netem, so no delay can be
added. Only the upstream's sending side is shaped, the direction a pull uses. The token
server stays on the host's loopback: its answers are a few hundred bytes, which a
bandwidth limit does not slow. Addresses are private and live only on the veth pair;
nothing is routed beyond it.

``WanLink.close()`` removes everything: deleting the namespace destroys its end of the
veth pair, which takes the other end and the qdisc with it. The bench calls it from its
exit stack, so it also runs on failure, Ctrl-C and SIGTERM (turned into
KeyboardInterrupt by ``run.py``).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

from tests.upstream.registry import RegistryProcess
from tests.upstream.token_server import TokenServer


def _run(*argv: str) -> str:
    out = subprocess.run(argv, capture_output=True, text=True, timeout=15)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {out.stderr.strip() or out.returncode}")
    return out.stdout


class WanLink:
    """A namespace and a veth pair whose namespace end sends at most ``rate`` (tc syntax,
    e.g. ``1gbit``)."""

    def __init__(self, rate: str) -> None:
        pid = os.getpid()
        self.rate = rate
        self.netns = f"ptbench-{pid}"
        self.host_if = f"ptbh{pid}"[:15]
        self.ns_if = f"ptbn{pid}"[:15]
        self.subnet = self._free_subnet(pid)
        self.host_address = f"{self.subnet}.1"
        self.upstream_address = f"{self.subnet}.2"
        self._opened = False

    @staticmethod
    def _free_subnet(pid: int) -> str:
        """A 10.254.N.0/30 no interface here uses yet (N from the PID, then the next)."""
        used = _run("ip", "-4", "-o", "addr", "show")
        for step in range(250):
            subnet = f"10.254.{(pid + step) % 250 + 1}"
            if f" {subnet}." not in used:
                return subnet
        raise RuntimeError("no free 10.254.N.0/30 for the WAN link")

    def _ns(self, *argv: str) -> str:
        return _run("ip", "netns", "exec", self.netns, *argv)

    def open(self) -> WanLink:
        self._opened = True
        try:
            _run("ip", "netns", "add", self.netns)
            _run("ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
            _run("ip", "link", "set", self.ns_if, "netns", self.netns)
            _run("ip", "addr", "add", f"{self.host_address}/30", "dev", self.host_if)
            _run("ip", "link", "set", self.host_if, "up")
            self._ns("ip", "addr", "add", f"{self.upstream_address}/30", "dev", self.ns_if)
            self._ns("ip", "link", "set", self.ns_if, "up")
            self._ns("ip", "link", "set", "lo", "up")
            self._ns("tc", "qdisc", "add", "dev", self.ns_if, "root", "handle", "1:", "htb",
                     "default", "10")  # fmt: skip
            self._ns("tc", "class", "add", "dev", self.ns_if, "parent", "1:", "classid", "1:10",
                     "htb", "rate", self.rate, "ceil", self.rate)  # fmt: skip
        except BaseException:
            self.close()
            raise
        return self

    def describe(self) -> dict[str, str]:
        return {
            "netns": self.netns,
            "rate": self.rate,
            "qdisc": self._ns("tc", "qdisc", "show", "dev", self.ns_if).strip(),
            "class": self._ns("tc", "class", "show", "dev", self.ns_if).strip(),
            "upstream_address": self.upstream_address,
        }

    def close(self) -> None:
        """Idempotent; every step is tried even if an earlier one fails."""
        if not self._opened:
            return
        self._opened = False
        with contextlib.suppress(RuntimeError, OSError, subprocess.TimeoutExpired):
            _run("ip", "netns", "del", self.netns)
        with contextlib.suppress(RuntimeError, OSError, subprocess.TimeoutExpired):
            _run("ip", "link", "del", self.host_if)  # gone with the namespace, normally


class WanRegistry(RegistryProcess):
    """A second ``docker-registry`` on the loopback upstream's storage, in the link's
    namespace: the same images, reached over the slow link."""

    def __init__(
        self, workdir: Path, token_server: TokenServer, storage_dir: Path, link: WanLink
    ) -> None:
        super().__init__(workdir, token_server)
        self.storage_dir = storage_dir
        self.address = link.upstream_address
        self.command_prefix = ["ip", "netns", "exec", link.netns]
