"""Latent files in, PiD-ready latents out.

PiD consumes each backbone's *normalised* spatial latent [B, C, h, w] (spec §7). Users bring
latents saved by diffusers pipelines (`output_type="latent"`: normalised, Flux/Qwen packed
into token sequences), by ComfyUI (`.latent`: raw VAE space), or by their own scripts. This
module reads every common container, works out the layout, converts to the PiD space, and
refuses anything it cannot place unambiguously, with an error naming the file.
"""

from __future__ import annotations

import math
import os
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from torch import Tensor

from pid_cli.registry import Latent

LATENT_SUFFIXES = (".safetensors", ".latent", ".pt", ".pth", ".npy", ".npz")
# Names under which tools store the latent when a file holds several tensors.
_LATENT_KEYS = ("latent", "latents", "samples", "latent_tensor", "x", "z")
FORMATS = ("auto", "pid", "packed", "raw")
FORMAT_HELP = ("pid: normalised spatial latent [B,C,h,w] (diffusers output_type='latent' for sd3/sdxl/zimage); "
               "packed: diffusers token sequence [B,L,64|128] (flux, flux2, qwenimage); "
               "raw: un-normalised VAE latent (ComfyUI .latent, vae.encode(), FLUX.2-klein's final output); "
               "auto: decide from the container and shape, refusing ambiguous cases")
MAX_LATENT_SIDE = 1024  # 8192 px at ×8: larger is not an image anyone decodes in one pass
MAX_LATENT_ABS = 1e4  # normalised latents are O(1); far larger values overflow the decoder into NaN
MAX_UNPACKED_BYTES = 1 << 32  # what a compressed container (.npz, zipped .pt) may expand to
_MAX_DEFLATE_RATIO = 1100  # deflate cannot expand more than ~1032:1; a member claiming more is lying


class LatentError(ValueError):
    """A latent file that cannot be read or placed; the message names the file."""


@dataclass
class LatentFile:
    """A tensor read from disk with what its container says about it."""

    path: Path
    tensor: Tensor  # as stored, any layout
    metadata: dict[str, Any] = field(default_factory=dict)
    raw_container: bool = False  # ComfyUI .latent: raw VAE space by convention


def read_latent_file(path: str | Path, key: str | None = None) -> LatentFile:
    """Read one latent tensor (and metadata) from any supported container. Pickles are read
    with `weights_only=True`: tensors and plain containers only, never code."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in LATENT_SUFFIXES:
        raise LatentError(f"{path}: unsupported latent file type {suffix!r} (expected one of "
                          f"{', '.join(LATENT_SUFFIXES)})")
    try:
        if suffix in (".safetensors", ".latent"):
            tensors, meta = _read_safetensors(path)
        elif suffix in (".pt", ".pth"):
            tensors, meta = _read_torch(path)
        else:
            tensors, meta = _read_numpy(path)
    except LatentError:
        raise
    except Exception as e:  # parsers raise anything on hostile bytes (SafetensorError, tokenize.TokenError, …)
        raise LatentError(f"{path}: cannot read latent file ({type(e).__name__}: {_clip(str(e))})") from e
    tensor = _pick(path, tensors, key)
    raw = suffix == ".latent"
    if raw and "latent_format_version_0" not in meta and tensor.is_floating_point():
        tensor = tensor.float() * (1.0 / 0.18215)  # ComfyUI's pre-2023 files stored SD-scaled latents
    return LatentFile(path, tensor, meta, raw_container=raw)


def _read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:  # safetensors only opens UTF-8 paths: read undecodable names from memory
        from safetensors.torch import load

        data = path.read_bytes()
        return load(data), safetensors_metadata(data)
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    return tensors, meta


def safetensors_metadata(data: bytes) -> dict[str, str]:
    """The `__metadata__` of a safetensors file's bytes (already validated by safetensors' own reader)."""
    import json
    import struct

    (n,) = struct.unpack("<Q", data[:8])
    meta = json.loads(data[8:8 + n]).get("__metadata__") or {}
    return {str(k): str(v) for k, v in meta.items()}


def _clip(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


def _check_zip_budget(path: Path, zf: zipfile.ZipFile) -> None:
    """Refuse an archive whose members would unpack to more than MAX_UNPACKED_BYTES, or claim more than
    deflate can produce: readers allocate the declared size before they find out it was a lie."""
    total = 0
    for info in zf.infolist():
        if info.compress_type != zipfile.ZIP_STORED and info.file_size > info.compress_size * _MAX_DEFLATE_RATIO + 4096:
            raise LatentError(f"{path}: archive member {info.filename!r} claims {info.file_size} bytes from "
                              f"{info.compress_size} compressed: corrupt or hostile file")
        total += info.file_size
    if total > MAX_UNPACKED_BYTES:
        raise LatentError(f"{path}: archive unpacks to {total} bytes, more than the {MAX_UNPACKED_BYTES} a latent "
                          "file may hold; split it into several files")


def _read_torch(path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    import pickle

    if not zipfile.is_zipfile(path):  # the pre-1.6 format allocates storages at the sizes the pickle claims
        raise LatentError(f"{path}: not a PyTorch zip archive (truncated, or saved by PyTorch < 1.6 with "
                          "_use_new_zipfile_serialization=False); re-save it with torch.save or as .safetensors")
    with zipfile.ZipFile(path) as zf:
        _check_zip_budget(path, zf)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise LatentError(f"{path}: refused: the pickle holds objects other than tensors and plain values "
                          f"(pid never executes code from input files)") from e
    if isinstance(obj, Tensor):
        obj = {"latent": obj}
    if not isinstance(obj, dict):
        raise LatentError(f"{path}: holds a {type(obj).__name__}, expected a tensor or a dict with one")
    # Only string keys: str() of a crafted key (nested tuples sharing one object) can take forever.
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, Tensor)}
    for k, t in tensors.items():
        # A crafted view (zero or overlapping strides) can claim far more elements than the file stores.
        if t.layout != torch.strided or t.numel() * t.element_size() > t.untyped_storage().nbytes():
            raise LatentError(f"{path}: tensor {k!r} {list(t.shape)} is not a plain dense tensor (sparse, or a "
                              "view larger than its storage); save tensor.contiguous() instead")
    meta = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, (str, int, float))}
    return tensors, meta


def _read_numpy(path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """`.npy`/`.npz` without np.load, which allocates whatever shape a header declares before reading:
    each header is checked against the bytes actually present first. Never unpickles."""
    if path.suffix.lower() == ".npy":
        with open(path, "rb") as fh:
            arrays = {"latent": _read_npy(fh, os.fstat(fh.fileno()).st_size, f"{path}")}
    else:
        arrays = {}
        with zipfile.ZipFile(path) as zf:
            _check_zip_budget(path, zf)
            for info in zf.infolist():
                if info.is_dir() or not info.filename.endswith(".npy"):
                    continue
                with zf.open(info) as fh:
                    arrays[info.filename[:-4]] = _read_npy(fh, info.file_size, f"{path}[{info.filename}]")
    return {k: torch.from_numpy(a) for k, a in arrays.items()}, {}


def _read_npy(fh: Any, available: int, where: str) -> np.ndarray:
    """One .npy payload from a binary stream holding `available` bytes (header included)."""
    from numpy.lib import format as npf

    start = fh.tell()
    version = npf.read_magic(fh)
    if version == (1, 0):
        shape, fortran, dtype = npf.read_array_header_1_0(fh)
    elif version == (2, 0):
        shape, fortran, dtype = npf.read_array_header_2_0(fh)
    else:
        raise LatentError(f"{where}: unsupported .npy format version {version[0]}.{version[1]}")
    if dtype.kind != "f" or dtype.hasobject:
        raise LatentError(f"{where}: array has dtype {dtype}, expected floating point")
    if not all(isinstance(n, int) and n >= 0 for n in shape):
        raise LatentError(f"{where}: invalid shape {shape!r}")
    header = fh.tell() - start
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > available - header:
        raise LatentError(f"{where}: header declares shape {list(shape)} ({nbytes} bytes) but the file holds "
                          f"{max(available - header, 0)} bytes of data (truncated or corrupt)")
    data = fh.read(nbytes)  # grows with the data actually read, never by what a header claims
    if len(data) != nbytes:
        raise LatentError(f"{where}: truncated: expected {nbytes} bytes of array data, found {len(data)}")
    array = np.frombuffer(data, dtype=dtype).reshape(shape, order="F" if fortran else "C")
    return np.array(array, dtype=dtype.newbyteorder("="), order="C")  # writable, native byte order


def _pick(path: Path, tensors: dict[str, Tensor], key: str | None) -> Tensor:
    if key is not None:
        if key not in tensors:
            raise LatentError(f"{path}: no tensor named {key!r} (found: {', '.join(sorted(tensors)) or 'none'})")
        return tensors[key]
    if len(tensors) == 1:
        return next(iter(tensors.values()))
    for name in _LATENT_KEYS:
        if name in tensors:
            return tensors[name]
    if not tensors:
        raise LatentError(f"{path}: holds no tensors")
    raise LatentError(f"{path}: holds several tensors ({', '.join(sorted(tensors))}); choose one with --key")


# ---------------------------------------------------------------------------------------
# Layout and normalisation


def parse_size(text: str) -> tuple[int, int]:
    """'HxW' → (h, w)."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"expected a size like 64x96 (height x width), got {text!r}") from None
    if h <= 0 or w <= 0:
        raise ValueError(f"size must be positive, got {text!r}")
    return h, w


def latent_size_from_metadata(meta: dict[str, Any], spec: Latent) -> tuple[int, int] | None:
    """The spatial latent grid a packed sequence unpacks to, from metadata: `latent_height`/
    `latent_width` (grid cells), or `height`/`width` (pixels of the image the LDM made)."""
    def num(name: str) -> int | None:
        value = meta.get(name)
        try:
            number = int(float(value)) if value is not None else None
        except (TypeError, ValueError, OverflowError):  # not a number, NaN, ±inf, or a float beyond range
            return None
        return number if number is not None and number > 0 else None

    if num("latent_height") and num("latent_width"):
        return num("latent_height"), num("latent_width")
    if num("height") and num("width"):
        return num("height") // spec.vae_factor, num("width") // spec.vae_factor
    return None


def to_pid_latent(file: LatentFile, spec: Latent, backbone: str, fmt: str = "auto",
                  size: tuple[int, int] | None = None,
                  bn_stats: Callable[[], tuple[Tensor, Tensor]] | None = None) -> Tensor:
    """Convert a stored tensor to the normalised PiD latent [B, C, h, w] float32.

    `fmt` is one of FORMATS. `size` (h, w) places a packed sequence when metadata does not.
    `bn_stats` lazily supplies FLUX.2's batch-norm statistics for raw FLUX.2 latents.
    """
    if fmt not in FORMATS:
        raise LatentError(f"unknown latent format {fmt!r}; expected one of {', '.join(FORMATS)}")
    name = f"{file.path}"
    z = file.tensor
    if not z.is_floating_point():
        raise LatentError(f"{name}: tensor has dtype {z.dtype}, expected floating point")
    if z.dim() not in (3, 4, 5):
        raise LatentError(f"{name}: cannot use a {z.dim()}-D tensor {list(z.shape)} as a latent "
                          "(expected [C,h,w], [B,C,h,w], [B,C,1,h,w] or a packed [B,L,D] sequence)")
    if z.numel() == 0:
        raise LatentError(f"{name}: tensor {list(z.shape)} is empty")
    z = z.float()
    if not torch.isfinite(z).all():
        raise LatentError(f"{name}: tensor {list(z.shape)} contains NaN or Inf values")
    size = size or latent_size_from_metadata(file.metadata, spec)
    if fmt == "auto":
        fmt = "raw" if file.raw_container else _guess_layout(name, z, spec, backbone, size)
    if z.dim() == 5:  # [B, C, T, h, w] (Qwen-Image / Wan): one frame only
        if z.shape[2] != 1:
            raise LatentError(f"{name}: 5-D latent {list(z.shape)} has {z.shape[2]} frames; PiD decodes images "
                              "(expected [B, C, 1, h, w])")
        z = z[:, :, 0]
    if z.dim() == 3 and fmt != "packed":
        z = z[None]  # [C, h, w] → [1, C, h, w]
    if fmt == "packed":
        z = _unpack(name, z, spec, size)
    elif z.dim() != 4:
        raise LatentError(f"{name}: cannot use a {z.dim()}-D tensor {list(z.shape)} as a latent "
                          "(expected [C,h,w], [B,C,h,w], [B,C,1,h,w] or a packed [B,L,D] sequence)")
    if fmt == "raw":
        z = _normalise(name, z, spec, backbone, bn_stats)
    _check_spatial(name, z, spec, backbone)
    peak = float(z.abs().max())
    if not peak <= MAX_LATENT_ABS:  # NaN too: a raw normalisation can still overflow
        raise LatentError(f"{name}: latent values reach {peak:.3g}; a normalised latent is O(1) and values beyond "
                          f"{MAX_LATENT_ABS:g} only decode to NaN. Is --latent-format right?")
    return z


def _guess_layout(name: str, z: Tensor, spec: Latent, backbone: str, size: tuple[int, int] | None) -> str:
    """'pid', 'packed' or 'raw' from the shape; raise where two readings are possible.

    A 3-D tensor reads as packed tokens [B, L, D] only when its width is the backbone's token
    width and a known latent size accounts for L tokens (without a size it could not be
    unpacked anyway), so a plain [C, h, w] latent is never mistaken for one.
    """
    token_width = spec.channels * (4 if spec.patchify == 1 else 1)
    if z.dim() == 3:
        cell = 2 if spec.patchify == 1 else 1
        spatial = z.shape[0] == spec.channels
        width_ok = z.shape[-1] == token_width and spec.fixed_grid is None
        explained = size is not None and (size[0] // cell) * (size[1] // cell) == z.shape[1]
        packed = width_ok and (explained if spatial else True)
        if spatial and packed:
            raise LatentError(f"{name}: 3-D tensor {list(z.shape)} reads both as [C,h,w] and as a packed "
                              "[B,L,D] sequence; say which with --latent-format pid|packed")
        if packed:
            return "packed"
    if z.dim() in (3, 4, 5):
        channels = z.shape[0] if z.dim() == 3 else z.shape[1]
        if channels == spec.channels:
            return "pid"
        if spec.patchify == 2 and channels * 4 == spec.channels:
            return "raw"  # FLUX.2-klein's pipeline output: raw and un-patchified (spec §7.1)
    raise LatentError(f"{name}: tensor {list(z.shape)} does not fit the {backbone} decoder, which takes "
                      f"{spec.channels}-channel latents [B,{spec.channels},h,w]"
                      + (f" or packed [B,L,{token_width}] sequences" if spec.fixed_grid is None else "")
                      + _suggest_backbone(z))


def _suggest_backbone(z: Tensor) -> str:
    channels = {4: "sdxl", 16: "flux, sd3, zimage or qwenimage", 32: "flux2 (raw FLUX.2 latent)", 128: "flux2",
                768: "dinov2", 1152: "siglip"}
    dims = [z.shape[1]] if z.dim() >= 4 else [z.shape[0], z.shape[-1]]
    for c in dims:
        if c in channels:
            return f"; {c} channels fits --backbone {channels[c]}"
        if c == 64:
            return "; a packed [B,L,64] sequence fits --backbone flux or qwenimage"
    return ""


def _unpack(name: str, z: Tensor, spec: Latent, size: tuple[int, int] | None) -> Tensor:
    """Packed tokens [B, L, D] → spatial [B, C, h, w] (diffusers' raster order)."""
    if z.dim() != 3:
        raise LatentError(f"{name}: a packed latent must be [B, L, D], got {list(z.shape)}")
    b, n_tokens, width = z.shape
    cell = 2 if spec.patchify == 1 else 1  # flux/qwen pack 2×2 latent cells per token; flux2 is already packed
    if width != spec.channels * cell * cell:
        raise LatentError(f"{name}: packed tokens are {width} wide; this backbone packs "
                          f"{spec.channels * cell * cell} per token")
    if size is None:
        raise LatentError(f"{name}: a packed [B, {n_tokens}, {width}] sequence does not say its image size; give "
                          "--latent-size HxW (the unpacked latent grid, e.g. 128x128 for a 1024 px Flux image) "
                          "or store latent_height/latent_width (or pixel height/width) in the file's metadata")
    h, w = size
    if h % cell or w % cell or (h // cell) * (w // cell) != n_tokens:
        raise LatentError(f"{name}: latent size {h}x{w} does not match {n_tokens} packed tokens "
                          f"({h // cell}x{w // cell} = {(h // cell) * (w // cell)})")
    grid = z.view(b, h // cell, w // cell, spec.channels, cell, cell)  # channel index c·4 + dy·2 + dx
    return grid.permute(0, 3, 1, 4, 2, 5).reshape(b, spec.channels, h, w)


def patchify_2x2(z: Tensor) -> Tensor:
    """[B, C, 2h, 2w] → [B, 4C, h, w] with channel c·4 + i·2 + j for in-cell offset (i, j)."""
    b, c, h, w = z.shape
    if h % 2 or w % 2:
        raise ValueError(f"cannot 2x2-patchify a {h}x{w} latent (odd size)")
    return z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h // 2, w // 2)


def _normalise(name: str, z: Tensor, spec: Latent, backbone: str,
               bn_stats: Callable[[], tuple[Tensor, Tensor]] | None) -> Tensor:
    """Raw VAE latent → the normalised space the decoder was trained on (spec §7.3)."""
    norm = spec.normalisation
    kind = norm.get("kind")
    if spec.patchify == 2 and z.shape[1] * 4 == spec.channels:
        z = patchify_2x2(z)
    if z.shape[1] != spec.channels:
        raise LatentError(f"{name}: raw latent has {z.shape[1]} channels; the {backbone} decoder needs "
                          f"{spec.channels}" + (f" (or {spec.channels // 4} before 2x2 patchify)"
                                                if spec.patchify == 2 else "") + _suggest_backbone(z))
    if kind == "affine":
        return (z - float(norm["shift"])) * float(norm["scale"])
    if kind == "per_channel":
        mean = torch.tensor(norm["mean"], dtype=z.dtype)[None, :, None, None]
        std = torch.tensor(norm["std"], dtype=z.dtype)[None, :, None, None]
        return (z - mean) / std
    if kind == "batchnorm":
        if bn_stats is None:
            raise LatentError(f"{name}: normalising a raw {backbone} latent needs the batch-norm statistics of "
                              "its VAE file, which is not available")
        mean, var = bn_stats()
        return (z - mean.float()[None, :, None, None]) / torch.sqrt(var.float()[None, :, None, None] + norm["eps"])
    raise LatentError(f"{name}: raw latents of {backbone} ({kind} normalisation) cannot be converted; "
                      "save the encoder's normalised output instead")


def _check_spatial(name: str, z: Tensor, spec: Latent, backbone: str) -> None:
    _, c, h, w = z.shape
    if c != spec.channels:
        raise LatentError(f"{name}: latent has {c} channels; the {backbone} decoder needs {spec.channels}"
                          + _suggest_backbone(z))
    if spec.fixed_grid is not None and (h, w) != tuple(spec.fixed_grid):
        raise LatentError(f"{name}: latent grid {h}x{w}; the {backbone} decoder only takes "
                          f"{spec.fixed_grid[0]}x{spec.fixed_grid[1]}")
    if max(h, w) > MAX_LATENT_SIDE:
        raise LatentError(f"{name}: latent grid {h}x{w} is larger than {MAX_LATENT_SIDE} on a side "
                          f"(a {h * spec.vae_factor}x{w * spec.vae_factor} px image); is the layout right?")


def training_sigma(sigma: float, frame: str) -> float:
    """σ in the frame the student was trained on (see `to_training_frame`)."""
    if not 0 <= sigma < math.inf:
        raise ValueError(f"degrade_sigma must be a finite number >= 0, got {sigma}")
    if frame == "flow":
        if sigma > 1:
            raise ValueError(f"degrade_sigma {sigma} is outside [0, 1] for a flow-matching latent")
        return sigma
    if frame == "euler-ve":
        return sigma / math.sqrt(sigma * sigma + 1)
    raise ValueError(f"unknown sigma frame {frame!r}")


def to_training_frame(latent: Tensor, sigma: float, frame: str) -> tuple[Tensor, float]:
    """Map an intermediate latent and its σ into the frame the student was trained on.

    Flow-matching backbones pass through. SDXL's Euler scheduler works in the variance-
    exploding frame x = x0 + σ·ε; the SDXL student was trained in the variance-preserving
    one, so x_vp = x / sqrt(σ² + 1) and σ_vp = σ / sqrt(σ² + 1) (spec §7.2).
    """
    trained = training_sigma(sigma, frame)
    if frame == "euler-ve" and sigma > 0:
        return latent / math.sqrt(sigma * sigma + 1), trained
    return latent, trained
