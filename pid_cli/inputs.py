"""Which files a run decodes, where each output goes, and which share of them this process owns.

Inputs are files, folders, globs, `-` (paths on stdin) or JSONL manifests. The list is sorted
and de-duplicated, then partitioned deterministically (`--shard K/N`, torchrun, Slurm), so a
retried shard redoes exactly its own files and skip-existing makes reruns idempotent.
"""

from __future__ import annotations

import glob
import os
import re
import string
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from pid_cli.latents import LATENT_SUFFIXES, sniff_container
from pid_cli.manifest import read_rows
from pid_cli.manifest import short as _short

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff")
TEMPLATE_FIELDS = ("stem", "index", "dir", "name")
DEFAULT_TEMPLATE = "{dir}/{stem}.png"  # a batch file adds _{index} to the stem


class InputError(ValueError):
    """A usage problem with the inputs as a whole (exit code 2)."""


@dataclass(frozen=True)
class InputSpec:
    """One input file and what a manifest line said about it."""

    path: Path
    rel_dir: str = ""  # folder relative to the folder argument it was found under
    prompt: str | None = None
    degrade_sigma: float | None = None
    output: str | None = None  # manifest-chosen output name, relative to --out
    source: str = ""  # where it was named (for messages)

    @property
    def is_image(self) -> bool:
        return self.path.suffix.lower() in IMAGE_SUFFIXES


def collect_inputs(args: Iterable[str], *, recursive: bool = False, stdin: TextIO | None = None,
                   allow_images: bool = True) -> list[InputSpec]:
    """Expand the command-line inputs into a sorted, de-duplicated list."""
    suffixes = LATENT_SUFFIXES + (IMAGE_SUFFIXES if allow_images else ())
    found: dict[Path, InputSpec] = {}

    def add(spec: InputSpec) -> None:
        key = spec.path.resolve()
        if key in found and found[key].source.endswith(".jsonl"):
            return  # a manifest line's settings win over a plain mention of the same file
        found[key] = spec

    for arg in args:
        if arg == "-":
            for line in (stdin or sys.stdin):
                if line.strip():
                    add(_file_spec(Path(line.strip()), "stdin", suffixes))
        elif arg.endswith(".jsonl"):
            for spec in read_manifest(Path(arg)):
                add(spec)
        elif os.path.isdir(arg):
            root = Path(arg)
            pattern = "**/*" if recursive else "*"
            for p in sorted(root.glob(pattern)):
                if p.is_file() and _wanted(p, suffixes):
                    rel = p.parent.relative_to(root)
                    add(InputSpec(p, rel_dir="" if rel == Path() else str(rel), source=arg))
        elif any(c in arg for c in "*?["):
            matches = sorted(glob.glob(arg, recursive=True))
            if not matches:
                raise InputError(f"{arg}: the pattern matches no files")
            for m in matches:
                if os.path.isfile(m) and _wanted(Path(m), suffixes):
                    add(InputSpec(Path(m), source=arg))
        else:
            add(_file_spec(Path(arg), "command line", suffixes))
    return sorted(found.values(), key=lambda s: (str(s.path.parent), s.path.name))


def _wanted(path: Path, suffixes: tuple[str, ...]) -> bool:
    """A file a folder or glob contributes: a known suffix, or none at all and a latent container inside
    (InvokeAI saves its latents as `Tensor_<id>`, torch files without a suffix)."""
    suffix = path.suffix.lower()
    return suffix in suffixes or (not suffix and sniff_container(path) is not None)


def _file_spec(path: Path, source: str, suffixes: tuple[str, ...]) -> InputSpec:
    if not path.exists():
        raise InputError(f"{path}: no such file or folder ({source})")
    if path.suffix.lower() not in suffixes and (not path.is_file() or sniff_container(path) is None):
        raise InputError(f"{path}: not a latent or image file (expected one of {', '.join(suffixes)}, or a file "
                         "without one holding a safetensors, PyTorch or NumPy latent)")
    return InputSpec(path, source=source)


def read_manifest(path: Path) -> list[InputSpec]:
    """JSONL lines `{"input": ..., "prompt": ..., "degrade_sigma": ..., "output": ...}`;
    relative inputs are relative to the manifest's folder."""
    specs = []
    for n, row in read_rows(path, InputError):
        where = f"{path} line {n}"
        unknown = set(row) - {"input", "prompt", "degrade_sigma", "output"}
        if unknown:
            raise InputError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
        sigma = row.get("degrade_sigma")
        if sigma is not None:
            try:  # NaN, Infinity, 1e999 and huge integers parse too
                sigma = None if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) else float(sigma)
            except OverflowError:
                sigma = None
            if sigma is None or not 0 <= sigma < float("inf"):
                raise InputError(f'{where}: "degrade_sigma" must be a number (finite, >= 0), '
                                 f'got {_short(row["degrade_sigma"])}')
        for field in ("prompt", "output"):
            if row.get(field) is not None and not isinstance(row[field], str):
                raise InputError(f'{where}: "{field}" must be a string')
        output = row.get("output")  # checked per input, with the others, by safe_output_path
        file = Path(row["input"])
        file = file if file.is_absolute() else path.parent / file
        try:
            found = file.is_file()
        except OSError as e:  # e.g. a name too long for the file system
            raise InputError(f"{where}: input {_short(str(file))} cannot be read ({e.strerror or e})") from e
        if not found:
            raise InputError(f"{where}: input {_short(str(file))} does not exist")
        specs.append(InputSpec(file, prompt=row.get("prompt"), degrade_sigma=sigma, output=output,
                               source=str(path)))
    return specs


# ---------------------------------------------------------------------------------------
# Sharding


def parse_shard(text: str) -> tuple[int, int]:
    """'K/N' (0-based K) → (K, N)."""
    try:
        k, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise InputError(f"--shard expects K/N with 0 <= K < N, got {text!r}") from None
    if not 0 <= k < n:
        raise InputError(f"--shard expects K/N with 0 <= K < N, got {text!r}")
    return k, n


def shard_from_env(env: Mapping[str, str] | None = None) -> tuple[int, int] | None:
    """This process's share from torchrun (RANK/WORLD_SIZE) or Slurm (array tasks, or tasks of a step)."""
    env = os.environ if env is None else env
    if "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
        first = int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
        return int(env["SLURM_ARRAY_TASK_ID"]) - first, int(env["SLURM_ARRAY_TASK_COUNT"])
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"])
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
    return None


def take_shard(items: list[InputSpec], k: int, n: int) -> list[InputSpec]:
    """Every n-th input starting at k: a partition of the sorted list, balanced to ±1."""
    return items[k::n]


# ---------------------------------------------------------------------------------------
# Output names


def _fields(template: str) -> set[str]:
    return {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}


def check_template(template: str) -> None:
    try:
        unknown = _fields(template) - set(TEMPLATE_FIELDS)
    except ValueError as e:
        raise InputError(f"--name template {template!r} is malformed ({e})") from None
    if unknown:
        raise InputError(f"--name template {template!r} uses unknown field(s) {', '.join(sorted(unknown))}; "
                         f"available: {', '.join('{' + f + '}' for f in TEMPLATE_FIELDS)}")
    if not template.lower().endswith(".png"):
        raise InputError(f"--name template {template!r} must end in .png")
    for _, name, spec, _ in string.Formatter().parse(template):
        widths = [int(d) for d in re.findall(r"\d+", spec or "")]
        if name is not None and ("{" in (spec or "") or max(widths, default=0) > 64):
            raise InputError(f"--name template {template!r}: format spec {spec!r} of {{{name}}} is not supported "
                             "(no nested fields, widths up to 64)")
    try:
        template.format(stem="x", index=0, dir=".", name="x.pt")
    except (ValueError, TypeError) as e:
        raise InputError(f"--name template {template!r} is malformed ({e})") from None


def output_names(spec: InputSpec, count: int, template: str) -> list[str]:
    """Relative output paths for the `count` images an input yields."""
    if spec.output is not None:
        if count == 1:
            return [spec.output]
        stem, ext = os.path.splitext(spec.output)
        return [f"{stem}_{i}{ext}" for i in range(count)]
    names = []
    indexed = "index" in _fields(template)
    for i in range(count):
        stem = spec.path.stem if count == 1 or indexed else f"{spec.path.stem}_{i}"
        names.append(template.format(stem=stem, index=i, dir=spec.rel_dir or ".", name=spec.path.name))
    return [os.path.normpath(n) for n in names]


def safe_output_path(out_dir: Path, name: str, where: str) -> Path:
    """`out_dir/name`, refusing names that would land outside `out_dir` (.., absolute, symlinks) and
    names that are not a .png file."""
    if os.path.isabs(name):
        raise InputError(f"{where}: output name {_short(name)!r} is absolute; names are relative to --out")
    if "\0" in name:
        raise InputError(f"{where}: output name {_short(name)!r} contains a NUL character")
    if not name.lower().endswith(".png") or os.path.basename(name).lower() == ".png":
        raise InputError(f"{where}: output name {_short(name)!r} is not a .png file name")
    root = out_dir.resolve()
    target = (out_dir / name).resolve()
    if root not in target.parents:  # outside, or the folder itself
        raise InputError(f"{where}: output name {_short(name)!r} leaves the output folder {out_dir}")
    return out_dir / name
