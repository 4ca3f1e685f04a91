"""`kernels/kv_quant.py` (the Triton K/V quantisation behind `--attention 8bit`) against the torch ops it replaces.

    python scripts/kv_quant_bench.py            # on a GPU: agreement, then µs per call beside Inductor's kernels
    python scripts/kv_quant_bench.py --cpu      # Triton's interpreter on the CPU: agreement, small shapes

On the GPU the kernels are timed against `reference.quantize_kv` of the concatenated parts under
torch.compile (what the network ran before them), plainly and replayed from CUDA graphs (the GPU's time without
Python's launch overhead, which inside a decode hides behind the GPU's work). The interpreter's float → e4m3
conversion does not round to nearest even (Hopper's does), so the CPU check allows V8 one e4m3 step off, and K8
off by one in at most 1e-4 of its values (the interpreter's FMA rounds twice).

How the kernels got here (µs per call, (B, text, image, heads, D); Inductor vs these):
- v1, two kernels (H100): (1, 300, 16384, 24, 64) 365 vs 659; (1, 0, 16384, 16, 72) 179 vs 414;
  (1, 300, 65536, 24, 64) 901 vs 2524; (1, 0, 65536, 16, 72) 510 vs 1357. Byte-wise transposed V stores, every
  quantise program re-reading all partial statistics, K loaded twice per block, 128-channel tiles at D = 64.
- v2, three kernels, 16-byte loads and stores, exact division by `div_rn` (H100): 335 vs 279; 251 vs 301;
  954 vs 541; 506 vs 532.
- v3, the division as one reciprocal per channel or block and a correction FMA per value (~10 instructions per
  value down to 3; the quantise kernel 26.0 → 15.1 SASS instructions per value at D = 64, 29.4 → 17.3 at 72),
  K and V blocks in separate programs (64 registers each, 4 programs per SM) (H200, plain / CUDA graphs):
  290 vs 203 / 205 vs 94; 242 vs 254 / 119 vs 92; 877 vs 423 / 752 vs 314; 525 vs 434 / 412 vs 297.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

if "--cpu" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # read when triton is imported
sys.path.insert(0, str(Path(__file__).resolve().parent))  # attention8_bench
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch import Tensor

from pid_cli.kernels import kv_quant as kv_quant_kernel
from pid_cli.kernels import reference as torch_reference


def quantize_kv(k_parts: list[Tensor], v_parts: list[Tensor]) -> tuple[Tensor, ...]:
    """The kernels on one or two parts [B, N_i, heads, D] of K and V."""
    if len(k_parts) == 1:
        k_parts, v_parts = [k_parts[0][:, :0], k_parts[0]], [v_parts[0][:, :0], v_parts[0]]
    return kv_quant_kernel.launch(*k_parts, *v_parts)


def projections(batch: int, n_txt: int, n_img: int, heads: int, d: int, device: str, gen: torch.Generator):
    """K and V parts as the network makes them: views into fused qkv outputs [B, N, 3·heads·D]."""
    def parts(n: int) -> tuple[Tensor, Tensor]:
        qkv = torch.randn(batch, n, 3 * heads * d, device=device, generator=gen).bfloat16()
        _, k, v = qkv.unflatten(-1, (3, heads, d)).unbind(2)
        return k + 0.3, v  # a shared key offset, as learned keys often have

    (ky, vy), (kx, vx) = parts(n_txt), parts(n_img)
    return ([ky, kx], [vy, vx]) if n_txt else ([kx], [vx])


def agreement(ours: tuple[Tensor, ...], torch_ops: tuple[Tensor, ...]) -> str:
    k8, k_scale, v8, v_scale = ours
    k8_ref, k_scale_ref, v8_ref, v_scale_ref = torch_ops
    k_off = (k8.int() - k8_ref.int()).abs()
    v_off = (v8.float() - v8_ref.float()).abs() / v8_ref.float().abs().clamp_min(2**-9)
    return (f"K8 {int((k_off > 0).sum())} off by ≤ {int(k_off.max())}, "
            f"V8 {int((v_off > 0).sum())} off (≤ {v_off.max().item():.3f} rel), "
            f"scales {(k_scale / k_scale_ref - 1).abs().max().item():.1e} / "
            f"{(v_scale / v_scale_ref - 1).abs().max().item():.1e}")


def cpu_check() -> None:
    """The kernels in Triton's interpreter against the torch ops, allowing one e4m3 step in V8 and K8 off by one
    in at most 1e-4 of its values (see above)."""
    gen = torch.Generator().manual_seed(0)
    # the last shape has more than PARTS chunks: the reduce kernel's loop runs twice
    for shape in [(2, 77, 1000, 3, 64), (1, 0, 333, 2, 72), (1, 5, 300, 2, 96), (1, 7, 33000, 1, 64)]:
        ks, vs = projections(*shape, "cpu", gen)
        ours, theirs = quantize_kv(ks, vs), torch_reference.quantize_kv(torch.cat(ks, 1), torch.cat(vs, 1))
        assert all(a.shape == b.shape and a.dtype == b.dtype for a, b in zip(ours, theirs, strict=True))
        v8, v8_ref = (torch_reference.mma_key_order(t.float(), inverse=True) for t in (ours[2], theirs[2]))
        step = 2.0 ** (torch.floor(torch.log2(v8_ref.abs().clamp_min(2**-6))) - 3)  # e4m3's spacing
        binade_edge = (v8 == v8_ref / 2) & (torch.log2(v8_ref.abs()) % 1 == 0)  # the interpreter's round-up slip
        k_off = (ours[0].int() - theirs[0].int()).abs()
        ok = torch.equal(ours[1], theirs[1]) and torch.equal(ours[3], theirs[3])
        ok &= int(k_off.max()) <= 1 and int((k_off > 0).sum()) <= 1e-4 * k_off.numel()
        ok &= bool(((v8 - v8_ref).abs() <= step).logical_or(binade_edge).all())
        print(f"{shape}: {agreement(ours, theirs)}: {'ok' if ok else 'MISMATCH'}")


def graphed(fn) -> float | None:
    """µs per replay of `fn` captured in a CUDA graph: the GPU's time without Python's launch overhead (which the
    plain timing includes: 3 Triton launches and 5 allocations here, a guarded compiled call for Inductor)."""
    from attention8_bench import timed

    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return timed(graph.replay) * 1e6
    except Exception as error:  # a column of the table, not the experiment
        print(f"# CUDA graph capture failed: {error!r}", flush=True)
        return None


def main() -> None:
    if "--cpu" in sys.argv:
        return cpu_check()
    from attention8_bench import timed

    gen = torch.Generator(device="cuda").manual_seed(0)
    reference = torch.compile(lambda ks, vs: torch_reference.quantize_kv(torch.cat(ks, 1), torch.cat(vs, 1)),
                              dynamic=False)
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| shape (B, text, image, heads, D) | Inductor µs | these kernels µs | in CUDA graphs: Inductor / these µs "
          "| agreement |")
    print("|---|---|---|---|---|")
    for shape in [(1, 300, 16384, 24, 64), (1, 0, 16384, 16, 72), (1, 300, 65536, 24, 64), (1, 0, 65536, 16, 72),
                  (2, 77, 1000, 3, 64), (1, 0, 333, 2, 72)]:
        ks, vs = projections(*shape, "cuda", gen)
        ours, theirs = quantize_kv(ks, vs), reference(ks, vs)
        t_ref = timed(lambda ks=ks, vs=vs: reference(ks, vs))
        t_ours = timed(lambda ks=ks, vs=vs: quantize_kv(ks, vs))
        g_ref, g_ours = (graphed(lambda f=f, ks=ks, vs=vs: f(ks, vs)) for f in (reference, quantize_kv))
        graphs = " / ".join("n/a" if t is None else f"{t:.0f}" for t in (g_ref, g_ours))
        print(f"| {shape} | {t_ref * 1e6:.0f} | {t_ours * 1e6:.0f} | {graphs} | {agreement(ours, theirs)} |",
              flush=True)


if __name__ == "__main__":
    main()
