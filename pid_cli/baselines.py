"""`--compare` and `--color-fix`: PiD's output next to the backbone VAE's own decode of the same latent.

Users judge PiD against what their pipeline gives today, the VAE decode. The worker decodes each latent
with both (GPU work); `render` then does the CPU work in the writer pool: Lanczos-upscale the VAE decode
to PiD's size, match PiD's low-frequency colour to it (`colorfix.color_fix`), and build the strip.

Files, next to the PiD output `NAME.png` (same folder, same bit depth except the strip):

* `NAME.vae.png`: the VAE decode, Lanczos-upscaled to PiD's size.
* `NAME.compare.png`: 8-bit strip, left to right: [input image (image inputs only), Lanczos-upscaled] |
  VAE decode | PiD output as written (colour-fixed when asked), 16 px white gaps.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

from pid_cli.colorfix import color_fix, side_by_side
from pid_cli.inputs.images import resize_lanczos

VAE_SUFFIX, COMPARE_SUFFIX = ".vae", ".compare"


@dataclass
class Baseline:
    """One item's decodes, float32 on the CPU, in [−1, 1]."""

    pid: Tensor  # [3, H, W] PiD output
    vae: Tensor  # [3, H/sr, W/sr] VAE decode of the same latent, at its own size
    source: Tensor | None = None  # [3, H/sr, W/sr] the preprocessed input image (image inputs)


@dataclass
class Rendered:
    pid: Tensor  # [3, H, W] what NAME.png holds (colour-fixed when asked)
    vae: Tensor | None  # [3, H, W] for NAME.vae.png (with --compare)
    strip: Tensor | None  # [3, H, W_strip] for NAME.compare.png (with --compare)
    labels: str  # what the strip shows, left to right


def baseline_paths(output: Path) -> tuple[Path, Path]:
    """(NAME.vae.png, NAME.compare.png) next to the PiD output NAME.png."""
    stem = output.name[: -len(output.suffix)] if output.suffix else output.name
    return output.with_name(stem + VAE_SUFFIX + ".png"), output.with_name(stem + COMPARE_SUFFIX + ".png")


def render(b: Baseline, color_fix_method: str, compare: bool) -> Rendered:
    """Colour-fix the PiD output and, with `compare`, make the upscaled VAE decode and the strip."""
    size = tuple(b.pid.shape[-2:])  # (H, W)
    upscaled = resize_lanczos(b.vae, size) if compare or color_fix_method == "wavelet" else None
    # mean-std measures PiD after area-averaging to the reference's own size, so it gets the native decode;
    # the wavelet fix would Lanczos-upscale it itself, so it gets the copy already made.
    reference = upscaled if color_fix_method == "wavelet" else b.vae
    pid = color_fix(b.pid, reference, color_fix_method)
    if not compare:
        return Rendered(pid, None, None, "")
    tiles, labels = [upscaled, pid], ["vae", "pid"]
    if b.source is not None:
        tiles, labels = [resize_lanczos(b.source, size), *tiles], ["input", *labels]
    return Rendered(pid, upscaled, side_by_side(tiles), " | ".join(labels))
