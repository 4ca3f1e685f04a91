"""PNG files, written so that a crash, a full disk or a second process never leaves a partial
or doubly-written image: encode to a temporary file in the target folder, fsync, then link it
into place (refusing an existing file) or rename it over one with `--overwrite`."""

from __future__ import annotations

import contextlib
import io
import os
import struct
import tempfile
import time
import zlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; clean_partials falls back to the files' age
    fcntl = None  # type: ignore[assignment]


class OutputExists(FileExistsError):
    """The output appeared while we were decoding (another process wrote it)."""


def encode_png(image: np.ndarray, text: dict[str, str] | None = None, compress_level: int = 4,
               plain: Iterable[str] = ()) -> bytes:
    """[H, W, 3] uint8 or uint16 → PNG bytes with iTXt metadata (UTF-8); the keys in `plain` as tEXt where
    their text fits Latin-1, as ComfyUI writes its `prompt`/`workflow` (and older readers only look there).

    Pillow cannot write 16-bit RGB, so 16-bit images go through a small writer of our own.
    """
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an [H, W, 3] image, got {list(image.shape)}")
    # Text from file names, manifests and metadata may hold lone surrogates (undecodable bytes of a file
    # name, "\udc80" in JSON) that UTF-8 cannot encode: replace them rather than fail the image.
    text = {_text(k): _text(v) for k, v in (text or {}).items()}
    plain = {k for k in plain if k in text and _latin1(k) and _latin1(text[k])}
    if image.dtype == np.uint8:
        info = PngInfo()
        for k, v in (text or {}).items():
            if k in plain:
                info.add_text(k, v)
            else:
                info.add_itxt(k, v)
        buf = io.BytesIO()
        Image.fromarray(image, "RGB").save(buf, format="PNG", pnginfo=info, compress_level=compress_level)
        return buf.getvalue()
    if image.dtype == np.uint16:
        return _png16(image, text or {}, compress_level, plain)
    raise ValueError(f"expected uint8 or uint16 pixels, got {image.dtype}")


def _text(value: str) -> str:
    return value.encode("utf-8", "replace").decode("utf-8")


def _latin1(value: str) -> bool:
    try:
        value.encode("latin-1")
    except UnicodeEncodeError:
        return False
    return "\0" not in value


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png16(image: np.ndarray, text: dict[str, str], level: int, plain: set[str]) -> bytes:
    h, w, _ = image.shape
    rows = np.ascontiguousarray(image, dtype=">u2").reshape(h, w * 3).view(np.uint8)  # big-endian bytes [H, W·6]
    raw = np.concatenate([np.zeros((h, 1), np.uint8), rows], axis=1).tobytes()  # filter byte 0 per row
    out = [b"\x89PNG\r\n\x1a\n", _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))]
    for k, v in text.items():
        if k in plain:
            out.append(_chunk(b"tEXt", k.encode("latin-1") + b"\x00" + v.encode("latin-1")))
        else:
            out.append(_chunk(b"iTXt", k.encode("latin-1", "replace") + b"\x00\x00\x00\x00\x00" + v.encode("utf-8")))
    out += [_chunk(b"IDAT", zlib.compress(raw, level)), _chunk(b"IEND", b"")]
    return b"".join(out)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()  # read once at import: os.umask can only be read by setting it


def write_atomic(path: Path, data: bytes, overwrite: bool = False) -> None:
    """Write `data` to `path` all-or-nothing. Without `overwrite`, an existing `path` raises
    OutputExists and is left untouched (two writers never both produce one file).

    The temporary file stays locked (flock) until it is linked into place and removed, so
    `clean_partials` in another process sharing the folder never deletes it mid-write; the lock dies
    with the process, so the files a `kill -9` leaves behind are cleaned by the next run."""
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
        _lock(fd, blocking=True)
        if os.fstat(fd).st_nlink:
            break
        os.close(fd)  # a cleaner removed it between mkstemp and the lock: make another
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs get the mode any new file would
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # atomic and fails if the name exists
            except FileExistsError:
                raise OutputExists(f"{path}: already exists (written by another process?)") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        os.close(fd)


def check_writable(out_dir: Path) -> None:
    """Fail before any GPU work if the output folder cannot be created or written."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except OSError as e:
        raise PermissionError(f"{out_dir}: output folder is not writable ({e.strerror or e})") from e


def _lock(fd: int, blocking: bool) -> bool | None:
    """Take an exclusive advisory lock on `fd`: True, False if another process holds it (non-blocking),
    None where the platform or file system has no locks."""
    if fcntl is None:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except BlockingIOError:
        return False
    except OSError:
        return None
    return True


PARTIAL_GRACE_S = 60.0  # without locks: a temporary file younger than this may still be being written


def clean_partials(out_dir: Path) -> int:
    """Remove temporary files left by a killed run (they never carry a final name). A file another
    process is still writing is locked (or brand new) and is left alone."""
    removed = 0
    now = time.time()
    for p in out_dir.rglob(".*.part"):
        try:
            fd = os.open(p, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            continue
        try:
            locked = _lock(fd, blocking=False)
            if locked or (locked is None and now - os.fstat(fd).st_mtime >= PARTIAL_GRACE_S):
                p.unlink()
                removed += 1
        except OSError:
            pass
        finally:
            os.close(fd)
    return removed
