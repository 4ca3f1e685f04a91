"""JSONL manifests: one object per line with at least a string `"input"`.

Both the input manifest of `pid decode` and the prompt manifest of `--prompt-file` use this reader,
so malformed lines fail the same way everywhere: with the file, the line number and what was wrong.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pid_cli.files import MAX_TEXT_BYTES, NotRegularFile, read_text


def short(value: object, limit: int = 200) -> str:
    """A value for an error message, cut so a hostile line cannot flood the terminal."""
    text = str(value)
    return text if len(text) <= limit else text[:limit] + f"… ({len(text)} characters)"


def read_rows(path: Path, error: type[Exception]) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-blank line; any problem raises `error` naming the line."""
    try:
        text = read_text(path, MAX_TEXT_BYTES, "manifest")  # a BOM must not become part of the first line
    except NotRegularFile as e:
        raise error(str(e)) from e
    except (OSError, UnicodeDecodeError) as e:
        raise error(f"{path}: cannot read manifest as UTF-8 text ({e})") from e
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path} line {n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise error(f"{where}: not valid JSON ({e.msg})") from e
        except (ValueError, RecursionError) as e:  # integers beyond Python's digit limit, deep nesting
            raise error(f"{where}: not usable JSON ({type(e).__name__}: {short(e)})") from None
        if not isinstance(row, dict) or not isinstance(row.get("input"), str):
            raise error(f'{where}: expected an object with a string "input" field, got {short(line.strip(), 80)}')
        if "\0" in row["input"]:
            raise error(f'{where}: "input" contains a NUL character')
        rows.append((n, row))
    return rows
