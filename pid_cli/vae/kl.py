"""Flux.1 / SD3 / SDXL autoencoders: diffusers' AutoencoderKL with an affine latent normalisation.

All three are the same LDM conv stack (docs/model.md#image-encoders); they differ in latent width, in whether the
1×1 quant convs exist (SDXL only) and in (shift, scale): latent = (μ − shift)·scale, computed in
the codec dtype like upstream. Flux.1 ships in BFL layout (`encoder.down.0.block.0…`), SD3/SDXL in
diffusers layout; either layout is accepted for every kind, the BFL one converted with diffusers'
own `convert_ldm_vae_checkpoint`.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import AutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from torch import Tensor

from pid_cli.vae.base import LatentCodec, VAEError, load_strict, track_renames

# Attention names of diffusers files written before diffusers 0.14 (mid-block attention only).
_LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def is_bfl_layout(state: dict[str, Tensor]) -> bool:
    """BFL/LDM names (`encoder.down.N`, `decoder.up.N`) rather than diffusers' (`down_blocks`)."""
    return any(k.startswith(("encoder.down.", "decoder.up.")) for k in state)


def bfl_to_diffusers(state: dict[str, Tensor], model_config: dict[str, Any], source: str,
                     names: dict[str, str] | None = None) -> dict[str, Tensor]:
    """BFL/LDM-layout VAE tensors → diffusers AutoencoderKL names (lossless: every tensor is placed).
    `names` receives diffusers key → file key."""
    return track_renames(state, convert_ldm_vae_checkpoint, source, names, config=model_config)


def fix_legacy_attention(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename pre-0.14 diffusers attention keys (`mid_block.attentions.0.query.weight` → `to_q`)."""
    out = {}
    for key, value in state.items():
        head, _, leaf = key.rpartition(".")
        prefix, _, name = head.rpartition(".")
        if ".attentions." in key and name in _LEGACY_ATTENTION:
            key = f"{prefix}.{_LEGACY_ATTENTION[name]}.{leaf}"
            value = value.reshape(value.shape[:2]) if value.ndim == 4 else value  # 1×1 conv → linear
        out[key] = value
    return out


def build_kl(model_config: dict[str, Any]) -> AutoencoderKL:
    with torch.device("meta"):
        return AutoencoderKL(**model_config)


def load_kl_state(model_config: dict[str, Any], state: dict[str, Tensor], source: str) -> AutoencoderKL:
    """AutoencoderKL filled strictly from a BFL- or diffusers-layout state dict."""
    names: dict[str, str] = {}
    state = bfl_to_diffusers(state, model_config, source, names) if is_bfl_layout(state) else \
        fix_legacy_attention(state)
    return load_strict(build_kl(model_config), state, source, names)


class KLCodec(LatentCodec):
    """Flux.1 (kind "flux1"), SD3 ("sd3") and SDXL ("sdxl")."""

    def __init__(self, kind: str, config: dict[str, Any], model: AutoencoderKL, device: torch.device | str,
                 dtype: torch.dtype | None = None) -> None:
        self.kind = kind
        norm = config["latent"]["normalisation"]
        if norm["kind"] != "affine":
            raise VAEError(f"{kind}: KL codec needs an affine normalisation, config has {norm['kind']!r}")
        self.shift, self.scale = float(norm["shift"]), float(norm["scale"])
        super().__init__(config, model, device, dtype)

    def encode_raw(self, images: Tensor) -> Tensor:
        return self.model.encode(images).latent_dist.mean  # [B, C, H/8, W/8]

    def normalize(self, raw: Tensor) -> Tensor:
        return (raw - self.shift) * self.scale

    def denormalize(self, latent: Tensor) -> Tensor:
        return latent / self.scale + self.shift

    def decode_raw(self, raw: Tensor) -> Tensor:
        return self.model.decode(raw).sample
