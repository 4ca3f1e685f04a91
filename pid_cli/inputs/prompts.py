"""Where each input's caption comes from.

Sources, first match wins (per input):

1. ``--prompt TEXT`` — one caption for every input (an explicit ``--prompt ""`` counts).
2. ``--prompt-file FILE`` — either a text file with one prompt per line, matched to the inputs by
   order (blank lines are skipped, surrounding whitespace stripped; it must have at least as many
   prompts as there are inputs), or a JSONL manifest (``*.jsonl``) of
   ``{"input": PATH, "prompt": TEXT}`` objects, matched by path (relative paths are relative to the
   manifest's folder; failing that, a file name that occurs once in the manifest matches).
3. A sidecar ``NAME.txt`` next to the input ``NAME.ext`` (whole file, whitespace stripped).
4. A ``prompt`` entry in a ``.safetensors`` input's metadata.
5. The empty caption ``""`` — the dropped-caption condition PiD saw in training.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open

from pid_cli.files import MAX_SIDECAR_BYTES, MAX_TEXT_BYTES, NotRegularFile, read_text
from pid_cli.inputs.latent_files import COMFYUI_MARKER
from pid_cli.inputs.manifest import read_rows

MANIFEST_SUFFIXES = (".jsonl", ".ndjson")
DEFAULT_PROMPT = ""

# Shared --help texts so every command documents the sources the same way.
PROMPT_HELP = ("Caption for all inputs. Precedence: --prompt > --prompt-file > sidecar NAME.txt > "
               "'prompt' in a .safetensors input's metadata > empty caption (the dropped-caption "
               "condition PiD was trained with). Gemma-2 embeds it behind the fixed CHI prefix.")
PROMPT_FILE_HELP = ("Prompts: a text file with one prompt per line (matched to inputs by order), or a "
                    'JSONL manifest of {"input": PATH, "prompt": TEXT} lines (matched by path).')
PROMPT_EMBEDS_HELP = ("Precomputed embeddings from `pid embed` (safetensors). Prompts are looked up "
                      "there and Gemma is never loaded; a prompt missing from the file is an error.")


class PromptSourceError(ValueError):
    """A prompt source is malformed or does not cover the inputs."""


@dataclass(frozen=True)
class Prompt:
    """A resolved caption and where it came from (for logs and error messages)."""

    text: str
    source: str


@dataclass(frozen=True)
class ManifestEntry:
    input: Path  # as resolved against the manifest's folder
    prompt: str | None
    line: int


def is_manifest(path: Path) -> bool:
    return Path(path).suffix.lower() in MANIFEST_SUFFIXES


def read_prompt_lines(path: Path) -> list[str]:
    """Non-blank lines of a text prompt file, whitespace-stripped, in order."""
    lines = _read_text(path, MAX_TEXT_BYTES, "prompt file").splitlines()
    return [s for line in lines if (s := line.strip())]


def read_manifest(path: Path) -> list[ManifestEntry]:
    """Parse a JSONL manifest; errors name the file and line."""
    path = Path(path)
    entries = []
    for n, row in read_rows(path, PromptSourceError):
        prompt = row.get("prompt")
        if prompt is not None and not isinstance(prompt, str):
            kind = type(prompt).__name__
            raise PromptSourceError(f'{path} line {n}: "prompt" must be a string, got {kind}')
        try:
            file = Path(row["input"]).expanduser()
        except RuntimeError:  # ~user that does not exist
            file = Path(row["input"])
        entries.append(ManifestEntry(path.parent / file, prompt, n))
    return entries


def prompts_from_file(path: Path) -> list[str]:
    """All prompts in a prompt file or manifest (for `pid embed --prompt-file`)."""
    if is_manifest(path):
        return [e.prompt for e in read_manifest(path) if e.prompt is not None]
    return read_prompt_lines(path)


def sidecar_path(input_path: Path) -> Path:
    return Path(input_path).with_suffix(".txt")


def metadata_prompt(input_path: Path) -> str | None:
    """The ``prompt`` metadata entry of a safetensors file (header only, no tensors read). A ComfyUI latent
    renamed to .safetensors has none: its ``prompt`` is ComfyUI's graph, not a caption."""
    try:
        try:
            str(input_path).encode("utf-8")
        except UnicodeEncodeError:  # safetensors only opens UTF-8 paths: read the header ourselves
            from pid_cli.inputs.latent_files import read_latent_file

            return read_latent_file(input_path).metadata.get("prompt")  # empty for a ComfyUI file
        with safe_open(str(input_path), "pt") as f:
            if COMFYUI_MARKER in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                return None
            return (f.metadata() or {}).get("prompt")
    except Exception as exc:
        raise PromptSourceError(f"{input_path}: cannot read safetensors metadata ({exc})") from exc


def resolve_prompts(inputs: Sequence[Path], *, prompt: str | None = None, prompt_file: Path | None = None,
                    sidecars: bool = True, metadata: bool = True,
                    errors: dict[Path, str] | None = None) -> list[Prompt]:
    """One :class:`Prompt` per input, by the precedence in the module docstring.

    With `errors`, an unreadable sidecar or metadata fails only its own input: the message goes into
    `errors[input]` (and the input gets the default prompt) instead of raising for the whole list."""
    inputs = [Path(p) for p in inputs]
    if prompt is not None:
        return [Prompt(prompt, "--prompt") for _ in inputs]
    from_file: list[Prompt | None] = [None] * len(inputs)
    if prompt_file is not None:
        from_file = _match_prompt_file(Path(prompt_file), inputs)
    out = []
    for inp, matched in zip(inputs, from_file, strict=True):
        try:
            out.append(matched if matched is not None else _own_prompt(inp, sidecars, metadata))
        except PromptSourceError as exc:
            if errors is None:
                raise
            errors[inp] = str(exc)
            out.append(Prompt(DEFAULT_PROMPT, "default (empty caption)"))
    return out


def _own_prompt(inp: Path, sidecars: bool, metadata: bool) -> Prompt:
    """What an input says about its prompt itself: sidecar, then metadata, then the default."""
    if sidecars and inp.suffix.lower() != ".txt" and os.path.lexists(side := sidecar_path(inp)):
        return Prompt(_read_text(side, MAX_SIDECAR_BYTES, "sidecar prompt").strip(), str(side))
    if metadata and inp.suffix == ".safetensors" and inp.is_file() and (meta := metadata_prompt(inp)) is not None:
        return Prompt(meta, f"metadata of {inp}")
    return Prompt(DEFAULT_PROMPT, "default (empty caption)")


def _match_prompt_file(path: Path, inputs: list[Path]) -> list[Prompt | None]:
    if not is_manifest(path):
        lines = read_prompt_lines(path)
        if len(lines) < len(inputs):
            raise PromptSourceError(f"{path}: {len(lines)} prompt(s) for {len(inputs)} input(s); "
                                    "a prompt file needs one non-blank line per input, in input order")
        return [Prompt(text, f"{path}, prompt {i + 1}") for i, text in enumerate(lines[: len(inputs)])]
    entries = [e for e in read_manifest(path) if e.prompt is not None]
    by_path = {_canonical(e.input): e for e in entries}
    names: dict[str, list[ManifestEntry]] = {}
    for e in entries:
        names.setdefault(e.input.name, []).append(e)
    out: list[Prompt | None] = []
    for inp in inputs:
        e = by_path.get(_canonical(inp))
        if e is None and len(same := names.get(inp.name, [])) == 1:
            e = same[0]
        out.append(None if e is None else Prompt(e.prompt or "", f"{path} line {e.line}"))
    return out


def _canonical(p: Path) -> Path:
    return Path(p).expanduser().resolve(strict=False)


def _read_text(path: Path, limit: int, what: str) -> str:
    """A regular text file of at most `limit` bytes (a FIFO or device named as a prompt would block or never end)."""
    try:
        return read_text(path, limit, what)  # a BOM must not become part of a prompt
    except FileNotFoundError as exc:
        raise PromptSourceError(f"{path}: file not found") from exc
    except NotRegularFile as exc:
        raise PromptSourceError(str(exc)) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise PromptSourceError(f"{path}: cannot read as UTF-8 text ({exc})") from exc
