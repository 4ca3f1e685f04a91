"""A `pid decode` run as data (`DecodeJob`), its exit codes, and the checks made before any input is read
deeply or any file is fetched."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pid_cli.colorfix import METHODS as COLOR_FIX_METHODS
from pid_cli.devices import resolve_device
from pid_cli.inputs.collection import (
    DEFAULT_TEMPLATE,
    IMAGE_SUFFIXES,
    InputError,
    InputSpec,
    check_template,
    collect_inputs,
    take_shard,
)
from pid_cli.inputs.latent_files import (
    LATENT_SUFFIXES,
)
from pid_cli.outputs import check_writable
from pid_cli.pipeline import CHECK_PSNR_DB
from pid_cli.registry import Entry
from pid_cli.split import check_split

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130




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
    check_psnr: float | None = CHECK_PSNR_DB  # 8-bit modes: the threshold of pipeline.Decoder's check; None: off
    compile: str = "auto"  # on, off, or auto: only when the run is long enough to win back compilation
    bit_depth: int = 8
    metadata: bool = True
    overwrite: bool = False
    fail_fast: bool = False
    recursive: bool = False
    latent_format: str = "auto"
    key: str | None = None
    latent_size: tuple[int, int] | None = None
    degrade_sigma: tuple[float, ...] | float | None = None  # one σ or an image's sweep; a number → (number,)
    target: str | None = None
    prompt: str | None = None
    prompt_file: Path | None = None
    prompt_embeds: Path | None = None
    text_encoder: Path | None = None
    shard: tuple[int, int] | None = None
    manifest_out: Path | None = None
    json_stdout: bool = False
    quiet: bool = False
    fit: bool = False  # image inputs: resize onto a trained output size (inputs/image_plan.py)
    compare: bool = False  # also write NAME.vae.png and NAME.compare.png (baselines.py)
    color_fix: str = "none"  # colorfix.METHODS
    warn: Callable[[str], None] = _warn  # module-level functions: jobs are pickled to worker processes
    note: Callable[[str], None] = _note

    def __post_init__(self) -> None:
        if self.degrade_sigma is not None and not isinstance(self.degrade_sigma, tuple):  # a library caller's σ
            values = self.degrade_sigma if isinstance(self.degrade_sigma, Sequence) else (self.degrade_sigma,)
            self.degrade_sigma = tuple(float(v) for v in values)


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


def fetch_run_files(job: DecodeJob, need_vae: bool) -> dict[str, Path]:
    """Every file the decode needs, fetched (or found on disk) in one step: the decoder unless `job.weights`
    names it, the VAE when `need_vae` (images, baselines, raw FLUX.2 latents), Gemma unless the prompts come
    from elsewhere. Files that are missing and cannot be fetched are all named in one error, with the ways
    out. Sets `job.weights` and `job.text_encoder`; returns the VAE's files by role when asked for."""
    from pid_cli import hub

    need_text = job.prompt_embeds is None and job.text_encoder is None and not os.environ.get("PID_TEXT_ENCODER")
    if job.weights is not None and not need_vae and not need_text:
        return {}
    try:
        files = hub.ensure_files(job.entry, decoder=job.weights is None, vae=need_vae, text_encoder=need_text)
    except hub.MissingFilesError as e:
        raise hub.HubError(with_ways_out(e)) from e
    job.weights = job.weights or files.weights
    if need_text:  # Gemma's snapshot: its config keys the embedding cache, so it is wanted even when all hit
        job.text_encoder = files.text_encoder
    return dict(files.vae) if need_vae else {}


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
        from pid_cli.vae import entry_kind  # pid_cli.vae imports diffusers (seconds): only runs that need it

        try:
            entry_kind(job.entry, decoder=True)
        except ValueError as e:
            raise InputError(f"{flag} needs the {job.entry.backbone} VAE decoder: {e}") from None


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


def with_ways_out(error: Exception) -> str:
    """A missing-files error from the hub, with every way a decode can go on."""
    text = str(error)
    if "(text encoder" in text:
        text += ("\nOr decode without the text encoder: make the prompts' embeddings with `pid embed` where it "
                 "is available and pass --prompt-embeds FILE (or --text-encoder PATH to a local copy).")
    return text
