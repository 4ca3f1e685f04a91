"""The engine behind `pid decode`: inputs → prepass → prompts → batched decode → PNGs.

Farm-safe by construction: every input gets exactly one JSONL record; outputs appear atomically; existing outputs
are skipped so a rerun resumes; a per-file error fails that file only; SIGINT/SIGTERM finish the images in flight
and stop (exit 130).

    job.py      DecodeJob, exit codes, the checks made before work starts
    records.py  JSONL records, progress, the closing summary, signal handlers
    plan.py     per-input probes, items, output sizes, batches, compile policy
    session.py  one device's decode loop (`run_here`)
    workers.py  one process per device of a multi-device run
"""

from __future__ import annotations

import threading

from pid_cli.decode.job import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, DecodeJob, check_job
from pid_cli.decode.records import Report
from pid_cli.decode.session import run_here
from pid_cli.decode.workers import run_per_device

__all__ = ["EXIT_FAILED", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_USAGE", "DecodeJob", "run"]


def run(job: DecodeJob, report: Report | None = None, stop: threading.Event | None = None) -> int:
    """Decode everything `job` names; returns the process exit code. Several devices (more than one image's
    group): one worker process each, whose records the parent writes (workers.py); else here."""
    check_job(job)
    if len(job.devices) > job.gpus_per_image:
        return run_per_device(job)
    return run_here(job, report, stop)
