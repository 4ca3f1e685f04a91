"""What the prepass works out without GPU work: each input's probe (count, latent shape, σ), the items to decode,
the output sizes, the batches and their size, and whether compiling pays."""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from pid_cli.decode.job import DecodeJob
from pid_cli.inputs.collection import (
    InputError,
    InputSpec,
)
from pid_cli.inputs.image_plan import ImagePlan, fit_sizes, load_image, plan_image
from pid_cli.inputs.images import image_pixels, read_image
from pid_cli.inputs.latent_files import (
    MAX_LATENT_SIDE,
    LatentError,
    Reading,
    read_as_pid,
    read_latent_file,
    scale_warning,
)
from pid_cli.model import layers
from pid_cli.registry import Entry

if TYPE_CHECKING:
    from pid_cli.pipeline import ExactCheck


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
    runtime: str = ""  # set when decoded: `Decoder.runtime()` and the batch size (what its exact pixels depend on)
    check: ExactCheck | None = None  # set when decoded: this image was the one checked against the exact path
    exact_fallback: bool = False  # set when decoded: 8-bit modes asked for, its size decoded on the exact path


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
    from pid_cli.vae import entry_kind  # pid_cli.vae imports diffusers (seconds): latent-only runs never do

    try:
        entry_kind(job.entry)
    except ValueError as e:  # VAEError: a VAE format pid has no encoder for
        raise InputError(f"{spec.path}: {e}") from None
    sigmas = _sigmas(job, spec, {})
    _, info = read_image(spec.path)  # the whole file: a corrupt image fails here, not mid-run
    fit_to = _fit_candidates(job) if job.fit else None
    plan = plan_image(job.entry, spec.path, info.width, info.height, fit_to)
    f = job.entry.latent.vae_factor
    if max(plan.width, plan.height) > MAX_LATENT_SIDE * f:  # the limit stored latents have (inputs/latent_files.py)
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


class Budget:
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


def attempt(fn: Callable[..., Any], *args: Any) -> tuple[Any, str | None]:
    """(result, None), or (None, message) for the errors a bad input file can cause."""
    try:
        return fn(*args), None
    except (LatentError, InputError, ValueError, OSError, RuntimeError) as e:
        return None, str(e)
    except (ArithmeticError, MemoryError, RecursionError) as e:  # what else a hostile file can cause
        spec = next((a for a in args if isinstance(a, InputSpec)), None)
        return None, f"{spec.path if spec else 'input'}: {type(e).__name__}: {e}"


def _sigmas(job: DecodeJob, spec: InputSpec, meta: dict[str, Any]) -> tuple[float, ...]:
    """The σ (or, for an image, the σ sweep) to decode `spec` at: manifest > --degrade-sigma > file metadata > 0.
    A stored latent was made at one σ, given in its backbone's own frame (converted when decoded); an image's σ
    noises its clean latent in the student's own frame (`noise_clean_latent`), so it must lie in [0, 1]. Errors
    name the file and where the value came from."""
    given = [(spec.degrade_sigma, "the manifest"), (job.degrade_sigma, "--degrade-sigma")]
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


TARGET_LONG_SIDE = {"2k": (1536, 3072), "4k": (3072, 4608)}


def check_size(job: DecodeJob, spec: InputSpec, latent_hw: tuple[int, int], warned: set[tuple[int, int]]) -> None:
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
    one decode, less than compiling again (docs/performance.md#batching). And compiled, an image's pixels do not
    depend on its place in a batch, only on the batch's size, so a resumed run, or one of some of the inputs,
    writes what the whole run would have (docs/performance.md#reproducibility)."""
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
    paid once per batch. Throughput peaked at batch 4 (docs/performance.md#batching); a larger batch costs memory
    and delays the first PNG by a whole batch."""
    if device.type != "cuda":
        return 1
    pixels = shape[1] * shape[2] * scale * scale
    free, _ = torch.cuda.mem_get_info(device)
    fits = int(free * 0.8) // (pixels * 800)  # ~bytes of activations per output pixel, with margin
    return max(1, min(16, fits, round(FULL_BATCH_PIXELS / pixels)))


# torch.compile delays the first image per output size and then saves time per output megapixel; it pays for
# itself after ~100-220 MP per GPU with warm caches, ~600-700 MP with cold ones (docs/performance.md#compile);
# 400 MP is between the two
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
