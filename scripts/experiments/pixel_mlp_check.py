"""Experiment: `pixel_mlp_kernel` (the tail of `PiTBlock.post` in one Triton kernel) against its torch ops.

    python scripts/experiments/pixel_mlp_check.py          # on a GPU: agreement at the 2K chunk shape, then µs
    python scripts/experiments/pixel_mlp_check.py --sweep  # also: the kernel's µs for each (BLOCK_M, num_warps)
    python scripts/experiments/pixel_mlp_check.py --cpu    # Triton's interpreter on the CPU: agreement, small shapes
    (--cpu --truncate keeps the interpreter's truncating fp32 → bf16 casts: rel L2 ~6e-3 then, from those alone)

On the GPU the kernel is timed against the path the network ran before it, `reference` under
torch.compile(dynamic=False), both writing xp in place: `xp.copy_(compiled(...))` against `launch(...)`.

Seen (H100, Triton 3.6, torch 2.11): kernel vs eager rel L2 1.1e-5 at 2M pixels (C = 16), 2e-5 at C = 32 and 64;
Inductor's path vs eager 1.7e-3 (it skips the intermediate bf16 roundings). 1,056-1,110 µs for Inductor's path,
305-349 for the kernel (two H100s). The interpreter needs two patches (`patch_interpreter`); with them the CPU
check agrees to ~1e-5.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

if "--cpu" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # read when triton is imported
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scripts/: attention8_bench
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch
from attention8_bench import timed
from torch import Tensor

from pid_cli.model import pixel_mlp_kernel as K

EPS = 1e-6


def inputs(m: int, c: int, device: str, gen: torch.Generator) -> tuple:
    """Random inputs at the network's magnitudes, in `launch`'s argument order."""
    def randn(*shape: int, std: float = 1.0, dtype: torch.dtype = torch.bfloat16) -> Tensor:
        return (torch.randn(*shape, generator=gen, device=device) * std).to(dtype)

    h = 4 * c
    return (randn(m, c, dtype=torch.float32), randn(m, 4 * c, std=0.5), randn(m, c),
            1 + randn(c, std=0.1, dtype=torch.float32), EPS,
            randn(h, c, std=c ** -0.5), randn(h, std=0.1), randn(c, h, std=h ** -0.5), randn(c, std=0.1))


def agreement(ours: Tensor, ref: Tensor) -> str:
    diff = (ours - ref).abs()
    rel = (ours - ref).norm() / ref.norm()
    return (f"max abs {diff.max().item():.3e}, rel L2 {rel.item():.3e}, "
            f"{(diff > 0).float().mean().item():.2%} of values differ")


def check(m: int, c: int, device: str, gen: torch.Generator) -> Tensor:
    args = inputs(m, c, device, gen)
    ref = K.reference(*args)
    xp = args[0].clone()
    K.launch(xp, *args[1:])
    print(f"M={m}, C={c}: kernel vs eager: {agreement(xp, ref)}")
    return ref


def patch_interpreter(round_casts: bool) -> None:
    """Two bf16 faults of Triton 3.6's interpreter, fixed to what the GPU does: tl.dot multiplies bf16 operands as
    their raw uint16 bits (garbage), and fp32 → bf16 casts truncate instead of rounding to nearest even."""
    import numpy as np
    import triton.language as tl
    from triton.runtime.interpreter import InterpreterBuilder, TensorHandle

    def widen(h: TensorHandle) -> TensorHandle:  # bf16 (stored as uint16) → fp32, exact
        if h.dtype.scalar != tl.bfloat16:
            return h
        return TensorHandle((h.data.astype(np.uint32) << 16).view(np.float32), tl.float32)

    dot, cast = InterpreterBuilder.create_dot, InterpreterBuilder.cast_impl

    def create_dot(self, a, b, d, *rest):
        return dot(self, widen(a), widen(b), d, *rest)

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            rounded = torch.from_numpy(np.ascontiguousarray(src.data)).to(torch.bfloat16).view(torch.int16)
            return TensorHandle(rounded.numpy().view(np.uint16), tl.bfloat16)
        return cast(self, src, dst_type)

    InterpreterBuilder.create_dot = create_dot
    if round_casts:
        InterpreterBuilder.cast_impl = cast_impl


def cpu_check() -> None:
    patch_interpreter(round_casts="--truncate" not in sys.argv)
    gen = torch.Generator().manual_seed(0)
    for m, c in ((300, 16), (1000, 16), (300, 32), (300, 64)):
        check(m, c, "cpu", gen)
    try:
        K.launch(*inputs(8, 24, "cpu", gen))
    except ValueError as e:
        print(f"C=24 refused: {e}")


def main() -> None:
    gen = torch.Generator(device="cuda").manual_seed(0)
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}")
    m, c = 8192 * 256, 16
    args = inputs(m, c, "cuda", gen)
    ref = check(m, c, "cuda", gen.manual_seed(0))
    compiled = torch.compile(K.reference, dynamic=False)
    print(f"M={m}, C={c}: compiled vs eager: {agreement(compiled(*args), ref)}")
    for c_other in (32, 64):
        check(65536 + 37, c_other, "cuda", gen)

    xp = args[0].clone()  # both paths overwrite it run after run; the values drift, the work does not change
    torch_us = 1e6 * timed(lambda: xp.copy_(compiled(xp, *args[1:])))
    kernel_us = 1e6 * timed(lambda: K.launch(xp, *args[1:]))
    moved = m * c * (4 + 4 + 4 * 2 + 2)  # bytes: xp read and written, modulation and expanded read
    print("\n| path | µs | GB/s |\n|---|---:|---:|")
    for name, us in (("torch.compile(reference), copy_ into xp", torch_us), ("pixel_mlp_kernel.launch", kernel_us)):
        print(f"| {name} | {us:.0f} | {moved / us / 1e3:.0f} |")
    if "--sweep" in sys.argv:
        print("\n| C | BLOCK_M | num_warps | µs | GB/s |\n|---:|---:|---:|---:|---:|")
        for c in K.CONFIGS:
            m_c = m * 16 // c  # the same number of values at every C
            args_c = inputs(m_c, c, "cuda", gen)
            default = K.CONFIGS[c]
            for cfg in ((32, 4), (64, 4), (64, 8), (128, 4), (128, 8), (256, 8)):
                K.CONFIGS[c] = cfg
                try:
                    us = 1e6 * timed(lambda a=args_c: K.launch(*a))
                except Exception as e:  # out of resources
                    print(f"| {c} | {cfg[0]} | {cfg[1]} | {type(e).__name__} | |")
                    continue
                print(f"| {c} | {cfg[0]} | {cfg[1]} | {us:.0f} | {m_c * c * 18 / us / 1e3:.0f} |")
            K.CONFIGS[c] = default


if __name__ == "__main__":
    cpu_check() if "--cpu" in sys.argv else main()
