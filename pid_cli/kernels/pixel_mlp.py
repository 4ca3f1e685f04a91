"""The tail of a PiT block's per-pixel work (`PiTBlock.post` after its linear projections) as one Triton kernel.

Why it exists: in eager or Inductor form the tail is ~6 kernels (gated residual, RMSNorm + modulation, fc1, GELU,
fc2, gated residual), each reading and writing the [M, C] or [M, 4C] per-pixel tensors again, all memory-bound.
The MLP is 16→64→16 wide, far too narrow for cuBLAS to be anything but memory-bound, and its hidden [M, 4C]
activations make two round trips through memory. Here one program takes BLOCK_M pixels, reads xp, the modulation
and the attention output once, keeps the hidden activations in registers, and writes the new residual stream over
xp: 288 bytes per pixel at C = 16, nothing else (timings against the Inductor-compiled ops:
docs/performance.md#machinery). It is bound by instruction issue, not memory: libdevice's erf is ~33 instructions
per hidden value, ~13 of them predicated moves that pick its polynomial's coefficients.

The arithmetic is eager PyTorch's (`reference.pixel_mlp`), every bf16 rounding reproduced:
    ga, sh, sc, gm = modulation.chunk(4, -1)                     # bf16
    x  = xp + bf16(ga · expanded)                                # fp32
    h  = norm_weight · x · rsqrt(mean(x²) + eps)                 # fp32 (RMSNorm)
    m  = bf16(h · bf16(1 + sc) + sh)                             # the modulation, rounded for fc1
    u  = bf16(m @ w1ᵀ + b1);  g = bf16(gelu(u))                  # fp32 products and bias, exact erf GELU
    v  = bf16(g @ w2ᵀ + b2)
    xp ← x + bf16(gm · v)
Results differ from eager only where a different fp32 summation order (the norm's mean, the dots) moves a value
across a bf16 rounding boundary.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

# pixel_dim → (BLOCK_M, num_warps), the fastest without register spills in the --sweep of the pixel-MLP check
# script (`git show be5e2df:scripts/experiments/pixel_mlp_check.py`; H100, Triton 3.6; C = 16: 315 µs per 2M
# pixels at (64, 4), 371 at (128, 8), 495 at (128, 4), 534 at (32, 4)). Four warps are
# one warpgroup, whose MMA (wgmma) takes 64 rows; 64 rows keep a thread at 69 registers at C = 16, so many programs
# share an SM. At C = 64, 64 rows spill (the [64, 256] fp32 hidden block) and 32 rows take the older mma.sync path.
# C must be a power of two ≥ 16 (tl.dot's smallest dimension).
CONFIGS: dict[int, tuple[int, int]] = {16: (64, 4), 32: (64, 4), 64: (32, 4)}
NUM_STAGES = 1  # no loop to pipeline


@triton.jit
def _pixel_mlp_kernel(XP, MOD, EXP, NW, W1, B1, W2, B2, n_pixels, eps,
                      C: tl.constexpr, BLOCK_M: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    ok = (rows < n_pixels)[:, None]
    rows = rows.to(tl.int64)  # M·4C passes 2^31 at C = 64
    cols = tl.arange(0, C)
    hid = tl.arange(0, 4 * C)

    # the weights, transposed for the dots: w1ᵀ [C, 4C], w2ᵀ [4C, C]
    w1t = tl.load(W1 + hid[None, :] * C + cols[:, None])
    w2t = tl.load(W2 + cols[None, :] * (4 * C) + hid[:, None])
    b1 = tl.load(B1 + hid).to(tl.float32)
    b2 = tl.load(B2 + cols).to(tl.float32)
    nw = tl.load(NW + cols)

    px = rows[:, None] * C + cols[None, :]  # [BLOCK_M, C]
    mod = MOD + rows[:, None] * (4 * C) + cols[None, :]  # chunks of C: gate_a, shift_m, scale_m, gate_m
    xp = tl.load(XP + px, mask=ok, other=0.0)
    ga = tl.load(mod, mask=ok, other=0.0).to(tl.float32)
    att = tl.load(EXP + px, mask=ok, other=0.0).to(tl.float32)
    x = xp + (ga * att).to(tl.bfloat16).to(tl.float32)

    rstd = tl.math.rsqrt(tl.sum(x * x, 1) / C + eps)  # [BLOCK_M]
    h = nw[None, :] * (x * rstd[:, None])
    sh = tl.load(mod + C, mask=ok, other=0.0).to(tl.float32)
    sc = tl.load(mod + 2 * C, mask=ok, other=0.0).to(tl.float32)
    one_sc = (1.0 + sc).to(tl.bfloat16).to(tl.float32)
    m = (h * one_sc + sh).to(tl.bfloat16)

    u = tl.dot(m, w1t) + b1[None, :]  # [BLOCK_M, 4C] fp32
    u = u.to(tl.bfloat16).to(tl.float32)
    g = (0.5 * u * (1.0 + tl.math.erf(u * 0.7071067811865476))).to(tl.bfloat16)
    v = tl.dot(g, w2t) + b2[None, :]  # [BLOCK_M, C] fp32
    v = v.to(tl.bfloat16).to(tl.float32)

    gm = tl.load(mod + 3 * C, mask=ok, other=0.0).to(tl.float32)
    tl.store(XP + px, x + (gm * v).to(tl.bfloat16).to(tl.float32), mask=ok)


def refusal(xp: Tensor, modulation: Tensor, expanded: Tensor, norm_weight: Tensor, w1: Tensor, b1: Tensor,
            w2: Tensor, b2: Tensor) -> str | None:
    """Why `launch` would not take these tensors, or None: a pixel width C outside CONFIGS, dtypes other than xp
    and norm_weight fp32 and the rest bf16, a non-contiguous xp (written in place), or shapes not xp's."""
    c = xp.shape[-1]
    if c not in CONFIGS:
        return f"unsupported pixel_dim {c} (supported: {sorted(CONFIGS)})"
    bf16 = (modulation, expanded, w1, b1, w2, b2)
    if xp.dtype != torch.float32 or norm_weight.dtype != torch.float32 or any(t.dtype != torch.bfloat16 for t in bf16):
        return "wants xp and norm_weight fp32, everything else bf16"
    if not xp.is_contiguous():
        return "xp must be contiguous (it is written in place)"
    n_pixels = xp.numel() // c
    if modulation.numel() != 4 * c * n_pixels or expanded.numel() != c * n_pixels or w1.shape != (4 * c, c):
        return "shapes do not match xp's"
    return None


def launch(xp: Tensor, modulation: Tensor, expanded: Tensor, norm_weight: Tensor, eps: float,
           w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor) -> None:
    """xp [..., C] fp32 (contiguous), modulation [..., 4C] and expanded [..., C] bf16, norm_weight [C] fp32,
    w1 [4C, C], b1 [4C], w2 [C, 4C], b2 [C] bf16: writes `reference.pixel_mlp`'s result into xp. ValueError with the
    `refusal` otherwise (the caller then takes the torch path)."""
    reason = refusal(xp, modulation, expanded, norm_weight, w1, b1, w2, b2)
    if reason is not None:
        raise ValueError(f"pixel_mlp: {reason}")
    c = xp.shape[-1]
    n_pixels = xp.numel() // c
    block_m, warps = CONFIGS[c]
    _pixel_mlp_kernel[(triton.cdiv(n_pixels, block_m),)](
        xp, modulation.contiguous(), expanded.contiguous(), norm_weight.contiguous(), w1.contiguous(),
        b1.contiguous(), w2.contiguous(), b2.contiguous(), n_pixels, eps, C=c, BLOCK_M=block_m,
        num_warps=warps, num_stages=NUM_STAGES)
