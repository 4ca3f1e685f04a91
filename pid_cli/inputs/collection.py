"""Which files a run decodes, where each output goes, and which share of them this process owns.

Inputs are files, folders, globs, `-` (paths on stdin) or JSONL manifests. The list is sorted
and de-duplicated, then partitioned deterministically (`--shard K/N`, torchrun, Slurm), so a
retried shard redoes exactly its own files and skip-existing makes reruns idempotent.
"""

from __future__ import annotations

import contextlib
import glob
import math
import os
import re
import string
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from pid_cli.files import is_regular
from pid_cli.inputs.latent_files import LATENT_SUFFIXES, sniff_container
from pid_cli.inputs.manifest import read_rows
from pid_cli.inputs.manifest import short as _short

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff")
TEMPLATE_FIELDS = ("stem", "index", "dir", "name", "sigma")
DEFAULT_TEMPLATE = "{dir}/{stem}.png"  # a batch file adds _{index} to the stem


class InputError(ValueError):
    """A usage problem with the inputs as a whole (exit code 2)."""


@dataclass(frozen=True)
class InputSpec:
    """One input file and what a manifest line said about it."""

    path: Path
    rel_dir: str = ""  # folder relative to the folder argument it was found under
    prompt: str | None = None
    degrade_sigma: tuple[float, ...] | None = None  # one σ, or an image's sweep (a manifest's number or list)
    output: str | None = None  # manifest-chosen output name, relative to --out
    source: str = ""  # where it was named (for messages)

    @property
    def is_image(self) -> bool:
        return self.path.suffix.lower() in IMAGE_SUFFIXES


MAX_GLOB_VISITS = 1_000_000  # entries a recursive pattern may look at: a folder tree bigger than this is a mistake


def collect_inputs(args: Iterable[str], *, recursive: bool = False, stdin: TextIO | None = None,
                   allow_images: bool = True, note: Callable[[str], None] | None = None) -> list[InputSpec]:
    """Expand the command-line inputs into a sorted list of jobs, one per listed file and settings.

    The same file listed twice with the same settings (or once plainly and once in a manifest) is one job, and
    `note` hears of it; listed with other prompts, sigmas or outputs it is one job each. A symlink alias of a file
    is a job of its own (it names its own output). Only regular files are taken: a FIFO or device would block or
    never end, so naming one is an error, and folders and patterns pass over them. Symlinked folders are not
    descended into, so a link loop cannot make a scan endless."""
    suffixes = LATENT_SUFFIXES + (IMAGE_SUFFIXES if allow_images else ())
    found: dict[str, list[InputSpec]] = {}
    merged = 0

    def add(spec: InputSpec) -> None:
        nonlocal merged
        jobs = found.setdefault(os.path.abspath(spec.path), [])
        for i, other in enumerate(jobs):
            if _settings(other) == _settings(spec) or not any(_settings(spec)):
                merged += 1  # the same job again, or a plain mention of a file a manifest already sets up
                return
            if not any(_settings(other)):  # a manifest line's settings win over a plain mention
                jobs[i] = spec
                merged += 1
                return
        jobs.append(spec)

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
            for p in _walk(root, recursive):
                if _wanted(p, suffixes):
                    rel = p.parent.relative_to(root)
                    add(InputSpec(p, rel_dir="" if rel == Path() else str(rel), source=arg))
        elif any(c in arg for c in "*?["):
            matches = _glob(arg)
            if not matches:
                raise InputError(f"{arg}: the pattern matches no files")
            for m in matches:
                if _wanted(Path(m), suffixes):
                    add(InputSpec(Path(m), source=arg))
        else:
            add(_file_spec(Path(arg), "command line", suffixes))
    if merged and note is not None:
        note(f"{merged} input(s) were listed more than once with the same settings; each is decoded once")
    return sorted((s for jobs in found.values() for s in jobs), key=lambda s: (str(s.path.parent), s.path.name))


def _settings(spec: InputSpec) -> tuple:
    return spec.prompt, spec.degrade_sigma, spec.output


def _walk(root: Path, recursive: bool) -> list[Path]:
    """The files of a folder (and with `recursive` of its sub-folders, symlinked ones not followed), sorted."""
    if not recursive:
        return sorted(p for p in root.iterdir())
    files = []
    for folder, dirs, names in os.walk(root, followlinks=False):
        dirs.sort()
        files += [Path(folder) / n for n in sorted(names)]
    return files


def _glob(pattern: str) -> list[str]:
    """Matches of a shell pattern. `**` spans folders but follows no symlinked folder (Python's glob follows
    them, so a link loop never returns), and the walk stops at MAX_GLOB_VISITS entries."""
    if "**" not in pattern:
        return sorted(glob.glob(pattern))
    parts = Path(pattern).parts
    fixed = next(i for i, part in enumerate(parts) if any(c in part for c in "*?["))
    root = Path(*parts[:fixed]) if fixed else Path(".")
    regex = re.compile(_glob_regex(parts[fixed:]))
    matches, visits = [], 0
    for folder, dirs, names in os.walk(root, followlinks=False):
        visits += len(dirs) + len(names)
        if visits > MAX_GLOB_VISITS:
            raise InputError(f"{pattern}: the pattern looks at more than {MAX_GLOB_VISITS} files and folders; "
                             "narrow it or list the inputs in a manifest")
        dirs.sort()
        for name in names:
            path = Path(folder) / name
            if regex.fullmatch(path.relative_to(root).as_posix()):
                matches.append(str(path))
    return sorted(matches)


def _glob_regex(parts: tuple[str, ...]) -> str:
    """A regular expression for relative paths matching pattern components, as the shell reads them: `*` and `?`
    stay inside one component, `[...]` is a character class, `**` is any number of folders."""
    out = []
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if part == "**":
            out.append(".*" if last else "(?:[^/]+/)*")
            continue
        j, piece = 0, ""
        while j < len(part):
            c = part[j]
            if c == "*":
                piece += "[^/]*"
            elif c == "?":
                piece += "[^/]"
            elif c == "[" and (end := part.find("]", j + 2)) != -1:
                body = part[j + 1:end]
                piece += "[" + ("^" + re.escape(body[1:]) if body[0] in "!^" else re.escape(body)) + "]"
                j = end
            else:
                piece += re.escape(c)
            j += 1
        out.append(piece + ("" if last else "/"))
    return "".join(out)


def _wanted(path: Path, suffixes: tuple[str, ...]) -> bool:
    """A file a folder or glob contributes: a regular file with a known suffix, or with none at all and a latent
    container inside (InvokeAI saves its latents as `Tensor_<id>`, torch files without a suffix)."""
    suffix = path.suffix.lower()
    return is_regular(path) and (suffix in suffixes or (not suffix and sniff_container(path) is not None))


def _file_spec(path: Path, source: str, suffixes: tuple[str, ...]) -> InputSpec:
    if not os.path.exists(path):
        hint = ""
        with contextlib.suppress(ValueError):
            float(str(path))
            hint = "; to sweep σ, give --degrade-sigma one comma-separated list (--degrade-sigma 0,0.4)"
        raise InputError(f"{path}: no such file or folder ({source}){hint}")
    if not is_regular(path):
        raise InputError(f"{path}: not a regular file (a FIFO, device or socket, or a link to one; {source}); pid "
                         "reads only regular files")
    if path.suffix.lower() not in suffixes and sniff_container(path) is None:
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
            values = sigma if isinstance(sigma, list) and sigma else [sigma]
            try:
                sigma = tuple(dict.fromkeys(_sigma_value(v) for v in values))
            except ValueError:
                raise InputError(f'{where}: "degrade_sigma" must be a number (finite, >= 0) or, for an image, a '
                                 f'list of them, got {_short(row["degrade_sigma"])}') from None
        for field in ("prompt", "output"):
            if row.get(field) is not None and not isinstance(row[field], str):
                raise InputError(f'{where}: "{field}" must be a string')
        output = row.get("output")  # checked per input, with the others, by safe_output_path
        file = Path(row["input"])
        file = file if file.is_absolute() else path.parent / file
        try:
            exists, regular = os.path.exists(file), is_regular(file)
        except OSError as e:  # e.g. a name too long for the file system
            raise InputError(f"{where}: input {_short(str(file))} cannot be read ({e.strerror or e})") from e
        if not exists:
            raise InputError(f"{where}: input {_short(str(file))} does not exist")
        if not regular:
            raise InputError(f"{where}: input {_short(str(file))} is not a regular file (a FIFO, device, socket or "
                             "folder); pid reads only regular files")
        specs.append(InputSpec(file, prompt=row.get("prompt"), degrade_sigma=sigma, output=output,
                               source=str(path)))
    return specs


def _sigma_value(value: object) -> float:
    """A finite σ >= 0 from JSON (NaN, Infinity, 1e999 and huge integers parse too); ValueError otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(value)
    try:
        sigma = float(value)
    except OverflowError:
        raise ValueError(value) from None
    if not 0 <= sigma < math.inf:
        raise ValueError(value)
    return sigma


def parse_sigmas(text: str) -> tuple[float, ...]:
    """`--degrade-sigma`: one σ, or a comma-separated sweep ("0,0.4,0.7"). One argument, not several, so a
    sweep cannot swallow the input paths that follow it on the command line; repeats are dropped."""
    sigmas = []
    for part in text.split(","):
        try:
            sigmas.append(_sigma_value(float(part)))
        except ValueError:
            raise InputError(f"--degrade-sigma {text!r}: {part.strip()!r} is not a finite number >= 0 (give one "
                             "value, or several separated by commas: --degrade-sigma 0,0.4,0.7)") from None
    return tuple(dict.fromkeys(sigmas))


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
    """This process's share of the inputs from what the scheduler really gives it, or None outside one.

    A Slurm array task (`--array=0-63`, or stepped `--array=1-15:2`) takes its place among the array's tasks
    (SLURM_ARRAY_TASK_ID/MIN/MAX/STEP/COUNT); within it, each process of an `srun` step (SLURM_PROCID of
    SLURM_STEP_NUM_TASKS) or of torchrun (RANK of WORLD_SIZE, which wins over Slurm's own ranks) takes its place
    again, so every input falls to exactly one process. What cannot be mapped that way (an array of listed
    indices like `--array=1,2,9`, a rank outside its world) is refused: guessing decodes some inputs twice and
    others never."""
    env = os.environ if env is None else env
    outer = _slurm_array_share(env) if "SLURM_ARRAY_TASK_ID" in env else None
    if "RANK" in env or "WORLD_SIZE" in env:
        inner = _rank_share(env, "RANK", "WORLD_SIZE", "torchrun")
    elif "SLURM_PROCID" in env and "SLURM_STEP_NUM_TASKS" in env:
        inner = _rank_share(env, "SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "srun")
    else:
        inner = None
    if outer is None or inner is None:
        return outer or inner
    return outer[0] * inner[1] + inner[0], outer[1] * inner[1]


def _env_int(env: Mapping[str, str], name: str, who: str) -> int:
    try:
        return int(env[name])
    except KeyError:
        raise InputError(f"{who} sets some of its variables but not {name}; pass --shard K/N instead") from None
    except ValueError:
        raise InputError(f"{name}={_short(env[name], 40)!r} (from {who}) is not an integer") from None


def _rank_share(env: Mapping[str, str], rank: str, size: str, who: str) -> tuple[int, int]:
    k, n = _env_int(env, rank, who), _env_int(env, size, who)
    if not 0 <= k < n:
        raise InputError(f"{rank}={k} is outside 0..{size}-1 = 0..{n - 1} (from {who}); pass --shard K/N instead")
    return k, n


def _slurm_array_share(env: Mapping[str, str]) -> tuple[int, int]:
    who = "a Slurm job array"
    task, count = _env_int(env, "SLURM_ARRAY_TASK_ID", who), _env_int(env, "SLURM_ARRAY_TASK_COUNT", who)
    first, last = _env_int(env, "SLURM_ARRAY_TASK_MIN", who), _env_int(env, "SLURM_ARRAY_TASK_MAX", who)
    step = _env_int(env, "SLURM_ARRAY_TASK_STEP", who) if "SLURM_ARRAY_TASK_STEP" in env else 1
    evenly = count >= 1 and step >= 1 and last - first == step * (count - 1)
    if not evenly or not first <= task <= last or (task - first) % step:
        raise InputError(f"the Slurm array's task ids are not an evenly spaced range ({first}-{last}:{step}, {count} "
                         f"task(s), this one {task}), so its share of the inputs cannot be worked out; use a range "
                         "like --array=0-63 or 0-63:2, or pass --shard K/N")
    return (task - first) // step, count


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
        template.format(stem="x", index=0, dir=".", name="x.pt", sigma=0.0)
    except (ValueError, TypeError) as e:
        raise InputError(f"--name template {template!r} is malformed ({e})") from None


def output_names(spec: InputSpec, count: int, template: str, sigmas: Sequence[float] = (0.0,)) -> list[str]:
    """Relative output paths for the `count` images an input yields at each σ of `sigmas`, σ by σ: entry
    k·count + i is image i at sigmas[k]. A sweep (several σ) whose names would not differ gets `_sigma{σ}` on
    each stem; one σ keeps the names a run without a sweep gives."""
    sweep = len(sigmas) > 1
    if spec.output is not None:
        stem, ext = os.path.splitext(spec.output)
        return [stem + (f"_sigma{sigma:g}" if sweep else "") + (f"_{i}" if count > 1 else "") + ext
                for sigma in sigmas for i in range(count)]
    names = []
    fields = _fields(template)
    indexed, by_sigma = "index" in fields, "sigma" in fields
    for sigma in sigmas:
        for i in range(count):
            stem = spec.path.stem + (f"_sigma{sigma:g}" if sweep and not by_sigma else "")
            stem = stem if count == 1 or indexed else f"{stem}_{i}"
            names.append(template.format(stem=stem, index=i, dir=spec.rel_dir or ".", name=spec.path.name,
                                         sigma=sigma))
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
