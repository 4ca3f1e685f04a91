"""The Triton kernel behind `sampler.step` on a GPU: one sampler step's arithmetic in one pass.

Why it exists: the step is x0 = x − t·v in float64 (upstream's arithmetic), then x0 re-noised to the next
timestep in float32. As torch ops that is eight kernels and ~14 bytes of traffic per value written (the float64
copies of x and v, their product, the difference, its float32 copy, then the re-noising's two products and
sum; timings: docs/performance.md#machinery). Here each value of x, v and the noise is read once and the new x
written once.

The arithmetic is the torch ops' (`sampler.step`'s path off CUDA, its reference), operation for operation and in
their order: float64 product and difference rounded each (no fused multiply-add: `enable_fp_fusion=False`), rounded
to float32, then the float32 products and sum of the re-noising, each rounded. The result is bit for bit the torch
ops' (tests/gpu/test_kernels.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK = 2048


@triton.jit
def _step_kernel(X, V, E, Out, n, t_cur, t_next, HAS_NOISE: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offsets < n
    x = tl.load(X + offsets, mask=ok, other=0.0)
    v = tl.load(V + offsets, mask=ok, other=0.0)
    x0 = (x.to(tl.float64) - t_cur.to(tl.float64) * v.to(tl.float64)).to(tl.float32)
    if HAS_NOISE:
        e = tl.load(E + offsets, mask=ok, other=0.0)
        x0 = (1.0 - t_next) * x0 + t_next * e
    tl.store(Out + offsets, x0, mask=ok)


def launch(x: Tensor, v: Tensor, t_cur: float, t_next: float, noise: Tensor | None) -> Tensor:
    """x [B, 3, H, W] float32, v the same shape (any float dtype), t_cur and t_next float32 values,
    noise float32 or None (the last step) → the next x, float32."""
    has_noise = noise is not None
    x, v = x.contiguous(), v.contiguous()
    noise = noise.contiguous() if has_noise else x  # not read without noise
    out = torch.empty_like(x)
    n = x.numel()
    _step_kernel[(triton.cdiv(n, BLOCK),)](x, v, noise, out, n, t_cur, t_next, HAS_NOISE=has_noise,
                                           BLOCK=BLOCK, num_warps=8, enable_fp_fusion=False)
    return out
