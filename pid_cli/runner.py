"""The batch engine behind `pid decode`: inputs → prepass → prompts → batched decode → PNGs.

Farm-safe by construction: every input gets exactly one JSONL record; outputs appear
atomically; existing outputs are skipped so a rerun resumes; a per-file error fails that file
only; SIGINT/SIGTERM finish the images in flight and stop (exit 130).
"""

from __future__ import annotations

import json
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch
from torch import Tensor

from pid_cli import __version__
from pid_cli.inputs import (
    DEFAULT_TEMPLATE,
    InputError,
    InputSpec,
    check_template,
    collect_inputs,
    output_names,
    safe_output_path,
    take_shard,
)
from pid_cli.latents import LatentError, read_latent_file, to_pid_latent, to_training_frame, training_sigma
from pid_cli.outputs import OutputExists, check_writable, clean_partials, encode_png, write_atomic
from pid_cli.pipeline import Decoder, resolve_device, to_uint
from pid_cli.registry import Entry

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


@dataclass
class DecodeJob:
    """Everything a `pid decode` run needs (the CLI's options, validated)."""

    inputs: list[str]
    out: Path
    entry: Entry
    weights: Path
    template: str = DEFAULT_TEMPLATE
    batch_size: int | None = None  # None: as many as fit in free GPU memory
    devices: list[torch.device] = field(default_factory=lambda: [resolve_device(None)])
    seed: int = 0
    steps: int = 4
    dtype: str | None = None
    bit_depth: int = 8
    metadata: bool = True
    overwrite: bool = False
    fail_fast: bool = False
    recursive: bool = False
    latent_format: str = "auto"
    key: str | None = None
    latent_size: tuple[int, int] | None = None
    degrade_sigma: float | None = None
    target: str | None = None
    prompt: str | None = None
    prompt_file: Path | None = None
    prompt_embeds: Path | None = None
    text_encoder: Path | None = None
    shard: tuple[int, int] | None = None
    manifest_out: Path | None = None
    json_stdout: bool = False
    quiet: bool = False
    bn_stats: Callable[[], tuple[Tensor, Tensor]] | None = None  # FLUX.2 VAE statistics, loaded on demand
    warn: Callable[[str], None] = lambda msg: print(f"warning: {msg}", file=sys.stderr)


@dataclass
class Item:
    """One image to make: item `index` of input `spec`."""

    spec: InputSpec
    index: int
    shape: tuple[int, int, int]  # latent [C, h, w]
    output: Path
    sigma: float  # as given (the backbone's own frame); converted when the batch is loaded
    seed: int
    prompt: str = ""


@dataclass
class InputState:
    """Progress of one input across its images; its record is written when `pending` hits 0."""

    spec: InputSpec
    outputs: list[Path]
    pending: int
    started: float
    error: str | None = None


class Records:
    """One JSONL record per input, to --manifest-out and/or stdout, written as each finishes."""

    def __init__(self, manifest_out: Path | None, stdout: TextIO | None):
        self.lock = threading.Lock()
        self.file = open(manifest_out, "a", encoding="utf-8") if manifest_out else None  # noqa: SIM115
        self.stdout = stdout
        self.counts = {"ok": 0, "skipped": 0, "failed": 0}

    def emit(self, spec: InputSpec, status: str, outputs: list[Path], seconds: float, error: str | None) -> None:
        line = json.dumps({"input": str(spec.path), "status": status, "outputs": [str(p) for p in outputs],
                           "seconds": round(seconds, 3), "error": error}, ensure_ascii=False)
        with self.lock:
            self.counts[status] += 1
            for f in (self.file, self.stdout):
                if f is not None:
                    f.write(line + "\n")
                    f.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def run(job: DecodeJob) -> int:
    """Decode everything `job` names; returns the process exit code."""
    check_template(job.template)
    check_writable(job.out)  # before any GPU work
    clean_partials(job.out)
    specs = collect_inputs(job.inputs, recursive=job.recursive, allow_images=False)
    if job.shard is not None:
        specs = take_shard(specs, *job.shard)
    records = Records(job.manifest_out, sys.stdout if job.json_stdout else None)
    stop = threading.Event()
    previous = _install_signal_handlers(stop)
    try:
        session = _Session(job, records, stop)
        session.prepass(specs)
        if session.items and not stop.is_set():
            session.embed_prompts()
            session.decode_all()
        session.report_unfinished()
    finally:
        _restore_signal_handlers(previous)
        records.close()
    if stop.is_set():
        return EXIT_INTERRUPTED
    return EXIT_FAILED if records.counts["failed"] else EXIT_OK


def load_latent(job: DecodeJob, spec: InputSpec) -> tuple[Tensor, dict[str, Any]]:
    """The PiD latent [B, C, h, w] of one input file and the file's metadata."""
    file = read_latent_file(spec.path, job.key)
    latent = to_pid_latent(file, job.entry.latent, job.entry.backbone, job.latent_format, job.latent_size,
                           job.bn_stats)
    return latent, file.metadata


class _Session:
    """The state of one run: items to decode, per-input progress, prompt embeddings."""

    def __init__(self, job: DecodeJob, records: Records, stop: threading.Event):
        self.job, self.records, self.stop = job, records, stop
        self.items: list[Item] = []
        self.states: dict[Path, InputState] = {}
        self.text: dict[str, Tensor] = {}
        self.lock = threading.Lock()
        self.failed_fast = threading.Event()

    def fail(self, spec: InputSpec, error: str) -> None:
        self.records.emit(spec, "failed", [], 0.0, error)
        if self.job.fail_fast:
            self.failed_fast.set()

    # -- prepass: read and validate every input, name its outputs, skip finished ones ----

    def prepass(self, specs: list[InputSpec]) -> None:
        claimed: dict[Path, InputSpec] = {}
        warned: set[tuple[int, int]] = set()
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            loaded = pool.map(lambda spec: _attempt(load_latent, self.job, spec), specs)
            for spec, (result, error) in zip(specs, loaded, strict=True):
                if self.failed_fast.is_set() or self.stop.is_set():
                    break
                if error is None:
                    error = _attempt(self._plan_input, spec, *result, claimed, warned)[1]
                if error is not None:
                    self.fail(spec, error)

    def _plan_input(self, spec: InputSpec, latent: Tensor, meta: dict[str, Any], claimed: dict[Path, InputSpec],
                    warned: set[tuple[int, int]]) -> None:
        job = self.job
        outputs = [safe_output_path(job.out, name, str(spec.path))
                   for name in output_names(spec, latent.shape[0], job.template)]
        for out in outputs:
            if out in claimed:
                raise InputError(f"{spec.path} and {claimed[out].path} would both write {out}; "
                                 "change --name (e.g. '{dir}/{name}.png')")
            claimed[out] = spec
        _check_size(job, spec, (latent.shape[-2], latent.shape[-1]), warned)
        sigma = _sigma(job, spec, meta)
        training_sigma(sigma, job.entry.latent.sigma_frame)  # validates the range now, not mid-run
        todo = [i for i, p in enumerate(outputs) if job.overwrite or not p.exists()]
        if not todo:
            self.records.emit(spec, "skipped", outputs, 0.0, None)
            return
        self.states[spec.path] = InputState(spec, outputs, len(todo), time.time())
        shape = (latent.shape[1], latent.shape[2], latent.shape[3])
        self.items += [Item(spec, i, shape, outputs[i], sigma, job.seed + i, _meta_prompt(meta)) for i in todo]

    # -- prompts: resolved per input, embedded once per unique prompt, Gemma freed after --

    def embed_prompts(self) -> None:
        from pid_cli.prompts import resolve_prompts
        from pid_cli.text import embed_prompts, load_prompt_embeds

        job = self.job
        specs = list({item.spec.path: item.spec for item in self.items}.values())
        if job.prompt is not None:
            chosen = {spec.path: job.prompt for spec in specs}
        else:
            resolved = resolve_prompts([s.path for s in specs], prompt_file=job.prompt_file)
            chosen = {s.path: s.prompt if s.prompt is not None else r.text
                      for s, r in zip(specs, resolved, strict=True)}
            if job.prompt_embeds is not None and job.prompt_file is None:
                table = load_prompt_embeds(job.prompt_embeds, job.entry.net_config["txt_max_length"])
                if len(table) == 1:  # a file made for one prompt serves inputs that name none
                    only = next(iter(table))
                    chosen = {p: (only if t == "" else t) for p, t in chosen.items()}
        for item in self.items:
            item.prompt = chosen[item.spec.path]
        unique = list(dict.fromkeys(item.prompt for item in self.items))
        if job.prompt_embeds is None and job.text_encoder is None and not os.environ.get("PID_TEXT_ENCODER"):
            from pid_cli import hub  # first use: fetch Gemma's snapshot (its config keys the embedding cache)

            job.text_encoder = hub.ensure_files(job.entry, vae=False, text_encoder=True).text_encoder
        embeds = embed_prompts(unique, prompt_embeds=job.prompt_embeds, text_encoder=job.text_encoder,
                               device=job.devices[0], model_max_length=job.entry.net_config["txt_max_length"])
        self.text = dict(zip(unique, embeds.unbind(0), strict=True))

    # -- decoding: a feeder thread loads batches, one worker per device, a pool writes PNGs --

    def decode_all(self) -> None:
        job = self.job
        decoders = _load_decoders(job)
        scale = job.entry.latent.vae_factor * job.entry.sr_scale
        batch_size = job.batch_size or min(auto_batch_size(d.device, self.items[0].shape, scale) for d in decoders)
        batches = plan_batches(self.items, batch_size)
        ready: queue.Queue = queue.Queue(maxsize=2 * len(decoders))
        progress = _Progress(len(self.items), job.quiet)

        def halted() -> bool:
            return self.stop.is_set() or self.failed_fast.is_set()

        def feeder() -> None:
            cache: dict[Path, Tensor] = {}
            for batch in batches:
                if halted():
                    break
                try:
                    ready.put((batch, *self._load_batch(batch, cache), None))
                except Exception as e:
                    ready.put((batch, None, None, f"{type(e).__name__}: {e}"))
                keep = {item.spec.path for item in batch}
                for path in [p for p in cache if p not in keep]:
                    del cache[path]
            for _ in decoders:
                ready.put(None)

        with ThreadPoolExecutor(max_workers=max(2, min(8, os.cpu_count() or 2))) as writers:
            written: list[Future] = []

            def worker(decoder: Decoder) -> None:
                while (task := ready.get()) is not None:
                    batch, latents, sigmas, error = task
                    if error is not None or halted():
                        for item in batch:
                            self.finish(item, error or "interrupted", progress)
                        continue
                    for sub, images in self._decode_with_retry(decoder, batch, latents, sigmas):
                        for item, pixels in zip(sub, images, strict=True):
                            if isinstance(pixels, str):
                                self.finish(item, pixels, progress)
                            else:
                                written.append(writers.submit(self.write, item, pixels, progress))

            threading.Thread(target=feeder, daemon=True).start()
            threads = [threading.Thread(target=worker, args=(d,)) for d in decoders]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            for f in written:
                f.result()
        progress.close()

    def _load_batch(self, batch: list[Item], cache: dict[Path, Tensor]) -> tuple[Tensor, list[float]]:
        latents, sigmas = [], []
        for item in batch:
            if item.spec.path not in cache:
                cache[item.spec.path] = load_latent(self.job, item.spec)[0]
            latent, sigma = to_training_frame(cache[item.spec.path][item.index], item.sigma,
                                              self.job.entry.latent.sigma_frame)
            latents.append(latent)
            sigmas.append(sigma)
        return torch.stack(latents), sigmas

    def _decode_with_retry(self, decoder: Decoder, batch: list[Item], latents: Tensor,
                           sigmas: list[float]) -> Iterator[tuple[list[Item], list]]:
        """Decode a batch; on out-of-memory split it in halves down to single images."""
        try:
            text = torch.stack([self.text[item.prompt] for item in batch])
            images = decoder.decode_tensor(latents, text, sigmas, [i.seed for i in batch], self.job.steps)
            yield batch, list(to_uint(images, self.job.bit_depth))
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            if len(batch) == 1:
                yield batch, [f"{batch[0].spec.path}: out of GPU memory even at batch size 1"]
                return
            half = len(batch) // 2
            yield from self._decode_with_retry(decoder, batch[:half], latents[:half], sigmas[:half])
            yield from self._decode_with_retry(decoder, batch[half:], latents[half:], sigmas[half:])
        except Exception as e:  # one bad batch must not end a farm run
            yield batch, [f"{item.spec.path}: decode failed ({type(e).__name__}: {e})" for item in batch]

    def write(self, item: Item, pixels, progress: _Progress) -> None:
        try:
            text = _png_text(self.job, item) if self.job.metadata else None
            write_atomic(item.output, encode_png(pixels, text), overwrite=self.job.overwrite)
            self.finish(item, None, progress)
        except OutputExists:
            self.finish(item, None, progress)  # another process wrote it: the file is complete either way
        except OSError as e:
            self.finish(item, f"{item.output}: cannot write ({e.strerror or e})", progress)

    def finish(self, item: Item, error: str | None, progress: _Progress) -> None:
        with self.lock:
            state = self.states[item.spec.path]
            state.error = state.error or error
            state.pending -= 1
            done = state.pending == 0
        progress.advance()
        if done:
            failed = state.error is not None
            self.records.emit(state.spec, "failed" if failed else "ok", [] if failed else state.outputs,
                              time.time() - state.started, state.error)
            if failed and self.job.fail_fast:
                self.failed_fast.set()

    def report_unfinished(self) -> None:
        """Inputs cut short by an interrupt or --fail-fast still get their record."""
        for state in self.states.values():
            if state.pending > 0:
                self.records.emit(state.spec, "failed", [], time.time() - state.started,
                                  "not decoded: the run stopped early")


def _attempt(fn: Callable[..., Any], *args: Any) -> tuple[Any, str | None]:
    """(result, None), or (None, message) for the errors a bad input file can cause."""
    try:
        return fn(*args), None
    except (LatentError, InputError, ValueError, OSError, RuntimeError) as e:
        return None, str(e)


def _meta_prompt(meta: dict[str, Any]) -> str:
    value = meta.get("prompt")
    return value if isinstance(value, str) else ""


def _sigma(job: DecodeJob, spec: InputSpec, meta: dict[str, Any]) -> float:
    """Manifest > --degrade-sigma > file metadata > 0 (a clean latent)."""
    for value, where in ((spec.degrade_sigma, "manifest"), (job.degrade_sigma, "--degrade-sigma"),
                         (meta.get("degrade_sigma", meta.get("sigma")), "metadata")):
        if value is None:
            continue
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{spec.path}: degrade_sigma from {where} is {value!r}, expected a number") from None
    return 0.0


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
            raise InputError(f"{spec.path}: this latent decodes to {w}x{h}, not a {job.target} image; {hint} "
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


def plan_batches(items: list[Item], batch_size: int) -> list[list[Item]]:
    """Micro-batches of equal latent shape, in input order within each shape."""
    groups: dict[tuple[int, int, int], list[Item]] = {}
    for item in items:
        groups.setdefault(item.shape, []).append(item)
    return [group[i:i + batch_size] for group in groups.values() for i in range(0, len(group), batch_size)]


def auto_batch_size(device: torch.device, shape: tuple[int, int, int], scale: int) -> int:
    """Images per batch that fit in the free memory of `device` (1 on CPU)."""
    if device.type != "cuda":
        return 1
    free, _ = torch.cuda.mem_get_info(device)
    per_image = shape[1] * shape[2] * scale * scale * 800  # ~bytes of activations per output pixel, with margin
    return max(1, min(16, int(free * 0.8) // per_image))


def _load_decoders(job: DecodeJob) -> list[Decoder]:
    with ThreadPoolExecutor(max_workers=len(job.devices)) as pool:
        return list(pool.map(lambda d: Decoder(job.entry, job.weights, device=d, dtype=job.dtype,
                                               text_encoder=job.text_encoder), job.devices))


def _png_text(job: DecodeJob, item: Item) -> dict[str, str]:
    source = f"{item.spec.path}" + (f"[{item.index}]" if item.index else "")
    return {"Software": f"pid {__version__}", "pid:backbone": job.entry.backbone, "pid:variant": job.entry.variant,
            "pid:checkpoint": f"{job.entry.id} ({job.weights.name})", "pid:seed": str(item.seed),
            "pid:steps": str(job.steps), "pid:degrade_sigma": f"{item.sigma:g}", "pid:prompt": item.prompt,
            "pid:source": source}


# ---------------------------------------------------------------------------------------
# Progress and signals


class _Progress:
    """images/s and ETA on stderr; silent when not a terminal or with --quiet."""

    def __init__(self, total: int, quiet: bool):
        self.bar = None
        if not quiet and sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("decoding"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[rate]}"), TimeRemainingColumn(),
                                console=Console(stderr=True))
            self.started = time.time()
            self.task = self.bar.add_task("decode", total=total, rate="")
            self.bar.start()
        self.done = 0

    def advance(self) -> None:
        self.done += 1
        if self.bar is not None:
            rate = self.done / max(time.time() - self.started, 1e-9)
            self.bar.update(self.task, advance=1, rate=f"{rate:.2f} img/s")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def _install_signal_handlers(stop: threading.Event) -> dict:
    if threading.current_thread() is not threading.main_thread():
        return {}

    def handler(signum, frame):  # first signal: finish in-flight writes and stop; second: abort
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        print("\ninterrupted: finishing images in flight (press Ctrl-C again to abort)", file=sys.stderr)

    return {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}


def _restore_signal_handlers(previous: dict) -> None:
    for sig, old in previous.items():
        signal.signal(sig, old)
