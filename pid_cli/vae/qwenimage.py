"""Qwen-Image autoencoder, one frame: the 2-D Wan-2.1-style VAE of `QwenImage_VAE_2d.pth`.

diffusers' AutoencoderKLQwenImage is the 3-D causal video VAE. For a single frame it reduces
exactly to a 2-D network: causal front padding means only the last temporal tap of each 3-D kernel
sees the frame, and the temporal down/up-sampling convs (`time_conv`) only act from the second frame
on. Upstream ships that 2-D network pre-converted, so we build it here in 2-D (a third of the
convolution work of running the 3-D model on one frame, and the shipped file loads as is). The
module names reproduce the file's Wan key names (`encoder.downsamples.3.residual.2.weight`);
tests/test_vae.py proves equality with the diffusers 3-D model on one frame.

Latent = (μ − mean_c)·(1/std_c), with mean and 1/std as tensors in the codec dtype like upstream.
Also accepted: a 3-D Wan-layout file or a diffusers-layout AutoencoderKLQwenImage file, reduced to
2-D on load by `wan3d_to_2d` (keep weight[:, :, -1], squeeze the norm gammas, drop `time_conv`).
"""

from __future__ import annotations

from itertools import pairwise
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers
from torch import Tensor, nn

from pid_cli.vae.base import LatentCodec, VAEError, load_strict


class RMSNorm2d(nn.Module):
    """Channel RMS norm: x / ‖x‖₂ over channels · sqrt(C) · γ (Wan's RMS_norm, no bias)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(x, dim=1) * self.scale * self.gamma


class ResidualBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        # Indices match the file: 0 norm, 2 conv, 3 norm, 6 conv (5 was dropout, 0 at inference).
        self.residual = nn.Sequential(
            RMSNorm2d(in_dim), nn.SiLU(), nn.Conv2d(in_dim, out_dim, 3, padding=1),
            RMSNorm2d(out_dim), nn.SiLU(), nn.Identity(), nn.Conv2d(out_dim, out_dim, 3, padding=1),
        )
        self.shortcut = nn.Conv2d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.shortcut(x) + self.residual(x)


class AttentionBlock(nn.Module):
    """Single-head spatial self-attention over all H·W positions."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = RMSNorm2d(dim)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        qkv = self.to_qkv(self.norm(x)).reshape(b, 1, c * 3, h * w).transpose(2, 3)  # [B, 1, HW, 3C]
        q, k, v = qkv.contiguous().chunk(3, dim=-1)
        out = F.scaled_dot_product_attention(q, k, v)  # [B, 1, HW, C]
        return x + self.proj(out.squeeze(1).transpose(1, 2).reshape(b, c, h, w))


class Resample(nn.Module):
    """×2 down (zero pad right/bottom, stride-2 3×3 conv) or ×2 up (nearest, 3×3 conv halving channels)."""

    def __init__(self, dim: int, up: bool) -> None:
        super().__init__()
        if up:
            self.resample = nn.Sequential(nn.Upsample(scale_factor=2.0, mode="nearest-exact"),
                                          nn.Conv2d(dim, dim // 2, 3, padding=1))
        else:
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))

    def forward(self, x: Tensor) -> Tensor:
        if isinstance(self.resample[0], nn.Upsample):  # interpolate in float32 (bf16 safety, as upstream)
            return self.resample[1](self.resample[0](x.float()).to(x.dtype))
        return self.resample(x)


def _middle(dim: int) -> nn.Sequential:
    return nn.Sequential(ResidualBlock(dim, dim), AttentionBlock(dim), ResidualBlock(dim, dim))


def _head(dim: int, out: int) -> nn.Sequential:
    return nn.Sequential(RMSNorm2d(dim), nn.SiLU(), nn.Conv2d(dim, out, 3, padding=1))


class Encoder2d(nn.Module):
    def __init__(self, dim: int, z2: int, dim_mult: list[int], num_res_blocks: int) -> None:
        super().__init__()
        dims = [dim * m for m in [1, *dim_mult]]
        self.conv1 = nn.Conv2d(3, dims[0], 3, padding=1)
        layers: list[nn.Module] = []
        for i, (d_in, d_out) in enumerate(pairwise(dims)):
            for r in range(num_res_blocks):
                layers.append(ResidualBlock(d_in if r == 0 else d_out, d_out))
            if i != len(dim_mult) - 1:
                layers.append(Resample(d_out, up=False))
        self.downsamples = nn.Sequential(*layers)
        self.middle = _middle(dims[-1])
        self.head = _head(dims[-1], z2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.middle(self.downsamples(self.conv1(x))))


class Decoder2d(nn.Module):
    def __init__(self, dim: int, z: int, dim_mult: list[int], num_res_blocks: int) -> None:
        super().__init__()
        dims = [dim * m for m in [dim_mult[-1], *dim_mult[::-1]]]
        self.conv1 = nn.Conv2d(z, dims[0], 3, padding=1)
        self.middle = _middle(dims[0])
        layers: list[nn.Module] = []
        for i, (d_in, d_out) in enumerate(pairwise(dims)):
            d_in = d_in // 2 if i > 0 else d_in  # every upsample halved the channels
            for r in range(num_res_blocks + 1):
                layers.append(ResidualBlock(d_in if r == 0 else d_out, d_out))
            if i != len(dim_mult) - 1:
                layers.append(Resample(d_out, up=True))
        self.upsamples = nn.Sequential(*layers)
        self.head = _head(dims[-1], 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.upsamples(self.middle(self.conv1(x))))


class QwenImageVAE2d(nn.Module):
    """encoder → conv1 (posterior moments); conv2 → decoder. Keys as in `QwenImage_VAE_2d.pth`."""

    def __init__(self, dim: int = 96, z_dim: int = 16, dim_mult: list[int] | None = None,
                 num_res_blocks: int = 2) -> None:
        super().__init__()
        dim_mult = dim_mult or [1, 2, 4, 4]
        self.z_dim = z_dim
        self.encoder = Encoder2d(dim, z_dim * 2, dim_mult, num_res_blocks)
        self.conv1 = nn.Conv2d(z_dim * 2, z_dim * 2, 1)
        self.conv2 = nn.Conv2d(z_dim, z_dim, 1)
        self.decoder = Decoder2d(dim, z_dim, dim_mult, num_res_blocks)

    def encode_mean(self, x: Tensor) -> Tensor:
        return self.conv1(self.encoder(x))[:, : self.z_dim]  # μ: [B, z, H/8, W/8]

    def decode(self, z: Tensor) -> Tensor:
        return self.decoder(self.conv2(z))


def wan3d_to_2d(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Wan-layout 3-D causal VAE tensors → the single-frame 2-D network: the last temporal tap of each
    3-D kernel, gammas as [C, 1, 1], and no `time_conv` (it never acts on the first frame)."""
    out = {}
    for key, value in state.items():
        if ".time_conv." in key:
            continue
        if value.ndim == 5:
            value = value[:, :, -1]
        elif key.endswith(".gamma"):
            value = value.reshape(-1, 1, 1)
        out[key] = value
    return out


def diffusers_to_wan_names(model: QwenImageVAE2d) -> dict[str, str]:
    """diffusers AutoencoderKLQwenImage key → Wan key, derived by running diffusers' own Wan converter
    on this model's Wan names (so the map is exactly the converter's inverse)."""
    dummies = {k: torch.empty(0, device="meta") for k in model.state_dict()}
    by_id = {id(t): k for k, t in dummies.items()}
    return {new: by_id[id(t)] for new, t in convert_wan_vae_to_diffusers(dummies).items()}


def load_qwen_state(model_config: dict[str, Any], state: dict[str, Tensor], source: str) -> QwenImageVAE2d:
    """QwenImageVAE2d filled strictly from a 2-D file, a 3-D Wan file or a diffusers 3-D file."""
    with torch.device("meta"):
        model = QwenImageVAE2d(**model_config)
    if "encoder.conv_in.weight" in state:  # diffusers layout
        names = diffusers_to_wan_names(model)
        state = {names.get(k, k): v for k, v in state.items() if ".time_conv." not in k}
    if any(v.ndim == 5 for v in state.values()):
        state = wan3d_to_2d(state)
    return load_strict(model, state, source)


class QwenImageCodec(LatentCodec):
    """Qwen-Image / Qwen-Image-2512 (kind "qwenimage"): 16 channels, per-channel mean/std."""

    kind = "qwenimage"

    def __init__(self, config: dict[str, Any], model: QwenImageVAE2d, device: torch.device | str,
                 dtype: torch.dtype | None = None) -> None:
        norm = config["latent"]["normalisation"]
        if norm["kind"] != "per_channel":
            raise VAEError(f"qwenimage: unsupported normalisation {norm}")
        super().__init__(config, model, device, dtype)
        # Upstream keeps mean and 1/std as tensors in the working dtype (1/std computed in that dtype).
        self.mean = torch.tensor(norm["mean"], dtype=self.dtype, device=self.device).view(1, -1, 1, 1)
        self.inv_std = 1.0 / torch.tensor(norm["std"], dtype=self.dtype, device=self.device).view(1, -1, 1, 1)

    def encode_raw(self, images: Tensor) -> Tensor:
        return self.model.encode_mean(images)

    def normalize(self, raw: Tensor) -> Tensor:
        return (raw - self.mean) * self.inv_std

    def denormalize(self, latent: Tensor) -> Tensor:
        return latent / self.inv_std + self.mean

    def decode_raw(self, raw: Tensor) -> Tensor:
        return self.model.decode(raw)
