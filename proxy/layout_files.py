"""A layout's files, read from or written to a directory or an uncompressed tar.

Reading is defensive, since a layout comes from elsewhere. Nothing is ever extracted by
a member's or a file's name: files are looked up by names this program builds (the two
fixed ones, and `blobs/ALGORITHM/HEX` from parsed digests) and their bytes streamed. A
tar is refused outright when any member could escape the layout (an absolute path or
`..`), is a link, a device or a sparse file, claims more bytes than the archive holds,
or appears twice. In a directory, a symlink where a layout file should be is refused.

Writing goes to a hidden temp sibling of the output, renamed into place once complete,
so a failed export leaves nothing at the output path.
"""

from __future__ import annotations

import contextlib
import io
import os
import secrets
import shutil
import stat
import tarfile
from abc import ABC, abstractmethod
from pathlib import Path
from typing import IO

from proxy.layout import LayoutError

MAX_MEMBERS = 100_000  # far more than any image has blobs; bounds the member table
GZIP_MAGIC = b"\x1f\x8b"
TAR_FORMAT = tarfile.PAX_FORMAT
COPY_CHUNK = 1 << 20


class LayoutReader(ABC):
    """The files of a layout, by name. Blocking: call from a worker thread."""

    @abstractmethod
    def size(self, name: str) -> int | None:
        """The file's size, or None if the layout has no such file."""

    @abstractmethod
    def open(self, name: str) -> IO[bytes]:
        """The file's bytes; the caller closes it."""

    def read_small(self, name: str, limit: int) -> bytes | None:
        size = self.size(name)
        if size is None:
            return None
        if size > limit:
            raise LayoutError(f"{name} is {size} bytes, more than the {limit} allowed")
        with self.open(name) as file:
            return file.read(size)

    def close(self) -> None:
        return None


def open_reader(path: Path) -> LayoutReader:
    """A directory layout, or a tar of one."""
    if path.is_dir():
        return DirReader(path)
    if path.is_file():
        return TarReader(path)
    raise LayoutError(f"{path}: no such file or directory")


class DirReader(LayoutReader):
    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, name: str) -> Path | None:
        path = self.root
        parts = name.split("/")
        for n, part in enumerate(parts):
            path = path / part
            try:
                mode = os.lstat(path).st_mode
            except FileNotFoundError:
                return None
            if stat.S_ISLNK(mode):
                raise LayoutError(f"{path} is a symlink: refused")
            wanted = stat.S_ISREG if n == len(parts) - 1 else stat.S_ISDIR
            if not wanted(mode):
                return None
        return path

    def size(self, name: str) -> int | None:
        path = self._path(name)
        return None if path is None else path.stat().st_size

    def open(self, name: str) -> IO[bytes]:
        path = self._path(name)
        if path is None:
            raise LayoutError(f"{name} is missing from the layout")
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        return os.fdopen(fd, "rb")


class TarReader(LayoutReader):
    """An uncompressed tar, read in place: its member table is built once, checking every
    member, then files are streamed from their offsets."""

    def __init__(self, path: Path) -> None:
        self.file = path.open("rb")
        try:
            if self.file.read(2) == GZIP_MAGIC:
                raise LayoutError(f"{path} is compressed: decompress it first (gunzip)")
            self.file.seek(0)
            # Kept open for the reader's life, closed by close().
            self.tar = tarfile.open(fileobj=self.file, mode="r:")  # noqa: SIM115
            self.members = self._scan(os.fstat(self.file.fileno()).st_size)
        except tarfile.TarError as exc:
            self.file.close()
            raise LayoutError(f"{path} is not a tar archive of a layout ({exc})") from None
        except BaseException:
            self.file.close()
            raise

    def _scan(self, archive_size: int) -> dict[str, tarfile.TarInfo]:
        members: dict[str, tarfile.TarInfo] = {}
        for count, member in enumerate(self.tar, 1):
            if count > MAX_MEMBERS:
                raise LayoutError(f"the archive has more than {MAX_MEMBERS} members")
            name = member_name(member.name)
            if member.isdir():
                continue
            if member.type not in (tarfile.REGTYPE, tarfile.AREGTYPE):
                raise LayoutError(f"archive member {member.name!r} is {_kind(member)}: refused")
            if member.offset_data + member.size > archive_size:
                raise LayoutError(
                    f"archive member {member.name!r} claims {member.size} bytes,"
                    " more than the archive holds"
                )
            if name in members:
                raise LayoutError(f"archive member {member.name!r} appears twice")
            members[name] = member
        return members

    def size(self, name: str) -> int | None:
        member = self.members.get(name)
        return None if member is None else member.size

    def open(self, name: str) -> IO[bytes]:
        member = self.members.get(name)
        file = self.tar.extractfile(member) if member is not None else None
        if file is None:
            raise LayoutError(f"{name} is missing from the archive")
        return file

    def close(self) -> None:
        self.tar.close()
        self.file.close()


def member_name(raw: str) -> str:
    """A member's name within the layout; refused if it could point outside it."""
    parts = [part for part in raw.split("/") if part not in ("", ".")]
    if raw.startswith("/") or ".." in parts or "\0" in raw:
        raise LayoutError(f"archive member {raw[:200]!r} points outside the layout: refused")
    return "/".join(parts)


def _kind(member: tarfile.TarInfo) -> str:
    if member.issym():
        return f"a symlink to {member.linkname[:200]!r}"
    if member.islnk():
        return f"a hard link to {member.linkname[:200]!r}"
    if member.issparse():
        return "a sparse file"
    return "a device or fifo" if member.isdev() else f"of tar type {member.type!r}"


class LayoutWriter(ABC):
    """Files written into a temp sibling of `out`, moved to `out` by `commit`."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.temp = out.parent / f".{out.name}.{secrets.token_hex(4)}.partial"

    @abstractmethod
    def add(self, name: str, size: int, source: IO[bytes]) -> None:
        """Write a file of exactly `size` bytes read from `source`."""

    def add_bytes(self, name: str, data: bytes) -> None:
        self.add(name, len(data), io.BytesIO(data))

    @abstractmethod
    def commit(self) -> None: ...

    @abstractmethod
    def abort(self) -> None: ...


def check_output(out: Path) -> None:
    """`out` must not exist yet (an empty directory is fine): an export never overwrites."""
    if not out.parent.is_dir():
        raise LayoutError(f"{out.parent} is not a directory")
    taken = out.is_symlink() or out.exists()
    if taken and (out.suffix == ".tar" or not out.is_dir() or any(out.iterdir())):
        raise LayoutError(f"{out} exists already: remove it or choose another -o")


def open_writer(out: Path) -> LayoutWriter:
    """A tar when `out` ends in .tar, else a directory."""
    check_output(out)
    return TarWriter(out) if out.suffix == ".tar" else DirWriter(out)


class DirWriter(LayoutWriter):
    def __init__(self, out: Path) -> None:
        super().__init__(out)
        self.temp.mkdir()

    def add(self, name: str, size: int, source: IO[bytes]) -> None:
        path = self.temp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("xb") as file:
            left = size
            while left and (chunk := source.read(min(COPY_CHUNK, left))):
                file.write(chunk)
                left -= len(chunk)
        if left:
            raise LayoutError(f"{name}: {left} of its {size} bytes could not be read")

    def commit(self) -> None:
        if self.out.is_dir():
            self.out.rmdir()  # empty, checked by open_writer
        self.temp.rename(self.out)

    def abort(self) -> None:
        shutil.rmtree(self.temp, ignore_errors=True)


class TarWriter(LayoutWriter):
    def __init__(self, out: Path) -> None:
        super().__init__(out)
        self.file = self.temp.open("xb")
        # Open until commit() or abort(); 1 MiB copies, since the default 16 KiB costs
        # two syscalls per 16 KiB.
        self.tar = tarfile.TarFile(
            fileobj=self.file, mode="w", format=TAR_FORMAT, copybufsize=COPY_CHUNK
        )
        self.dirs: set[str] = set()

    def add(self, name: str, size: int, source: IO[bytes]) -> None:
        parts = name.split("/")
        for n in range(1, len(parts)):
            parent = "/".join(parts[:n])
            if parent not in self.dirs:
                self.dirs.add(parent)
                self.tar.addfile(_info(parent + "/", 0, tarfile.DIRTYPE))
        # tarfile copies exactly `size` bytes, and raises if `source` runs short.
        self.tar.addfile(_info(name, size, tarfile.REGTYPE), source)

    def commit(self) -> None:
        self.tar.close()
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.temp, self.out)

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self.tar.close()
        self.file.close()
        self.temp.unlink(missing_ok=True)


def _info(name: str, size: int, kind: bytes) -> tarfile.TarInfo:
    # Fixed owner, mode and time: one cache exported twice gives the same archive.
    info = tarfile.TarInfo(name)
    info.size, info.type, info.mtime = size, kind, 0
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info
