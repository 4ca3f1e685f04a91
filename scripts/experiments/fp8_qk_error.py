"""Experiment: what Q·K in FP8 (e4m3) instead of INT8 would cost the 8-bit attention in accuracy. Runs on the CPU.

    python scripts/experiments/fp8_qk_error.py

Why ask: INT8 logits need a conversion instruction per logit in the kernel (the magic-constant add; an FP8 product
accumulates straight into fp32), ~13% of its per-logit instructions. The answer: FP8 Q·K has 1.4-2.5x the error of
INT8 Q·K at PiD-like logit spreads, so the kernel keeps INT8. Both variants below share everything else
(`attention8.quantize_kv`'s K centring and block scales, FP8 P and V, the ones-channel denominator).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pid_cli.model import attention8

FP8 = torch.float8_e4m3fn


def inputs(nq: int, nk: int, heads: int, d: int, logit_std: float, gen: torch.Generator):
    """As scripts/attention8_bench.py: RMS-normed q and k (k with a shared offset), logits of std `logit_std`."""
    def rms_normed(n: int) -> torch.Tensor:
        x = torch.randn(1, n, heads, d, generator=gen)
        return x / x.pow(2).mean(-1, keepdim=True).sqrt()

    q = (rms_normed(nq) * logit_std).bfloat16()
    k = (rms_normed(nk) + 0.3).bfloat16()
    return q, k, torch.randn(1, nk, heads, d, generator=gen).bfloat16()


def fp8_qk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """`attention8.attend_quantized` with Q (per row) and K (per block of 128 keys) rounded to e4m3 instead of INT8."""
    k8, k_scale, v8, v_scale = attention8.quantize_kv(k, v)
    d, n_kv = q.shape[-1], k.shape[1]
    keys = k8.float().unflatten(2, (-1, attention8.KEY_BLOCK)) * k_scale[..., None, None]  # centred K per block
    block_scale = keys.abs().amax((-1, -2), keepdim=True).clamp_min(1e-20) / attention8.FP8_MAX
    keys = ((keys / block_scale).to(FP8).float() * block_scale).flatten(2, 3)[:, :, :n_kv, :d]
    q32 = q.float().transpose(1, 2)
    q_scale = q32.abs().amax(-1, keepdim=True).clamp_min(1e-20) / attention8.FP8_MAX
    logits = ((q32 / q_scale).to(FP8).float() * q_scale) @ keys.transpose(-1, -2) * (math.log2(math.e) / math.sqrt(d))
    p8 = (torch.exp2(logits - logits.amax(-1, keepdim=True)) * attention8.FP8_MAX).to(FP8).float()
    weighted = p8 @ attention8.mma_key_order(v8.float(), inverse=True)[:, :, :d + 1, :n_kv].transpose(-1, -2)
    return (weighted[..., :d] / weighted[..., d:] * v_scale[:, :, None, :]).transpose(1, 2)


def main() -> None:
    gen = torch.Generator().manual_seed(0)
    print("| logit std | INT8 Q·K (the kernel's) rel. L2 vs exact | FP8 Q·K rel. L2 vs exact |")
    print("|---|---|---|")
    for std in (1.0, 2.0, 3.0):
        q, k, v = inputs(512, 3000, 4, 64, std, gen)
        exact = F.scaled_dot_product_attention(*(t.float().transpose(1, 2) for t in (q, k, v))).transpose(1, 2)

        int8, fp8 = (((out.float() - exact).norm() / exact.norm()).item()
                     for out in (attention8.reference_attention(q, k, v), fp8_qk_attention(q, k, v)))
        print(f"| {std:g} | {int8:.2e} | {fp8:.2e} |")


if __name__ == "__main__":
    main()
