"""Reading image files and preparing them for a backbone encoder (docs/model.md#image-inputs), plus `--fit`.

Rules (each one tested in tests/test_images.py):
* Formats: whatever Pillow opens (PNG, JPEG, WebP, TIFF, BMP, GIF, …); the first frame of
  animations / multi-page files.
* Size: at most MAX_IMAGE_PIXELS (120 MP) per image, and no more than the file's bytes could hold, both
  checked from the header before any pixel data is decoded (`image_pixels` gives callers the same figure).
* Orientation: the EXIF orientation tag is applied once, so phone photos come out upright (upstream
  ignores it; for files without the tag nothing changes; Pillow already turns TIFFs as it loads them).
* Bit depth: 8-bit files give uint8, 16-bit PNG/TIFF give uint16 without losing precision.
  Pillow truncates 16-bit *colour* to 8 bits, so those are read with OpenCV (optional dependency
  `opencv-python-headless`); 16-bit grey is read by Pillow. A 16-bit TIFF with separate colour planes
  (PlanarConfiguration 2), which both misread, is decoded plane by plane as 16-bit grey by Pillow
  (`_read_planar_tiff`). Float images are refused.
* Colour: grey (and 1-bit) is replicated to R = G = B; palette, CMYK, YCbCr, … go through Pillow's
  RGB conversion.
* Alpha (RGBA, LA, palette or grey with a transparent colour): composited over white,
  out = round((c·a + max·(max − a)) / max) in integers (max = 255 or 65535). Opaque pixels are
  unchanged; transparent ones become white instead of whatever colour the file happens to keep
  under them (upstream's `convert("RGB")` keeps that hidden colour).
* Values: uint8 → v/127.5 − 1, uint16 → v/32767.5 − 1 (both map the full range onto [−1, 1]).
* Size (docs/model.md#image-inputs): centre-crop each side down to a multiple of 16, left = (w − w')//2,
  top = (h − h')//2, no resizing. `--fit` instead resizes onto a target bucket (`fit_to_target`).
"""

from __future__ import annotations

import io
import itertools
import math
import re
import struct
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, TiffImagePlugin, UnidentifiedImageError
from torch import Tensor

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp")
_GREY16_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_EXIF_ORIENTATION = 0x0112


class ImageReadError(ValueError):
    """An image file that cannot be read; the message names the file."""


@dataclass(frozen=True)
class ImageInfo:
    path: Path
    width: int  # after EXIF orientation, before any crop
    height: int
    bit_depth: int  # 8 or 16: dtype of the returned array
    source_mode: str  # Pillow mode of the file (e.g. "RGBA", "I;16", "RGB" for 16-bit colour read by OpenCV)
    had_alpha: bool  # composited over white
    orientation: int  # EXIF orientation applied (1 = none)


def read_image(path: str | Path) -> tuple[np.ndarray, ImageInfo]:
    """An image file as an H×W×3 RGB array (uint8, or uint16 for 16-bit files) and what was done to it."""
    path = Path(path)
    with _open_image(path) as im:
        mode, deep_colour = im.mode, _is_16bit_colour(im)  # before getexif(), which may load and drop tiles
        orientation = _orientation(im, path, deep_colour)
        to_apply = orientation if 1 <= orientation <= 8 else 1
        if deep_colour and im.format == "TIFF" and im.tag_v2.get(_PLANAR_CONFIGURATION, 1) == 2:
            arr = _read_planar_tiff(path, im)
        elif deep_colour:
            arr = _read_16bit_colour(path)
        else:
            arr = _pil_to_array(im, path)
            if im.format == "TIFF" and _EXIF_ORIENTATION not in im.tag_v2:
                to_apply = 1  # Pillow turns a TIFF upright as it loads it, and drops the tag: not a second time
    had_alpha = arr.shape[2] in (2, 4)
    arr = _orient(_to_rgb(arr), to_apply)
    info = ImageInfo(path=path, width=arr.shape[1], height=arr.shape[0], bit_depth=8 * arr.dtype.itemsize,
                     source_mode=mode, had_alpha=had_alpha, orientation=orientation)
    return np.ascontiguousarray(arr), info


def image_pixels(path: str | Path) -> int:
    """Width × height that `read_image` will decode `path` to, from the header alone (no pixel data is read), so
    a caller can bound how many pixels it decodes at once. Raises ImageReadError where `read_image` would refuse
    the file before decoding it: missing, unreadable header, over MAX_IMAGE_PIXELS, or more than it could hold."""
    with _open_image(Path(path)) as im:
        return im.size[0] * im.size[1]


# Pixels per input image, checked from the header before any pixel data is decoded. Reading peaks at ~10 bytes a
# pixel (8-bit RGB) to ~18 (16-bit RGBA): the decoder's buffer, the array, the composited or oriented copy; and
# the prepass reads several images at once, so Pillow's own limit (2 × 89.5 MP ≈ 179 MP, up to 3.2 GB each) is
# too loose. 120 MP (1.2-2.1 GB) keeps the largest camera photos (102 MP medium format, 11,656×8,742, which
# `--fit` resizes down); a 200 MP phone shot at full resolution, or a stitched panorama, must be downscaled first.
MAX_IMAGE_PIXELS = 120_000_000

# No codec packs more than this many pixels into one byte of file (1-bit deflate reaches ~8,300); a header
# that claims more is corrupt or hostile, and Pillow would allocate (and zero) the whole claimed image.
_MAX_PIXELS_PER_BYTE = 16_384
_READ_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, struct.error)


@contextmanager
def _open_image(path: Path) -> Iterator[Image.Image]:
    """The first frame, opened lazily (header only) and its size checked; any failure to read it, here or in the
    `with` body, becomes an ImageReadError naming the file."""
    if not path.is_file():
        raise ImageReadError(f"{path}: no such file")
    try:
        with Image.open(path) as im:
            im.seek(0)
            _check_declared_size(path, im.size)
            yield im
    except ImageReadError:
        raise
    except Image.DecompressionBombError as e:  # Pillow's own check at open, above 2 × Image.MAX_IMAGE_PIXELS
        found = re.search(r"\((\d+) pixels\)", str(e))
        size = f"{int(found.group(1)):,}" if found else "too many"
        raise ImageReadError(f"{path}: the image has {size} pixels, over the cap of {MAX_IMAGE_PIXELS:,} pixels "
                             "per input image; downscale it first") from e
    except _READ_ERRORS as e:
        raise ImageReadError(f"{path}: cannot read image ({type(e).__name__}: {e})") from e


def _check_declared_size(path: Path, size: tuple[int, int]) -> None:
    w, h = size
    if w * h > MAX_IMAGE_PIXELS:
        raise ImageReadError(f"{path}: the image is {w}x{h} = {w * h:,} pixels, over the cap of "
                             f"{MAX_IMAGE_PIXELS:,} pixels per input image; downscale it first")
    nbytes = path.stat().st_size
    if w * h > nbytes * _MAX_PIXELS_PER_BYTE + (1 << 21):
        raise ImageReadError(f"{path}: the header declares {w}x{h} pixels, far more than {nbytes} bytes of file can "
                             "hold (corrupt or hostile file)")


def _orientation(im: Image.Image, path: Path, deep_colour: bool) -> int:
    """The EXIF orientation tag (1 when absent). Pillow's PNG getexif() decodes the whole image (to 8 bits) to look
    for an eXIf chunk after the pixels; a 16-bit PNG is decoded by OpenCV instead, so its chunks are walked."""
    if deep_colour and im.format == "PNG" and "exif" not in im.info:
        exif = Image.Exif()
        if (data := _png_exif(path)) is not None:
            exif.load(data)
    else:
        exif = im.getexif()
    return int(exif.get(_EXIF_ORIENTATION, 1) or 1)


def _png_exif(path: Path) -> bytes | None:
    """The eXIf chunk's data, found by reading chunk headers only (PNG spec, 5.3 Chunk layout)."""
    with path.open("rb") as f:
        f.seek(8)
        while len(head := f.read(8)) == 8:
            length, kind = struct.unpack(">I4s", head)
            if kind in (b"eXIf", b"IEND"):
                return f.read(length) if kind == b"eXIf" else None
            f.seek(length + 4, io.SEEK_CUR)  # data and CRC
    return None


def _is_16bit_colour(im: Image.Image) -> bool:
    """A colour PNG/TIFF with 16-bit samples, which Pillow would truncate to 8 bits."""
    if im.mode in (*_GREY16_MODES, "F"):
        return False
    if im.format == "PNG":
        return any(";16" in str(t.args[0] if isinstance(t.args, tuple) else t.args) for t in im.tile)
    if im.format == "TIFF":
        bits = im.tag_v2.get(258, (8,))
        return max(bits if isinstance(bits, tuple) else (bits,)) == 16
    return False


def _read_16bit_colour(path: Path) -> np.ndarray:
    """H×W×C uint16 (C = 1..4, RGB(A) order) via OpenCV, which keeps all 16 bits."""
    try:
        import cv2
    except ImportError as e:
        raise ImageReadError(f"{path}: 16-bit colour images need OpenCV to keep their precision "
                             "(pip install opencv-python-headless), or save the image as 8-bit") from e
    arr = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if arr is None:
        raise ImageReadError(f"{path}: cannot read image (OpenCV could not decode it)")
    if arr.dtype != np.uint16:
        raise ImageReadError(f"{path}: unsupported sample type {arr.dtype} (expected 8- or 16-bit integers)")
    if arr.ndim == 2:
        return arr[:, :, None]
    if arr.shape[2] in (3, 4):  # BGR(A) → RGB(A) in place: a copy would add 6-8 bytes a pixel to the peak
        cv2.cvtColor(arr, cv2.COLOR_BGR2RGB if arr.shape[2] == 3 else cv2.COLOR_BGRA2RGBA, dst=arr)
    return arr


# TIFF 6.0 tags (Section 8, "Baseline Field Reference Guide"; tiles: Section 15; Predictor: Section 14).
_WIDTH, _LENGTH, _BITS, _COMPRESSION, _PHOTOMETRIC, _FILL_ORDER = 256, 257, 258, 259, 262, 266
_STRIP_OFFSETS, _SAMPLES, _ROWS_PER_STRIP, _STRIP_BYTES, _PLANAR_CONFIGURATION = 273, 277, 278, 279, 284
_PREDICTOR, _TILE_WIDTH, _TILE_LENGTH, _TILE_OFFSETS, _TILE_BYTES, _EXTRA_SAMPLES, _SAMPLE_FORMAT = (
    317, 322, 323, 324, 325, 338, 339)


def _read_planar_tiff(path: Path, im: Image.Image) -> np.ndarray:
    """H×W×C uint16 (RGB, + alpha when the 4th plane is one) from a 16-bit RGB TIFF stored as separate planes
    (PlanarConfiguration 2: all of R, then all of G, then all of B). Pillow reads those with 8 bits a sample (and
    garbles them uncompressed), OpenCV reads the first plane as if it were interleaved RGB; so each plane's strips
    or tiles are wrapped, as stored, in a one-sample grey TIFF of their own, which Pillow decodes with all 16 bits
    (through libtiff: every compression and predictor it reads)."""
    tags = im.tag_v2
    try:
        w, h, spp = _first(tags, _WIDTH), _first(tags, _LENGTH), _first(tags, _SAMPLES, 1)
        bits, kind = _tuple(tags.get(_BITS, 1)), _tuple(tags.get(_SAMPLE_FORMAT, 1))
        tiled = _TILE_OFFSETS in tags
        offsets = _tuple(tags.get(_TILE_OFFSETS if tiled else _STRIP_OFFSETS, ()))
        counts = _tuple(tags.get(_TILE_BYTES if tiled else _STRIP_BYTES, ()))
        layout = {t: _first(tags, t) for t in (_COMPRESSION, _FILL_ORDER, _ROWS_PER_STRIP, _PREDICTOR, _TILE_WIDTH,
                                               _TILE_LENGTH) if t in tags}
        alpha = spp > 3 and _first(tags, _EXTRA_SAMPLES, 0) in (1, 2)  # other extra planes are ignored
        if _first(tags, _PHOTOMETRIC, 0) != 2 or spp < 3 or set(bits) != {16} or set(kind) != {1}:
            raise ImageReadError(f"{path}: unsupported planar TIFF (photometric {tags.get(_PHOTOMETRIC)}, {spp} "
                                 f"samples of {bits} bits, sample format {kind}); save it as interleaved RGB")
        per_plane, rest = divmod(len(offsets), spp)
        size = path.stat().st_size
        if rest or not per_plane or len(counts) != len(offsets) or min(offsets + counts) < 0 or sum(counts) > size:
            raise ImageReadError(f"{path}: corrupt planar TIFF ({len(offsets)} strips or tiles of {sum(counts)} "
                                 f"bytes for {spp} planes, in a file of {size} bytes)")
    except (TypeError, IndexError) as e:  # a tag of a type or count the spec does not allow
        raise ImageReadError(f"{path}: corrupt planar TIFF ({type(e).__name__}: {e})") from e
    out = np.empty((h, w, 3 + alpha), np.uint16)
    with path.open("rb") as f:
        for k in range(out.shape[2]):
            chunks = [_read_at(f, offsets[i], counts[i]) for i in range(k * per_plane, (k + 1) * per_plane)]
            with Image.open(io.BytesIO(_grey16_tiff(tags.prefix, w, h, layout, tiled, chunks))) as plane:
                out[:, :, k] = np.asarray(plane)
    return out


def _tuple(v: object) -> tuple:
    return v if isinstance(v, tuple) else (v,)


def _first(tags: TiffImagePlugin.ImageFileDirectory_v2, tag: int, default: int | None = None) -> int:
    """A tag's (first) value as an int: TypeError/IndexError where a hostile file gives it a type or count that
    the spec does not allow."""
    return int(_tuple(tags[tag] if default is None else tags.get(tag, default))[0])


def _read_at(f: BinaryIO, offset: int, count: int) -> bytes:
    f.seek(offset)
    return f.read(count)


def _grey16_tiff(prefix: bytes, w: int, h: int, layout: dict[int, int], tiled: bool, chunks: list[bytes]) -> bytes:
    """A TIFF of one 16-bit grey plane (TIFF 6.0 Section 4, "Grayscale Images"): header, IFD, then `chunks`, the
    plane's strips (or tiles) as stored, in the source's byte order and with its compression and predictor."""
    o = "<" if prefix == b"II" else ">"
    tags = {_WIDTH: (4, [w]), _LENGTH: (4, [h]), _BITS: (3, [16]), _PHOTOMETRIC: (3, [1]), _SAMPLES: (3, [1]),
            _PLANAR_CONFIGURATION: (3, [1]), _SAMPLE_FORMAT: (3, [1]),
            **{t: (4 if t in (_ROWS_PER_STRIP, _TILE_WIDTH, _TILE_LENGTH) else 3, [v]) for t, v in layout.items()}}
    n = len(chunks)
    ifd_end = 8 + 2 + 12 * (len(tags) + 2) + 4
    data_at = ifd_end + (8 * n if n > 1 else 0)  # the offsets and counts arrays, when they do not fit an entry
    tags[_TILE_OFFSETS if tiled else _STRIP_OFFSETS] = (4, list(itertools.accumulate(map(len, chunks[:-1]),
                                                                                     initial=data_at)))
    tags[_TILE_BYTES if tiled else _STRIP_BYTES] = (4, [len(c) for c in chunks])
    entries, arrays = [], b""
    for tag, (typ, values) in sorted(tags.items()):
        packed = struct.pack(f"{o}{len(values)}{'H' if typ == 3 else 'I'}", *values)
        if len(packed) > 4:
            packed, arrays = struct.pack(o + "I", ifd_end + len(arrays)), arrays + packed
        entries.append(struct.pack(o + "HHI", tag, typ, len(values)) + packed.ljust(4, b"\0"))
    return b"".join([prefix, struct.pack(o + "HIH", 42, 8, len(tags)), *entries, bytes(4), arrays, *chunks])


def _pil_to_array(im: Image.Image, path: Path) -> np.ndarray:
    """H×W×C with C = 1 (grey), 3 (RGB) or 4 (RGBA); uint8, or uint16 for 16-bit grey."""
    if im.mode in _GREY16_MODES:
        arr = np.asarray(im)
        if arr.min(initial=0) < 0 or arr.max(initial=0) > 65535:
            raise ImageReadError(f"{path}: 32-bit integer samples outside 0..65535 are not supported")
        grey = arr.astype(np.uint16)[:, :, None]
        key = im.info.get("transparency")
        if isinstance(key, int):  # one grey value marked transparent → a 16-bit alpha channel
            return np.concatenate([grey, np.where(grey == key, 0, 65535).astype(np.uint16)], axis=2)
        return grey
    if im.mode == "F":
        raise ImageReadError(f"{path}: floating-point images are not supported; save as 8- or 16-bit")
    if "A" in im.mode or "transparency" in im.info:
        im = im.convert("RGBA")
    elif im.mode in ("1", "L"):
        im = im.convert("L")
    elif im.mode != "RGB":
        im = im.convert("RGB")
    arr = np.asarray(im)
    return arr[:, :, None] if arr.ndim == 2 else arr


def _to_rgb(arr: np.ndarray) -> np.ndarray:
    """H×W×{1,2,3,4} → H×W×3: grey replicated, alpha composited over white.

    The composite runs in blocks of rows, in the narrowest type that holds c·a + max·(max − a) + max//2 (uint16
    for 8-bit, uint32 for 16-bit): done at once in uint32/uint64 it peaked at ~50 bytes a pixel (6 GB at 120 MP)."""
    c = arr.shape[2]
    if c in (2, 4):
        top = np.iinfo(arr.dtype).max
        wide = np.uint32 if top > 255 else np.uint16
        out = np.empty((*arr.shape[:2], c - 1), arr.dtype)
        for r in range(0, arr.shape[0], _ROWS_PER_BLOCK):
            block = arr[r : r + _ROWS_PER_BLOCK]
            colour, alpha = block[:, :, : c - 1].astype(wide), block[:, :, c - 1 :].astype(wide)
            out[r : r + _ROWS_PER_BLOCK] = (colour * alpha + top * (top - alpha) + top // 2) // top
        arr = out
    return np.repeat(arr, 3, axis=2) if arr.shape[2] == 1 else arr


_ROWS_PER_BLOCK = 256


def _orient(arr: np.ndarray, orientation: int) -> np.ndarray:
    """Apply an EXIF orientation (same result as PIL.ImageOps.exif_transpose)."""
    ops = {
        1: lambda a: a,
        2: lambda a: a[:, ::-1],
        3: lambda a: a[::-1, ::-1],
        4: lambda a: a[::-1],
        5: lambda a: a.transpose(1, 0, 2),
        6: lambda a: np.rot90(a, -1),
        7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),
        8: lambda a: np.rot90(a, 1),
    }
    return ops[orientation](arr)


def to_tensor(img: np.ndarray) -> Tensor:
    """H×W×3 uint8/uint16 → [1, 3, H, W] float32 in [−1, 1] (v/127.5 − 1, resp. v/32767.5 − 1)."""
    half = {np.dtype(np.uint8): 127.5, np.dtype(np.uint16): 32767.5}.get(img.dtype)
    if half is None or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected an H×W×3 uint8 or uint16 image, got {img.dtype} {img.shape}")
    x = torch.from_numpy(np.ascontiguousarray(img).astype(np.float32)).permute(2, 0, 1)[None]
    return x / half - 1


def preprocess(img: np.ndarray, multiple: int = 16) -> np.ndarray:
    """Centre-crop each side down to a multiple of `multiple` (upstream's rule; no resizing)."""
    h, w = img.shape[:2]
    nh, nw = h // multiple * multiple, w // multiple * multiple
    if nh == 0 or nw == 0:
        raise ValueError(f"image of {w}x{h} px is smaller than the {multiple}-px minimum the encoder needs")
    top, left = (h - nh) // 2, (w - nw) // 2
    return img[top : top + nh, left : left + nw]


def parse_size(size: str | Sequence[int]) -> tuple[int, int]:
    """"4096x3072" or (4096, 3072) → (width, height)."""
    if isinstance(size, str):
        w, _, h = size.lower().partition("x")
        return int(w), int(h)
    w, h = size
    return int(w), int(h)


def choose_bucket(width: int, height: int, buckets: Sequence[str | Sequence[int]]) -> tuple[int, int]:
    """The bucket (W, H) whose aspect ratio is closest to width/height (in log ratio); ties → larger area."""
    if not buckets:
        raise ValueError("no output buckets to choose from")
    sizes = [parse_size(b) for b in buckets]
    target = math.log(width / height)
    return min(sizes, key=lambda s: (round(abs(math.log(s[0] / s[1]) - target), 9), -s[0] * s[1]))


def fit_to_target(img: np.ndarray, target: str | Sequence[int], sr_scale: int) -> np.ndarray:
    """`--fit`: resize so that PiD's output (sr_scale × the input) is exactly `target` (W, H).

    Rule: the input must become (W/sr, H/sr). The image is scaled (Lanczos, aspect ratio kept) by
    the smallest factor that covers that size, then centre-cropped to it like §8.1; nothing is
    stretched or padded, and the crop only removes an aspect-ratio mismatch. A 1000×750 photo with
    target 4096×3072 and sr 4 becomes 1024×768. Already the right size: returned unchanged.
    """
    tw, th = parse_size(target)
    if tw % sr_scale or th % sr_scale:
        raise ValueError(f"target {tw}x{th} is not a multiple of the ×{sr_scale} scale")
    iw, ih = tw // sr_scale, th // sr_scale
    h, w = img.shape[:2]
    if (w, h) == (iw, ih):
        return img
    s = max(iw / w, ih / h)
    rw, rh = max(iw, round(w * s)), max(ih, round(h * s))
    resized = resize_array(img, (rw, rh))
    top, left = (rh - ih) // 2, (rw - iw) // 2
    return resized[top : top + ih, left : left + iw]


def resize_array(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """H×W×C integer image → size (W, H) with Lanczos, per channel in float (keeps 16-bit precision)."""
    top = np.iinfo(img.dtype).max
    channels = [_lanczos(img[:, :, c].astype(np.float32), size) for c in range(img.shape[2])]
    return np.clip(np.rint(np.stack(channels, axis=2)), 0, top).astype(img.dtype)


def _lanczos(plane: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return np.asarray(Image.fromarray(plane, mode="F").resize(size, Image.Resampling.LANCZOS))


def resize_lanczos(x: Tensor, size: tuple[int, int]) -> Tensor:
    """[B, C, h, w] or [C, h, w] float image → (H, W) = `size` with Lanczos; float32, clamped to [−1, 1].

    Used to upscale the VAE decode to PiD's size for `--compare` and the colour fix."""
    squeeze = x.ndim == 3
    x4 = x[None] if squeeze else x
    h, w = size
    planes = x4.detach().float().cpu().numpy()
    out = np.stack([np.stack([_lanczos(p, (w, h)) for p in img]) for img in planes])
    y = torch.from_numpy(out).clamp_(-1, 1).to(x.device)
    return y[0] if squeeze else y


def to_uint8(x: Tensor) -> np.ndarray:
    """[3, H, W] or [1, 3, H, W] in [−1, 1] → H×W×3 uint8 with upstream's rule (docs/model.md#output-pixels):
    floor((clamp(x, −1, 1) + 1)·127.5), computed in float32, truncated."""
    if x.ndim == 4:
        if x.shape[0] != 1:
            raise ValueError(f"to_uint8 takes one image, got a batch of {x.shape[0]}")
        x = x[0]
    u = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).permute(1, 2, 0).cpu().numpy()
    return u.astype(np.uint8)
