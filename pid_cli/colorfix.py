"""Baselines next to PiD: colour fix against the backbone VAE's own decode, and a side-by-side strip.

PiD re-synthesises pixels, so its global colour can drift from what the latent encodes (users
report brightened dark scenes and a green/blue cast on FLUX.2). The VAE decode of the same latent
is a faithful, if blurry, colour reference; both fixes take *low-frequency* colour from it and keep
PiD's detail:

* "mean-std": per-channel affine map so that the PiD image's mean and standard deviation match
  the reference's. PiD's statistics are measured after area-averaging it down to the reference's
  size, because the detail PiD adds (absent from the VAE decode) is not a contrast error. With an
  integer size ratio the channel means of the result equal the reference's exactly (before clamping).
* "wavelet": StableSR's wavelet colour fix. Both images are split by a 5-level à-trous blur
  (3×3 binomial kernel, dilation 1, 2, 4, 8, 16, replicate padding) into high = Σ detail bands and
  low = the residual blur; the result is PiD's high band plus the reference's low band (the reference
  is first Lanczos-upscaled to PiD's size). Changes only coarse colour/tone, never edges or texture.

All images are float tensors in [−1, 1], [B, 3, H, W] (or [3, H, W]); results are clamped.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from pid_cli.inputs.images import resize_lanczos

METHODS = ("none", "mean-std", "wavelet")
WAVELET_LEVELS = 5


def color_fix(image: Tensor, reference: Tensor, method: str = "none") -> Tensor:
    """`image` (PiD output) with its low-frequency colour matched to `reference` (the VAE decode of the
    same latent, at its native size or already upscaled; same aspect ratio)."""
    if method not in METHODS:
        raise ValueError(f"unknown colour fix {method!r}; choose one of {', '.join(METHODS)}")
    if method == "none":
        return image
    squeeze = image.ndim == 3
    x, ref = (image[None], reference[None]) if squeeze else (image, reference)
    if x.shape[:2] != ref.shape[:2]:
        raise ValueError(f"image {list(x.shape)} and reference {list(ref.shape)} differ in batch or channels")
    x, ref = x.float(), ref.float().to(x.device)
    out = _mean_std(x, ref) if method == "mean-std" else _wavelet(x, ref)
    return out[0] if squeeze else out


def _mean_std(x: Tensor, ref: Tensor) -> Tensor:
    small = F.interpolate(x, size=ref.shape[-2:], mode="area") if x.shape[-2:] != ref.shape[-2:] else x
    mu_x, sd_x = small.mean((2, 3), keepdim=True), small.std((2, 3), keepdim=True)
    mu_r, sd_r = ref.mean((2, 3), keepdim=True), ref.std((2, 3), keepdim=True)
    return ((x - mu_x) * (sd_r / sd_x.clamp_min(1e-6)) + mu_r).clamp(-1, 1)


def _wavelet(x: Tensor, ref: Tensor) -> Tensor:
    if ref.shape[-2:] != x.shape[-2:]:
        ref = resize_lanczos(ref, tuple(x.shape[-2:]))
    # high(x) + low(ref) = x + low(ref − x): the split is linear, so one low-pass does.
    _, low = wavelet_split(ref - x)
    return (x + low).clamp(-1, 1)


def wavelet_split(x: Tensor, levels: int = WAVELET_LEVELS) -> tuple[Tensor, Tensor]:
    """x = high + low exactly: low is `levels` successive à-trous blurs (dilation 2^i), high the rest."""
    high, low = torch.zeros_like(x), x
    for i in range(levels):
        blurred = _blur(low, 2**i)
        high, low = high + (low - blurred), blurred
    return high, low


def _blur(x: Tensor, d: int) -> Tensor:
    """3×3 binomial blur ([1, 2, 1] ⊗ [1, 2, 1] / 16) with dilation d and replicate padding, done as two
    1-D passes of shifted adds (several times faster on CPU than a depthwise convolution at 4K)."""
    h, w = x.shape[-2:]
    p = F.pad(x, (d, d, 0, 0), mode="replicate")
    x = (p[..., :w] + 2 * p[..., d : d + w] + p[..., 2 * d :]) / 4
    p = F.pad(x, (0, 0, d, d), mode="replicate")
    return (p[..., :h, :] + 2 * p[..., d : d + h, :] + p[..., 2 * d :, :]) / 4


def side_by_side(images: Sequence[Tensor], gap: int = 16, gap_value: float = 1.0) -> Tensor:
    """Images placed left to right with `gap` px of `gap_value` (white) between them → [3, H, W_total].
    Images of another height than the first are Lanczos-resized to it, keeping their aspect ratio."""
    if not images:
        raise ValueError("side_by_side needs at least one image")
    tiles = [im[0] if im.ndim == 4 else im for im in images]
    h = tiles[0].shape[-2]
    row: list[Tensor] = []
    for i, t in enumerate(tiles):
        t = t.float().cpu()
        if t.shape[-2] != h:
            t = resize_lanczos(t, (h, max(1, round(t.shape[-1] * h / t.shape[-2]))))
        if i:
            row.append(torch.full((t.shape[0], h, gap), gap_value))
        row.append(t)
    return torch.cat(row, dim=-1)


def color_stats(image: Tensor) -> dict[str, list[float]]:
    """Per-channel mean and std (R, G, B, on the [0, 1] scale) and mean Rec. 709 luma, for reports."""
    x = (image[None] if image.ndim == 3 else image).float()
    x = (x.clamp(-1, 1) + 1) / 2
    luma = (0.2126 * x[:, 0] + 0.7152 * x[:, 1] + 0.0722 * x[:, 2]).mean()
    return {"mean": x.mean((0, 2, 3)).tolist(), "std": x.std((2, 3)).mean(0).tolist(), "luma": [float(luma)]}
