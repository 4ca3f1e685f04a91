"""Time PiD's image-token matmuls at 2K in bf16 and through `--matmul fp8` (model/linear8.py), on one GPU.

    python scripts/matmul8_bench.py

Per shape: bf16 F.linear; the FP8 layer as a decode runs it (compiled: per-token quantisation of the bf16
input + torch._scaled_mm); the bare FP8 product on pre-quantised input (the ceiling). Also the FP8 layer's
relative L2 error against the fp32 product of the same bf16 operands.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pid_cli.model import linear8

# (name, tokens M, in K, out N, layers of this shape per forward at 2K)
SHAPES = [("MMDiT qkv_x", 16384, 1536, 4608, 14), ("MMDiT proj_x", 16384, 1536, 1536, 14),
          ("MMDiT w1/w3", 16384, 1536, 4096, 28), ("MMDiT w2", 16384, 4096, 1536, 14),
          ("PiT modulation pre", 8192, 1536, 8192, 4), ("PiT modulation post", 8192, 1536, 16384, 4),
          ("PiT compress", 8192, 4096, 1152, 4), ("PiT expand", 8192, 1152, 4096, 4),
          ("PiT qkv", 16384, 1152, 3456, 2), ("PiT proj", 16384, 1152, 1152, 2)]


def timed(fn, repeat: int = 30) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeat):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)  # ms


def main() -> None:
    dev = torch.device("cuda")
    torch._dynamo.config.cache_size_limit = 64  # one graph per shape: the default of 8 would fall back to eager
    fp8_layer = torch.compile(linear8.linear, dynamic=False)
    print(f"# {torch.cuda.get_device_name(dev)}, torch {torch.__version__}")
    print("| shape (M × K → N) | bf16 ms (TFLOP/s) | fp8 layer ms (TFLOP/s) | bare fp8 ms | speed-up | rel. L2 "
          "| bare fp8, fast accumulation ms | its rel. L2 | fast vs promoted sums, rel. L2 | mean signed drift |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    total_bf16 = total_fp8 = 0.0
    for name, m, k, n, count in SHAPES:
        x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        w = (torch.randn(n, k, device=dev) * k**-0.5).to(torch.bfloat16)
        bias = torch.randn(n, device=dev, dtype=torch.bfloat16) * 0.1
        w8, w_scale, b = linear8.quantize_weight(w, bias)
        x8, x_scale = linear8.quantize_rows(x)
        t_bf16 = timed(lambda: F.linear(x, w, bias))  # noqa: B023
        t_fp8 = timed(lambda: fp8_layer(x, w8, w_scale, b))  # noqa: B023
        t_bare = timed(lambda: torch._scaled_mm(x8, w8.t(), scale_a=x_scale, scale_b=w_scale, bias=b,  # noqa: B023
                                                out_dtype=torch.bfloat16))
        t_fast = timed(lambda: torch._scaled_mm(x8, w8.t(), scale_a=x_scale, scale_b=w_scale, bias=b,  # noqa: B023
                                                out_dtype=torch.bfloat16, use_fast_accum=True))
        exact = F.linear(x.float(), w.float(), bias.float())
        fast = torch._scaled_mm(x8, w8.t(), scale_a=x_scale, scale_b=w_scale, bias=b, out_dtype=torch.bfloat16,
                                use_fast_accum=True)
        error_fast = ((fast.float() - exact).norm() / exact.norm()).item()
        # the accumulation alone: same operands, no bias, fp32 out, cuBLAS's promoted sums as the reference (a
        # drift of the magnitudes shows as a non-zero mean of the signed deviation)
        slow = torch._scaled_mm(x8, w8.t(), scale_a=x_scale, scale_b=w_scale, out_dtype=torch.float32)
        fast32 = torch._scaled_mm(x8, w8.t(), scale_a=x_scale, scale_b=w_scale, out_dtype=torch.float32,
                                  use_fast_accum=True)
        accumulation = ((fast32 - slow).norm() / slow.norm()).item()
        drift = ((fast32 - slow) * slow.sign()).mean().item() / slow.abs().mean().item()
        error = ((fp8_layer(x, w8, w_scale, b).float() - exact).norm() / exact.norm()).item()
        flop = 2 * m * k * n
        total_bf16 += t_bf16 * count
        total_fp8 += t_fp8 * count
        print(f"| {name} ({m} × {k} → {n}) | {t_bf16:.3f} ({flop / t_bf16 / 1e9:.0f}) | "
              f"{t_fp8:.3f} ({flop / t_fp8 / 1e9:.0f}) | {t_bare:.3f} | {t_bf16 / t_fp8:.2f}× | {error:.1e} | "
              f"{t_fast:.3f} | {error_fast:.1e} | {accumulation:.1e} | {drift:+.1e} |",
              flush=True)
    print(f"\nper 2K forward (shape × count): bf16 {total_bf16:.1f} ms, fp8 {total_fp8:.1f} ms "
          f"({total_bf16 / total_fp8:.2f}×); per 4-step decode {4 * (total_bf16 - total_fp8):.0f} ms saved")


if __name__ == "__main__":
    main()
