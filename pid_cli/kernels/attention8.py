"""8-bit attention for Hopper GPUs, the Triton kernel of the opt-in `--attention 8bit` precision mode.

Why it exists: at 4096² attention is most of a decode (1.65e15 FLOP per image) and cuDNN's bf16 kernel already
runs at its ceiling. Hopper's 8-bit tensor cores have twice the bf16 rate, and PyTorch's SDPA refuses 8-bit
inputs, so the kernel is ours (Triton). At PiD's head dims the softmax's per-element work (exp2, conversions), not
the tensor cores, bounds it. Its speed against cuDNN, per card: docs/performance.md#kernels.

Q·K runs in INT8 and P·V in FP8 (e4m3), the split SageAttention made popular: logits are sums of
many products whose operands have a bounded range, where INT8's uniform 8 bits lose ~4x less than
FP8's 4-bit mantissa; probabilities span decades, which only a float format keeps.
  Q  one scale per query row (its max |q| / 127), rounded to INT8 inside the kernel from bf16.
  K  the per-head mean over all keys removed first (adding q·mean to a whole row of logits leaves
     softmax unchanged, and it shrinks what 8 bits must hold), then one scale per block of 128 keys.
  V  one FP8 scale per channel over all keys; stored transposed, [.., head_dim, keys], as Hopper's
     8-bit MMA wants its second operand, with one more channel of ones after the last (see P), and its keys
     in the order in which the kernel hands P to the P·V product (see `reference.mma_key_order`).
  P  the softmax numerator exp2(s - max) ∈ (0, 1] times 448, e4m3's full range. The softmax denominator is
     the sum of the FP8 numerators, the weights that multiply V. At head dim 64 the ones channel of V makes
     the P·V product compute it: one adder less per logit, where per-logit work bounds the kernel. Above 64
     the kernel sums the unrounded numerators instead (faster there; the two sums differ by ~1e-3 relative).
Logits, the running max and both accumulators stay fp32.

Head dims 64 (MMDiT) and 72 (PiT) are what PiD has. Triton blocks are powers of two, so a head dim
above 64 is split into a 64-wide part and a zero-padded remainder (32 wide for Q·K, whose 8-bit MMA
needs K ≥ 32); V's channels plus the ones channel are split alike (64 + 16 for both head dims;
`constants.split_widths`).

K and V are quantised beforehand, by `reference.quantize_kv`'s arithmetic (on a GPU the Triton kernels of
kv_quant.py, which read the text and image parts of K and V where the projections left them, without
concatenating them). `reference.attend_quantized` computes this kernel's arithmetic with plain torch ops on any
device; the tests hold it against exact attention on the CPU, and `tests/gpu/test_kernels.py` holds the kernel
against both on a GPU.

The kernel: one program owns BLOCK_M query rows of one (batch, head): it rounds them to INT8, then streams the
pre-quantised keys and values in blocks of BLOCK_N with the online softmax, logits and accumulators in fp32. At
head dim 64 the softmax denominator accumulates in the P·V product (V's ones channel); above 64 summing P directly
measured faster. Key blocks past the last full one are masked; nothing else needs masks because keys and values
are zero-padded to whole blocks of 128."""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from pid_cli.kernels import constants
from pid_cli.kernels.constants import KEY_BLOCK, split_widths  # reference.mma_key_order: P's key order

INT8_MAX: tl.constexpr = tl.constexpr(constants.INT8_MAX)
LOG2_FP8_MAX: tl.constexpr = tl.constexpr(math.log2(constants.FP8_MAX))
# int32 → fp32 without a conversion instruction (those share the slow pipe with exp2): for |s| < 2^22,
# the float whose bits are s + 0x4B400000 is exactly 1.5·2^23 + s
MAGIC_BITS: tl.constexpr = tl.constexpr(0x4B400000)
MAGIC: tl.constexpr = tl.constexpr(12582912.0)

# (BLOCK_M, BLOCK_N, num_warps, num_stages) per head dim, the fastest on an H100 in
# `scripts/attention8_bench.py --sweep` (Triton 3.6; its automatic warp specialisation failed to compile
# or did not help here)
CONFIGS: dict[int, tuple[int, int, int, int]] = {64: (128, 128, 4, 3), 72: (64, 128, 4, 3)}
DEFAULT_CONFIG = (64, 128, 4, 3)


@triton.jit
def _round_int8(x):
    return tl.where(x >= 0, x + 0.5, x - 0.5).to(tl.int8)  # the cast truncates; |x| ≤ 127 by the scale


@triton.jit
def _mma_key_order(p, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """`reference.mma_key_order` on P's keys: a relabelling only, every value stays in its thread's registers."""
    p = tl.reshape(p, [BLOCK_M, BLOCK_N // 32, 2, 2, 2, 2, 2])  # [rows, groups of 32 keys, j1, j0, c1, c0, b]
    return tl.reshape(tl.permute(p, [0, 1, 2, 4, 5, 3, 6]), [BLOCK_M, BLOCK_N])  # [.., j1, c1, c0, j0, b]


@triton.jit
def _attend(acc_lo, acc_hi, m_i, l_i, q8_lo, q8_hi, row_factor, k_base, v_base, ks_base, start, n_kv, n_pad,
            D_LO: tl.constexpr, D_HI: tl.constexpr, DV_HI: tl.constexpr, BLOCK_N: tl.constexpr,
            KEY_BLOCK: tl.constexpr, MASK: tl.constexpr, ONES_SUM: tl.constexpr):
    """One block of BLOCK_N keys into the running softmax state."""
    keys = start + tl.arange(0, BLOCK_N)
    d_qk = D_LO + D_HI
    k_t = tl.load(k_base + keys[None, :] * d_qk + tl.arange(0, D_LO)[:, None])  # [D_LO, BLOCK_N]
    s = tl.dot(q8_lo, k_t, out_dtype=tl.int32)  # [BLOCK_M, BLOCK_N] integer products
    if D_HI > 0:
        k_t_hi = tl.load(k_base + keys[None, :] * d_qk + (D_LO + tl.arange(0, D_HI))[:, None])
        s = tl.dot(q8_hi, k_t_hi, s, out_dtype=tl.int32)
    s = (s + MAGIC_BITS).to(tl.float32, bitcast=True)  # MAGIC + s, exactly (|s| ≤ 127²·96 < 2^22)
    factor = row_factor * tl.load(ks_base + start // KEY_BLOCK)  # [BLOCK_M]: logits in log2 units = s · factor
    if MASK:
        s = tl.where((keys < n_kv)[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, (tl.max(s, 1) - MAGIC) * factor)
    alpha = tl.math.exp2(m_i - m_new)
    # (s − MAGIC)·factor − (m_new − log2 448) as one fused multiply-add per logit (the per-element work, not
    # the tensor cores, bounds this kernel). The FMA rounds once; rounding `bias` moves a row's logits of one
    # key block alike, by half an ulp of MAGIC·factor (~1e-4 in log2 units at PiD's scales).
    bias = MAGIC * factor + (m_new - LOG2_FP8_MAX)
    p = tl.math.exp2(s * factor[:, None] - bias[:, None])  # (0, 448]
    if not ONES_SUM:
        l_i = l_i * alpha + tl.sum(p, 1)
    p8 = _mma_key_order(p.to(tl.float8e4nv), p.shape[0], BLOCK_N)  # V's keys are stored in this order
    v = tl.load(v_base + tl.arange(0, D_LO)[None, :] * n_pad + keys[:, None])  # [BLOCK_N, D_LO]
    acc_lo = tl.dot(p8, v, acc_lo * alpha[:, None])
    v_hi = tl.load(v_base + (D_LO + tl.arange(0, DV_HI))[None, :] * n_pad + keys[:, None])  # [BLOCK_N, DV_HI]
    # With ONES_SUM a fresh accumulator per block: Hopper's FP8 MMA adds each product into its accumulator with
    # ~14 bits, and the denominator, a sum of positive terms, drifted low (error 7.4e-2 instead of 3.8e-2 at
    # 4,396 keys) when it accumulated across blocks there.
    acc_hi = acc_hi * alpha[:, None] + tl.dot(p8, v_hi) if ONES_SUM else tl.dot(p8, v_hi, acc_hi * alpha[:, None])
    return acc_lo, acc_hi, m_new, l_i


@triton.jit
def _attention8_kernel(Q, K8, KS, V8, VS, Out,
                          stride_qb, stride_qn, stride_qh, stride_ob, stride_on, stride_oh,
                          n_q, n_kv, n_pad, heads, qk_scale,
                          HEAD_DIM: tl.constexpr, D_LO: tl.constexpr, D_HI: tl.constexpr, DV_HI: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, KEY_BLOCK: tl.constexpr,
                          ONES_SUM: tl.constexpr):
    bh = tl.program_id(1)
    b = (bh // heads).to(tl.int64)
    h = bh % heads
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_q

    # this block's queries, one INT8 scale per row
    q_rows = Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qn
    q_lo = tl.load(q_rows + tl.arange(0, D_LO)[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(q_lo), 1)
    if D_HI > 0:
        cols_hi = D_LO + tl.arange(0, D_HI)
        q_hi = tl.load(q_rows + cols_hi[None, :], mask=row_ok[:, None] & (cols_hi < HEAD_DIM)[None, :],
                       other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.max(tl.abs(q_hi), 1))
    q_scale = tl.maximum(amax, 1e-20) / INT8_MAX
    q8_lo = _round_int8(q_lo / q_scale[:, None])
    q8_hi = q8_lo  # unused unless D_HI > 0
    if D_HI > 0:
        q8_hi = _round_int8(q_hi / q_scale[:, None])
    row_factor = q_scale * qk_scale

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)  # unless ONES_SUM
    acc_lo = tl.zeros([BLOCK_M, D_LO], tl.float32)
    acc_hi = tl.zeros([BLOCK_M, DV_HI], tl.float32)  # V's channels past D_LO, then its ones channel
    k_base = K8 + bh.to(tl.int64) * n_pad * (D_LO + D_HI)
    v_base = V8 + bh.to(tl.int64) * n_pad * (D_LO + DV_HI)
    ks_base = KS + bh * (n_pad // KEY_BLOCK)
    n_full = (n_kv // BLOCK_N) * BLOCK_N
    for start in range(0, n_full, BLOCK_N):
        acc_lo, acc_hi, m_i, l_i = _attend(acc_lo, acc_hi, m_i, l_i, q8_lo, q8_hi, row_factor, k_base, v_base,
                                           ks_base, start, n_kv, n_pad, D_LO, D_HI, DV_HI, BLOCK_N, KEY_BLOCK,
                                           False, ONES_SUM)
    for start in range(n_full, n_kv, BLOCK_N):  # the partial last block, if any
        acc_lo, acc_hi, m_i, l_i = _attend(acc_lo, acc_hi, m_i, l_i, q8_lo, q8_hi, row_factor, k_base, v_base,
                                           ks_base, start, n_kv, n_pad, D_LO, D_HI, DV_HI, BLOCK_N, KEY_BLOCK,
                                           True, ONES_SUM)

    # out = acc · v_scale / l
    cols_hi = D_LO + tl.arange(0, DV_HI)
    if ONES_SUM:
        l_i = tl.sum(tl.where((cols_hi == HEAD_DIM)[None, :], acc_hi, 0.0), 1)  # the ones channel
    inv_l = 1.0 / l_i
    o_rows = Out + b * stride_ob + h * stride_oh + rows[:, None] * stride_on
    cols = tl.arange(0, D_LO)
    v_scale = tl.load(VS + bh * HEAD_DIM + cols)
    tl.store(o_rows + cols[None, :], (acc_lo * v_scale[None, :] * inv_l[:, None]).to(Out.dtype.element_ty),
             mask=row_ok[:, None])
    if HEAD_DIM > D_LO:
        col_ok = cols_hi < HEAD_DIM
        v_scale_hi = tl.load(VS + bh * HEAD_DIM + cols_hi, mask=col_ok, other=0.0)
        tl.store(o_rows + cols_hi[None, :],
                 (acc_hi * v_scale_hi[None, :] * inv_l[:, None]).to(Out.dtype.element_ty),
                 mask=row_ok[:, None] & col_ok[None, :])


def launch(q: Tensor, k8: Tensor, k_scale: Tensor, v8: Tensor, v_scale: Tensor, n_kv: int,
           config: tuple[int, int, int, int] | None = None) -> Tensor:
    """q [B, Nq, heads, D] (bf16 or fp32) and `quantize_kv`'s outputs → [B, Nq, heads, D] in q's dtype."""
    if q.stride(-1) != 1:
        q = q.contiguous()
    b, n_q, heads, d = q.shape
    d_hi, dv_hi = split_widths(d)
    block_m, block_n, warps, stages = config or CONFIGS.get(d, DEFAULT_CONFIG)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    grid = (triton.cdiv(n_q, block_m), b * heads)
    _attention8_kernel[grid](
        q, k8, k_scale, v8, v_scale, out, q.stride(0), q.stride(1), q.stride(2),
        out.stride(0), out.stride(1), out.stride(2), n_q, n_kv, k8.shape[2], heads, math.log2(math.e) / math.sqrt(d),
        HEAD_DIM=d, D_LO=64, D_HI=d_hi, DV_HI=dv_hi, BLOCK_M=block_m, BLOCK_N=block_n, KEY_BLOCK=KEY_BLOCK,
        ONES_SUM=d == 64, num_warps=warps, num_stages=stages)
    return out
