"""Image encoders of every supported backbone, as `LatentCodec`s (image ↔ normalised PiD latent).

    codec = load_codec("flux1", "ae.safetensors", device="cuda")
    latent = codec.encode(images)        # [B, 3, H, W] in [-1, 1] → [B, 16, H/8, W/8], docs/model.md#image-encoders
    baseline = codec.decode(latent)      # the backbone VAE's own decode, for --compare / --color-fix

Kinds: flux1 (also Z-Image), flux2 (also FLUX.2-klein), sd3, sdxl, qwenimage (also -2512), and the
representation encoders dinov2 (RAE) and siglip (Scale-RAE), which encode only (`rae.py`: built from an
encoder folder with `load_rae_codec`, no decoder, so no VAE baseline). The registry's `vae.format` names
are accepted too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pid_cli.registry import IMAGE_ENCODER_KINDS, Entry
from pid_cli.vae.base import LatentCodec, VAEError, load_config, read_tensors
from pid_cli.vae.flux2 import (
    Flux2Codec,
    denormalize_flux2,
    flux2_bn_stats,
    load_flux2_state,
    normalize_flux2,
    patchify_flux2,
    unpatchify_flux2,
)
from pid_cli.vae.kl import KLCodec, load_kl_state
from pid_cli.vae.qwenimage import QwenImageCodec, load_qwen_state
from pid_cli.vae.rae import NO_DECODER, RAE_KINDS, load_rae_codec, rae_codec_for

KINDS = ("flux1", "flux2", "sd3", "sdxl", "qwenimage", *RAE_KINDS)
FORMATS = IMAGE_ENCODER_KINDS  # registry `vae.format` → kind

__all__ = [
    "FORMATS",
    "KINDS",
    "NO_DECODER",
    "RAE_KINDS",
    "LatentCodec",
    "VAEError",
    "build_codec",
    "denormalize_flux2",
    "entry_kind",
    "flux2_bn_stats",
    "load_codec",
    "load_config",
    "load_entry_codec",
    "load_rae_codec",
    "normalize_flux2",
    "patchify_flux2",
    "rae_codec_for",
    "resolve_kind",
    "unpatchify_flux2",
]


def resolve_kind(kind_or_format: str, *, decoder: bool = False) -> str:
    """A codec kind from a kind or a registry `vae.format` name; with `decoder`, only kinds that can also
    decode (a VAE baseline for --compare / --color-fix)."""
    kind = FORMATS.get(kind_or_format, kind_or_format)
    if kind not in KINDS:
        raise VAEError(f"unknown VAE kind {kind_or_format!r}; known: {', '.join(KINDS)}")
    if decoder and kind in NO_DECODER:
        raise VAEError(NO_DECODER[kind])
    return kind


def _vae_kind(kind_or_format: str) -> str:
    kind = resolve_kind(kind_or_format)
    if kind in RAE_KINDS:
        raise VAEError(f"{kind} has no VAE file: its encoder is built from a folder with load_rae_codec")
    return kind


def _load_model(kind: str, model_config: dict[str, Any], state: dict[str, Tensor], source: str) -> torch.nn.Module:
    if kind == "flux2":
        return load_flux2_state(model_config, state, source)
    if kind == "qwenimage":
        return load_qwen_state(model_config, state, source)
    return load_kl_state(model_config, state, source)


def build_codec(kind: str, state: dict[str, Tensor] | None = None, *, device: torch.device | str = "cpu",
                dtype: torch.dtype | None = None, overrides: dict[str, Any] | None = None,
                source: str = "state dict") -> LatentCodec:
    """A codec from a state dict (any accepted layout), or with random weights when `state` is None.
    `overrides` change the shipped model config (tests build tiny VAEs this way)."""
    kind = _vae_kind(kind)
    config = load_config(kind, overrides)
    model = _random_model(kind, config) if state is None else _load_model(kind, config["model"], state, source)
    if kind == "flux2":
        return Flux2Codec(config, model, device, dtype)
    if kind == "qwenimage":
        return QwenImageCodec(config, model, device, dtype)
    return KLCodec(kind, config, model, device, dtype)


def load_codec(kind: str, weights_path: str | Path, device: torch.device | str = "cpu",
               dtype: torch.dtype | None = None, *, overrides: dict[str, Any] | None = None) -> LatentCodec:
    """The codec of `kind` (or registry format name) with weights from `weights_path`, loaded strictly.
    dtype defaults to bf16 on accelerators (as upstream encodes), float32 on CPU."""
    kind = _vae_kind(kind)
    return build_codec(kind, read_tensors(weights_path), device=device, dtype=dtype, overrides=overrides,
                       source=str(weights_path))


def _random_model(kind: str, config: dict[str, Any]) -> torch.nn.Module:
    from diffusers import AutoencoderKL, AutoencoderKLFlux2

    from pid_cli.vae.qwenimage import QwenImageVAE2d

    cls = {"flux2": AutoencoderKLFlux2, "qwenimage": QwenImageVAE2d}.get(kind, AutoencoderKL)
    return cls(**config["model"])


def entry_kind(entry: Entry, *, decoder: bool = False) -> str:
    """The codec kind of a registry entry's VAE; VAEError where pid has no encoder for it, or with `decoder` no
    decoder (RAE / Scale-RAE encode only)."""
    if entry.vae is None:
        raise VAEError(f"registry entry {entry.id} names no VAE")
    return resolve_kind(entry.vae.format, decoder=decoder)


def load_entry_codec(entry: Entry, files: dict[str, Path], device: torch.device | str = "cpu",
                     dtype: str | None = None) -> LatentCodec:
    """The entry's VAE as a codec that must produce exactly the latents its decoder takes, from its files by role
    (`weights` for a VAE; `encoder` folder and `stats` for the RAE encoders), as the hub resolved them.

    `vae.options.model_overrides` in the registry entry changes the shipped model config (a fine-tuned VAE of
    another width; the tests' tiny VAE)."""
    kind, torch_dtype = entry_kind(entry), {"bf16": torch.bfloat16, "fp32": torch.float32}.get(dtype or "")
    if kind in RAE_KINDS:
        codec = rae_codec_for(kind, files, entry.latent.normalisation, entry.vae.options, device, torch_dtype)
        source = files["encoder"]
        grid = entry.latent.fixed_grid
        if tuple(grid or ()) != (codec.grid, codec.grid):  # the prepass planned every image with this grid
            raise VAEError(f"{source}: this encoder makes a {codec.grid}x{codec.grid} latent grid at its "
                           f"{codec.input_size}² input; {entry.id} decodes "
                           + (f"{grid[0]}x{grid[1]}" if grid else "no fixed grid (latent.fixed_grid)"))
    elif files.get("weights") is None:
        raise VAEError(f"{entry.id}: no VAE weight file was resolved")
    else:
        source = files["weights"]
        codec = load_codec(kind, source, device, torch_dtype, overrides=entry.vae.options.get("model_overrides"))
    if (codec.channels, codec.factor) != (entry.latent.channels, entry.latent.vae_factor):
        raise VAEError(f"{source}: this VAE makes {codec.channels}-channel latents at 1/{codec.factor} size; "
                       f"{entry.id} decodes {entry.latent.channels}-channel latents at 1/{entry.latent.vae_factor}")
    return codec
