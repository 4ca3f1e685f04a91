"""Reading image files and preparing them for a backbone encoder (spec §8.1), plus `--fit`.

Rules (each one tested in tests/test_images.py):
* Formats: whatever Pillow opens (PNG, JPEG, WebP, TIFF, BMP, GIF, …); the first frame of
  animations / multi-page files.
* Orientation: the EXIF orientation tag is applied, so phone photos come out upright (upstream
  ignores it; for files without the tag nothing changes).
* Bit depth: 8-bit files give uint8, 16-bit PNG/TIFF give uint16 without losing precision.
  Pillow truncates 16-bit *colour* to 8 bits, so those are read with OpenCV (optional dependency
  `opencv-python-headless`); 16-bit grey is read by Pillow. Float images are refused.
* Colour: grey (and 1-bit) is replicated to R = G = B; palette, CMYK, YCbCr, … go through Pillow's
  RGB conversion.
* Alpha (RGBA, LA, palette or grey with a transparent colour): composited over white,
  out = round((c·a + max·(max − a)) / max) in integers (max = 255 or 65535). Opaque pixels are
  unchanged; transparent ones become white instead of whatever colour the file happens to keep
  under them (upstream's `convert("RGB")` keeps that hidden colour).
* Values: uint8 → v/127.5 − 1, uint16 → v/32767.5 − 1 (both map the full range onto [−1, 1]).
* Size (spec §8.1): centre-crop each side down to a multiple of 16, left = (w − w')//2,
  top = (h − h')//2, no resizing. `--fit` instead resizes onto a target bucket (`fit_to_target`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
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
    if not path.is_file():
        raise ImageReadError(f"{path}: no such file")
    try:
        with Image.open(path) as im:
            im.seek(0)
            _check_declared_size(path, im.size)
            mode, deep_colour = im.mode, _is_16bit_colour(im)  # before getexif(), which may load and drop tiles
            orientation = int(im.getexif().get(_EXIF_ORIENTATION, 1) or 1)
            arr = _read_16bit_colour(path) if deep_colour else _pil_to_array(im, path)
    except ImageReadError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        raise ImageReadError(f"{path}: cannot read image ({type(e).__name__}: {e})") from e
    had_alpha = arr.shape[2] in (2, 4)
    arr = _orient(_to_rgb(arr), orientation if 1 <= orientation <= 8 else 1)
    info = ImageInfo(path=path, width=arr.shape[1], height=arr.shape[0], bit_depth=8 * arr.dtype.itemsize,
                     source_mode=mode, had_alpha=had_alpha, orientation=orientation)
    return np.ascontiguousarray(arr), info


# No codec packs more than this many pixels into one byte of file (1-bit deflate reaches ~8,300); a header
# that claims more is corrupt or hostile, and Pillow would allocate (and zero) the whole claimed image.
_MAX_PIXELS_PER_BYTE = 16_384


def _check_declared_size(path: Path, size: tuple[int, int]) -> None:
    w, h = size
    nbytes = path.stat().st_size
    if w * h > nbytes * _MAX_PIXELS_PER_BYTE + (1 << 21):
        raise ImageReadError(f"{path}: the header declares {w}x{h} pixels, far more than {nbytes} bytes of file can "
                             "hold (corrupt or hostile file)")


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
    return arr[:, :, [2, 1, 0, 3][: arr.shape[2]]] if arr.shape[2] >= 3 else arr  # BGR(A) → RGB(A)


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
    """H×W×{1,2,3,4} → H×W×3: grey replicated, alpha composited over white."""
    c = arr.shape[2]
    if c in (2, 4):
        top = np.iinfo(arr.dtype).max
        wide = np.uint64 if top > 255 else np.uint32
        colour, alpha = arr[:, :, : c - 1].astype(wide), arr[:, :, c - 1 :].astype(wide)
        arr = ((colour * alpha + top * (top - alpha) + top // 2) // top).astype(arr.dtype)
    return np.repeat(arr, 3, axis=2) if arr.shape[2] == 1 else arr


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
    """Centre-crop each side down to a multiple of `multiple` (spec §8.1; no resizing)."""
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
    """[3, H, W] or [1, 3, H, W] in [−1, 1] → H×W×3 uint8 with upstream's rule (spec §8.2):
    floor((clamp(x, −1, 1) + 1)·127.5), computed in float32, truncated."""
    if x.ndim == 4:
        if x.shape[0] != 1:
            raise ValueError(f"to_uint8 takes one image, got a batch of {x.shape[0]}")
        x = x[0]
    u = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).permute(1, 2, 0).cpu().numpy()
    return u.astype(np.uint8)
