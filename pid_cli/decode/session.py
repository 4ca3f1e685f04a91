"""The decode loop of one device: prepass, prompts, fetching, batched decode with OOM retry, PNG writing, and the
records of a run (`run_here`)."""

from __future__ import annotations

import contextlib
import os
import queue
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from pid_cli import __version__
from pid_cli.baselines import Baseline, baseline_paths, render
from pid_cli.decode.job import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    DecodeJob,
    check_job,
    check_records_path,
    collect_job_inputs,
    fetch_run_files,
    nothing_to_decode,
)
from pid_cli.decode.plan import (
    PREPASS_MEMORY,
    Budget,
    Item,
    Probe,
    attempt,
    auto_batch_size,
    check_size,
    compile_for,
    load_source,
    plan_batches,
    probe_cost,
    probe_input,
)
from pid_cli.decode.records import Progress, Records, Report, install_signal_handlers, restore_signal_handlers
from pid_cli.inputs.collection import (
    InputError,
    InputSpec,
    output_names,
    safe_output_path,
    take_shard,
)
from pid_cli.inputs.latent_files import (
    LatentError,
    noise_clean_latent,
    training_sigma,
)
from pid_cli.outputs import (
    HostPixels,
    OutputExists,
    clean_partials,
    encode_png,
    finite_items,
    ignores_case,
    to_uint,
    write_atomic,
)
from pid_cli.pipeline import Decoder, ExactCheck

if TYPE_CHECKING:
    from pid_cli.vae import LatentCodec

CLEAN_LATENTS_KEPT = 8  # images whose encoder latent a later batch may reuse (a few MB each at 4K)


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
    checks: list[dict] = field(default_factory=list)  # its images held against the exact path (8-bit modes)


def run_here(job: DecodeJob, report: Report | None = None, stop: threading.Event | None = None) -> int:
    """Decode everything `job` names on its one device (or one group splitting each image); returns the process
    exit code. A worker process of a multi-device run (workers.py) calls this with `report` (records and progress
    go to the parent) and its own `stop`, set by its signal handler; without one, SIGINT/SIGTERM are handled here.

    Cheap checks come before expensive work: the inputs are collected and read, `--out` tested and the
    prompts resolved before any checkpoint, VAE or text encoder is fetched, and every file the run needs is
    fetched in one step, so a missing one (offline, the Hub out of reach) is reported with all the others."""
    check_job(job)
    previous = {}
    if stop is None:
        stop = threading.Event()
        previous = install_signal_handlers(stop)  # first: an interrupt from here on still leaves every record
    records: Records | None = None
    found: list[InputSpec] = []
    specs: list[InputSpec] = []
    try:
        records = Records(job.manifest_out, sys.stdout if job.json_stdout else None, report)
        clean_partials(job.out)
        found = collect_job_inputs(job)
        check_records_path(job, found)
        specs = take_shard(found, *job.shard) if job.shard is not None else found
        session = Session(job, records, stop, report)
        session.prepass(specs)
        if session.items and not stop.is_set():
            session.choose_prompts()
        if session.items and not stop.is_set():  # unless every remaining input failed while its prompt was read
            session.fetch_files()
            session.embed_prompts()
            session.decode_all()
        session.report_unfinished()
    finally:
        restore_signal_handlers(previous)
        if records is not None:
            records.close()
    if report is None:
        print(records.summary() if specs else nothing_to_decode(job, len(found)), file=sys.stderr)
    if stop.is_set():
        return EXIT_INTERRUPTED
    return EXIT_FAILED if records.counts["failed"] or records.lost else EXIT_OK


class Session:
    """The state of one run: items to decode, per-input progress, prompt embeddings."""

    def __init__(self, job: DecodeJob, records: Records, stop: threading.Event, report: Report | None = None):
        self.job, self.records, self.stop, self.report = job, records, stop, report
        self.items: list[Item] = []
        self.states: dict[InputSpec, InputState] = {}  # a file listed with two prompts is two inputs
        self.text: dict[str, Tensor] = {}
        self.vae_files: dict[str, Path] = {}  # the backbone VAE's files by role, when images or baselines need it
        self.needs_vae = False  # a raw FLUX.2 latent needs its VAE's batch-norm statistics
        self.bn_stats: tuple[Tensor, Tensor] | None = None
        self.lock = threading.Lock()
        self.failed_fast = threading.Event()
        self.claimed_as: dict[str, Path] = {}  # output identity → the name it was first claimed by
        self.case_insensitive: bool | None = None  # the output folder's file system, probed on first use
        self.name_max: int | None = None
        # the latest images' clean latents (on the decode device): a σ sweep whose items fall into several batches
        # encodes each image once (items of one image are planned next to each other)
        self.clean_latents: OrderedDict[InputSpec, Tensor] = OrderedDict()

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
        budget = Budget(PREPASS_MEMORY)
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            loaded = pool.map(lambda spec: attempt(budget.run, probe_cost(spec), probe_input, self.job, spec), specs)
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
                    error = attempt(self._plan_input, spec, probe, claimed, warned)[1]
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
        check_size(job, spec, probe.shape[1:], warned)
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
        from pid_cli.inputs.prompts import resolve_prompts
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
        self.vae_files = fetch_run_files(self.job, need_vae)

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

            if self.vae_files.get("weights") is None:
                raise LatentError(f"{self.job.entry.id}: normalising a raw latent needs the VAE file, which was "
                                  "not resolved")
            self.bn_stats = flux2_bn_stats(self.vae_files["weights"])
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
        progress = Progress(len(self.items), job.quiet, self.report)

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
                codec = _DeviceCodec(job, decoder.device, self.vae_files)
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
        stored = [i for i, item in enumerate(batch) if item.plan is None]  # an image's σ is the student's already
        trained, sigmas = latents, list(sigmas)
        if stored:  # `latents` stays as given: the --compare baseline decodes it
            converted, stored_sigmas = decoder.to_trained_frame(latents[stored], [sigmas[i] for i in stored])
            trained = converted if len(stored) == len(batch) else latents.index_copy(0, torch.tensor(
                stored, device=latents.device), converted)
            for i, sigma in zip(stored, stored_sigmas, strict=True):
                sigmas[i] = sigma
        text = torch.stack([self.text[item.prompt] for item in batch])
        images = decoder.decode_tensor(trained, text, sigmas, [i.seed for i in batch], job.steps,
                                       pad_to=runs_as)  # [B, 3, H, W], [-1, 1]
        size = tuple(images.shape[-2:])
        runtime = f"{decoder.runtime(size)}, batch {runs_as}"  # another batch size may move a pixel by a level (README)
        size_check = decoder.checks.get(size)
        for item in batch:
            item.runtime = runtime
            item.exact_fallback = size_check is not None and not size_check.passed
        if decoder.last_check is not None:
            self._checked(batch[0], decoder.last_check, size)
        if not self.baselines:
            pixels = HostPixels(images, job.bit_depth)  # no wait for the GPU: the next batch queues behind
            return [_Pending(pixels, i) for i in range(len(batch))]
        blank = _non_finite(batch, images)  # NaN/Inf would be written as a black PNG: fail those items instead
        vae = codec.get().decode(latents).cpu()  # [B, 3, H/sr, W/sr]: the backbone's own decode of each latent
        images = images.float().cpu()
        return _mask([Baseline(pid, ref, src.float() if item.plan is not None else None)
                      for item, pid, ref, src in zip(batch, images, vae, sources, strict=True)], blank)

    def _checked(self, item: Item, check: ExactCheck, size: tuple[int, int]) -> None:
        """Say what the 8-bit check found, on stderr and in the checked image's record and PNG."""
        item.check = check
        (self.job.note if check.passed else self.job.warn)(f"8-bit check at {size[1]}x{size[0]} ({item.output.name}): "
                                                           f"{check.describe()}")
        with self.lock:
            state = self.states[item.spec]
            state.checks.append({"output": str(item.output), **check.record()})
            if not check.passed:
                state.warnings.append(f"{item.output.name}: 8-bit check {check.describe()}")

    def _latents(self, decoder: Decoder, codec: _DeviceCodec, batch: list[Item], sources: list[Tensor]) -> Tensor:
        """[B, C, h, w] float32 on the decoder's device. Image items are VAE-encoded here, on the worker's
        device, each image once however many of its σ the batch holds, then noised to their σ as upstream's image
        path does (`noise_clean_latent`, ε from a generator of the item's seed, made anew for each σ) and rounded to
        bf16, which both PiD and the --compare baseline decode."""
        latents: list[Tensor | None] = [None if item.plan is not None else src.to(decoder.device, torch.float32)
                                        for item, src in zip(batch, sources, strict=True)]
        picks = [i for i, z in enumerate(latents) if z is None]
        clean = {batch[i].spec: self.clean_latents[batch[i].spec] for i in picks
                 if batch[i].spec in self.clean_latents}  # encoded for an earlier batch
        first = {batch[i].spec: i for i in reversed(picks) if batch[i].spec not in clean}  # one encode per image
        for size in dict.fromkeys(sources[i].shape for i in first.values()):  # RAE's fixed grid: several sizes
            group = [i for i in first.values() if sources[i].shape == size]
            encoded = codec.get().encode(torch.stack([sources[i] for i in group])).float()  # [n, C, h, w]
            for i, z in zip(group, encoded.to(decoder.device), strict=True):
                clean[batch[i].spec] = z
        self.clean_latents.update(clean)
        while len(self.clean_latents) > CLEAN_LATENTS_KEPT:
            self.clean_latents.popitem(last=False)
        frame = self.job.entry.latent.sigma_frame
        for i in picks:
            item = batch[i]
            generator = torch.Generator(device=decoder.device).manual_seed(item.seed)
            noised = noise_clean_latent(clean[item.spec][None], item.sigma, generator, frame)  # [1, C, h, w]
            latents[i] = noised[0].to(torch.bfloat16).float()
        return torch.stack(latents)

    def _write(self, item: Item, pixels: _Pending | Baseline, progress: Progress,
               slot: threading.BoundedSemaphore) -> None:
        try:
            (self.write_baseline if isinstance(pixels, Baseline) else self.write)(item, pixels, progress)
        finally:
            slot.release()

    def write(self, item: Item, pending: _Pending, progress: Progress) -> None:
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

    def write_baseline(self, item: Item, baseline: Baseline, progress: Progress) -> None:
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

    def finish(self, item: Item, error: str | None, progress: Progress) -> None:
        with self.lock:
            state = self.states[item.spec]
            state.error = state.error or error
            state.pending -= 1
            done = state.pending == 0
        progress.advance()
        if done:
            failed = state.error is not None
            self.records.emit(state.spec, "failed" if failed else "ok", [] if failed else state.outputs,
                              time.time() - state.started, state.error, state.warnings, state.sigmas, state.checks)
            if failed and self.job.fail_fast:
                self.failed_fast.set()

    def report_unfinished(self) -> None:
        """Inputs cut short by an interrupt or --fail-fast still get their record."""
        for state in self.states.values():
            if state.pending > 0:
                self.records.emit(state.spec, "failed", [], time.time() - state.started,
                                  "not decoded: the run stopped early", state.warnings)


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


class _DeviceCodec:
    """The backbone VAE on one device worker's device, loaded when that worker first needs it (its first
    image to encode or baseline to decode); a VAE that fails to load fails each batch that needs it."""

    def __init__(self, job: DecodeJob, device: torch.device, files: dict[str, Path]):
        self.job, self.device, self.files = job, device, files
        self.codec: LatentCodec | None = None
        self.error: ValueError | None = None

    def get(self) -> LatentCodec:
        if self.codec is None and self.error is None:
            try:
                from pid_cli.vae import load_entry_codec  # diffusers: seconds, paid only by runs that need a VAE

                self.codec = load_entry_codec(self.job.entry, self.files, self.device, self.job.dtype)
            except ValueError as e:  # VAEError: unreadable or mismatched file
                self.error = e
        if self.error is not None:
            raise self.error
        return self.codec


def _load_decoder(job: DecodeJob, compile: bool | None) -> Decoder:
    try:
        return Decoder(job.entry, job.weights, device=job.devices[0], dtype=job.dtype, text_encoder=job.text_encoder,
                       attention=job.attention, matmul=job.matmul, compile=compile, helper_devices=job.devices[1:],
                       check_psnr=job.check_psnr)
    except TypeError as e:  # a registry net_config the network does not take: a configuration error
        raise ValueError(f"registry entry {job.entry.id} ({job.entry.source}): net_config: {e}") from e


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
    if item.exact_fallback:
        text["pid:8bit_fallback"] = (f"--attention {job.attention} --matmul {job.matmul} asked for; decoded on the "
                                     "exact path, the 8-bit check at this size having failed")
    else:
        if job.attention != "bf16":
            text["pid:attention"] = job.attention
        if job.matmul != "bf16":
            text["pid:matmul"] = job.matmul
    if item.check is not None:
        text["pid:8bit_check"] = item.check.describe()
    if job.color_fix != "none":
        text["pid:color_fix"] = f"{job.color_fix} (reference: {job.entry.backbone} VAE decode)"
    return text


def _baseline_text(job: DecodeJob, item: Item, what: str) -> dict[str, str]:
    source = f"{item.spec.path}" + (f"[{item.index}]" if item.index else "")
    return {"Software": f"pid {__version__}", "pid:baseline": what, "pid:pid_output": item.output.name,
            "pid:source": source}
