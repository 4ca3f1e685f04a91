"""Latent files in, PiD-ready latents out.

PiD consumes each backbone's *normalised* spatial latent [B, C, h, w] (README: Inputs). Users bring
latents saved by diffusers pipelines (`output_type="latent"`: normalised, Flux/Qwen/FLUX.2 packed
into token sequences), by ComfyUI (`.latent`: the VAE's own output for most backbones, already
normalised for FLUX.2), by InvokeAI (torch files without a suffix) or by their own scripts. This
module reads every common container, works out the layout, converts to the PiD space, and refuses
anything it cannot place unambiguously, with an error naming the file.
"""

from __future__ import annotations

import contextlib
import math
import os
import stat
import struct
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from torch import Tensor

from pid_cli.files import is_regular
from pid_cli.registry import Latent

LATENT_SUFFIXES = (".safetensors", ".latent", ".pt", ".pth", ".npy", ".npz")
# Names under which tools store the latent when a file holds several tensors.
_LATENT_KEYS = ("latent", "latents", "samples", "latent_tensor", "x", "z")
FORMATS = ("auto", "pid", "packed", "raw")
FORMAT_HELP = ("pid: normalised spatial latent [B,C,h,w] (diffusers output_type='latent' for sd3/sdxl/zimage, "
               "InvokeAI); packed: diffusers token sequence [B,L,64|128] (flux, flux2, qwenimage); "
               "raw: un-normalised VAE latent (vae.encode(), FLUX.2-klein's final output); "
               "auto: decide from the container and shape, refusing ambiguous cases")
MAX_LATENT_SIDE = 1024  # 8192 px at ×8: larger is not an image anyone decodes in one pass
MAX_LATENT_ABS = 1e4  # normalised latents are O(1); far larger values overflow the decoder into NaN
MAX_UNPACKED_BYTES = 1 << 32  # what a compressed container (.npz, zipped .pt) may expand to
_MAX_DEFLATE_RATIO = 1100  # deflate cannot expand more than ~1032:1; a member claiming more is lying

# ComfyUI (nodes.py SaveLatent / LoadLatent, checked against 0.3.64): a `.latent` file is safetensors holding
# {"latent_tensor": samples, "latent_format_version_0": torch.tensor([])}, with metadata {"prompt": <the API graph
# as JSON>, "workflow": <the UI graph as JSON>, ...}. LoadLatent scales by 1/0.18215 only when the *tensor*
# `latent_format_version_0` is absent: files from before the marker stored SD1.x-scaled latents.
COMFYUI_TENSOR, COMFYUI_MARKER, COMFYUI_LEGACY_SCALE = "latent_tensor", "latent_format_version_0", 1 / 0.18215


class LatentError(ValueError):
    """A latent file that cannot be read or placed; the message names the file."""


@dataclass
class LatentFile:
    """A tensor read from disk with what its container says about it."""

    path: Path
    tensor: Tensor  # as stored, any layout
    metadata: dict[str, Any] = field(default_factory=dict)  # pid's keys: prompt, degrade_sigma, height/width, ...
    container: str = "safetensors"  # "comfyui", "safetensors", "torch" or "numpy"
    provenance: dict[str, str] = field(default_factory=dict)  # a ComfyUI file's own metadata (prompt/workflow graphs)


def container_of(path: Path) -> str:
    """The reader for `path`: its latent suffix, or, for a file without one (InvokeAI names the tensors it saves
    `Tensor_<id>`), what its first bytes say. LatentError where neither tells."""
    suffix = path.suffix.lower()
    if suffix in LATENT_SUFFIXES:
        return suffix
    sniffed = sniff_container(path)
    if sniffed is None:
        raise LatentError(f"{path}: unsupported latent file type {suffix or '(no suffix)'!r} (expected one of "
                          f"{', '.join(LATENT_SUFFIXES)}, or a file without a suffix holding one of them, as "
                          "InvokeAI saves its latents)")
    return sniffed


def sniff_container(path: Path) -> str | None:
    """'.safetensors', '.pt', '.npy' or '.npz' from a regular file's first bytes; None for anything else."""
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):  # a FIFO or device would block or never end
            return None
        with open(path, "rb") as fh:
            head = fh.read(9)
        if head.startswith(b"\x93NUMPY"):
            return ".npy"
        if head.startswith(b"PK\x03\x04"):
            with zipfile.ZipFile(path) as zf:  # reads only the central directory
                names = zf.namelist()
            if any(n.endswith("data.pkl") for n in names):  # torch.save's zip layout: <archive>/data.pkl
                return ".pt"
            return ".npz" if names and all(n.endswith(".npy") for n in names) else None
        if len(head) == 9 and head[8:9] == b"{" and 8 + struct.unpack("<Q", head[:8])[0] <= st.st_size:
            return ".safetensors"  # an 8-byte little-endian header length, then the JSON header
    except (OSError, zipfile.BadZipFile):
        return None
    return None


MAX_LATENT_BYTES = 256 << 20  # one latent tensor as stored: 64 FLUX latents of a 1024 px image are 67 MB
MAX_ARCHIVE_MEMBERS = 10_000  # arrays an .npz may list (only the one used is read)


@dataclass(frozen=True)
class _Entry:
    """What a container's header says about one tensor, before any of its data is read."""

    shape: tuple[int, ...]
    itemsize: int


def read_latent_file(path: str | Path, key: str | None = None) -> LatentFile:
    """Read one latent tensor (and metadata) from any supported container. Only the tensor used is read, and
    only after its header says it is no larger than MAX_LATENT_BYTES: a sparse or hostile file claiming
    gigabytes is refused before they are read. Pickles are read with `weights_only=True`: tensors and plain
    containers only, never code."""
    path = Path(path)
    if not is_regular(path):  # a FIFO blocks and a device never ends; collect_inputs refused them, but names change
        raise LatentError(f"{path}: no such file" if not os.path.exists(path) else
                          f"{path}: not a regular file (a FIFO, device or folder); pid reads only regular files")
    kind = container_of(path)
    try:
        opener = {".safetensors": _open_safetensors, ".latent": _open_safetensors, ".pt": _open_torch,
                  ".pth": _open_torch, ".npy": _open_npy}.get(kind, _open_npz)
        with opener(path) as (entries, load, meta):
            comfyui = kind == ".latent" or (COMFYUI_MARKER in entries and COMFYUI_TENSOR in entries)
            name = (key or COMFYUI_TENSOR) if comfyui else _choose(path, entries, key)
            if name not in entries:
                what = "a ComfyUI latent file holds its latent as " + repr(COMFYUI_TENSOR) if comfyui else "no tensor"
                raise LatentError(f"{path}: {what}{'' if comfyui else f' named {name!r}'}; this one holds "
                                  f"{', '.join(sorted(entries)) or 'no tensors'} (choose one with --key)")
            entry = entries[name]
            if math.prod(entry.shape) * entry.itemsize > MAX_LATENT_BYTES:
                raise LatentError(f"{path}: tensor {name!r} {list(entry.shape)} holds "
                                  f"{math.prod(entry.shape) * entry.itemsize} bytes, more than the {MAX_LATENT_BYTES} "
                                  "a latent may hold; split the batch into several files")
            tensor = load(name)
    except LatentError:
        raise
    except Exception as e:  # parsers raise anything on hostile bytes (SafetensorError, tokenize.TokenError, …)
        raise LatentError(f"{path}: cannot read latent file ({type(e).__name__}: {_clip(str(e))})") from e
    if comfyui:
        return _comfyui_latent(tensor, entries, path, meta)
    container = {".safetensors": "safetensors", ".pt": "torch", ".pth": "torch"}.get(kind, "numpy")
    return LatentFile(path, tensor, meta, container)


def _comfyui_latent(tensor: Tensor, entries: dict[str, _Entry], path: Path, meta: dict[str, Any]) -> LatentFile:
    """A ComfyUI latent as its LoadLatent would load it; extra tensors beside it (noise_mask, batch_index) are
    not the latent, and its metadata is ComfyUI's record of the graph, not pid's keys (its `prompt` is the
    whole graph, not a caption): it travels into the PNG as provenance."""
    if COMFYUI_MARKER not in entries and tensor.is_floating_point():
        tensor = tensor.float() * COMFYUI_LEGACY_SCALE
    provenance = {k: v for k, v in meta.items() if isinstance(k, str) and isinstance(v, str)}
    return LatentFile(path, tensor, {}, "comfyui", provenance)


def _choose(path: Path, entries: dict[str, _Entry], key: str | None) -> str:
    """The tensor a file's latent is: --key, its only (non-empty) tensor, or a conventional name."""
    if key is not None:
        return key
    names = [k for k, e in entries.items() if math.prod(e.shape) or len(entries) == 1]  # empty markers aren't latents
    if len(names) == 1:
        return names[0]
    for name in _LATENT_KEYS:
        if name in names:
            return name
    if not names:
        raise LatentError(f"{path}: holds no tensors")
    raise LatentError(f"{path}: holds several tensors ({', '.join(sorted(names))}); choose one with --key")


_ST_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4, "I16": 2,
                "I8": 1, "U8": 1, "BOOL": 1, "U16": 2, "U32": 4, "U64": 8}


@contextlib.contextmanager
def _open_safetensors(path: Path) -> Iterator[tuple[dict[str, _Entry], Callable[[str], Tensor], dict[str, Any]]]:
    """safetensors checks its header against the file's size itself; shapes come from it before any data."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:  # safetensors only opens UTF-8 paths: read undecodable names from memory
        from safetensors.torch import load

        if path.stat().st_size > MAX_LATENT_BYTES + (16 << 20):
            raise LatentError(f"{path}: {path.stat().st_size} bytes, more than a latent file may hold") from None
        data = path.read_bytes()
        tensors = load(data)
        yield ({k: _Entry(tuple(t.shape), t.element_size()) for k, t in tensors.items()}, tensors.__getitem__,
               safetensors_metadata(data))
        return
    with safe_open(str(path), framework="pt") as f:
        entries = {k: _Entry(tuple(f.get_slice(k).get_shape()), _ST_ITEMSIZE.get(f.get_slice(k).get_dtype(), 8))
                   for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        yield entries, f.get_tensor, dict(f.metadata() or {})


def safetensors_metadata(data: bytes) -> dict[str, str]:
    """The `__metadata__` of a safetensors file's bytes (already validated by safetensors' own reader)."""
    import json

    (n,) = struct.unpack("<Q", data[:8])
    meta = json.loads(data[8:8 + n]).get("__metadata__") or {}
    return {str(k): str(v) for k, v in meta.items()}


def _clip(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


def _check_zip_budget(path: Path, zf: zipfile.ZipFile) -> None:
    """Refuse an archive whose members would unpack to more than MAX_UNPACKED_BYTES, or claim more than
    deflate can produce: readers allocate the declared size before they find out it was a lie."""
    total = 0
    infos = zf.infolist()
    if len(infos) > MAX_ARCHIVE_MEMBERS:
        raise LatentError(f"{path}: archive lists {len(infos)} members, more than the {MAX_ARCHIVE_MEMBERS} a latent "
                          "file may hold")
    for info in infos:
        if info.compress_type != zipfile.ZIP_STORED and info.file_size > info.compress_size * _MAX_DEFLATE_RATIO + 4096:
            raise LatentError(f"{path}: archive member {info.filename!r} claims {info.file_size} bytes from "
                              f"{info.compress_size} compressed: corrupt or hostile file")
        total += info.file_size
    if total > MAX_UNPACKED_BYTES:
        raise LatentError(f"{path}: archive unpacks to {total} bytes, more than the {MAX_UNPACKED_BYTES} a latent "
                          "file may hold; split it into several files")


@contextlib.contextmanager
def _open_torch(path: Path) -> Iterator[tuple[dict[str, _Entry], Callable[[str], Tensor], dict[str, Any]]]:
    """torch.load memory-maps the archive, so storages are paged in only when the chosen tensor is copied."""
    import pickle

    if not zipfile.is_zipfile(path):  # the pre-1.6 format allocates storages at the sizes the pickle claims
        raise LatentError(f"{path}: not a PyTorch zip archive (truncated, or saved by PyTorch < 1.6 with "
                          "_use_new_zipfile_serialization=False); re-save it with torch.save or as .safetensors")
    with zipfile.ZipFile(path) as zf:
        _check_zip_budget(path, zf)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
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
    yield ({k: _Entry(tuple(t.shape), t.element_size()) for k, t in tensors.items()},
           lambda name: tensors[name].clone(), meta)  # a copy: the mapping closes with the file


@contextlib.contextmanager
def _open_npy(path: Path) -> Iterator[tuple[dict[str, _Entry], Callable[[str], Tensor], dict[str, Any]]]:
    """`.npy` without np.load, which allocates whatever shape a header declares: the header is checked against
    the bytes present and the size cap first. Never unpickles."""
    with open(path, "rb") as fh:
        header = _npy_header(fh, os.fstat(fh.fileno()).st_size, f"{path}")
        yield {"latent": _Entry(header[0], header[2].itemsize)}, lambda _: _npy_data(fh, header, f"{path}"), {}


@contextlib.contextmanager
def _open_npz(path: Path) -> Iterator[tuple[dict[str, _Entry], Callable[[str], Tensor], dict[str, Any]]]:
    """`.npz`: every member's header is read (a few bytes each), the data of only the member used."""
    with zipfile.ZipFile(path) as zf:
        _check_zip_budget(path, zf)
        members = {info.filename[:-4]: info for info in zf.infolist()
                   if not info.is_dir() and info.filename.endswith(".npy")}
        headers = {}
        for name, info in members.items():
            with zf.open(info) as fh:
                headers[name] = _npy_header(fh, info.file_size, f"{path}[{info.filename}]")

        def load(name: str) -> Tensor:
            with zf.open(members[name]) as fh:
                where = f"{path}[{members[name].filename}]"
                return _npy_data(fh, _npy_header(fh, members[name].file_size, where), where)

        yield {k: _Entry(h[0], h[2].itemsize) for k, h in headers.items()}, load, {}


def _npy_header(fh: Any, available: int, where: str) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """(shape, fortran order, dtype, data bytes) of a .npy stream holding `available` bytes, header included."""
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
    return tuple(shape), fortran, dtype, nbytes


def _npy_data(fh: Any, header: tuple[tuple[int, ...], bool, np.dtype, int], where: str) -> Tensor:
    shape, fortran, dtype, nbytes = header
    data = fh.read(nbytes)  # grows with the data actually read, never by what a header claims
    if len(data) != nbytes:
        raise LatentError(f"{where}: truncated: expected {nbytes} bytes of array data, found {len(data)}")
    array = np.frombuffer(data, dtype=dtype).reshape(shape, order="F" if fortran else "C")
    return torch.from_numpy(np.array(array, dtype=dtype.newbyteorder("="), order="C"))  # writable, native order


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


@dataclass(frozen=True)
class SizeHint:
    """What says how a packed token sequence lies on the image: a latent grid (`--latent-size`, or metadata
    `latent_height`/`latent_width`) or the image's pixel size (metadata `height`/`width`)."""

    height: int
    width: int
    unit: str  # "grid": the VAE's latent grid (image px / 8) or the token grid (image px / 16); "pixels"
    source: str  # for messages: "--latent-size", "metadata latent_height/latent_width", "metadata height/width"


def size_hint(meta: dict[str, Any], latent_size: tuple[int, int] | None = None) -> SizeHint | None:
    """`--latent-size` first, then the file's metadata."""
    if latent_size is not None:
        return SizeHint(latent_size[0], latent_size[1], "grid", "--latent-size")

    def num(name: str) -> int | None:
        value = meta.get(name)
        try:
            number = int(float(value)) if value is not None else None
        except (TypeError, ValueError, OverflowError):  # not a number, NaN, ±inf, or a float beyond range
            return None
        return number if number is not None and number > 0 else None

    if (h := num("latent_height")) and (w := num("latent_width")):
        return SizeHint(h, w, "grid", "metadata latent_height/latent_width")
    if (h := num("height")) and (w := num("width")):
        return SizeHint(h, w, "pixels", "metadata height/width")
    return None


TOKEN_PX = 16  # pixels per packed token side for every packed backbone (Flux/Qwen: 2x2 cells at /8; FLUX.2: /16)


def token_grid(name: str, n_tokens: int, hint: SizeHint | None) -> tuple[tuple[int, int], str | None]:
    """The (rows, columns) of `n_tokens` packed tokens, and how a grid hint was read.

    A grid hint may be the VAE's latent grid (image px / 8, diffusers' `height // vae_scale_factor`) or the
    token grid (image px / 16, FLUX.2's own latent grid): the token count tells them apart, since one holds
    four times the cells of the other."""
    if hint is None:
        raise LatentError(f"{name}: a packed sequence of {n_tokens} tokens does not say its image size; give "
                          "--latent-size HxW (the VAE's latent grid, image px / 8, e.g. 128x128 for a 1024x1024 "
                          "image, or the token grid, image px / 16) or store latent_height/latent_width (or the "
                          "image's pixel height/width) in the file's metadata" + _grid_suggestion(n_tokens, None))
    h, w = hint.height, hint.width
    if hint.unit == "pixels":
        grid = (h // TOKEN_PX, w // TOKEN_PX)
        if grid[0] * grid[1] == n_tokens:
            return grid, None
        raise LatentError(f"{name}: {hint.source} {h}x{w} px makes {grid[0] * grid[1]} packed tokens "
                          f"({grid[0]}x{grid[1]} of {TOKEN_PX} px), not the {n_tokens} the file holds"
                          + _grid_suggestion(n_tokens, h / w))
    if h * w == n_tokens:
        return (h, w), f"{hint.source} {h}x{w} read as the token grid (a {h * TOKEN_PX}x{w * TOKEN_PX} px image)"
    if h % 2 == 0 and w % 2 == 0 and (h // 2) * (w // 2) == n_tokens:
        return (h // 2, w // 2), (f"{hint.source} {h}x{w} read as the VAE's latent grid (a "
                                  f"{h * TOKEN_PX // 2}x{w * TOKEN_PX // 2} px image)")
    raise LatentError(f"{name}: {hint.source} {h}x{w} does not fit the {n_tokens} packed tokens the file holds: as "
                      f"the token grid it holds {h * w}, as the VAE's latent grid {(h // 2) * (w // 2)}"
                      + _grid_suggestion(n_tokens, h / w))


def _grid_suggestion(n_tokens: int, aspect: float | None) -> str:
    """'; for N tokens give --latent-size ...', the token grid of closest aspect ratio (square without one)."""
    pairs = [(a, n_tokens // a) for a in range(1, math.isqrt(n_tokens) + 1) if n_tokens % a == 0]
    pairs += [(b, a) for a, b in pairs]
    target = math.log(aspect) if aspect else 0.0
    a, b = min(pairs, key=lambda p: abs(math.log(p[0] / p[1]) - target))
    return (f"; for {n_tokens} tokens give --latent-size {2 * a}x{2 * b} (the VAE's latent grid of a "
            f"{a * TOKEN_PX}x{b * TOKEN_PX} px image) or {a}x{b} (its token grid)")


@dataclass
class Reading:
    """A stored tensor read as a PiD latent, with what a user should hear about how it was read."""

    latent: Tensor  # [B, C, h, w] float32, normalised (unless `deferred_batchnorm`)
    layout: str  # the --latent-format it was read as: pid, packed or raw
    note: str | None = None  # how --latent-size was read
    other: tuple[str, Tensor] | None = None  # the other plausible reading: (its --latent-format, its latent)
    deferred_batchnorm: bool = False  # a raw FLUX.2 latent, patchified but not normalised: the VAE's statistics


def to_pid_latent(file: LatentFile, spec: Latent, backbone: str, fmt: str = "auto",
                  size: tuple[int, int] | None = None,
                  bn_stats: Callable[[], tuple[Tensor, Tensor]] | None = None) -> Tensor:
    """Convert a stored tensor to the normalised PiD latent [B, C, h, w] float32 (see `read_as_pid`)."""
    return read_as_pid(file, spec, backbone, fmt, size, bn_stats).latent


def read_as_pid(file: LatentFile, spec: Latent, backbone: str, fmt: str = "auto",
                size: tuple[int, int] | None = None,
                bn_stats: Callable[[], tuple[Tensor, Tensor]] | None = None, *,
                defer_batchnorm: bool = False) -> Reading:
    """Read a stored tensor as the normalised PiD latent [B, C, h, w] float32.

    `fmt` is one of FORMATS. `size` (`--latent-size`, a latent grid) places a packed sequence when metadata
    does not. `bn_stats` lazily supplies FLUX.2's batch-norm statistics for raw FLUX.2 latents; with
    `defer_batchnorm` such a latent is only patchified (the prepass learns its shape without fetching the VAE).
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
    hint = size_hint(file.metadata, size)
    if fmt == "auto":
        fmt = _comfyui_layout(name, z, spec, backbone) if file.container == "comfyui" else \
            _guess_layout(name, z, spec, backbone, hint)
    if z.dim() == 5:  # [B, C, T, h, w] (Qwen-Image / Wan): one frame only
        if z.shape[2] != 1:
            raise LatentError(f"{name}: 5-D latent {list(z.shape)} has {z.shape[2]} frames; PiD decodes images "
                              "(expected [B, C, 1, h, w])")
        z = z[:, :, 0]
    if z.dim() == 3 and fmt != "packed":
        z = z[None]  # [C, h, w] → [1, C, h, w]
    note = None
    if fmt == "packed":
        z, note = _unpack(name, z, spec, hint)
    elif z.dim() != 4:
        raise LatentError(f"{name}: cannot use a {z.dim()}-D tensor {list(z.shape)} as a latent "
                          "(expected [C,h,w], [B,C,h,w], [B,C,1,h,w] or a packed [B,L,D] sequence)")
    stored = z
    deferred = defer_batchnorm and fmt == "raw" and spec.normalisation.get("kind") == "batchnorm"
    if fmt == "raw":
        z = _normalise(name, z, spec, backbone, bn_stats, defer_batchnorm=deferred)
    _check_spatial(name, z, spec, backbone)
    peak = float(z.abs().max())
    if not peak <= MAX_LATENT_ABS:  # NaN too: a raw normalisation can still overflow
        raise LatentError(f"{name}: latent values reach {peak:.3g}; a normalised latent is O(1) and values beyond "
                          f"{MAX_LATENT_ABS:g} only decode to NaN. Is --latent-format right?")
    return Reading(z, fmt, note, _other_reading(name, stored, fmt, spec, backbone), deferred)


def _other_reading(name: str, stored: Tensor, fmt: str, spec: Latent, backbone: str) -> tuple[str, Tensor] | None:
    """The same spatial tensor under the other of pid/raw, where that reading exists without VAE files
    (affine and per-channel normalisations, the channel count right either way)."""
    if spec.normalisation.get("kind") not in ("affine", "per_channel") or stored.shape[1] != spec.channels:
        return None
    if fmt == "pid":
        return "raw", _normalise(name, stored, spec, backbone, None)
    if fmt == "raw":
        return "pid", stored
    return None  # packed: diffusers always packs normalised latents


_READ_AS = {"raw": "the VAE's own, un-normalised output", "pid": "latents already normalised for the decoder"}
UNIT_MARGIN = math.log(1.4)  # the other reading must sit this much closer to unit scale to be suggested
FAR_FROM_UNIT = math.log(4)  # beyond this factor from unit scale, warn even without another reading


def scale_warning(reading: Reading, name: str, frame_scale: float = 1.0) -> str | None:
    """A warning when the latent's scale says it was probably read the wrong way.

    Normalised latents (and noisy ones: the noise is unit-scale in that space) have an RMS near 1; a raw VAE
    latent read as normalised is off by the normalisation's scale (×2.8 for Flux, ×7.7 for SDXL). `frame_scale`
    maps the latent into the frame the decoder sees (SDXL's Euler σ)."""
    if reading.deferred_batchnorm:
        return None
    here = _rms(reading.latent) * frame_scale
    off = abs(math.log(max(here, 1e-12)))
    if reading.other is not None:
        flag, other = reading.other
        there = _rms(other) * frame_scale
        if abs(math.log(max(there, 1e-12))) + UNIT_MARGIN < off:
            return (f"{name}: read as --latent-format {reading.layout}, the latent's RMS is {here:.3g}, far from the "
                    f"unit scale the decoder was trained on; read as --latent-format {flag} it would be {there:.3g}. "
                    f"If the file holds {_READ_AS[flag]}, pass --latent-format {flag}")
    if off > FAR_FROM_UNIT:
        return (f"{name}: the latent's RMS is {here:.3g}, far from the unit scale of the normalised space the "
                "decoder was trained on; check --latent-format and --backbone")
    return None


def _rms(t: Tensor) -> float:
    return float(t.float().pow(2).mean().sqrt())


def _comfyui_layout(name: str, z: Tensor, spec: Latent, backbone: str) -> str:
    """How a ComfyUI LATENT of this backbone is stored: the registry's `comfyui` field (raw VAE output, or
    already normalised for FLUX.2, whose ComfyUI VAE folds the batch-norm and the 2x2 patchify in)."""
    if spec.comfyui is None:
        raise LatentError(f"{name}: ComfyUI has no latent format for the {backbone} decoder, so this .latent file "
                          "does not say what it holds; pass --latent-format pid or raw")
    channels = z.shape[0] if z.dim() == 3 else z.shape[1]
    if spec.comfyui == "pid" and spec.patchify == 2 and channels * 4 == spec.channels:
        raise LatentError(f"{name}: ComfyUI's {backbone} LATENT has {spec.channels} channels and is already "
                          f"normalised; a {channels}-channel .latent is not what its VAE writes. Pass "
                          "--latent-format raw if it holds the VAE's raw output")
    return spec.comfyui


def _guess_layout(name: str, z: Tensor, spec: Latent, backbone: str, hint: SizeHint | None) -> str:
    """'pid', 'packed' or 'raw' from the shape; raise where two readings are possible.

    A 3-D tensor reads as packed tokens [B, L, D] only when its width is the backbone's token
    width and a known size accounts for L tokens (without a size it could not be unpacked
    anyway), so a plain [C, h, w] latent is never mistaken for one.
    """
    token_width = spec.channels * (4 if spec.patchify == 1 else 1)
    if z.dim() == 3:
        spatial = z.shape[0] == spec.channels
        width_ok = z.shape[-1] == token_width and spec.fixed_grid is None
        packed = width_ok and (_explains(z.shape[1], hint) if spatial else True)
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
            return "raw"  # FLUX.2-klein's pipeline output: raw and un-patchified
    raise LatentError(f"{name}: tensor {list(z.shape)} does not fit the {backbone} decoder, which takes "
                      f"{spec.channels}-channel latents [B,{spec.channels},h,w]"
                      + (f" or packed [B,L,{token_width}] sequences" if spec.fixed_grid is None else "")
                      + _suggest_backbone(z))


def _explains(n_tokens: int, hint: SizeHint | None) -> bool:
    try:
        token_grid("", n_tokens, hint)
    except LatentError:
        return False
    return True


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


def _unpack(name: str, z: Tensor, spec: Latent, hint: SizeHint | None) -> tuple[Tensor, str | None]:
    """Packed tokens [B, L, D] → spatial [B, C, h, w] (diffusers' raster order), and how a size hint was read."""
    if z.dim() != 3:
        raise LatentError(f"{name}: a packed latent must be [B, L, D], got {list(z.shape)}")
    b, n_tokens, width = z.shape
    cell = 2 if spec.patchify == 1 else 1  # flux/qwen pack 2×2 latent cells per token; flux2 is already packed
    if width != spec.channels * cell * cell:
        raise LatentError(f"{name}: packed tokens are {width} wide; this backbone packs "
                          f"{spec.channels * cell * cell} per token")
    (rows, cols), note = token_grid(name, n_tokens, hint)
    tokens = z.view(b, rows, cols, spec.channels, cell, cell)  # channel index c·4 + dy·2 + dx
    return tokens.permute(0, 3, 1, 4, 2, 5).reshape(b, spec.channels, rows * cell, cols * cell), note


def patchify_2x2(z: Tensor) -> Tensor:
    """[B, C, 2h, 2w] → [B, 4C, h, w] with channel c·4 + i·2 + j for in-cell offset (i, j)."""
    b, c, h, w = z.shape
    if h % 2 or w % 2:
        raise ValueError(f"cannot 2x2-patchify a {h}x{w} latent (odd size)")
    return z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h // 2, w // 2)


def _normalise(name: str, z: Tensor, spec: Latent, backbone: str,
               bn_stats: Callable[[], tuple[Tensor, Tensor]] | None, *, defer_batchnorm: bool = False) -> Tensor:
    """Raw VAE latent → the normalised space the decoder was trained on (the registry's `normalisation`); with
    `defer_batchnorm`, a batch-norm latent is only patchified."""
    norm = spec.normalisation
    kind = norm.get("kind")
    if spec.patchify == 2 and z.shape[1] * 4 == spec.channels:
        if z.shape[2] % 2 or z.shape[3] % 2:
            raise LatentError(f"{name}: a raw {backbone} latent is 2x2-patchified, so its grid must be even; "
                              f"got {z.shape[2]}x{z.shape[3]}")
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
        if defer_batchnorm:
            return z
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


def noise_clean_latent(clean: Tensor, sigma: float, generator: torch.Generator, frame: str) -> Tensor:
    """An encoded image's clean latent `clean` [B, C, h, w] forward-noised to `sigma` the way the student saw
    latents in training, so PiD decodes it as an x_t of that σ (upstream's image path, its `--degrade_sigmas`).

    The form is the one of the frame the student was trained in: variance-preserving sqrt(1-σ²)·x0 + σ·ε for SDXL
    (the backbone whose stored latents come in the Euler VE frame), (1-σ)·x0 + σ·ε for every flow-matching one.
    ε is float32, drawn from `generator` on its device in one call of `clean`'s shape; σ <= 0 draws nothing and
    returns `clean` unchanged."""
    if sigma <= 0:
        return clean
    eps = torch.randn(clean.shape, generator=generator, device=generator.device, dtype=torch.float32)
    clean = clean.to(eps.device, torch.float32)
    if frame == "euler-ve":
        return float(max(0.0, 1.0 - sigma * sigma) ** 0.5) * clean + sigma * eps  # ** 0.5: upstream's rounding
    if frame == "flow":
        return (1.0 - sigma) * clean + sigma * eps
    raise ValueError(f"unknown sigma frame {frame!r}")


def to_training_frame(latent: Tensor, sigma: float, frame: str) -> tuple[Tensor, float]:
    """Map an intermediate latent and its σ into the frame the student was trained on.

    Flow-matching backbones pass through. SDXL's Euler scheduler works in the variance-
    exploding frame x = x0 + σ·ε; the SDXL student was trained in the variance-preserving
    one, so x_vp = x / sqrt(σ² + 1) and σ_vp = σ / sqrt(σ² + 1) (docs/model.md#sdxl-sigma-frame).
    """
    trained = training_sigma(sigma, frame)
    if frame == "euler-ve" and sigma > 0:
        return latent / math.sqrt(sigma * sigma + 1), trained
    return latent, trained
