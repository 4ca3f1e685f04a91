"""PNG files, written so that a crash, a full disk or a second process never leaves a partial
or doubly-written image: encode to a temporary file in the target folder, fsync, then link it
into place (refusing an existing file) or rename it over one with `--overwrite`."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import math
import os
import re
import secrets
import stat
import struct
import tempfile
import time
import zlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from torch import Tensor

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; clean_partials falls back to the files' age
    fcntl = None  # type: ignore[assignment]


class OutputExists(FileExistsError):
    """The output appeared while we were decoding (another process wrote it)."""


# ---- decoded images → PNG samples ------------------------------------------------------------------------


def to_uint(images: Tensor, bit_depth: int = 8) -> np.ndarray:
    """[B, 3, H, W] in [-1, 1] → [B, H, W, 3] uint8/uint16, rounded to nearest (upstream's
    demos truncate, which darkens every pixel by half a level on average)."""
    return _png_levels(_device_levels(images, bit_depth).cpu().numpy())


def level_difference(a: np.ndarray, b: np.ndarray) -> tuple[float, np.ndarray]:
    """Two images as 8-bit levels (`to_uint`) → (PSNR in dB, inf when identical; |a − b| per value)."""
    delta = np.abs(a.astype(np.int32) - b.astype(np.int32))
    mse = float(np.mean(delta.astype(np.float64) ** 2))
    return (math.inf if mse == 0 else 10 * math.log10(255**2 / mse)), delta


def finite_items(images: Tensor) -> Tensor:
    """[B, ...] → [B] bool: whether each item is free of NaN and Inf (which a PNG would show as black)."""
    return torch.isfinite(images.flatten(1)).all(1)


def _device_levels(images: Tensor, bit_depth: int) -> Tensor:
    """[B, 3, H, W] in [-1, 1] → [B, H, W, 3] levels on the images' device, in the narrowest type that copies:
    uint8, or for 16 bits int16 holding level − 32768 (torch has no uint16 arithmetic on GPUs)."""
    top = 255 if bit_depth == 8 else 65535
    scaled = ((images.float().clamp(-1, 1) + 1) * (top / 2)).round().permute(0, 2, 3, 1)
    levels = scaled.to(torch.uint8) if bit_depth == 8 else (scaled - 32768).to(torch.int16)
    return levels.contiguous()


def _png_levels(levels: np.ndarray) -> np.ndarray:
    """`_device_levels`' values as PNG samples: uint8 as they are; int16 level − 32768 back to uint16
    (the same 16 bits with the top one flipped)."""
    return levels if levels.dtype == np.uint8 else levels.view(np.uint16) ^ np.uint16(0x8000)


class HostPixels:
    """A batch's PNG-ready pixels on their way to host memory.

    Why: `pid decode` encodes PNGs in writer threads. Copying a decoded batch out synchronously would
    leave the GPU idle while the decode thread waits for the copy and then prepares the next batch; here
    the conversion and the copy into pinned memory are queued behind the decode, and only the writer that
    reads an image waits for them.
    """

    def __init__(self, images: Tensor, bit_depth: int = 8):
        levels = _device_levels(images, bit_depth)  # [B, H, W, 3]
        finite = finite_items(images)  # [B]
        self._copied: torch.cuda.Event | None = None
        if images.is_cuda:
            self._levels = torch.empty(levels.shape, dtype=levels.dtype, pin_memory=True)
            self._finite = torch.empty(finite.shape, dtype=torch.bool, pin_memory=True)
            self._levels.copy_(levels, non_blocking=True)
            self._finite.copy_(finite, non_blocking=True)
            self._copied = torch.cuda.Event()
            self._copied.record(torch.cuda.current_stream(images.device))
        else:
            self._levels, self._finite = levels, finite

    def get(self, index: int) -> np.ndarray | None:
        """Item `index` as [H, W, 3] uint8/uint16, or None when its pixels hold NaN or Inf."""
        if self._copied is not None:
            self._copied.synchronize()
        if not bool(self._finite[index]):
            return None
        return _png_levels(self._levels[index].numpy())


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


PARTIAL_PATTERN = re.compile(r"\.pid-[0-9a-f]{16}\.part")  # what write_atomic names its temporary files
_OLD_PARTIAL_PATTERN = re.compile(r"\..+\.png\.[a-z0-9_]{8}\.part")  # what pid 0.1 named them before hardening round 2
_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0)
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def write_atomic(path: Path, data: bytes, overwrite: bool = False, root: Path | None = None) -> None:
    """Write `data` to `path` all-or-nothing. Without `overwrite`, an existing `path` raises
    OutputExists and is left untouched (two writers never both produce one file).

    With `root` (the output folder), every folder between it and `path` is opened without following symlinks
    and the file is written and published relative to the last one: a sub-folder swapped for a link while a
    run goes on makes the write fail, never land outside `root`.

    The temporary file stays locked (flock) until it is linked into place and removed, so
    `clean_partials` in another process sharing the folder never deletes it mid-write; the lock dies
    with the process, so the files a `kill -9` leaves behind are cleaned by the next run."""
    if root is None:
        root = path.parent
        root.mkdir(parents=True, exist_ok=True)
    parts = path.parent.relative_to(root).parts if path.parent != root else ()
    folder = open_folder(root, parts, create=True)
    try:
        while True:
            tmp = partial_name(path.name)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | getattr(os, "O_CLOEXEC", 0),
                         0o666, dir_fd=folder)  # the umask applies, as to any new file
            _lock(fd, blocking=True)
            if os.fstat(fd).st_nlink:
                break
            os.close(fd)  # a cleaner removed it between creation and the lock: make another
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
            if overwrite:
                os.replace(tmp, path.name, src_dir_fd=folder, dst_dir_fd=folder)
            else:
                try:  # atomic and fails if the name exists
                    os.link(tmp, path.name, src_dir_fd=folder, dst_dir_fd=folder, follow_symlinks=False)
                except FileExistsError:
                    raise OutputExists(f"{path}: already exists (written by another process?)") from None
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp, dir_fd=folder)
            os.close(fd)
    finally:
        os.close(folder)


def partial_name(final: str) -> str:
    """A temporary file's name: pid's mark, 8 hex digits of the final name's hash (which output it becomes) and
    8 random ones. Short whatever the final name, so a name the file system takes is never refused for it."""
    return f".pid-{hashlib.sha1(final.encode('utf-8', 'surrogateescape')).hexdigest()[:8]}{secrets.token_hex(4)}.part"


def open_folder(root: Path, parts: tuple[str, ...], create: bool = False) -> int:
    """A descriptor of root/parts..., each part opened without following a symlink (made with `create`)."""
    fd = os.open(root, _DIR_FLAGS)
    try:
        for part in parts:
            if part in ("", ".", ".."):
                raise OSError(errno.EINVAL, f"{root}: the output path leaves it ({part!r})")
            if create:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, dir_fd=fd)
            try:
                sub = os.open(part, _DIR_FLAGS | _NOFOLLOW, dir_fd=fd)
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise OSError(e.errno, f"{part!r} under {root} is a symlink or not a folder: pid writes only "
                                  "into real folders inside --out") from None
                raise
            os.close(fd)
            fd = sub
    except BaseException:
        os.close(fd)
        raise
    return fd


def ignores_case(folder: Path) -> bool:
    """Whether the file system holding `folder` treats A.png and a.png as one name (macOS and Windows defaults)."""
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".pid-Case-") as probe:
            name = os.path.basename(probe.name)
            return os.path.exists(os.path.join(folder, name.swapcase()))
    except OSError:
        return False


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
    """Remove the temporary files killed runs left (named by write_atomic, so provably pid's; they never carry a
    final name). A file another process is still writing is locked (or brand new) and is left alone; so is any
    other hidden file, whoever made it. Symlinked folders are not followed."""
    removed = 0
    now = time.time()
    for folder, _, names in os.walk(out_dir, followlinks=False):
        for name in names:
            if not (PARTIAL_PATTERN.fullmatch(name) or _OLD_PARTIAL_PATTERN.fullmatch(name)):
                continue
            try:
                dfd = os.open(folder, _DIR_FLAGS | _NOFOLLOW)
            except OSError:
                continue
            try:
                fd = os.open(name, os.O_RDONLY | _NOFOLLOW | getattr(os, "O_NONBLOCK", 0), dir_fd=dfd)
            except OSError:
                os.close(dfd)
                continue
            try:
                st = os.fstat(fd)
                locked = _lock(fd, blocking=False) if stat.S_ISREG(st.st_mode) else False
                if locked or (locked is None and now - st.st_mtime >= PARTIAL_GRACE_S):
                    os.unlink(name, dir_fd=dfd)
                    removed += 1
            except OSError:
                pass
            finally:
                os.close(fd)
                os.close(dfd)
    return removed
