"""FLUX.2 autoencoder (also FLUX.2-klein): diffusers' AutoencoderKLFlux2, 2×2 patchify and BatchNorm stats.

The PiD latent is 128 channels at 1/16 resolution (docs/model.md#flux2-latents): posterior mean μ [B, 32, H/8, W/8]
→ 2×2 patchify (channel c·4 + i·2 + j for in-cell row i, column j) → eval-mode BatchNorm without
affine, (z − running_mean)/sqrt(running_var + 1e-4), with the 128 statistics stored in the AE file.

The BFL file keeps the 1×1 quant convs inside encoder/decoder (`encoder.quant_conv`,
`decoder.post_quant_conv`) and the statistics under `bn.`; the rest is the LDM layout that diffusers'
`convert_ldm_vae_checkpoint` maps. The small functions here are public because the latent side
(FLUX.2-klein's raw 32-channel pipeline output, docs/model.md#flux2-latents) needs the same patchify and
statistics.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLFlux2
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from safetensors import SafetensorError, safe_open
from torch import Tensor

from pid_cli.vae.base import LatentCodec, VAEError, load_strict, read_tensors, track_renames
from pid_cli.vae.kl import fix_legacy_attention, is_bfl_layout

BN_EPS = 1e-4
_BN_KEYS = ("bn.running_mean", "bn.running_var")
# BFL names of the quant convs → diffusers names (convert_ldm_vae_checkpoint expects them top-level).
_BFL_QUANT = {"encoder.quant_conv.": "quant_conv.", "decoder.post_quant_conv.": "post_quant_conv."}


def patchify_flux2(z: Tensor) -> Tensor:
    """[B, C, 2h, 2w] → [B, 4C, h, w]; output channel c·4 + i·2 + j holds in-cell pixel (row i, col j)."""
    b, c, h2, w2 = z.shape
    if h2 % 2 or w2 % 2:
        raise ValueError(f"patchify_flux2 needs even latent sides, got {w2}x{h2}")
    z = z.reshape(b, c, h2 // 2, 2, w2 // 2, 2)  # [B, C, h, i, w, j]
    return z.permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h2 // 2, w2 // 2)


def unpatchify_flux2(z: Tensor) -> Tensor:
    """Inverse of `patchify_flux2`: [B, 4C, h, w] → [B, C, 2h, 2w]."""
    b, c4, h, w = z.shape
    z = z.reshape(b, c4 // 4, 2, 2, h, w)  # [B, C, i, j, h, w]
    return z.permute(0, 1, 4, 2, 5, 3).reshape(b, c4 // 4, h * 2, w * 2)


def flux2_bn_stats(ae_path: str | Path) -> tuple[Tensor, Tensor]:
    """(running_mean[128], running_var[128]) as float32 from a FLUX.2 AE file (BFL or diffusers layout).

    Reads only those two tensors from a safetensors file (the AE is ~300 MB)."""
    path = Path(ae_path)
    if path.suffix == ".safetensors" and path.is_file():
        try:
            with safe_open(str(path), framework="pt") as f:
                keys = set(f.keys())
                state = {k: f.get_tensor(k) for k in _BN_KEYS if k in keys}
        except (SafetensorError, OSError, ValueError) as e:
            raise VAEError(f"{path}: not a readable safetensors file ({e})") from e
    else:
        state = read_tensors(path)
    if not all(k in state for k in _BN_KEYS):
        raise VAEError(f"{path}: no {' / '.join(_BN_KEYS)} tensors: not a FLUX.2 autoencoder file")
    return state[_BN_KEYS[0]].float(), state[_BN_KEYS[1]].float()


def normalize_flux2(z128: Tensor, mean: Tensor, var: Tensor, eps: float = BN_EPS) -> Tensor:
    """(z − mean)/sqrt(var + eps) per channel, in z's dtype (the klein conversion: docs/model.md#flux2-latents)."""
    m = mean.to(z128).view(1, -1, 1, 1)
    s = torch.sqrt(var.to(z128).view(1, -1, 1, 1) + eps)
    return (z128 - m) / s


def denormalize_flux2(z128: Tensor, mean: Tensor, var: Tensor, eps: float = BN_EPS) -> Tensor:
    """Inverse of `normalize_flux2`."""
    return z128 * torch.sqrt(var.to(z128).view(1, -1, 1, 1) + eps) + mean.to(z128).view(1, -1, 1, 1)


def bfl_to_diffusers_flux2(state: dict[str, Tensor], model_config: dict[str, Any], source: str,
                           names: dict[str, str] | None = None) -> dict[str, Tensor]:
    """BFL FLUX.2 AE tensors → AutoencoderKLFlux2 names, every tensor placed (`names`: new → file key)."""
    renamed: dict[str, Tensor] = {}
    extra: dict[str, Tensor] = {}
    file_names: dict[str, str] = {}
    for key, value in state.items():
        if key.startswith("bn."):
            extra[key] = value
            continue
        original = key
        for old, new in _BFL_QUANT.items():
            if key.startswith(old):
                key = new + key[len(old):]
        renamed[key] = value
        file_names[key] = original
    converted_names: dict[str, str] = {}
    out = track_renames(renamed, convert_ldm_vae_checkpoint, source, converted_names, config=model_config)
    if names is not None:
        names.update({k: file_names[v] for k, v in converted_names.items()})
    return {**out, **extra}


def load_flux2_state(model_config: dict[str, Any], state: dict[str, Tensor], source: str) -> AutoencoderKLFlux2:
    names: dict[str, str] = {}
    state = bfl_to_diffusers_flux2(state, model_config, source, names) if is_bfl_layout(state) else \
        fix_legacy_attention(state)
    # A batch counter, not a statistic: meaningless in eval mode, so a file may leave it out.
    state.setdefault("bn.num_batches_tracked", torch.tensor(0, dtype=torch.long))
    with torch.device("meta"):
        model = AutoencoderKLFlux2(**model_config)
    return load_strict(model, state, source, names)


class Flux2Codec(LatentCodec):
    """FLUX.2 (kind "flux2"): 128-channel, 1/16-resolution BN-normalised latent."""

    kind = "flux2"

    def __init__(self, config: dict[str, Any], model: AutoencoderKLFlux2, device: torch.device | str,
                 dtype: torch.dtype | None = None) -> None:
        norm = config["latent"]["normalisation"]
        if norm["kind"] != "batchnorm" or norm["patch"] != 2:
            raise VAEError(f"flux2: unsupported normalisation {norm}")
        self.eps = float(norm["eps"])
        super().__init__(config, model, device, dtype)

    def bn_stats(self) -> tuple[Tensor, Tensor]:
        bn = self.model.bn
        return bn.running_mean, bn.running_var

    def encode_raw(self, images: Tensor) -> Tensor:
        return self.model.encode(images).latent_dist.mean  # [B, 32, H/8, W/8]

    def normalize(self, raw: Tensor) -> Tensor:
        # Eval-mode BatchNorm like upstream's `bn` module (stats in the codec dtype); [B, 128, H/16, W/16].
        mean, var = self.bn_stats()
        return F.batch_norm(patchify_flux2(raw), mean, var, training=False, eps=self.eps)

    def denormalize(self, latent: Tensor) -> Tensor:
        return unpatchify_flux2(denormalize_flux2(latent, *self.bn_stats(), eps=self.eps))

    def decode_raw(self, raw: Tensor) -> Tensor:
        return self.model.decode(raw).sample
