"""The batch engine behind `pid decode`: inputs → prepass → prompts → batched decode → PNGs.

Farm-safe by construction: every input gets exactly one JSONL record; outputs appear
atomically; existing outputs are skipped so a rerun resumes; a per-file error fails that file
only; SIGINT/SIGTERM finish the images in flight and stop (exit 130).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import torch
from torch import Tensor

from pid_cli import __version__
from pid_cli.baselines import Baseline, baseline_paths, render
from pid_cli.colorfix import METHODS as COLOR_FIX_METHODS
from pid_cli.imageinput import ImagePlan, fit_sizes, load_image, plan_image
from pid_cli.images import image_pixels, read_image
from pid_cli.inputs import (
    DEFAULT_TEMPLATE,
    IMAGE_SUFFIXES,
    InputError,
    InputSpec,
    check_template,
    collect_inputs,
    output_names,
    safe_output_path,
    take_shard,
)
from pid_cli.latents import (
    LATENT_SUFFIXES,
    MAX_LATENT_SIDE,
    LatentError,
    Reading,
    noise_clean_latent,
    read_as_pid,
    read_latent_file,
    scale_warning,
    to_training_frame,
    training_sigma,
)
from pid_cli.model import layers
from pid_cli.outputs import OutputExists, check_writable, clean_partials, encode_png, ignores_case, write_atomic
from pid_cli.pipeline import Decoder, HostPixels, finite_items, resolve_device, to_uint
from pid_cli.registry import Entry
from pid_cli.split import check_split

if TYPE_CHECKING:
    from pid_cli.vae import LatentCodec

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
Report = Callable[[str, Any], None]  # (event, data): "record" dict, "total" count, "advance" None


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr)


@dataclass
class DecodeJob:
    """Everything a `pid decode` run needs (the CLI's options, validated)."""

    inputs: list[str]
    out: Path
    entry: Entry
    weights: Path | None = None  # None: resolved (downloaded if need be) once the inputs have been checked
    template: str = DEFAULT_TEMPLATE
    batch_size: int | None = None  # None: per output size (auto_batch_size)
    devices: list[torch.device] = field(default_factory=lambda: [resolve_device(None)])
    gpus_per_image: int = 1  # >1: each image split across this many of `devices` (latency, not throughput)
    seed: int = 0
    steps: int = 4
    dtype: str | None = None
    attention: str = "bf16"
    matmul: str = "bf16"
    compile: str = "auto"  # on, off, or auto: only when the run is long enough to win back compilation
    bit_depth: int = 8
    metadata: bool = True
    overwrite: bool = False
    fail_fast: bool = False
    recursive: bool = False
    latent_format: str = "auto"
    key: str | None = None
    latent_size: tuple[int, int] | None = None
    degrade_sigma: tuple[float, ...] | float | None = None  # one σ, or an image's sweep (inputs.parse_sigmas)
    target: str | None = None
    prompt: str | None = None
    prompt_file: Path | None = None
    prompt_embeds: Path | None = None
    text_encoder: Path | None = None
    shard: tuple[int, int] | None = None
    manifest_out: Path | None = None
    json_stdout: bool = False
    quiet: bool = False
    fit: bool = False  # image inputs: resize onto a trained output size (imageinput.py)
    compare: bool = False  # also write NAME.vae.png and NAME.compare.png (baselines.py)
    color_fix: str = "none"  # colorfix.METHODS
    warn: Callable[[str], None] = _warn  # module-level functions: jobs are pickled to worker processes
    note: Callable[[str], None] = _note


@dataclass
class Item:
    """One image to make: item `index` of input `spec`."""

    spec: InputSpec
    index: int
    shape: tuple[int, int, int]  # latent [C, h, w]
    output: Path
    sigma: float  # as given (the backbone's own frame); converted when the batch is decoded
    seed: int
    prompt: str = ""
    plan: ImagePlan | None = None  # image inputs: how the file becomes encoder input
    provenance: dict[str, str] = field(default_factory=dict)  # a ComfyUI latent's graph, copied into the PNG
    runtime: str = ""  # set when decoded: `Decoder.runtime` and the batch size (what its exact pixels depend on)


@dataclass
class Probe:
    """What the prepass learns about one input without GPU work."""

    count: int  # images it yields
    shape: tuple[int, int, int]  # latent [C, h, w] of each
    meta: dict[str, Any]
    plan: ImagePlan | None = None  # image inputs
    warnings: list[str] = field(default_factory=list)  # e.g. a scale that says the layout was misread
    note: str | None = None  # how --latent-size was read
    provenance: dict[str, str] = field(default_factory=dict)
    needs_vae: bool = False  # a raw FLUX.2 latent: normalised with its VAE's batch-norm statistics
    sigmas: tuple[float, ...] = (0.0,)  # one σ; an image may have a sweep


@dataclass
class InputState:
    """Progress of one input across its images; its record is written when `pending` hits 0."""

    spec: InputSpec
    outputs: list[Path]
    pending: int
    started: float
    error: str | None = None
    warnings: list[str] = field(default_factory=list)
    sigmas: list[float] = field(default_factory=list)  # the σ of each output


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
             warnings: list[str] | None = None, sigmas: list[float] | None = None) -> None:
        """`sigmas`: the degrade σ of each output (an image's σ sweep gives one output per σ)."""
        self.add({"input": str(spec.path), "status": status, "outputs": [str(p) for p in outputs],
                  "sigmas": list(sigmas or []) if outputs else [], "seconds": round(seconds, 3), "error": error,
                  "warnings": list(warnings or [])})

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


def run(job: DecodeJob, report: Report | None = None, stop: threading.Event | None = None) -> int:
    """Decode everything `job` names; returns the process exit code. Several devices: one worker process
    each (see workers.py), which calls this with `report` (records and progress go to the parent) and its
    own `stop`, set by its signal handler; without one, SIGINT/SIGTERM are handled here.

    Cheap checks come before expensive work: the inputs are collected and read, `--out` tested and the
    prompts resolved before any checkpoint, VAE or text encoder is fetched, and every file the run needs is
    fetched in one step, so a missing one (offline, the Hub out of reach) is reported with all the others."""
    check_job(job)
    if len(job.devices) > job.gpus_per_image:
        from pid_cli.workers import run_per_device

        return run_per_device(job)
    previous = {}
    if stop is None:
        stop = threading.Event()
        previous = _install_signal_handlers(stop)  # first: an interrupt from here on still leaves every record
    records: Records | None = None
    found: list[InputSpec] = []
    specs: list[InputSpec] = []
    try:
        records = Records(job.manifest_out, sys.stdout if job.json_stdout else None, report)
        clean_partials(job.out)
        found = collect_job_inputs(job)
        check_records_path(job, found)
        specs = take_shard(found, *job.shard) if job.shard is not None else found
        session = _Session(job, records, stop, report)
        session.prepass(specs)
        if session.items and not stop.is_set():
            session.choose_prompts()
        if session.items and not stop.is_set():  # unless every remaining input failed while its prompt was read
            session.fetch_files()
            session.embed_prompts()
            session.decode_all()
        session.report_unfinished()
    finally:
        _restore_signal_handlers(previous)
        if records is not None:
            records.close()
    if report is None:
        print(records.summary() if specs else nothing_to_decode(job, len(found)), file=sys.stderr)
    if stop.is_set():
        return EXIT_INTERRUPTED
    return EXIT_FAILED if records.counts["failed"] or records.lost else EXIT_OK


def check_records_path(job: DecodeJob, specs: list[InputSpec]) -> None:
    """--manifest-out appends records: it must not be one of the inputs (or their sidecars), which it would
    corrupt."""
    if job.manifest_out is None:
        return
    target = os.path.realpath(job.manifest_out)
    for spec in specs:
        if target in (os.path.realpath(spec.path), os.path.realpath(spec.path.with_suffix(".txt"))):
            raise InputError(f"--manifest-out {job.manifest_out} is the input {spec.path} (or its prompt); records "
                             "appended to it would corrupt it: choose another file")


def nothing_to_decode(job: DecodeJob, found: int) -> str:
    """What an empty run says, instead of exiting in silence."""
    if found:
        k, n = job.shard or (0, 1)
        return f"pid decode: nothing to decode: the {found} input(s) all fall in other shards than {k}/{n}"
    where = " ".join(job.inputs)
    return (f"pid decode: nothing to decode: {where} holds no latent or image files (latents: "
            f"{' '.join(LATENT_SUFFIXES)}; images: {' '.join(IMAGE_SUFFIXES)})"
            + ("" if job.recursive else "; --recursive also searches sub-folders"))


def fetch_run_files(job: DecodeJob, need_vae: bool) -> Path | None:
    """Every file the decode needs, fetched (or found on disk) in one step: the decoder unless `job.weights`
    names it, the VAE when `need_vae` (images, baselines, raw FLUX.2 latents), Gemma unless the prompts come
    from elsewhere. Files that are missing and cannot be fetched are all named in one error, with the ways
    out. Sets `job.weights` and `job.text_encoder`; returns the VAE file when asked for."""
    from pid_cli import hub

    need_text = job.prompt_embeds is None and job.text_encoder is None and not os.environ.get("PID_TEXT_ENCODER")
    if job.weights is not None and not need_vae and not need_text:
        return None
    try:
        files = hub.ensure_files(job.entry, decoder=job.weights is None, vae=need_vae, text_encoder=need_text)
    except hub.MissingFilesError as e:
        raise hub.HubError(with_ways_out(e)) from e
    job.weights = job.weights or files.weights
    if need_text:  # Gemma's snapshot: its config keys the embedding cache, so it is wanted even when all hit
        job.text_encoder = files.text_encoder
    return files.vae_weights if need_vae else None


def check_job(job: DecodeJob) -> None:
    """What would refuse the whole run, refused before any input is read or GPU work starts."""
    check_template(job.template)
    _check_baseline_options(job)
    _check_gpus_per_image(job)
    check_writable(job.out)


def collect_job_inputs(job: DecodeJob) -> list[InputSpec]:
    """Every input the run names: collected, sorted, outputs of earlier runs left out (before sharding)."""
    return _drop_earlier_outputs(collect_inputs(job.inputs, recursive=job.recursive, note=job.note), job)


def job_inputs(job: DecodeJob) -> list[InputSpec]:
    """The inputs this run (or this worker) owns: `collect_job_inputs`, then its shard."""
    specs = collect_job_inputs(job)
    return take_shard(specs, *job.shard) if job.shard is not None else specs


def device_groups(job: DecodeJob) -> list[list[torch.device]]:
    """`job.devices` in groups of `gpus_per_image`, in order: one worker (one decoder) per group."""
    n = job.gpus_per_image
    return [job.devices[i:i + n] for i in range(0, len(job.devices), n)]


def _check_gpus_per_image(job: DecodeJob) -> None:
    n = job.gpus_per_image
    if n < 1 or len(job.devices) % n:
        raise InputError(f"--gpus-per-image {n} must divide the {len(job.devices)} device(s) of --devices "
                         f"({', '.join(map(str, job.devices))}) into groups of equal size")
    if n > 1:
        for group in device_groups(job):
            check_split(group, job.entry.net_config)


def _check_baseline_options(job: DecodeJob) -> None:
    """--compare/--color-fix need the backbone VAE's decoder: refuse them up front where there is none."""
    if job.color_fix not in COLOR_FIX_METHODS:
        raise InputError(f"--color-fix must be one of {', '.join(COLOR_FIX_METHODS)}, got {job.color_fix!r}")
    if job.compare or job.color_fix != "none":
        flag = "--compare" if job.compare else "--color-fix"
        try:
            vae_kind(job.entry, decoder=True)
        except ValueError as e:
            raise InputError(f"{flag} needs the {job.entry.backbone} VAE decoder: {e}") from None


def vae_kind(entry: Entry, decoder: bool = False) -> str:
    """The codec kind of the entry's VAE; VAEError where pid has no encoder for it, or with `decoder` no
    decoder (RAE/SigLIP encode only). Imports pid_cli.vae (and diffusers, seconds) only here: latent-only
    runs never pay for it."""
    from pid_cli.vae import VAEError, resolve_kind

    if entry.vae is None:
        raise VAEError(f"registry entry {entry.id} names no VAE")
    return resolve_kind(entry.vae.format, decoder=decoder)


def _drop_earlier_outputs(specs: list[InputSpec], job: DecodeJob) -> list[InputSpec]:
    """Images that a folder or glob finds inside --out are left out: they are most likely earlier outputs
    (`pid decode dir --out dir` would otherwise decode its own PNGs on a rerun). Named files still count."""
    root = job.out.resolve()
    expanded = lambda s: s.source not in ("command line", "stdin") and not s.source.endswith(".jsonl")
    earlier = lambda s: s.is_image and expanded(s) and root in s.path.resolve().parents
    keep = [s for s in specs if not earlier(s)]
    if len(keep) < len(specs):
        job.warn(f"left out {len(specs) - len(keep)} image(s) inside the output folder {job.out} (earlier "
                 "outputs?); name them explicitly to decode them")
    return keep


def probe_input(job: DecodeJob, spec: InputSpec) -> Probe:
    """Read and validate one input (CPU only, nothing fetched): how many images it yields, their latent shape,
    and what the user should hear about how it was read."""
    _check_options_apply(job, spec)
    if not spec.is_image:
        file = read_latent_file(spec.path, job.key)
        reading = read_as_pid(file, job.entry.latent, job.entry.backbone, job.latent_format, job.latent_size,
                              defer_batchnorm=True)
        latent = reading.latent
        sigmas = _sigmas(job, spec, file.metadata)
        sigma = sigmas[0]
        frame = job.entry.latent.sigma_frame
        scale = 1 / math.sqrt(sigma * sigma + 1) if frame == "euler-ve" and 0 < sigma < math.inf else 1.0
        warning = scale_warning(reading, str(spec.path), scale)
        return Probe(latent.shape[0], (latent.shape[1], latent.shape[2], latent.shape[3]), file.metadata,
                     warnings=[warning] if warning else [], note=reading.note, provenance=file.provenance,
                     needs_vae=reading.deferred_batchnorm, sigmas=sigmas)
    try:
        vae_kind(job.entry)
    except ValueError as e:  # VAEError: a VAE format pid has no encoder for
        raise InputError(f"{spec.path}: {e}") from None
    sigmas = _sigmas(job, spec, {})
    _, info = read_image(spec.path)  # the whole file: a corrupt image fails here, not mid-run
    fit_to = _fit_candidates(job) if job.fit else None
    plan = plan_image(job.entry, spec.path, info.width, info.height, fit_to)
    f = job.entry.latent.vae_factor
    if max(plan.width, plan.height) > MAX_LATENT_SIDE * f:  # the limit stored latents have (latents.py)
        raise InputError(f"{spec.path}: a {plan.width}x{plan.height} image would decode to "
                         f"{plan.width * job.entry.sr_scale}x{plan.height * job.entry.sr_scale}; use --fit to "
                         "resize it onto a trained size")
    grid = job.entry.latent.fixed_grid or (plan.height // f, plan.width // f)  # RAE encoders: one grid for all
    return Probe(1, (job.entry.latent.channels, *grid), {}, plan, sigmas=sigmas)


def _check_options_apply(job: DecodeJob, spec: InputSpec) -> None:
    """An option given for a kind of input it does not act on is refused for that input, never ignored: the user
    asked for something the output would not show."""
    if spec.is_image:
        given = [flag for flag, on in (("--key", job.key is not None), ("--latent-size", job.latent_size is not None),
                                       (f"--latent-format {job.latent_format}", job.latent_format != "auto")) if on]
        if given:
            raise InputError(f"{spec.path}: {' and '.join(given)} applies to latent files; this is an image, which "
                             f"the {job.entry.backbone} VAE encodes (decode it in a run without {given[0].split()[0]})")
    elif job.fit:
        raise InputError(f"{spec.path}: --fit resizes image inputs; this is a latent file, which decodes at its own "
                         "size (decode it in a run without --fit)")


PREPASS_MEMORY = 2 << 30  # bytes the prepass threads may hold at once while reading and checking inputs


def probe_cost(spec: InputSpec) -> int:
    """Bytes reading one input may hold at its peak, from its size alone: an image ~20 bytes a pixel (the decoded
    array, float copies, a resize), a latent four times its file (as read, in float32, normalised, and the other
    reading `scale_warning` compares)."""
    try:
        return 20 * image_pixels(spec.path) if spec.is_image else 4 * spec.path.stat().st_size
    except (OSError, ValueError):  # unreadable or refused: probe_input says why, and holds next to nothing
        return 0


class _Budget:
    """A count of bytes that threads take before work and give back after: many small inputs go in parallel, a
    large one waits for room (one larger than the whole budget runs alone)."""

    def __init__(self, total: int):
        self.total, self.free = total, total
        self.changed = threading.Condition()

    def run(self, cost: int, fn: Callable[..., Any], *args: Any) -> Any:
        cost = min(cost, self.total)
        with self.changed:
            self.changed.wait_for(lambda: self.free >= cost)
            self.free -= cost
        try:
            return fn(*args)
        finally:
            with self.changed:
                self.free += cost
                self.changed.notify_all()


def _fit_candidates(job: DecodeJob) -> list[tuple[int, int]]:
    sizes = fit_sizes(job.entry, TARGET_LONG_SIDE[job.target] if job.target else None)
    if not sizes:
        raise InputError(f"--fit: {job.entry.id} lists no trained output sizes"
                         + (f" for --target {job.target}" if job.target else ""))
    return sizes


def load_source(job: DecodeJob, item: Item, bn_stats: Callable[[], tuple[Tensor, Tensor]] | None = None) -> Tensor:
    """What the worker needs for all items of `item`'s input: latents [B, C, h, w] as given, or the
    preprocessed image [1, 3, H, W] in [−1, 1] (encoded on the worker's device)."""
    if item.plan is not None:
        return load_image(job.entry, item.spec.path, item.plan)[None]
    return load_latent(job, item.spec, bn_stats).latent


def load_latent(job: DecodeJob, spec: InputSpec, bn_stats: Callable[[], tuple[Tensor, Tensor]] | None = None
                ) -> Reading:
    """The PiD latent [B, C, h, w] of one input file, and how it was read."""
    file = read_latent_file(spec.path, job.key)
    return read_as_pid(file, job.entry.latent, job.entry.backbone, job.latent_format, job.latent_size, bn_stats)


class _Session:
    """The state of one run: items to decode, per-input progress, prompt embeddings."""

    def __init__(self, job: DecodeJob, records: Records, stop: threading.Event, report: Report | None = None):
        self.job, self.records, self.stop, self.report = job, records, stop, report
        self.items: list[Item] = []
        self.states: dict[InputSpec, InputState] = {}  # a file listed with two prompts is two inputs
        self.text: dict[str, Tensor] = {}
        self.vae_path: Path | None = None  # the backbone VAE file, when images or baselines need it
        self.needs_vae = False  # a raw FLUX.2 latent needs its VAE's batch-norm statistics
        self.bn_stats: tuple[Tensor, Tensor] | None = None
        self.lock = threading.Lock()
        self.failed_fast = threading.Event()
        self.claimed_as: dict[str, Path] = {}  # output identity → the name it was first claimed by
        self.case_insensitive: bool | None = None  # the output folder's file system, probed on first use
        self.name_max: int | None = None

    def fail(self, spec: InputSpec, error: str, warnings: list[str] | None = None) -> None:
        self.records.emit(spec, "failed", [], 0.0, error, warnings)
        if self.job.fail_fast:
            self.failed_fast.set()

    # -- prepass: read and validate every input, name its outputs, skip finished ones ----

    SHOWN_WARNINGS = 10  # input warnings printed on stderr; the rest are only in the records (and counted)

    def prepass(self, specs: list[InputSpec]) -> None:
        claimed: dict[str, InputSpec] = {}
        warned: set[tuple[int, int]] = set()
        notes: set[str] = set()
        shown = 0
        budget = _Budget(PREPASS_MEMORY)
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            loaded = pool.map(lambda spec: _attempt(budget.run, probe_cost(spec), probe_input, self.job, spec), specs)
            for spec, (probe, error) in zip(specs, loaded, strict=True):
                if self.failed_fast.is_set() or self.stop.is_set():  # still one record per input
                    self.records.emit(spec, "failed", [], 0.0, "not decoded: the run stopped early")
                    continue
                if probe is not None:
                    for warning in probe.warnings:
                        shown += 1
                        if shown <= self.SHOWN_WARNINGS:
                            self.job.warn(warning)
                        elif shown == self.SHOWN_WARNINGS + 1:
                            self.job.warn("further warnings about inputs go to the records only")
                    if probe.note and probe.note not in notes:
                        notes.add(probe.note)
                        self.job.note(probe.note)
                if error is None:
                    error = _attempt(self._plan_input, spec, probe, claimed, warned)[1]
                if error is not None:
                    self.fail(spec, error, probe.warnings if probe is not None else None)

    def _plan_input(self, spec: InputSpec, probe: Probe, claimed: dict[str, InputSpec],
                    warned: set[tuple[int, int]]) -> None:
        job = self.job
        claimed_as = self.claimed_as
        sigmas = probe.sigmas
        outputs = [safe_output_path(job.out, name, str(spec.path))  # σ by σ: outputs[k * count + i]
                   for name in output_names(spec, probe.count, job.template, sigmas)]
        for out in (f for o in outputs for f in self.files_of(o)):
            self._check_name_length(spec, out)
            identity = self.output_identity(out)
            if identity in claimed:
                other, first = claimed[identity], claimed_as[identity]
                whose = "the same input listed again with other settings" if other.path == spec.path else other.path
                how = "" if first == out else f" (as {first}, the same file by another spelling)"
                raise InputError(f"{spec.path} and {whose} would both write {out}{how}; change --name "
                                 "(e.g. '{dir}/{name}.png') or the manifest's output")
            if out.resolve() == spec.path.resolve():
                raise InputError(f"{spec.path}: the output would overwrite its own input; choose another --out")
            if out.exists() and not out.is_file():
                raise InputError(f"{spec.path}: the output {out} exists and is not a file")
            claimed[identity], claimed_as[identity] = spec, out
        _check_size(job, spec, probe.shape[1:], warned)
        if not spec.is_image:  # an image's σ is already in the student's frame (checked by _sigmas)
            try:
                training_sigma(sigmas[0], job.entry.latent.sigma_frame)  # validates the range now, not mid-run
            except ValueError as e:
                raise InputError(f"{spec.path}: {e}") from None
        per_output = [s for s in sigmas for _ in range(probe.count)]
        todo = [j for j, p in enumerate(outputs) if job.overwrite or not all(f.exists() for f in self.files_of(p))]
        if not todo:
            self.records.emit(spec, "skipped", outputs, 0.0, None, probe.warnings, per_output)
            return
        self.needs_vae |= probe.needs_vae
        self.states[spec] = InputState(spec, outputs, len(todo), time.time(), warnings=probe.warnings,
                                       sigmas=per_output)
        # image i of the input at every σ: its own seed (seed + i), the same for each σ, as upstream re-seeds
        self.items += [Item(spec, j % probe.count, probe.shape, outputs[j], per_output[j], job.seed + j % probe.count,
                            plan=probe.plan, provenance=probe.provenance) for j in todo]

    def output_identity(self, out: Path) -> str:
        """Which file `out` really is: symlinks and `..` resolved, and case folded where the output folder's file
        system ignores case (A.png and a.png are one file there)."""
        identity = os.path.realpath(out)
        if self.case_insensitive is None:
            self.case_insensitive = ignores_case(self.job.out)
        return identity.casefold() if self.case_insensitive else identity

    def _check_name_length(self, spec: InputSpec, out: Path) -> None:
        """Each part of an output's name must fit the file system, checked before any decoding is spent on it."""
        if self.name_max is None:
            try:
                self.name_max = os.pathconf(self.job.out, "PC_NAME_MAX")
            except (OSError, ValueError, AttributeError):
                self.name_max = 255
        for part in out.relative_to(self.job.out).parts:
            if len(os.fsencode(part)) > self.name_max:
                raise InputError(f"{spec.path}: the output name {part[:60]!r}… is {len(os.fsencode(part))} bytes, more "
                                 f"than the {self.name_max} this file system allows; shorten it with --name")

    def files_of(self, output: Path) -> list[Path]:
        """Every file one item writes: its PNG, plus NAME.vae.png and NAME.compare.png with --compare."""
        return [output, *baseline_paths(output)] if self.job.compare else [output]

    # -- prompts: resolved per input, embedded once per unique prompt, Gemma freed after --

    def choose_prompts(self) -> None:
        """Each input's caption (nothing is fetched or embedded yet); an input whose own prompt cannot be read,
        or is missing from --prompt-embeds, fails alone."""
        from pid_cli.prompts import resolve_prompts
        from pid_cli.text import load_prompt_embeds

        job = self.job
        specs = list(dict.fromkeys(item.spec for item in self.items))
        unreadable: dict[InputSpec, str] = {}  # a sidecar that cannot be read fails its own input only
        if job.prompt is not None:
            chosen = {spec: job.prompt for spec in specs}
        else:
            errors: dict[Path, str] = {}
            resolved = resolve_prompts([s.path for s in specs], prompt_file=job.prompt_file, errors=errors)
            chosen = {s: s.prompt if s.prompt is not None else r.text for s, r in zip(specs, resolved, strict=True)}
            unreadable = {s: errors[s.path] for s in specs if s.path in errors}
            if job.prompt_embeds is not None:
                table = load_prompt_embeds(job.prompt_embeds, job.entry.net_config["txt_max_length"])
                if len(table) == 1 and job.prompt_file is None:  # a file made for one prompt serves inputs
                    only = next(iter(table))                     # that name none
                    chosen = {s: (only if t == "" else t) for s, t in chosen.items()}
                for spec, text in chosen.items():  # an input's own prompt the file lacks fails that input only
                    if text not in table and spec not in unreadable:
                        unreadable[spec] = (f"{spec.path}: {job.prompt_embeds} has no embedding for its prompt "
                                            f"{text[:80]!r}; re-run `pid embed` with it")
        for spec, error in unreadable.items():
            state = self.states.pop(spec)
            self.fail(state.spec, error, state.warnings)
        self.items = [item for item in self.items if item.spec not in unreadable]
        for item in self.items:
            item.prompt = chosen[item.spec]

    def fetch_files(self) -> None:
        need_vae = self.needs_vae or self.baselines or any(item.plan is not None for item in self.items)
        self.vae_path = fetch_run_files(self.job, need_vae)

    def embed_prompts(self) -> None:
        job = self.job
        unique = list(dict.fromkeys(item.prompt for item in self.items))
        if not unique:
            return
        from pid_cli.text import embed_prompts

        embeds = embed_prompts(unique, prompt_embeds=job.prompt_embeds, text_encoder=job.text_encoder,
                               device=job.devices[0], model_max_length=job.entry.net_config["txt_max_length"])
        self.text = dict(zip(unique, embeds.unbind(0), strict=True))

    def batchnorm_stats(self) -> tuple[Tensor, Tensor]:
        """FLUX.2's VAE batch-norm statistics, read once from the VAE file `fetch_files` found."""
        if self.bn_stats is None:
            from pid_cli.vae.flux2 import flux2_bn_stats

            if self.vae_path is None:
                raise LatentError(f"{self.job.entry.id}: normalising a raw latent needs the VAE file, which was "
                                  "not resolved")
            self.bn_stats = flux2_bn_stats(self.vae_path)
        return self.bn_stats

    # -- decoding: a feeder thread loads batches, a worker decodes them, a pool writes PNGs --

    def decode_all(self) -> None:
        job = self.job
        if not self.items:
            return
        scale = job.entry.latent.vae_factor * job.entry.sr_scale
        decoder = _load_decoder(job, compile_for(job, self.items, scale))
        try:
            self._decode_on(decoder, scale)
        finally:
            decoder.close()  # a split decoder's helper processes

    def _decode_on(self, decoder: Decoder, scale: int) -> None:
        job = self.job

        def batch_size(shape: tuple[int, int, int]) -> int:
            return job.batch_size or auto_batch_size(decoder.device, shape, scale)

        batches = plan_batches(self.items, batch_size, pad=decoder.compiled)
        ready: queue.Queue = queue.Queue(maxsize=2)
        progress = _Progress(len(self.items), job.quiet, self.report)

        def halted() -> bool:
            return self.stop.is_set() or self.failed_fast.is_set()

        def feeder() -> None:
            cache: dict[Path, Tensor] = {}
            for batch, runs_as in batches:
                if halted():
                    break
                loaded, failed = self._load_batch(batch, cache)
                ready.put((loaded, runs_as, [src for _, src in loaded], [i.sigma for i, _ in loaded], failed))
                keep = {item.spec.path for item in batch}
                for path in [p for p in cache if p not in keep]:
                    del cache[path]
            ready.put(None)

        n_writers = max(2, min(8, os.cpu_count() or 2))
        # Images waiting for a writer hold host memory (pinned pixels; with baselines, float images of ~150 MB at
        # 4K): bound how many, so a slow disk holds the decode back instead of filling RAM.
        slots = threading.BoundedSemaphore(2 * n_writers)
        with ThreadPoolExecutor(max_workers=n_writers) as writers:
            written: list[Future] = []

            def worker() -> None:
                codec = _DeviceCodec(job, decoder.device, self.vae_path)
                while (task := ready.get()) is not None:
                    loaded, runs_as, sources, sigmas, failed = task
                    batch = [item for item, _ in loaded]
                    for item, error in failed:  # an input that vanished or changed since the prepass fails alone
                        self.finish(item, error, progress)
                    if halted() or not batch:
                        for item in batch:
                            self.finish(item, "interrupted", progress)
                        continue
                    for sub, images in self._decode_with_retry(decoder, codec, batch, sources, sigmas, runs_as):
                        for item, pixels in zip(sub, images, strict=True):
                            if isinstance(pixels, str):
                                self.finish(item, pixels, progress)
                            else:
                                slots.acquire()
                                written.append(writers.submit(self._write, item, pixels, progress, slots))

            threading.Thread(target=feeder, daemon=True).start()
            decoding = threading.Thread(target=worker)  # the main thread stays free for signals
            decoding.start()
            decoding.join()
            for f in written:
                f.result()
        progress.close()

    @property
    def baselines(self) -> bool:
        """Whether items are also decoded by the VAE (for --compare or --color-fix)."""
        return self.job.compare or self.job.color_fix != "none"

    def _load_batch(self, batch: list[Item], cache: dict[Path, Tensor | str]
                    ) -> tuple[list[tuple[Item, Tensor]], list[tuple[Item, str]]]:
        """Per item: its latent [C, h, w] as given, or its preprocessed image [3, H, W]. An item whose file cannot
        be read now, or no longer has the shape the prepass saw, is returned with its error instead: only it fails,
        not the others of its batch."""
        loaded, failed = [], []
        for item in batch:
            if item.spec.path not in cache:
                try:
                    cache[item.spec.path] = load_source(self.job, item, self.batchnorm_stats)
                except Exception as e:
                    message = str(e) if str(item.spec.path) in str(e) else f"{item.spec.path}: {type(e).__name__}: {e}"
                    cache[item.spec.path] = f"{message} (read again for decoding)"
            source = cache[item.spec.path]
            if isinstance(source, str):
                failed.append((item, source))
            elif item.index >= len(source) or not self._as_planned(item, source[item.index]):
                got = list(source[item.index].shape) if item.index < len(source) else f"{len(source)} item(s)"
                failed.append((item, f"{item.spec.path}: changed since the run began (now {got}); nothing was "
                                     "decoded from it"))
            else:
                loaded.append((item, source[item.index]))
        return loaded, failed

    def _as_planned(self, item: Item, source: Tensor) -> bool:
        """The prepass planned a latent [C, h, w] or an image of plan.height x plan.width."""
        if item.plan is not None:
            return tuple(source.shape[-2:]) == (item.plan.height, item.plan.width)
        return tuple(source.shape) == item.shape

    def _decode_with_retry(self, decoder: Decoder, codec: _DeviceCodec, batch: list[Item], sources: list[Tensor],
                           sigmas: list[float], runs_as: int) -> Iterator[tuple[list[Item], list]]:
        """Decode a batch as one of `runs_as` images (plan_batches); on out-of-memory retry a padded batch
        unpadded, then split it in halves down to single images."""
        try:
            results = self._decode_batch(decoder, codec, batch, sources, sigmas, runs_as)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            if runs_as > len(batch):
                yield from self._decode_with_retry(decoder, codec, batch, sources, sigmas, len(batch))
                return
            if len(batch) == 1:
                yield batch, [f"{batch[0].spec.path}: out of GPU memory even at batch size 1"]
                return
            half = len(batch) // 2
            for part in (slice(None, half), slice(half, None)):
                yield from self._decode_with_retry(decoder, codec, batch[part], sources[part], sigmas[part],
                                                   len(batch[part]))
            return
        except Exception as e:  # one bad batch must not end a farm run
            yield batch, [f"{item.spec.path}: decode failed ({type(e).__name__}: {e})" for item in batch]
            return
        yield batch, results

    def _decode_batch(self, decoder: Decoder, codec: _DeviceCodec, batch: list[Item], sources: list[Tensor],
                      sigmas: list[float], runs_as: int) -> list:
        """Encode the batch's images, decode everything with PiD and, for baselines, with the VAE too.

        Returns per item a `_Pending` image (its pixels still on their way from the GPU) or a `Baseline`, for
        the writer to finish.
        """
        job = self.job
        latents = self._latents(decoder, codec, batch, sources)  # [B, C, h, w], normalised, as given (noised)
        frame = [(z, s) if item.plan is not None else to_training_frame(z, s, job.entry.latent.sigma_frame)
                 for item, z, s in zip(batch, latents, sigmas, strict=True)]
        text = torch.stack([self.text[item.prompt] for item in batch])
        images = decoder.decode_tensor(torch.stack([z for z, _ in frame]), text, [s for _, s in frame],
                                       [i.seed for i in batch], job.steps, pad_to=runs_as)  # [B, 3, H, W], [-1, 1]
        runtime = f"{decoder.runtime}, batch {runs_as}"  # another batch size may move a pixel by a level (README)
        for item in batch:
            item.runtime = runtime
        if not self.baselines:
            pixels = HostPixels(images, job.bit_depth)  # no wait for the GPU: the next batch queues behind
            return [_Pending(pixels, i) for i in range(len(batch))]
        blank = _non_finite(batch, images)  # NaN/Inf would be written as a black PNG: fail those items instead
        vae = codec.get().decode(latents).cpu()  # [B, 3, H/sr, W/sr]: the backbone's own decode of each latent
        images = images.float().cpu()
        return _mask([Baseline(pid, ref, src.float() if item.plan is not None else None)
                      for item, pid, ref, src in zip(batch, images, vae, sources, strict=True)], blank)

    def _latents(self, decoder: Decoder, codec: _DeviceCodec, batch: list[Item], sources: list[Tensor]) -> Tensor:
        """[B, C, h, w] float32 on the decoder's device. Image items are VAE-encoded here, on the worker's
        device, each image once however many of its σ the batch holds, then noised to their σ as upstream's image
        path does (`noise_clean_latent`, ε from a generator of the item's seed, made anew for each σ) and rounded to
        bf16, which both PiD and the --compare baseline decode."""
        latents: list[Tensor | None] = [None if item.plan is not None else src.to(decoder.device, torch.float32)
                                        for item, src in zip(batch, sources, strict=True)]
        picks = [i for i, z in enumerate(latents) if z is None]
        first = {batch[i].spec: i for i in reversed(picks)}  # one encode per image
        clean: dict[InputSpec, Tensor] = {}
        for size in dict.fromkeys(sources[i].shape for i in first.values()):  # RAE's fixed grid: several sizes
            group = [i for i in first.values() if sources[i].shape == size]
            encoded = codec.get().encode(torch.stack([sources[i] for i in group])).float()  # [n, C, h, w]
            for i, z in zip(group, encoded.to(decoder.device), strict=True):
                clean[batch[i].spec] = z
        frame = self.job.entry.latent.sigma_frame
        for i in picks:
            item = batch[i]
            generator = torch.Generator(device=decoder.device).manual_seed(item.seed)
            noised = noise_clean_latent(clean[item.spec][None], item.sigma, generator, frame)  # [1, C, h, w]
            latents[i] = noised[0].to(torch.bfloat16).float()
        return torch.stack(latents)

    def _write(self, item: Item, pixels: _Pending | Baseline, progress: _Progress,
               slot: threading.BoundedSemaphore) -> None:
        try:
            (self.write_baseline if isinstance(pixels, Baseline) else self.write)(item, pixels, progress)
        finally:
            slot.release()

    def write(self, item: Item, pending: _Pending, progress: _Progress) -> None:
        try:
            pixels = pending.batch.get(pending.index)
        except Exception as e:  # a GPU fault surfaces where the copy is awaited
            self.finish(item, f"{item.spec.path}: decode failed ({type(e).__name__}: {e})", progress)
            return
        if pixels is None:
            self.finish(item, _non_finite_error(item), progress)
            return
        try:
            text = _png_text(self.job, item) if self.job.metadata else None
            write_atomic(item.output, encode_png(pixels, text, plain=item.provenance), overwrite=self.job.overwrite,
                         root=self.job.out)
            self.finish(item, None, progress)
        except OutputExists:
            if item.output.is_file():
                self.finish(item, None, progress)  # another process wrote it: the file is complete either way
            else:
                self.finish(item, f"{item.output}: exists and is not a file", progress)
        except OSError as e:
            self.finish(item, f"{item.output}: cannot write ({e.strerror or e})", progress)
        except Exception as e:  # e.g. PNG metadata that cannot be encoded: fail this image, not the run
            self.finish(item, f"{item.output}: cannot write ({type(e).__name__}: {e})", progress)

    def write_baseline(self, item: Item, baseline: Baseline, progress: _Progress) -> None:
        """Colour-fix and write the PiD output, plus NAME.vae.png and NAME.compare.png with --compare."""
        job = self.job
        path = item.output
        try:
            out = render(baseline, job.color_fix, job.compare)
            text = _png_text(job, item) if job.metadata else None
            files = [(item.output, to_uint(out.pid[None], job.bit_depth)[0], text, item.provenance)]
            if out.vae is not None:
                vae_path, strip_path = baseline_paths(item.output)
                files.append((vae_path, to_uint(out.vae[None], job.bit_depth)[0], text and _baseline_text(
                    job, item, f"{job.entry.backbone} VAE decode, Lanczos-upscaled x{job.entry.sr_scale}"), ()))
                files.append((strip_path, to_uint(out.strip[None], 8)[0],
                              text and _baseline_text(job, item, f"side by side: {out.labels}"), ()))
            for path, pixels, meta, plain in files:
                with contextlib.suppress(OutputExists):  # written by an earlier run or another process: complete
                    write_atomic(path, encode_png(pixels, meta, plain=plain), overwrite=job.overwrite, root=job.out)
            self.finish(item, None, progress)
        except OSError as e:
            self.finish(item, f"{path}: cannot write ({e.strerror or e})", progress)
        except Exception as e:  # a failed colour fix or strip fails this item only
            self.finish(item, f"{item.spec.path}: baseline failed ({type(e).__name__}: {e})", progress)

    def finish(self, item: Item, error: str | None, progress: _Progress) -> None:
        with self.lock:
            state = self.states[item.spec]
            state.error = state.error or error
            state.pending -= 1
            done = state.pending == 0
        progress.advance()
        if done:
            failed = state.error is not None
            self.records.emit(state.spec, "failed" if failed else "ok", [] if failed else state.outputs,
                              time.time() - state.started, state.error, state.warnings, state.sigmas)
            if failed and self.job.fail_fast:
                self.failed_fast.set()

    def report_unfinished(self) -> None:
        """Inputs cut short by an interrupt or --fail-fast still get their record."""
        for state in self.states.values():
            if state.pending > 0:
                self.records.emit(state.spec, "failed", [], time.time() - state.started,
                                  "not decoded: the run stopped early", state.warnings)


def _attempt(fn: Callable[..., Any], *args: Any) -> tuple[Any, str | None]:
    """(result, None), or (None, message) for the errors a bad input file can cause."""
    try:
        return fn(*args), None
    except (LatentError, InputError, ValueError, OSError, RuntimeError) as e:
        return None, str(e)
    except (ArithmeticError, MemoryError, RecursionError) as e:  # what else a hostile file can cause
        spec = next((a for a in args if isinstance(a, InputSpec)), None)
        return None, f"{spec.path if spec else 'input'}: {type(e).__name__}: {e}"


def _non_finite(batch: list[Item], images: Tensor) -> dict[int, str]:
    """Errors for the items whose decoded pixels hold NaN or Inf (an overflowing latent, a broken checkpoint)."""
    finite = finite_items(images).tolist()
    return {i: _non_finite_error(item) for i, (item, ok) in enumerate(zip(batch, finite, strict=True)) if not ok}


def _non_finite_error(item: Item) -> str:
    return (f"{item.spec.path}: the decoder produced NaN/Inf pixels{f' (item {item.index})' if item.index else ''}"
            "; nothing was written")


@dataclass(frozen=True)
class _Pending:
    """One item of a decoded batch whose pixels are still being copied off the GPU."""

    batch: HostPixels
    index: int


def _mask(results: list, errors: dict[int, str]) -> list:
    return [errors.get(i, r) for i, r in enumerate(results)]


def _sigmas(job: DecodeJob, spec: InputSpec, meta: dict[str, Any]) -> tuple[float, ...]:
    """The σ (or, for an image, the σ sweep) to decode `spec` at: manifest > --degrade-sigma > file metadata > 0.
    A stored latent was made at one σ, given in its backbone's own frame (converted when decoded); an image's σ
    noises its clean latent in the student's own frame (`noise_clean_latent`), so it must lie in [0, 1]. Errors
    name the file and where the value came from."""
    given = [(spec.degrade_sigma, "the manifest"), (_as_sigmas(job.degrade_sigma), "--degrade-sigma")]
    if not spec.is_image:
        given.append((meta.get("degrade_sigma", meta.get("sigma")), "metadata"))
    for value, where in given:
        if value is None:
            continue
        values = value if isinstance(value, tuple) else (value,)
        sigmas = []
        for v in values:
            try:
                sigma = float(v)
            except (TypeError, ValueError, OverflowError):
                sigma = math.nan
            if not 0 <= sigma < math.inf:
                raise InputError(f"{spec.path}: degrade_sigma from {where} is {str(v)[:100]!r}, expected a finite "
                                 "number >= 0")
            if spec.is_image and sigma > 1:
                raise InputError(f"{spec.path}: degrade_sigma {sigma:g} from {where} is outside [0, 1]; an image's "
                                 "clean latent is noised to x_t = (1-σ)·x0 + σ·ε (SDXL: sqrt(1-σ²)·x0 + σ·ε)")
            sigmas.append(sigma)
        if len(sigmas) > 1 and not spec.is_image:
            raise InputError(f"{spec.path}: a σ sweep ({where}: {', '.join(f'{v:g}' for v in sigmas)}) applies to "
                             "image inputs; a stored latent was made at one σ, so give it one value")
        return tuple(sigmas)
    return (0.0,)


def _as_sigmas(value: float | Sequence[float] | None) -> tuple[float, ...] | None:
    """DecodeJob.degrade_sigma as a tuple: the CLI gives one, a library caller may give a single number."""
    if value is None or isinstance(value, tuple):
        return value
    return tuple(value) if isinstance(value, Sequence) else (value,)


TARGET_LONG_SIDE = {"2k": (1536, 3072), "4k": (3072, 4608)}


def _check_size(job: DecodeJob, spec: InputSpec, latent_hw: tuple[int, int], warned: set[tuple[int, int]]) -> None:
    """An error if the output misses --target, a warning (once per size) if off the trained sizes."""
    scale = job.entry.latent.vae_factor * job.entry.sr_scale
    h, w = latent_hw[0] * scale, latent_hw[1] * scale
    if job.target is not None:
        lo, hi = TARGET_LONG_SIDE[job.target]
        if not lo <= max(h, w) < hi:
            fits = [t for t, (a, b) in TARGET_LONG_SIDE.items() if a <= max(h, w) < b]
            hint = f"use --target {fits[0]}" if fits else "no target fits this size"
            if spec.is_image and not job.fit:
                hint += f", or --fit to resize it onto a {job.target} size"
            what = "image" if spec.is_image else "latent"
            raise InputError(f"{spec.path}: this {what} decodes to {w}x{h}, not a {job.target} image; {hint} "
                             "(or name a --variant to decode it anyway)")
    if (h, w) not in warned and not in_trained_sizes(job.entry, w, h):
        warned.add((h, w))
        job.warn(f"{w}x{h} is outside the trained sizes of {job.entry.id}; expect colour artefacts "
                 f"(trained: {_describe_sizes(job.entry)})")


def in_trained_sizes(entry: Entry, w: int, h: int) -> bool:
    sizes = entry.output_sizes
    if (w, h) in sizes.buckets:
        return True
    if not sizes.levels or w % sizes.multiple_of or h % sizes.multiple_of:
        return False
    ratios = [tuple(int(v) for v in r.split(":")) for r in sizes.aspect_ratios]
    return min(sizes.levels) <= max(w, h) <= max(sizes.levels) and any(abs(w / h - a / b) < 0.03 for a, b in ratios)


def _describe_sizes(entry: Entry) -> str:
    sizes = entry.output_sizes
    if sizes.levels:
        return f"long side {min(sizes.levels)}-{max(sizes.levels)} at {', '.join(sizes.aspect_ratios)}"
    return ", ".join(f"{w}x{h}" for w, h in sizes.buckets)


def plan_batches(items: list[Item], batch_size: Callable[[tuple[int, int, int]], int],
                 pad: bool) -> list[tuple[list[Item], int]]:
    """Micro-batches of equal latent shape, in input order within each shape, of `batch_size(shape)` items, each
    with the number of images it runs as: its own, or with `pad` (a compiled decoder) `batch_size(shape)`, a short
    batch filled with copies of its last image (`Decoder.decode_tensor`'s pad_to).

    Why pad: compiled code is per shape, so a run's last, short batch would compile again where each copy costs
    one decode (~0.3 s at 2K): 9 2K images in batches of 4 took 4-22 s less with cold compile caches, 1-8 s less
    with warm ones. And compiled, an image's pixels do not depend on its place in a batch, only on the batch's
    size, so a resumed run, or one of some of the inputs, writes what the whole run would have (H200,
    BENCHMARKS.md)."""
    groups: dict[tuple[int, int, int], list[Item]] = {}
    for item in items:
        groups.setdefault(item.shape, []).append(item)
    batches = []
    for shape, group in groups.items():
        size = batch_size(shape)
        batches += [(group[i:i + size], size if pad else min(size, len(group) - i))
                    for i in range(0, len(group), size)]
    return batches


FULL_BATCH_PIXELS = 4 * 2048 * 2048  # output pixels per batch at which a GPU is full (see auto_batch_size)


def auto_batch_size(device: torch.device, shape: tuple[int, int, int], scale: int) -> int:
    """Images per batch for latents of `shape` [C, h, w]: 1 on a CPU; on a GPU as many as make FULL_BATCH_PIXELS
    output pixels (4 at 2K, 1 at 4K), fewer if free memory says so.

    Why stop there: a 2K decode fills an H200 on its own, and batching only amortises the small part of a decode
    paid once per batch. Throughput peaked at batch 4 (3.41-3.43 / 3.44 / 3.46 / 3.48 / 3.42 images/s at batch
    1 / 2 / 3 / 4 / 8, BENCHMARKS.md); a larger batch costs memory and delays the first PNG by a whole batch."""
    if device.type != "cuda":
        return 1
    pixels = shape[1] * shape[2] * scale * scale
    free, _ = torch.cuda.mem_get_info(device)
    fits = int(free * 0.8) // (pixels * 800)  # ~bytes of activations per output pixel, with margin
    return max(1, min(16, fits, round(FULL_BATCH_PIXELS / pixels)))


class _DeviceCodec:
    """The backbone VAE on one device worker's device, loaded when that worker first needs it (its first
    image to encode or baseline to decode); a VAE that fails to load fails each batch that needs it."""

    def __init__(self, job: DecodeJob, device: torch.device, weights: Path | None):
        self.job, self.device, self.weights = job, device, weights
        self.codec: LatentCodec | None = None
        self.error: ValueError | None = None

    def get(self) -> LatentCodec:
        if self.codec is None and self.error is None:
            try:
                self.codec = load_vae(self.job.entry, self.weights, self.device, self.job.dtype)
            except ValueError as e:  # VAEError: unreadable or mismatched file
                self.error = e
        if self.error is not None:
            raise self.error
        return self.codec


def load_vae(entry: Entry, weights: Path | None, device: torch.device, dtype: str | None = None) -> LatentCodec:
    """The entry's VAE as a codec that must produce exactly the latents its decoder takes.

    `vae.options.model_overrides` in the registry entry changes the shipped model config (a fine-tuned
    VAE of another width; the tests' tiny VAE). The RAE encoders (dinov2, siglip) have no VAE file: `weights`
    is unused, their encoder folder and statistics are looked up where `fetch_run_files` put them."""
    from pid_cli.vae import RAE_KINDS, VAEError, load_codec, rae_codec_for

    kind, torch_dtype = vae_kind(entry), {"bf16": torch.bfloat16, "fp32": torch.float32}.get(dtype)
    if kind in RAE_KINDS:  # an encoder folder (+ statistics), already fetched by fetch_run_files: look them up
        from pid_cli import hub

        try:
            files = hub.ensure_files(entry, decoder=False, text_encoder=False, download=False, notice=None).vae
        except hub.HubError as e:
            raise VAEError(str(e)) from None
        codec = rae_codec_for(kind, files, entry.latent.normalisation, entry.vae.options, device, torch_dtype)
        weights = files["encoder"]
        grid = entry.latent.fixed_grid
        if tuple(grid or ()) != (codec.grid, codec.grid):  # the prepass planned every image with this grid
            raise VAEError(f"{weights}: this encoder makes a {codec.grid}x{codec.grid} latent grid at its "
                           f"{codec.input_size}² input; {entry.id} decodes "
                           + (f"{grid[0]}x{grid[1]}" if grid else "no fixed grid (latent.fixed_grid)"))
    elif weights is None:
        raise VAEError(f"{entry.id}: no VAE weight file was resolved")
    else:
        overrides = entry.vae.options.get("model_overrides") if entry.vae else None
        codec = load_codec(kind, weights, device, torch_dtype, overrides=overrides)
    if (codec.channels, codec.factor) != (entry.latent.channels, entry.latent.vae_factor):
        raise VAEError(f"{weights}: this VAE makes {codec.channels}-channel latents at 1/{codec.factor} size; "
                       f"{entry.id} decodes {entry.latent.channels}-channel latents at 1/{entry.latent.vae_factor}")
    return codec


# torch.compile delays the first image by 5-11 s per output size with warm caches and ~30-35 s with cold ones, and
# saves 0.045-0.056 s per output megapixel on an H200/H100 (BENCHMARKS.md): it pays for itself after ~100-220 MP
# per GPU when warm, ~600-700 MP when cold; 400 MP is between the two
COMPILE_MIN_MEGAPIXELS = 400


def compile_for(job: DecodeJob, items: list[Item], scale: int) -> bool | None:
    """`--compile auto`: compile only when this GPU has enough output pixels to win the time back (with
    several GPUs each worker decides for its own share), so a short interactive run shows its first image
    in seconds; None leaves it to the Decoder (CPU, or a GPU without Triton: never)."""
    if job.compile != "auto":
        return job.compile == "on"
    if job.devices[0].type != "cuda" or not layers.HAS_TRITON:
        return None
    megapixels = sum(item.shape[1] * item.shape[2] for item in items) * scale * scale / 1e6
    return megapixels >= COMPILE_MIN_MEGAPIXELS


def _load_decoder(job: DecodeJob, compile: bool | None) -> Decoder:
    try:
        return Decoder(job.entry, job.weights, device=job.devices[0], dtype=job.dtype, text_encoder=job.text_encoder,
                       attention=job.attention, matmul=job.matmul, compile=compile, helper_devices=job.devices[1:])
    except TypeError as e:  # a registry net_config the network does not take: a configuration error
        raise ValueError(f"registry entry {job.entry.id} ({job.entry.source}): net_config: {e}") from e


def with_ways_out(error: Exception) -> str:
    """A missing-files error from the hub, with every way a decode can go on."""
    text = str(error)
    if "(text encoder" in text:
        text += ("\nOr decode without the text encoder: make the prompts' embeddings with `pid embed` where it "
                 "is available and pass --prompt-embeds FILE (or --text-encoder PATH to a local copy).")
    return text


def _png_text(job: DecodeJob, item: Item) -> dict[str, str]:
    """The PNG's text chunks: pid's record of how it was made and, for a ComfyUI latent, ComfyUI's own
    `prompt`/`workflow` graphs, so that dropping the PNG on ComfyUI loads the workflow that made the latent."""
    source = f"{item.spec.path}" + (f"[{item.index}]" if item.index else "")
    text = {key: value for key, value in item.provenance.items() if not key.startswith("pid:") and key != "Software"}
    text |= {"Software": f"pid {__version__}", "pid:backbone": job.entry.backbone, "pid:variant": job.entry.variant,
            "pid:checkpoint": f"{job.entry.id} ({job.weights.name})", "pid:seed": str(item.seed),
            "pid:steps": str(job.steps), "pid:degrade_sigma": f"{item.sigma:g}", "pid:prompt": item.prompt,
            "pid:source": source}
    if item.plan is not None:
        text["pid:preprocess"] = item.plan.note
    if item.runtime:
        text["pid:runtime"] = item.runtime
    if job.attention != "bf16":
        text["pid:attention"] = job.attention
    if job.matmul != "bf16":
        text["pid:matmul"] = job.matmul
    if job.color_fix != "none":
        text["pid:color_fix"] = f"{job.color_fix} (reference: {job.entry.backbone} VAE decode)"
    return text


def _baseline_text(job: DecodeJob, item: Item, what: str) -> dict[str, str]:
    source = f"{item.spec.path}" + (f"[{item.index}]" if item.index else "")
    return {"Software": f"pid {__version__}", "pid:baseline": what, "pid:pid_output": item.output.name,
            "pid:source": source}


# ---------------------------------------------------------------------------------------
# Progress and signals


class _Progress:
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


def _install_signal_handlers(stop: threading.Event, signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM),
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


def _restore_signal_handlers(previous: dict) -> None:
    for sig, old in previous.items():
        signal.signal(sig, old)
