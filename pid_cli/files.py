"""Reading the small files a run is told about (manifests, prompt files, sidecars) without trusting them.

A path can name a FIFO, a device or a socket as easily as a file (on the command line, through a symlink, in a
manifest): opening a FIFO blocks until a writer comes, and `/dev/zero` reads without end. So every such read
opens without blocking, refuses anything but a regular file, and stops at a stated size.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

MAX_TEXT_BYTES = 64 << 20  # a manifest or prompt file: 64 MiB is ~300,000 lines of JSON
MAX_SIDECAR_BYTES = 1 << 20  # a caption: Gemma reads 300 tokens of it, so 1 MiB is far more than any prompt


class NotRegularFile(OSError):
    """The path names something other than a regular file, or more bytes than the reader accepts."""


def is_regular(path: str | os.PathLike[str]) -> bool:
    """True for a regular file (after symlinks), False for anything else, including a path that is not there."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


def read_regular(path: str | os.PathLike[str], limit: int, what: str = "file") -> bytes:
    """The bytes of a regular file of at most `limit` bytes; NotRegularFile (naming the file) otherwise."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except ValueError as e:  # a NUL in the name
        raise NotRegularFile(f"{path}: cannot open ({e})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFile(f"{path}: the {what} is not a regular file (a FIFO, device, socket or folder); "
                                 "pid reads only regular files")
        if st.st_size > limit:
            raise NotRegularFile(f"{path}: the {what} holds {st.st_size} bytes, more than the {limit} accepted")
        chunks, total = [], 0
        while chunk := os.read(fd, 1 << 20):  # the size may grow while we read: stop at the limit regardless
            total += len(chunk)
            if total > limit:
                raise NotRegularFile(f"{path}: the {what} grew past the {limit} bytes accepted while being read")
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def read_text(path: str | os.PathLike[str], limit: int = MAX_TEXT_BYTES, what: str = "file") -> str:
    """A regular UTF-8 text file (a leading BOM dropped) of at most `limit` bytes."""
    return read_regular(path, limit, what).decode("utf-8-sig")


def regular_path(path: Path) -> Path:
    """`path` if it is a regular file; NotRegularFile saying what it is otherwise (for input paths)."""
    if not is_regular(path):
        kind = "does not exist" if not os.path.lexists(path) else "is not a regular file (a FIFO, device, " \
            "socket or folder, or a link to one)"
        raise NotRegularFile(f"{path}: {kind}")
    return path
