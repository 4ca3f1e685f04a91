"""Image files as `pid decode` inputs: their size plan, their pixels, and the `--fit` target sizes.

An image is encoded by the backbone's own VAE encoder (`pid_cli.vae`) into a clean latent, which PiD
then decodes at sr_scale× (4×; 8× for SigLIP): single-pass super-resolution. The prepass must know every
input's latent shape before any GPU work, so the size is planned here from the file alone
(`plan_image`); the worker reads the pixels again, identically (`load_image`), when the batch is loaded.

Size rules (what `pid decode --help` and the README state):

* Default: centre-crop each side down to a multiple of `crop_multiple(entry)`, no resizing. That
  multiple is lcm(16, VAE factor, patch / gcd(patch, sr)): 16 is upstream's rule (docs/model.md#image-inputs), the VAE
  factor makes the latent grid whole, and the last term makes PiD's output side (image side × sr) a
  multiple of the network's patch size. It is 16 for every released checkpoint.
* `--fit`: the output size is the trained size (`fit_sizes`) whose aspect ratio is closest to the
  image's (ties → the larger), within `--target`'s long-side range; the image is Lanczos-resized by the
  smallest factor that covers output/sr and centre-cropped to it (`images.fit_to_target`: nothing is
  stretched or padded). A 1000×750 photo for flux `--target 4k` becomes 1024×768 and decodes to 4096×3072.

Colour handling (grey, RGBA over white, 16-bit, EXIF orientation) is `images.read_image`'s; values map
to [−1, 1] as upstream (v/127.5 − 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import Tensor

from pid_cli.inputs.collection import InputError
from pid_cli.inputs.images import choose_bucket, fit_to_target, preprocess, read_image, to_tensor
from pid_cli.registry import Entry

# A bucket "covers" an aspect ratio of the entry when their log ratios differ by less than this (~10 %):
# upstream's 4096×2176 bucket is its 16:9 size, so no extra 16:9 size is generated next to it.
_RATIO_TOLERANCE = 0.1


@dataclass(frozen=True)
class ImagePlan:
    """How one image becomes encoder input: its size after preprocessing, and what was done."""

    width: int  # pixels handed to the VAE encoder
    height: int
    fit: tuple[int, int] | None  # --fit: PiD output size (W, H) it was resized for
    note: str  # for PNG metadata, e.g. "crop 1000x750 -> 992x736"


def crop_multiple(entry: Entry) -> int:
    """Side multiple of encoder input: upstream's 16, whole latent cells, whole output patches."""
    patch = int(entry.net_config.get("patch_size", 16))
    return math.lcm(16, entry.latent.vae_factor, patch // math.gcd(patch, entry.sr_scale))


def fit_sizes(entry: Entry, long_side: tuple[int, int] | None = None) -> list[tuple[int, int]]:
    """Output sizes (W, H) `--fit` may choose: the entry's trained buckets, plus level × aspect-ratio
    sizes for each listed ratio that no bucket covers (v1 lists only square buckets), limited to
    `long_side` = [lo, hi) and to sizes an encodable image maps onto exactly."""
    sizes = entry.output_sizes
    step = crop_multiple(entry) * entry.sr_scale  # output side of one whole crop multiple
    in_range = (lambda w, h: long_side[0] <= max(w, h) < long_side[1]) if long_side else (lambda w, h: True)
    found = [(w, h) for w, h in sizes.buckets if in_range(w, h)]
    for ratio in sizes.aspect_ratios:
        a, b = (int(v) for v in ratio.split(":"))
        if any(abs(math.log(w / h) - math.log(a / b)) < _RATIO_TOLERANCE for w, h in found):
            continue
        multiple = math.lcm(sizes.multiple_of, step)
        for level in sizes.levels:
            short = max(multiple, round(level * min(a, b) / max(a, b) / multiple) * multiple)
            w, h = (level, short) if a >= b else (short, level)
            if in_range(w, h):
                found.append((w, h))
    return sorted({(w, h) for w, h in found if w % step == 0 and h % step == 0}, key=lambda s: (-s[0] * s[1], s))


def plan_image(entry: Entry, path: Path, width: int, height: int,
               fit_to: list[tuple[int, int]] | None) -> ImagePlan:
    """The encoder-input size of a `width`×`height` image (after EXIF orientation). `fit_to`: the
    `--fit` candidates (`fit_sizes`), or None to centre-crop."""
    if fit_to is not None:
        out_w, out_h = choose_bucket(width, height, fit_to)
        w, h = out_w // entry.sr_scale, out_h // entry.sr_scale
        return ImagePlan(w, h, (out_w, out_h), f"fit {width}x{height} -> {w}x{h} (output {out_w}x{out_h})")
    m = crop_multiple(entry)
    w, h = width // m * m, height // m * m
    if w == 0 or h == 0:
        raise InputError(f"{path}: image of {width}x{height} px is smaller than the {m}-px minimum the "
                         f"{entry.backbone} encoder needs")
    note = "as is" if (w, h) == (width, height) else f"centre-crop {width}x{height} -> {w}x{h}"
    if entry.latent.fixed_grid is not None:  # RAE / Scale-RAE encoders see every image at their one input size
        note += f", resized by the {entry.backbone} encoder to its fixed square input"
    return ImagePlan(w, h, None, note)


def load_image(entry: Entry, path: Path, plan: ImagePlan) -> Tensor:
    """The image as encoder input [3, H, W] float32 in [−1, 1], preprocessed as `plan` says."""
    arr, _ = read_image(path)
    arr = fit_to_target(arr, plan.fit, entry.sr_scale) if plan.fit else preprocess(arr, crop_multiple(entry))
    if arr.shape[:2] != (plan.height, plan.width):  # the file changed since the prepass
        raise InputError(f"{path}: image is now {arr.shape[1]}x{arr.shape[0]} after preprocessing, "
                         f"planned {plan.width}x{plan.height}; was it replaced during the run?")
    return to_tensor(np.ascontiguousarray(arr))[0]
