"""The Triton kernel behind `pid::norm_rope` (`layers.norm_rope` on CUDA): RMSNorm of each attention head's q or
k, then RoPE, in one pass.

Why it exists: torch.compile turns the same ops into a kernel with one (token, head) row of 64 values per
program, far below memory bandwidth (timings: docs/performance.md#kernels). Here one program normalises and rotates
BLOCK_ROWS rows, reading each value once and writing it once.

The arithmetic is `reference.norm_rope`'s (`apply_rope(RMSNorm(x))`), in its order: statistics in fp32, the
normalised value rounded to x's dtype, times the weight (rounded to the product's dtype), rotated in fp32; the
result is stored in the dtype attention takes (bf16 in the bf16 network: half the bytes of the fp32 rotation, and
attention's own cast of it is then a no-op).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK_ROWS = 32


@triton.jit
def _norm_rope_kernel(X, W, COS, SIN, Out, n_rows, n_tokens, heads, stride_b, stride_n, stride_h, eps,
                      HEAD_DIM: tl.constexpr, HALF: tl.constexpr, BLOCK_ROWS: tl.constexpr,
                      PRODUCT_DTYPE: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)  # (batch, token, head), head fastest
    row_ok = rows < n_rows
    head = rows % heads
    token = (rows // heads) % n_tokens
    batch = rows // (heads * n_tokens)
    cols = tl.arange(0, 2 * HALF)  # HALF: head_dim/2 rounded up to a power of two
    col_ok = cols < HEAD_DIM
    ok = row_ok[:, None] & col_ok[None, :]
    src = batch.to(tl.int64) * stride_b + token.to(tl.int64) * stride_n + head * stride_h
    x = tl.load(X + src[:, None] + cols[None, :], mask=ok, other=0.0)  # [BLOCK_ROWS, 2·HALF]
    x32 = x.to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(x32 * x32, 1) / HEAD_DIM + eps)
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    normed = ((x32 * rstd[:, None]).to(x.dtype).to(tl.float32) * w[None, :]).to(PRODUCT_DTYPE).to(tl.float32)
    a, b = tl.split(tl.reshape(normed, [BLOCK_ROWS, HALF, 2]))  # the pairs' first and second values
    pairs = tl.arange(0, HALF)
    table = token[:, None] * (HEAD_DIM // 2) + pairs[None, :]
    pair_ok = row_ok[:, None] & (pairs < HEAD_DIM // 2)[None, :]
    cos = tl.load(COS + table, mask=pair_ok, other=0.0)
    sin = tl.load(SIN + table, mask=pair_ok, other=0.0)
    out = tl.reshape(tl.join(a * cos - b * sin, a * sin + b * cos), [BLOCK_ROWS, 2 * HALF])
    tl.store(Out + rows.to(tl.int64)[:, None] * HEAD_DIM + cols[None, :], out.to(Out.dtype.element_ty), mask=ok)


_TRITON_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16}  # the network's two dtypes


def launch(x: Tensor, weight: Tensor, eps: float, cos: Tensor, sin: Tensor, out_dtype: torch.dtype) -> Tensor:
    """x [B, N, heads, head_dim] (its last dim contiguous), weight [head_dim], cos/sin [N, head_dim/2] fp32
    → [B, N, heads, head_dim] in out_dtype (fp32 or bf16)."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    b, n, heads, d = x.shape
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    n_rows = b * n * heads
    product = torch.promote_types(x.dtype, weight.dtype)
    _norm_rope_kernel[(triton.cdiv(n_rows, BLOCK_ROWS),)](
        x, weight, cos.contiguous(), sin.contiguous(), out, n_rows, n, heads, x.stride(0), x.stride(1),
        x.stride(2), eps, HEAD_DIM=d, HALF=triton.next_power_of_2(d // 2), BLOCK_ROWS=BLOCK_ROWS,
        PRODUCT_DTYPE=_TRITON_DTYPES[product], num_warps=4)
    return out
