"""The torch ops each of our kernels replaces, on any device and without Triton: the CPU implementations of the
`torch.ops.pid.*` ops (ops.py) and what the kernels are held to (tests; `tests/gpu/test_kernels.py` and the kernels'
bench scripts on a GPU). Each kernel module's docstring says how its arithmetic relates to these.

`sampler_step.py`'s reference is `sampler.step`'s torch path."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from pid_cli.kernels.constants import FP8_MAX, INT8_MAX, KEY_BLOCK, split_widths

# ---------------------------------------------------------------------------------------------------------------
# 8-bit attention (kernels/attention8.py has the arithmetic and why; kernels/kv_quant.py quantises K and V)


def mma_key_order(x: Tensor, inverse: bool = False) -> Tensor:
    """Reorder the last axis (keys, a multiple of 32) the way the kernel feeds P to Hopper's FP8 MMA.

    Why: the Q·K product leaves each thread, per row and group of 32 keys, the logits of keys 8j + 2c + b
    (c = lane % 4; j < 4, b < 2), while the P·V product wants from that thread P of keys 16h + 4c + e (h < 2,
    e < 4). Moving those values between threads cost ~100 shuffle and select instructions per block of 128
    logits, a tenth of a loop bound by instruction issue. A sum over keys does not care about their order, so
    the kernel instead relabels key 16·j1 + 8·j0 + 4·c1 + 2·c0 + b as 16·j1 + 8·c1 + 4·c0 + 2·j0 + b, which
    keeps every value in the thread that computed it, and V's keys are stored relabelled alike."""
    groups = x.unflatten(-1, (-1, 2, 2, 2, 2, 2))  # [..., N/32, j1, j0, c1, c0, b]
    groups = groups.movedim(-2, -4) if inverse else groups.movedim(-4, -2)  # ↔ [..., N/32, j1, c1, c0, j0, b]
    return groups.flatten(-6)


def _round_int8(x: Tensor) -> Tensor:
    return torch.round(x).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)


def quantize_kv(k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """k, v [B, N, heads, D] → k8 [B, heads, Np, Dqk] int8, k_scale [B, heads, Np/128] fp32,
    v8 [B, heads, Dv, Np] float8_e4m3fn (transposed), v_scale [B, heads, D] fp32; Np is N rounded up
    to 128; padding rows and channels are zero, except channel D of v8: ones. v8's keys are in
    `mma_key_order`."""
    n, d = k.shape[1], k.shape[3]
    qk_rest, v_rest = split_widths(d)
    n_pad = -(-n // KEY_BLOCK) * KEY_BLOCK
    k = k.float()
    k = (k - k.mean(1, keepdim=True)).transpose(1, 2)  # [B, heads, N, D]
    k = F.pad(k, (0, 64 + qk_rest - d, 0, n_pad - n))  # [B, heads, Np, Dqk]
    blocks = k.unflatten(2, (n_pad // KEY_BLOCK, KEY_BLOCK))  # [B, heads, Np/128, 128, Dqk]
    k_scale = blocks.abs().amax((-1, -2)).clamp_min(1e-20) / INT8_MAX  # [B, heads, Np/128]
    k8 = _round_int8(blocks / k_scale[..., None, None]).flatten(2, 3)
    v = v.float()
    v_scale = v.abs().amax(1).clamp_min(1e-20) / FP8_MAX  # [B, heads, D]
    v = (v / v_scale[:, None]).permute(0, 2, 3, 1)  # [B, heads, D, N]
    v = torch.cat([v, torch.ones_like(v[:, :, :1])], 2)  # [B, heads, D + 1, N]: the denominator's channel
    v = F.pad(v, (0, n_pad - n, 0, 64 + v_rest - d - 1))  # [B, heads, Dv, Np]
    return k8, k_scale, mma_key_order(v).to(torch.float8_e4m3fn).contiguous(), v_scale


def attend_quantized(q: Tensor, k8: Tensor, k_scale: Tensor, v8: Tensor, v_scale: Tensor, n_kv: int) -> Tensor:
    """The kernel's arithmetic on `quantize_kv`'s outputs with plain torch ops, P quantised against the exact
    row max rather than the kernel's running one: the op's CPU implementation and the reference the GPU
    kernel is held to. q [B, Nq, heads, D] → [B, Nq, heads, D] in q's dtype."""
    d = q.shape[-1]
    q32 = q.float().transpose(1, 2)  # [B, heads, Nq, D]
    q_scale = q32.abs().amax(-1, keepdim=True).clamp_min(1e-20) / INT8_MAX
    q8 = _round_int8(q32 / q_scale).float()
    keys = (k8.float().unflatten(2, (-1, KEY_BLOCK)) * k_scale[..., None, None]).flatten(2, 3)[:, :, :n_kv, :d]
    logits = (q8 @ keys.transpose(-1, -2)) * q_scale * (math.log2(math.e) / math.sqrt(d))  # log2 units
    p = torch.exp2(logits - logits.amax(-1, keepdim=True)) * FP8_MAX
    p8 = p.to(torch.float8_e4m3fn).float()
    values = mma_key_order(v8.float(), inverse=True)[:, :, :d + 1, :n_kv].transpose(-1, -2)  # [B, heads, N, D + 1]
    weighted = p8 @ values  # [B, heads, Nq, D + 1]: the last channel sums the weights (V's ones)
    out = weighted[..., :d] / weighted[..., d:] * v_scale[:, :, None, :]
    return out.transpose(1, 2).to(q.dtype)


def attention8(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """8-bit attention's result computed with torch ops on any device. q [B, Nq, heads, D], k, v [B, N, heads, D]
    → [B, Nq, heads, D] in v's dtype."""
    return attend_quantized(q.to(v.dtype), *quantize_kv(k, v), k.shape[1])


# ---------------------------------------------------------------------------------------------------------------
# norm_rope (kernels/norm_rope.py)


def norm_rope(x: Tensor, weight: Tensor, eps: float, cos: Tensor, sin: Tensor, out_dtype: torch.dtype) -> Tensor:
    """`apply_rope(RMSNorm(x), (cos, sin))` of model/layers.py rounded to out_dtype, as one function: x [B, N, heads,
    head_dim], weight [head_dim], cos/sin [N, head_dim/2] fp32 → [B, N, heads, head_dim] in out_dtype. RMSNorm's
    statistics in fp32, the normalised value rounded to x's dtype before the weight multiplies it, consecutive
    pairs rotated in fp32."""
    x32 = x.float()
    normed = weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    cos, sin = (r[None, :, None, :] for r in (cos, sin))  # [1, N, 1, head_dim/2]
    pairs = normed.float().unflatten(-1, (-1, 2))
    a, b = pairs[..., 0], pairs[..., 1]
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2).to(out_dtype)


# ---------------------------------------------------------------------------------------------------------------
# pixel_mlp (kernels/pixel_mlp.py)


def pixel_mlp(xp: Tensor, modulation: Tensor, expanded: Tensor, norm_weight: Tensor, eps: float,
              w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor) -> Tensor:
    """The torch ops the pixel MLP kernel replaces (`PiTBlock.residuals` of a bf16 network, any device); returns
    the new xp, its inputs untouched."""
    ga, sh, sc, gm = modulation.chunk(4, -1)  # each [..., C] bf16
    x = xp + ga * expanded
    x32 = x.float()
    h = norm_weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps))
    m = h * (1 + sc) + sh
    v = F.linear(F.gelu(F.linear(m.to(torch.bfloat16), w1, b1)), w2, b2)  # [..., C] → [..., 4C] → [..., C]
    return x + gm * v
