"""Time the q/k RMSNorm + RoPE of one attention (q and k) at 2K and 4K shapes: torch.compile of the torch ops
against `layers.norm_rope`'s Triton kernel, and check they agree.

    python scripts/norm_rope_bench.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from matmul8_bench import timed  # ms

from pid_cli.model.layers import RMSNorm, apply_rope, norm_rope, rope_2d

# name: (tokens, heads, head_dim)
SHAPES = {"2K MMDiT": (16384, 24, 64), "2K PiT": (16384, 16, 72), "4K MMDiT": (65536, 24, 64),
          "4K PiT": (65536, 16, 72)}


def main() -> None:
    dev = torch.device("cuda")
    torch._dynamo.config.cache_size_limit = 64
    print(f"# {torch.cuda.get_device_name(dev)}, torch {torch.__version__}")
    print("| shape (tokens, heads, head_dim) | compiled torch ops µs | Triton kernel µs | speed-up | GB/s kernel "
          "| max rel. Δ |")
    print("|---|---|---|---|---|---|")
    for name, shape in SHAPES.items():
        row(name, *shape, dev)


def row(name: str, n: int, heads: int, d: int, dev: torch.device) -> None:
    side = int(n**0.5)
    rope = rope_2d(d, side, side, None, None, device=dev)
    q_norm, k_norm = RMSNorm(d).to(dev), RMSNorm(d).to(dev)
    with torch.no_grad():
        q_norm.weight.uniform_(0.5, 1.5)
        k_norm.weight.uniform_(0.5, 1.5)
    qkv = torch.randn(1, n, 3 * heads * d, device=dev, dtype=torch.bfloat16)

    def composed(qkv):
        q, k, _ = qkv.unflatten(-1, (3, heads, d)).unbind(2)
        return apply_rope(q_norm(q), rope).to(qkv.dtype), apply_rope(k_norm(k), rope).to(qkv.dtype)

    def fused(qkv):
        q, k, _ = qkv.unflatten(-1, (3, heads, d)).unbind(2)
        return norm_rope(q_norm, q, rope, qkv.dtype), norm_rope(k_norm, k, rope, qkv.dtype)

    compiled = torch.compile(composed, dynamic=False)
    with torch.inference_mode():
        t_ops, t_kernel = 1e3 * timed(lambda: compiled(qkv)), 1e3 * timed(lambda: fused(qkv))  # µs
        pairs = zip(fused(qkv), composed(qkv), strict=True)
        delta = max(((a.float() - b.float()).abs().max() / b.float().abs().max()).item() for a, b in pairs)
    traffic = 2 * n * heads * d * (2 + 2)  # q and k: bf16 in, bf16 out (the dtype attention takes)
    print(f"| {name} ({n}, {heads}, {d}) | {t_ops:.1f} | {t_kernel:.1f} | {t_ops / t_kernel:.2f}× | "
          f"{traffic / t_kernel / 1e3:.0f} | {delta:.1e} |", flush=True)


if __name__ == "__main__":
    main()
