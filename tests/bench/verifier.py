"""The least work a verifying cache adds to a cold pull, as a process of its own.

    python -m tests.bench.verifier BYTES_PER_SECOND SCRATCH_DIR PATH=DIGEST...

The cold phase runs it beside a direct pull: the pull then shares its cores with what
any mirror that checks digests and stores blobs must do, and nothing else (no sockets,
no HTTP, no Python per request). For each blob file in turn it reads 512 KiB at a time
(the mirror's upstream read size), hashes the bytes with sha256 and writes them to a
scratch file, then fsyncs and removes the file, as a cache commits a blob. It keeps to
BYTES_PER_SECOND, the pace of a direct pull, so that its work is spread over the pull
as a mirror's is, not done in a burst at the start.

Prints {"cpu_seconds": ..., "seconds": ...} on stdout; exits 1 if a digest does not match.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import sys
import time
from pathlib import Path

READ_SIZE = 512 << 10


class Pace:
    """Sleeps whenever the work done runs ahead of ``bytes_per_second`` since it began."""

    def __init__(self, bytes_per_second: float) -> None:
        self.rate = bytes_per_second
        self.started = time.perf_counter()
        self.done = 0

    def keep(self, n: int) -> None:
        self.done += n
        ahead = self.done / self.rate - (time.perf_counter() - self.started)
        if ahead > 0:
            time.sleep(ahead)


def verify_and_store(path: Path, digest: str, scratch: Path, pace: Pace) -> None:
    """Hash one blob file while writing it to ``scratch``; fsync, remove, check."""
    h = hashlib.sha256()
    fd = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with open(path, "rb", buffering=0) as f:
            while chunk := f.read(READ_SIZE):
                h.update(chunk)
                os.write(fd, chunk)
                pace.keep(len(chunk))
        os.fsync(fd)
    finally:
        os.close(fd)
        scratch.unlink()
    if f"sha256:{h.hexdigest()}" != digest:
        raise SystemExit(f"{path}: sha256:{h.hexdigest()}, expected {digest}")


def main(argv: list[str]) -> int:
    bytes_per_second, scratch_dir, *pairs = argv
    pace = Pace(float(bytes_per_second))
    scratch = Path(scratch_dir) / f"verifier-{os.getpid()}"
    for pair in pairs:
        path, digest = pair.rsplit("=", 1)
        verify_and_store(Path(path), digest, scratch, pace)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    seconds = time.perf_counter() - pace.started
    cpu = usage.ru_utime + usage.ru_stime
    print(json.dumps({"cpu_seconds": round(cpu, 3), "seconds": round(seconds, 4)}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
