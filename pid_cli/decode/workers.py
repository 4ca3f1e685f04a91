"""`pid decode --devices A,B,...`: one worker process per device (with `--gpus-per-image N`, per N devices: the
worker's decoder splits each image across them, pipeline.py and split.py).

Why processes and not a thread per GPU: a compiled decode still launches thousands of kernels from
Python, and threads share one interpreter lock: on 4 GPUs threads scaled far worse than a process per GPU
(docs/performance.md#multi-gpu).

Each worker is the single-device run of `session.run_here` on its share of the inputs: the run's own shard
(`--shard K/N`, torchrun, Slurm) split again round-robin, so worker i of n takes shard K + N·i of N·n.
Workers hand their records, progress and warnings to this parent, the only writer of `--manifest-out`,
`--json`, the progress bar and stderr's warnings, so a multi-GPU run reads exactly like a single-GPU one.

Stopping: workers ignore SIGINT. The parent turns the first Ctrl-C/SIGTERM (or a --fail-fast failure)
into one SIGTERM per worker (finish the images in flight, record the rest), a second into another
(abort), each delivered once the worker has said its handler is in place. A worker whose parent is
gone stops the same way. A worker that dies leaves inputs without
a record: the parent records each of them as failed.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import queue
import signal
import sys
import threading
import time
import traceback
from dataclasses import replace
from typing import Any

from pid_cli.decode.job import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    DecodeJob,
    check_records_path,
    collect_job_inputs,
    device_groups,
    fetch_run_files,
    job_inputs,
    nothing_to_decode,
)
from pid_cli.decode.records import Progress, Records, install_signal_handlers
from pid_cli.decode.session import run_here
from pid_cli.hub import HubError
from pid_cli.inputs.collection import InputError, InputSpec, take_shard
from pid_cli.registry import RegistryError

PARENT_POLL_S = 0.5


def worker_jobs(job: DecodeJob) -> list[DecodeJob]:
    """One job per device (per group of `gpus_per_image` devices), each on its round-robin share of this run's
    shard."""
    k, n = job.shard or (0, 1)
    groups = device_groups(job)
    return [replace(job, devices=group, shard=(k + n * i, n * len(groups)), quiet=True, json_stdout=False,
                    manifest_out=None) for i, group in enumerate(groups)]


def run_per_device(job: DecodeJob) -> int:
    """The parent of a multi-device run (`decode.run` has refused a bad job before calling this). It checks the
    inputs and prompt sources and fetches the files every worker needs once, before any worker starts."""
    found = collect_job_inputs(job)
    check_records_path(job, found)
    specs = take_shard(found, *job.shard) if job.shard is not None else found
    if not specs:
        print(nothing_to_decode(job, len(found)), file=sys.stderr)
        return EXIT_OK
    job = _prepare(job, specs)
    jobs = worker_jobs(job)
    context = multiprocessing.get_context("spawn")  # CUDA cannot be forked
    events: multiprocessing.Queue = context.Queue()
    workers = [context.Process(target=_worker_main, args=(w, i, os.getpid(), events), daemon=False,
                               name=f"pid-decode-{w.devices[0]}") for i, w in enumerate(jobs)]
    stop = _ParentStop(workers)
    previous = {sig: signal.signal(sig, stop.handler) for sig in (signal.SIGINT, signal.SIGTERM)} \
        if threading.current_thread() is threading.main_thread() else {}
    records = Records(job.manifest_out, sys.stdout if job.json_stdout else None)
    progress = Progress(0, job.quiet)
    recorded: dict[str, int] = {}  # records per input path (a file listed with two prompts is two inputs)
    exits: dict[int, int] = {}
    died: dict[int, int] = {}  # workers gone without reporting their exit: index → exit code
    usage_error: str | None = None
    warned: set[tuple[str, str]] = set()  # every worker meets the same odd sizes: say each once
    try:
        for w in workers:
            w.start()
        while len(exits) < len(workers):
            try:
                index, event, data = events.get(timeout=PARENT_POLL_S)
            except queue.Empty:
                for i, w in enumerate(workers):  # a worker that died without saying goodbye
                    if i not in exits and w.exitcode is not None:
                        exits[i] = died[i] = w.exitcode
                        print(f"error: the decode worker on {jobs[i].devices[0]} exited with code {w.exitcode}",
                              file=sys.stderr)
                continue
            if event == "record":
                recorded[data["input"]] = recorded.get(data["input"], 0) + 1
                records.add(data)
                if data["status"] == "failed" and job.fail_fast:
                    stop.request("fail-fast")
            elif event == "ready":
                stop.worker_ready(index)
            elif event == "total":
                progress.add_total(data)
            elif event == "advance":
                progress.advance()
            elif event in ("warn", "note"):
                if (event, data) not in warned:
                    warned.add((event, data))
                    (job.warn if event == "warn" else job.note)(data)
            elif event == "usage":
                usage_error = usage_error or data
                stop.request("usage")
            elif event == "exit":
                exits[index] = data
        for w in workers:
            w.join()
        _record_lost_inputs(jobs, died, recorded, records)
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
        progress.close()
        records.close()
    print(records.summary(), file=sys.stderr)
    if usage_error is not None:
        raise ValueError(usage_error)
    if stop.reason == "signal":
        return EXIT_INTERRUPTED
    failed = records.counts["failed"] or records.lost or any(code not in (EXIT_OK, EXIT_INTERRUPTED)
                                                                for code in exits.values())
    return EXIT_FAILED if failed or stop.reason == "fail-fast" else EXIT_OK


def _prepare(job: DecodeJob, specs: list[InputSpec]) -> DecodeJob:
    """The job the workers get: prompt sources checked and the checkpoint, VAE and text encoder fetched once
    here (workers would each probe the Hub and wait on each other's downloads). A raw FLUX.2 latent's VAE,
    which only reading the file reveals, is fetched by the worker that meets it."""
    from pid_cli.inputs.prompts import resolve_prompts
    from pid_cli.text import load_prompt_embeds

    if job.prompt is None:  # a malformed --prompt-file is a usage error before anything is fetched
        resolve_prompts([s.path for s in specs if s.prompt is None], prompt_file=job.prompt_file, errors={})
    if job.prompt_embeds is not None:
        load_prompt_embeds(job.prompt_embeds, job.entry.net_config["txt_max_length"])
    job = replace(job)
    need_vae = job.compare or job.color_fix != "none" or any(s.is_image for s in specs)
    fetch_run_files(job, need_vae)
    return job


class _ParentStop:
    """Turns stop requests into SIGTERMs, each delivered to a worker once its handler is in place (a
    worker still importing torch would die of it instead of stopping)."""

    def __init__(self, workers: list):
        self.workers = workers
        self.ready: set[int] = set()
        self.reason: str | None = None
        self.sent = 0

    def worker_ready(self, index: int) -> None:
        self.ready.add(index)
        for _ in range(self.sent):
            self._signal(index)

    def handler(self, signum, frame) -> None:
        if self.sent == 0:
            print("\ninterrupted: finishing images in flight (press Ctrl-C again to abort)", file=sys.stderr)
        self.request("signal")

    def request(self, reason: str) -> None:
        self.reason = self.reason or reason
        if reason != "signal" and self.sent:
            return  # a fail-fast or usage stop asks once; only a user's second signal aborts
        self.sent += 1
        for index in self.ready:
            self._signal(index)

    def _signal(self, index: int) -> None:
        worker = self.workers[index]
        if worker.pid is not None and worker.exitcode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid, signal.SIGTERM)


def _record_lost_inputs(jobs: list[DecodeJob], died: dict[int, int], recorded: dict[str, int],
                        records: Records) -> None:
    """Inputs of a worker that died (out of memory, a driver error, SIGKILL) still get their record."""
    for i, code in died.items():
        try:
            specs = job_inputs(jobs[i])
        except Exception:  # the inputs vanished meanwhile: nothing more to say per input
            return
        for spec in specs:
            if recorded.get(str(spec.path), 0) > 0:
                recorded[str(spec.path)] -= 1  # this input (or another listing of its file) has its record
                continue
            records.emit(spec, "failed", [], 0.0,
                         f"not decoded: the worker on {jobs[i].devices[0]} exited with code {code}")


def _worker_main(job: DecodeJob, index: int, parent: int, events: Any) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides; a terminal's Ctrl-C reaches us too
    stop = threading.Event()
    install_signal_handlers(stop, (signal.SIGTERM,), announce=False)
    events.put((index, "ready", None))  # from here on a SIGTERM stops this worker instead of killing it

    def watch_parent() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_S)
        os.kill(os.getpid(), signal.SIGTERM)  # orphaned: stop as if asked to

    threading.Thread(target=watch_parent, daemon=True).start()
    code = EXIT_FAILED
    job = replace(job, warn=lambda message: events.put((index, "warn", message)),
                  note=lambda message: events.put((index, "note", message)))
    try:
        code = run_here(job, report=lambda event, data: events.put((index, event, data)), stop=stop)
    except (RegistryError, InputError, HubError, PermissionError, ValueError) as e:  # the CLI's usage errors
        events.put((index, "usage", str(e)))
        code = EXIT_USAGE
    except BaseException:
        traceback.print_exc()
        code = EXIT_FAILED
    finally:
        events.put((index, "exit", code))
        events.close()
        events.join_thread()
