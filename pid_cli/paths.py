"""Where pid keeps its own files (embedding cache, compile caches).

Model weights are not kept here: they live in the Hugging Face cache (`HF_HOME` /
`HF_HUB_CACHE`) so that other tools share one copy.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """`$PID_CACHE_DIR`, else `$XDG_CACHE_HOME/pid`, else `~/.cache/pid`."""
    if env := os.environ.get("PID_CACHE_DIR"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "pid"
