"""Experiment: the 8-bit attention kernel with other block shapes and pipeline depths, the ones-channel
denominator at the PiT blocks' head dim (72), and one K scale per 256 keys.

    python scripts/experiments/pit_attention_variants.py

Why ask: at head dim 72 the kernel runs at ~77% of its head-dim-64 rate although its per-logit work, which
bounds it, is the same. From the SASS (BENCHMARKS.md, "Leads from the SASS for the PiT shape"): the loop issues
8.95 instructions per logit as shipped (64x128 blocks, denominator summed from P), 7.8 with the denominator
from V's ones channel, 6.8 with that and 64x256 blocks. Blocks of 256 keys need one K scale per 256 keys (the
kernel applies one scale per key block), so those variants quantise K that way; the error column says what
that costs. The ones channel measured slower before P stayed in its registers; this asks again, and
tries the same shapes at head dim 64 (the MMDiT blocks).

Every variant runs on the same inputs in one process (TFLOP/s, median of 20 after warm-up, interleaved
twice, best kept), kernel only: K/V quantisation is not timed. Error: relative L2 against fp32 attention at
logit spreads 1 and 3, and against the same-arithmetic torch reference.
"""

from __future__ import annotations

import contextlib
import math
import sys
from pathlib import Path

import torch
import triton

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from attention8_bench import SHAPES, inputs, rel_l2, sdpa, timed  # noqa: E402

from pid_cli.model import attention8, attention8_kernel  # noqa: E402

# head dim: [(ones_sum, BLOCK_M, BLOCK_N, warps, stages, key block)], the shipped configuration first
VARIANTS = {
    72: [(False, 64, 128, 4, 3, 128), (True, 64, 128, 4, 3, 128), (False, 64, 128, 4, 2, 128),
         (True, 64, 128, 4, 2, 128), (True, 128, 128, 8, 3, 128), (True, 128, 64, 4, 3, 128),
         (False, 64, 256, 4, 3, 256), (False, 64, 256, 4, 2, 256), (True, 64, 256, 4, 3, 256),
         (True, 64, 256, 4, 2, 256), (True, 128, 256, 8, 2, 256)],
    64: [(True, 128, 128, 4, 3, 128), (True, 128, 128, 4, 2, 128), (True, 128, 128, 4, 4, 128),
         (True, 64, 128, 4, 2, 128), (True, 128, 64, 4, 2, 128), (True, 64, 256, 4, 2, 256),
         (True, 64, 256, 4, 3, 256), (True, 128, 256, 8, 2, 256)],
}


@contextlib.contextmanager
def key_block(n: int):
    """attention8's K scale block set to n keys (quantize_kv and attend_quantized read it at call time)."""
    saved, attention8.KEY_BLOCK = attention8.KEY_BLOCK, n
    try:
        yield
    finally:
        attention8.KEY_BLOCK = saved


def quantize(k: torch.Tensor, v: torch.Tensor, n: int):
    with key_block(n):
        return attention8.quantize_kv(k, v)


def reference(q, packed, n_kv: int, n: int):
    with key_block(n):
        return attention8.attend_quantized(q, *packed, n_kv)


def launch(q, k8, k_scale, v8, v_scale, n_kv: int, variant) -> torch.Tensor:
    ones_sum, block_m, block_n, warps, stages, key_block = variant
    b, n_q, heads, d = q.shape
    d_hi, dv_hi = attention8.split_widths(d)
    out = torch.empty_like(q)
    grid = (triton.cdiv(n_q, block_m), b * heads)
    attention8_kernel._attention8_kernel[grid](
        q, k8, k_scale, v8, v_scale, out, q.stride(0), q.stride(1), q.stride(2),
        out.stride(0), out.stride(1), out.stride(2), n_q, n_kv, k8.shape[2], heads,
        math.log2(math.e) / math.sqrt(d), HEAD_DIM=d, D_LO=64, D_HI=d_hi, DV_HI=dv_hi, BLOCK_M=block_m,
        BLOCK_N=block_n, KEY_BLOCK=key_block, ONES_SUM=ones_sum, num_warps=warps, num_stages=stages)
    return out


def main() -> None:
    gen = torch.Generator(device="cuda").manual_seed(0)
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, Triton {triton.__version__}")
    for d, variants in VARIANTS.items():
        shapes = {name: s for name, s in SHAPES.items() if s[3] == d}
        print(f"\n| head dim {d}: ones sum, M, N, warps, stages, key block | "
              + " | ".join(f"{n} TFLOP/s" for n in shapes) + " | rel L2 vs fp32, std 1 / 3 | vs reference |")
        print("|---|" + "---|" * len(shapes) + "---|---|")
        speed: dict[tuple, dict[str, float]] = {v: {} for v in variants}
        for name, (nq, nk, heads, _) in shapes.items():
            q, k, v = inputs(nq, nk, heads, d, 1.0, gen)
            packed = {kb: quantize(k, v, kb) for kb in {var[-1] for var in variants}}
            flops = 4 * nq * nk * d * heads
            for _ in range(2):  # interleaved, best kept: clocks and temperature treat all alike
                for variant in variants:
                    try:
                        kv = packed[variant[-1]]
                        t = timed(lambda q=q, kv=kv, nk=nk, variant=variant: launch(q, *kv, nk, variant))
                    except Exception as e:  # out of shared memory / registers
                        print(f"# {variant} {name}: {type(e).__name__}: {str(e)[:120]}", flush=True)
                        continue
                    speed[variant][name] = max(speed[variant].get(name, 0.0), flops / t / 1e12)
            del q, k, v, packed
            torch.cuda.empty_cache()
        nk, heads = next(iter(shapes.values()))[1:3]
        cases = [inputs(2048, nk, heads, d, std, gen) for std in (1.0, 3.0)]
        exact = [sdpa(q.float(), k.float(), v.float()) for q, k, v in cases]
        for variant in variants:
            errors, vs_ref = [], ""
            for (q, k, v), ex in zip(cases, exact, strict=True):
                packed = quantize(k, v, variant[-1])
                out = launch(q, *packed, nk, variant)
                errors.append(f"{rel_l2(out, ex):.3e}")
                vs_ref = vs_ref or f"{rel_l2(out, reference(q, packed, nk, variant[-1])):.2e}"
            row = " | ".join(f"{speed[variant].get(n, float('nan')):.0f}" for n in shapes)
            print(f"| {variant} | {row} | {' / '.join(errors)} | {vs_ref} |", flush=True)


if __name__ == "__main__":
    main()
