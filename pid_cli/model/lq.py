"""The latent ("LQ") branch: a ControlNet-like projection of the encoder latent onto the
patch grid, and the sigma-aware gates that inject it into the image stream."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pid_cli.model.layers import Conv2d, GroupNorm, Linear


class ResBlock(nn.Module):
    """h + Conv(SiLU(GN(Conv(SiLU(GN(h)))))); `block` indices match the released keys."""

    def __init__(self, dim: int, padding_mode: str):
        super().__init__()
        self.block = nn.Sequential(
            GroupNorm(4, dim, eps=1e-5), nn.SiLU(), Conv2d(dim, dim, 3, padding=1, padding_mode=padding_mode),
            GroupNorm(4, dim, eps=1e-5), nn.SiLU(), Conv2d(dim, dim, 3, padding=1, padding_mode=padding_mode),
        )

    def forward(self, h: Tensor) -> Tensor:
        return h + self.block(h)


class SigmaGate(nn.Module):
    """s + sigmoid(proj([s, f]) − exp(log_alpha)·σ) ⊙ f.

    The σ term closes the gate as the latent gets noisier. `per_dim` selects a gate per
    token and channel (v1) instead of one per token (v1.5).
    """

    def __init__(self, hidden: int, per_dim: bool):
        super().__init__()
        self.log_alpha = nn.Parameter(torch.tensor(0.0))
        self.content_proj = Linear(2 * hidden, hidden if per_dim else 1)

    def forward(self, s: Tensor, f: Tensor, sigma: Tensor) -> Tensor:
        gate = torch.sigmoid(self.content_logit(s, f) - self.log_alpha.float().exp() * sigma.float()[:, None, None])
        return s + gate * f

    def content_logit(self, s: Tensor, f: Tensor) -> Tensor:
        """content_proj([s, f]) → [B, L, hidden or 1] in the weight dtype. With one gate per token the
        projection is two dot products per token, written out so that the compiled gate reads s and f once,
        without the [s, f] concatenation and a one-column GEMM (3 kernels per gate; docs/performance.md#machinery)."""
        proj = self.content_proj
        if proj.out_features > 1:
            return proj(torch.cat([s, f], dim=-1))
        weight, hidden = proj.weight.float(), s.shape[-1]  # [1, 2·hidden]
        dot_s, dot_f = ((x.to(proj.weight.dtype).float() * w).sum(-1, keepdim=True)  # [B, L, 1] each
                        for x, w in ((s, weight[0, :hidden]), (f, weight[0, hidden:])))
        return (dot_s + dot_f + proj.bias.float()).to(proj.weight.dtype)


class LQProjection(nn.Module):
    """Latent [B, C_lat, zh, zw] → one feature map [B, L, hidden] per injection point.

    The latent is optionally un-patchified (Flux2 v1.5: 128 → 32 channels at 2× size),
    nearest-upsampled onto the patch grid, and run through a small conv stack.
    """

    def __init__(self, latent_channels: int, unpatchify: int, lq_dim: int, hidden: int, num_res_blocks: int,
                 num_heads: int, gate_per_dim: bool, padding_mode: str, pit_head: bool):
        super().__init__()
        if latent_channels % (unpatchify * unpatchify):
            raise ValueError(f"lq_latent_channels={latent_channels} is not divisible by "
                             f"lq_latent_unpatchify_factor²={unpatchify ** 2}")
        self.unpatchify = unpatchify
        conv_in = latent_channels // (unpatchify * unpatchify)
        self.latent_proj = nn.Sequential(
            Conv2d(conv_in, lq_dim, 3, padding=1, padding_mode=padding_mode), nn.SiLU(),
            Conv2d(lq_dim, lq_dim, 3, padding=1, padding_mode=padding_mode),
            *(ResBlock(lq_dim, padding_mode) for _ in range(num_res_blocks)),
        )
        self.output_heads = nn.ModuleList(Linear(lq_dim, hidden) for _ in range(num_heads))
        self.pit_head = Linear(lq_dim, hidden) if pit_head else None
        self.gate_modules = nn.ModuleList(SigmaGate(hidden, gate_per_dim) for _ in range(num_heads))

    def unpatchify_latent(self, z: Tensor) -> Tensor:
        """out[b, c, y·f+i, x·f+j] = in[b, c·f²+i·f+j, y, x] (inverse of the Flux2 2×2 patchify)."""
        f = self.unpatchify
        if f == 1:
            return z
        b, c, h, w = z.shape
        z = z.view(b, c // (f * f), f, f, h, w).permute(0, 1, 4, 2, 5, 3)  # [B, C', h, f, w, f]
        return z.reshape(b, c // (f * f), h * f, w * f)

    def tokens(self, z: Tensor, grid_h: int, grid_w: int) -> Tensor:
        """Latent [B, C_lat, zh, zw] → conv features [B, L, lq_dim] on the patch grid. The
        per-injection heads (`output_heads[k]`, `pit_head`) turn them into [B, L, hidden]."""
        z = self.unpatchify_latent(z.float())
        z = F.interpolate(z, size=(grid_h, grid_w), mode="nearest")  # [B, C', Hs, Ws]
        # [B, L, lq_dim], contiguous: the heads' GEMMs then fuse their bias (on the transposed view cuBLAS
        # ran the product and the bias add as two kernels, each step)
        return self.latent_proj(z).flatten(2).transpose(1, 2).contiguous()
