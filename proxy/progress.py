"""Progress of the CLI commands that copy blobs (`warm`, `export`, `import`)."""

from __future__ import annotations

import sys
from typing import TextIO

from cache.digests import Digest


class Progress:
    """A bar per blob on a terminal. Piped, one plain line per finished blob, or nothing
    with `lines_when_piped=False`, so that a script's output holds only the summary."""

    def __init__(self, out: TextIO = sys.stdout, lines_when_piped: bool = True) -> None:
        self.out = out
        self.tty = out.isatty()
        self.lines = self.tty or lines_when_piped

    def update(self, digest: Digest | str, done: int, total: int) -> None:
        if self.tty:
            filled = int(30 * done / total) if total else 30
            bar = "#" * filled + " " * (30 - filled)
            self.out.write(f"\r{str(digest)[:19]} [{bar}] {mb(done)}/{mb(total)}")
            self.out.flush()

    def finish(self, digest: Digest | str, total: int, result: str) -> None:
        if self.tty:
            self.out.write("\r" + " " * 70 + "\r")
        if self.lines:
            self.out.write(f"{digest}  {mb(total)}  {result}\n")
            self.out.flush()


def mb(size: int) -> str:
    return f"{size / 1e6:.1f} MB"
