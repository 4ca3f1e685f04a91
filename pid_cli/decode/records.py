"""What a run tells the world: one JSONL record per input, the progress bar, the closing summary, and the signal
handlers that let an interrupted run still write every record."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from pid_cli.inputs.collection import (
    InputError,
    InputSpec,
)

Report = Callable[[str, Any], None]  # (event, data): "record" dict, "total" count, "advance" None


class Records:
    """One JSONL record per input, to --manifest-out and/or stdout, written as each finishes; and what the
    run's closing summary on stderr says (counts, the first failures)."""

    SHOWN_FAILURES = 10  # failures the summary names; the rest are counted (every record names its own)

    def __init__(self, manifest_out: Path | None, stdout: TextIO | None, forward: Report | None = None):
        self.lock = threading.Lock()
        self.forward = forward  # a per-device worker process hands its records to the parent instead
        self.manifest_out = manifest_out
        try:
            self.file = open(manifest_out, "a", encoding="utf-8") if manifest_out else None  # noqa: SIM115
            self.fresh_line = self.file is not None and self.file.tell() > 0 and _last_byte(manifest_out) != b"\n"
        except OSError as e:
            raise InputError(f"--manifest-out {manifest_out}: cannot open for appending ({e.strerror or e})") from e
        self.stdout = stdout
        self.counts = {"ok": 0, "skipped": 0, "failed": 0}
        self.warned = 0  # inputs whose record carries warnings
        self.failures: list[tuple[str, str]] = []  # (input, error) of the first SHOWN_FAILURES failed inputs
        self.lost = 0  # records that could not be written (disk full): the run must not exit 0

    def emit(self, spec: InputSpec, status: str, outputs: list[Path], seconds: float, error: str | None,
             warnings: list[str] | None = None, sigmas: list[float] | None = None,
             checks: list[dict] | None = None) -> None:
        """`sigmas`: the degrade σ of each output (an image's σ sweep gives one output per σ). `checks`: its images
        held against the exact path by the 8-bit check (pipeline.ExactCheck.record), a key only where there are
        some."""
        record = {"input": str(spec.path), "status": status, "outputs": [str(p) for p in outputs],
                  "sigmas": list(sigmas or []) if outputs else [], "seconds": round(seconds, 3), "error": error,
                  "warnings": list(warnings or [])}
        if checks:
            record["exact_check"] = list(checks)
        self.add(record)

    def add(self, record: dict[str, Any]) -> None:
        with self.lock:
            self.counts[record["status"]] += 1
            self.warned += bool(record.get("warnings"))
            if record["status"] == "failed" and len(self.failures) < self.SHOWN_FAILURES:
                self.failures.append((record["input"], record["error"] or "failed"))
        if self.forward is not None:
            self.forward("record", record)
            return
        line = json.dumps(record, ensure_ascii=False)
        try:
            line.encode("utf-8")
        except UnicodeEncodeError:  # undecodable bytes of a file name: \udcXX escapes keep the JSON exact
            line = json.dumps(record)
        with self.lock:
            if self.fresh_line:  # a run killed mid-record left a partial line: start a fresh one
                line, self.fresh_line = "\n" + line, False
            for f in (self.file, self.stdout):
                if f is not None:
                    try:
                        f.write((line if f is self.file else line.lstrip("\n")) + "\n")
                        f.flush()
                    except OSError as e:  # a full disk must not take the run (and every later record) down
                        if not self.lost:
                            print(f"error: cannot write records ({e.strerror or e}); the run will exit 1",
                                  file=sys.stderr)
                        self.lost += 1

    def summary(self) -> str:
        """The run's closing lines for stderr: counts, then each failed input (the first few) and why."""
        ok, skipped, failed = self.counts["ok"], self.counts["skipped"], self.counts["failed"]
        parts = [f"{ok} decoded", f"{skipped} skipped (outputs exist)" if skipped else "", f"{failed} failed",
                 f"{self.warned} with warnings" if self.warned else ""]
        lines = [f"pid decode: {ok + skipped + failed} input(s): " + ", ".join(filter(None, parts))]
        for path, error in self.failures:
            lines.append(f"  failed: {error if error.startswith(path) else f'{path}: {error}'}")
        if failed > len(self.failures):
            where = (f"see {self.manifest_out}" if self.manifest_out is not None else
                     "--manifest-out FILE or --json lists every record")
            lines.append(f"  … and {failed - len(self.failures)} more failed ({where})")
        if self.lost:
            lines.append(f"  {self.lost} record(s) could not be written")
        return "\n".join(lines)

    def close(self) -> None:
        if self.file is not None:
            try:
                self.file.close()
            except OSError:
                self.lost += 1


def _last_byte(path: Path) -> bytes:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1)


# ---------------------------------------------------------------------------------------
# Progress and signals


class Progress:
    """images/s and ETA on stderr; silent when not a terminal or with --quiet."""

    def __init__(self, total: int, quiet: bool, forward: Report | None = None):
        self.bar = None
        self.forward = forward
        if forward is not None:
            forward("total", total)
        elif not quiet and sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("decoding"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[rate]}"), TimeRemainingColumn(),
                                console=Console(stderr=True))
            self.started = time.time()
            self.task = self.bar.add_task("decode", total=total, rate="")
            self.bar.start()
        self.done = 0

    def add_total(self, count: int) -> None:
        if self.bar is not None:
            self.bar.update(self.task, total=self.bar.tasks[0].total + count)

    def advance(self) -> None:
        self.done += 1
        if self.forward is not None:
            self.forward("advance", None)
        if self.bar is not None:
            rate = self.done / max(time.time() - self.started, 1e-9)
            self.bar.update(self.task, advance=1, rate=f"{rate:.2f} img/s")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def install_signal_handlers(stop: threading.Event, signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM),
                             announce: bool = True) -> dict:
    if threading.current_thread() is not threading.main_thread():
        return {}

    def handler(signum, frame):  # first signal: finish in-flight writes and stop; second: abort
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        if announce:
            print("\ninterrupted: finishing images in flight (press Ctrl-C again to abort)", file=sys.stderr)

    return {sig: signal.signal(sig, handler) for sig in signals}


def restore_signal_handlers(previous: dict) -> None:
    for sig, old in previous.items():
        signal.signal(sig, old)
