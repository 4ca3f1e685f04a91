"""`pid convert`: a released `model_ema_bf16.pth` pickle → safetensors, after strict validation.

The safetensors copy loads with mmap and without unpickling. Keys are written WITHOUT the `net.` prefix (exactly
the network's `state_dict()` names; `read_state_dict` accepts both), dtypes are kept (bf16 stays bf16), and the
metadata records the registry entry and the source file's SHA-256 so the loader can tell a current copy from a
stale one. Validation builds the entry's network on the meta device (no memory) and requires the file to have
exactly its keys and shapes, through the same check the loader uses.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from pid_cli.registry import Entry


class ConvertError(ValueError):
    """The file is not a checkpoint for this registry entry, or cannot be read/written."""


@dataclass(frozen=True)
class ConvertReport:
    entry_id: str
    num_tensors: int
    tensor_bytes: int
    dropped: tuple[str, ...]  # training-only tensors present in the file but not part of the decoder
    output: Path


def convert_checkpoint(src: str | os.PathLike[str], dst: str | os.PathLike[str], entry: Entry, *,
                       source_sha256: str | None = None, overwrite: bool = False) -> ConvertReport:
    """Validate `src` against `entry` and write `dst` atomically (temp file + rename in the same folder).

    An existing `dst` is replaced only with `overwrite`, and never when it is `src` itself (the same path, a
    link to it, the same file): checked before the source is read, so a slip of `-o` costs nothing."""
    from safetensors.torch import save_file

    from pid_cli.model import PiDConfig, PiDNet, WeightsError, read_state_dict
    from pid_cli.model.weights import check_state

    src, dst = Path(src), Path(dst)
    _check_output(src, dst, overwrite)
    try:
        state = read_state_dict(src)
        with torch.device("meta"):
            net = PiDNet(PiDConfig.from_dict(entry.net_config))
        check_state(net, state, f"{src} (registry entry {entry.id})")
    except WeightsError as exc:
        raise ConvertError(str(exc)) from exc
    expected = net.state_dict().keys()
    tensors = {k: v.contiguous() for k, v in state.items() if k in expected}
    if source_sha256 is None:
        from pid_cli.hub import sha256_of

        source_sha256 = sha256_of(src)
    metadata = {
        "format": "pt",
        "pid.entry": entry.id,
        "pid.source": src.name,
        "pid.source_size": str(src.stat().st_size),
        "pid.source_sha256": source_sha256,
        "pid.net_config": json.dumps(entry.net_config, sort_keys=True),
    }
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        _check_output(src, dst, overwrite)  # again: validating a big file takes a while
        _move_into_place(tmp, dst, overwrite)
    except ConvertError:
        raise
    except Exception as exc:
        raise ConvertError(f"cannot write {dst}: {exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    return ConvertReport(entry.id, len(tensors), nbytes, tuple(sorted(set(state) - set(tensors))), dst)


def _check_output(src: Path, dst: Path, overwrite: bool) -> None:
    """Refuse to replace the source (same resolved path or same file: the pickle would be lost) and, unless asked
    to, any existing file: `-o` is easy to point at something precious."""
    if dst.resolve() == src.resolve() or (dst.exists() and src.exists() and os.path.samefile(src, dst)):
        raise ConvertError(f"{dst}: refusing to write over the source checkpoint {src}; choose another -o/--output")
    if dst.is_dir():
        raise ConvertError(f"{dst}: is a folder; -o/--output takes the safetensors file to write")
    if (dst.exists() or dst.is_symlink()) and not overwrite:
        raise ConvertError(f"{dst}: already exists; pass --overwrite to replace it")


def _move_into_place(tmp: Path, dst: Path, overwrite: bool) -> None:
    """Rename `tmp` to `dst`; without `overwrite` by a hard link, which fails (not replaces) when another process
    created `dst` meanwhile. Filesystems without hard links fall back to the check made just before."""
    if overwrite:
        os.replace(tmp, dst)
        return
    try:
        os.link(tmp, dst)
    except FileExistsError:
        raise ConvertError(f"{dst}: already exists; pass --overwrite to replace it") from None
    except OSError:
        os.replace(tmp, dst)


def guess_entry(src: Path, entries: list[Entry]) -> Entry | None:
    """The entry whose Hub path or experiment folder matches the file's location, if any."""
    where = Path(os.path.abspath(src))  # not resolve(): a Hugging Face cache path is a symlink into blobs/
    for entry in reversed(entries):
        if entry.weights.is_local and Path(entry.weights.path).resolve() == src.resolve():
            return entry
        if not entry.weights.is_local and where.as_posix().endswith("/" + entry.weights.path):
            return entry
    for entry in reversed(entries):
        if entry.experiment and entry.experiment in where.parts:
            return entry
    return None
