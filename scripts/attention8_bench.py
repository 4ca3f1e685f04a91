"""Check and time the 8-bit attention kernel against cuDNN's bf16 SDPA on PiD's attention shapes.

    python scripts/attention8_bench.py                # accuracy + speed at the configured block sizes
    python scripts/attention8_bench.py --sweep        # also every block-size candidate (to pick CONFIGS)

Accuracy: relative L2 of the kernel and of `reference_attention` (same arithmetic in torch) against
fp32 attention, on inputs shaped like PiD's (RMS-normed q and k with RoPE-like rotation, logit
temperature set by --logit-std). The kernel must land where the reference does. Speed: TFLOP/s
counted as 4·Nq·Nk·D per head (the standard attention FLOPs), median of 20 runs after warm-up,
with and without the K/V quantisation pass (compiled, as in the network).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pid_cli.kernels import attention8 as attention8_kernel
from pid_cli.kernels import reference
from pid_cli.model.layers import fast_attention

SHAPES = {  # name: (query tokens, key tokens, heads, head_dim)
    "2K MMDiT": (16684, 16684, 24, 64),
    "2K PiT": (16384, 16384, 16, 72),
    "4K MMDiT": (65836, 65836, 24, 64),
    "4K PiT": (65536, 65536, 16, 72),
}


def timed(fn, repeat: int = 20) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def inputs(nq: int, nk: int, heads: int, d: int, logit_std: float, gen: torch.Generator):
    def rms_normed(n: int) -> torch.Tensor:
        x = torch.randn(1, n, heads, d, device="cuda", generator=gen)
        return x / x.pow(2).mean(-1, keepdim=True).sqrt()

    # q·k / sqrt(d) of unit-RMS vectors has std 1; scale q for the wanted logit spread
    q = (rms_normed(nq) * logit_std).bfloat16()
    k = (rms_normed(nk) + 0.3).bfloat16()  # a shared offset, as learned keys often have
    v = torch.randn(1, nk, heads, d, device="cuda", generator=gen).bfloat16()
    return q, k, v


def sdpa(q, k, v):
    return F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def speed(name: str, shape: tuple[int, int, int, int], quantize, gen: torch.Generator, sweep: bool) -> list:
    nq, nk, heads, d = shape
    q, k, v = inputs(nq, nk, heads, d, 1.0, gen)
    flops = 4 * nq * nk * d * heads
    with fast_attention():
        t_bf16 = timed(lambda: sdpa(q, k, v))
    packed = quantize(k, v)
    t_kernel = timed(lambda: attention8_kernel.launch(q, *packed, nk))
    t_total = timed(lambda: attention8_kernel.launch(q, *quantize(k, v), nk))
    print(f"| {name} | {flops / t_bf16 / 1e12:.0f} ({t_bf16 * 1e3:.2f}) | {flops / t_kernel / 1e12:.0f} "
          f"({t_kernel * 1e3:.2f}) | {flops / t_total / 1e12:.0f} ({t_total * 1e3:.2f}) | "
          f"{t_bf16 / t_total:.2f}x |", flush=True)
    rows = []
    candidates = [(64, 128, 4, 3), (128, 128, 4, 3), (64, 64, 4, 3), (128, 128, 8, 3), (128, 128, 8, 2),
                  (64, 128, 4, 4), (128, 128, 4, 4), (128, 64, 4, 3), (256, 128, 8, 3), (256, 64, 8, 3)]
    for config in candidates if sweep else []:
        try:
            t = timed(lambda c=config: attention8_kernel.launch(q, *packed, nk, config=c), 5)
        except Exception as e:  # out of shared memory / registers for this config
            rows.append((name, config, None, type(e).__name__))
            continue
        rows.append((name, config, flops / t / 1e12, ""))
    return rows


def accuracy(name: str, qkv: tuple, std: float) -> None:
    q, k, v = qkv
    exact = sdpa(q.float(), k.float(), v.float())
    with fast_attention():
        bf16 = sdpa(q, k, v)
    ref = reference.attention8(q, k, v)
    packed = reference.quantize_kv(k, v)
    out = attention8_kernel.launch(q, *packed, k.shape[1])
    assert torch.isfinite(out).all()
    print(f"| {name} | {std:g} | {rel_l2(bf16, exact):.2e} | {rel_l2(ref, exact):.2e} | {rel_l2(out, exact):.2e} | "
          f"{rel_l2(out, ref):.2e} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--logit-std", type=float, nargs="+", default=[1.0, 3.0])
    args = ap.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}")

    print("\n## accuracy (relative L2 against fp32 attention; 4096 queries against 2K-sized keys)")
    print("| shape | logit std | bf16 cuDNN | reference 8-bit | kernel 8-bit | kernel vs reference |")
    print("|---|---|---|---|---|---|")
    for name, (_, nk, heads, d) in SHAPES.items():
        if name.startswith("2K"):
            for std in args.logit_std:
                accuracy(name, inputs(4096, nk, heads, d, std, gen), std)

    print("\n## speed (TFLOP/s; ms in brackets)")
    quantize = torch.compile(reference.quantize_kv, dynamic=False)
    print("| shape | bf16 cuDNN | 8-bit kernel | + K/V quantisation (compiled) | speed-up |")
    print("|---|---|---|---|---|")
    sweep_rows = []
    for name, shape in SHAPES.items():
        sweep_rows += speed(name, shape, quantize, gen, args.sweep)
    if sweep_rows:
        print("\n## sweep (BLOCK_M, BLOCK_N, warps, stages): TFLOP/s, best first per shape")
        for name in SHAPES:
            rows = sorted((r for r in sweep_rows if r[0] == name and r[2]), key=lambda r: -r[2])
            print(name, " ".join(f"{r[1]}:{r[2]:.0f}" for r in rows[:8]),
                  "| failed:", [r[1] for r in sweep_rows if r[0] == name and not r[2]])


if __name__ == "__main__":
    main()
