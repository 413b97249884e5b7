"""Running client programs next to the in-process mirror, and checking the mirror stayed healthy.

The mirror serves from the test's own event loop, so clients must run as
asyncio subprocesses: a blocking ``subprocess.run`` would stall the mirror and
the client would wait for it forever.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass

import pytest

from tests.mirror import MakeMirror, Mirror
from tests.upstream.registry import RegistryProcess

__all__ = [
    "CommandFailed",
    "Result",
    "assert_mirror_logged_no_errors",
    "assert_stored",
    "require_binary",
    "run",
    "start_mirror",
]


@dataclass(frozen=True)
class Result:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    def describe(self) -> str:
        return (
            f"$ {' '.join(self.argv)}\nexit status {self.returncode}\n"
            f"--- stdout\n{self.stdout[-4000:]}\n--- stderr\n{self.stderr[-4000:]}"
        )


class CommandFailed(AssertionError):
    def __init__(self, result: Result) -> None:
        super().__init__(result.describe())
        self.result = result


async def run(
    *argv: str | os.PathLike[str],
    env: Mapping[str, str] | None = None,
    check: bool = True,
    time_limit: float = 60.0,
) -> Result:
    """Run ``argv`` to completion without blocking the loop; raise CommandFailed if it fails."""
    args = tuple(os.fspath(a) for a in argv)
    proc = await asyncio.create_subprocess_exec(
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=None if env is None else dict(env),
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), time_limit)
    except TimeoutError:
        proc.kill()  # only the process started here, by its PID
        out, err = await proc.communicate()
        result = Result(args, -9, out.decode(errors="replace"), err.decode(errors="replace"))
        raise AssertionError(f"timed out after {time_limit}s\n{result.describe()}") from None
    assert proc.returncode is not None
    result = Result(
        args, proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")
    )
    if check and result.returncode != 0:
        raise CommandFailed(result)
    return result


def require_binary(name: str) -> str:
    """The path of ``name``; a missing client is a failure, never a silent skip."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed; run `make system-deps`", pytrace=False)
    return path


def assert_mirror_logged_no_errors(caplog: pytest.LogCaptureFixture) -> None:
    """No ERROR records so far in this test, e.g. a fill task that died with an exception.

    A background task that fails with nobody awaiting it only shows up as an
    ``asyncio`` "Task exception was never retrieved" record, logged when the task
    is collected, so collect first.
    """
    gc.collect()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, "the mirror logged errors:\n" + "\n".join(
        f"{r.name} {r.levelname}: {r.getMessage()}"
        + (f"\n{logging.Formatter().formatException(r.exc_info)}" if r.exc_info else "")
        for r in errors
    )


async def assert_stored(mirror: Mirror, digests: set[str], within: float = 5.0) -> None:
    """The mirror's store holds every digest (a blob is committed just after its last byte
    went out, so a client can finish a moment before the commit)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while missing := digests - mirror.stored_blobs():
        assert loop.time() < deadline, f"not in the mirror's store: {sorted(missing)}"
        await asyncio.sleep(0.02)


async def start_mirror(
    make_mirror: MakeMirror, docker_io: RegistryProcess, ghcr_io: RegistryProcess | None
) -> Mirror:
    """A mirror with docker.io as its default upstream and, if given, ghcr.io beside it
    (reached by ``?ns=ghcr.io`` or the ``/v2/ghcr.io/`` path prefix)."""
    upstreams = [{"name": "docker.io", "url": docker_io.url, "default": True}]
    if ghcr_io is not None:
        upstreams.append({"name": "ghcr.io", "url": ghcr_io.url})
    return await make_mirror(upstreams)
