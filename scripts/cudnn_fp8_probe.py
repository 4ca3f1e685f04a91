"""Probe cuDNN's FP8 fused attention (cudnn-frontend's `sdpa_fp8`) on PiD's attention shapes: does it build
for head dims 64 and 72, how fast is it against cuDNN bf16 and our 8-bit kernel, and how far is it from fp32.

    pip install nvidia-cudnn-frontend==1.18.0 && python scripts/cudnn_fp8_probe.py

Q, K, V are quantised to e4m3 with one scale per tensor (what the graph takes); P is scaled by 448. On Hopper
the output is e4m3 too (bf16 output is Blackwell-only), scaled like V.
Inputs and timing are attention8_bench's.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from attention8_bench import SHAPES, inputs, rel_l2, sdpa, timed

from pid_cli.model import attention8
from pid_cli.model.layers import fast_attention

FP8_MAX = 448.0


class Fp8Attention:
    """One built cuDNN graph for [1, N, heads, d] e4m3 inputs (BSHD, as PiD's projections lay them out)."""

    def __init__(self, cudnn, nq: int, nk: int, heads: int, d: int, handle, stats: bool = False):
        self.cudnn, self.handle = cudnn, handle
        dt = cudnn.data_type
        g = cudnn.pygraph(io_data_type=dt.FP8_E4M3, intermediate_data_type=dt.FLOAT, compute_data_type=dt.FLOAT,
                          handle=handle)

        def bshd(uid, n):
            return g.tensor(uid=uid, dim=(1, heads, n, d), stride=(n * heads * d, d, heads * d, 1),
                            data_type=dt.FP8_E4M3)

        def scalar(uid):
            return g.tensor(uid=uid, dim=(1, 1, 1, 1), stride=(1, 1, 1, 1), data_type=dt.FLOAT)

        q, k, v = bshd(0, nq), bshd(1, nk), bshd(2, nk)
        scales = [scalar(uid) for uid in (5, 6, 7, 8, 9, 10)]  # descale q, k, v, s; scale s, o
        o, lse, amax_s, amax_o = g.sdpa_fp8(
            q=q, k=k, v=v, descale_q=scales[0], descale_k=scales[1], descale_v=scales[2], descale_s=scales[3],
            scale_s=scales[4], scale_o=scales[5], generate_stats=stats, attn_scale=1 / math.sqrt(d),
            use_causal_mask=False)
        o.set_uid(3).set_output(True).set_dim((1, heads, nq, d)).set_stride(
            (nq * heads * d, d, heads * d, 1)).set_data_type(dt.FP8_E4M3)  # bf16 output is Blackwell-only
        if stats:  # some cuDNN builds only offer the training graph, which also writes the softmax statistics
            lse.set_uid(4).set_output(True).set_dim((1, heads, nq, 1)).set_stride((heads * nq, nq, 1, 1)).set_data_type(
                dt.FLOAT)
        amax_s.set_uid(11).set_output(True).set_dim((1, 1, 1, 1)).set_stride((1, 1, 1, 1)).set_data_type(dt.FLOAT)
        amax_o.set_uid(12).set_output(True).set_dim((1, 1, 1, 1)).set_stride((1, 1, 1, 1)).set_data_type(dt.FLOAT)
        g.validate()
        g.build_operation_graph()
        g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        g.check_support()
        g.build_plans()
        self.graph = g
        self.workspace = torch.empty(g.get_workspace_size(), dtype=torch.uint8, device="cuda")
        self.out = torch.empty(1, nq, heads, d, dtype=torch.float8_e4m3fn, device="cuda")
        self.amax = torch.empty(2, dtype=torch.float32, device="cuda")
        self.lse = torch.empty(1, heads, nq, 1, dtype=torch.float32, device="cuda")
        one = torch.ones(1, dtype=torch.float32, device="cuda")
        self.s_scale, self.s_descale = one * FP8_MAX, one / FP8_MAX

    def __call__(self, q8, q_descale, k8, k_descale, v8, v_descale):
        """→ [1, N, heads, d] bf16. |O| ≤ max |V| (a convex combination of V's rows), so V's scale fits O."""
        pack = {0: q8, 1: k8, 2: v8, 5: q_descale, 6: k_descale, 7: v_descale, 8: self.s_descale, 9: self.s_scale,
                10: 1 / v_descale, 3: self.out, 11: self.amax[0:1], 12: self.amax[1:2], 4: self.lse}
        self.graph.execute(pack, self.workspace, handle=self.handle)
        return (self.out.float() * v_descale).bfloat16()


def quantize(x: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[1, N, heads, d] → e4m3 [1, N, heads, width] (zero channels appended) and its fp32 descale [1]."""
    amax = x.abs().amax().float().clamp_min(1e-20)
    x8 = (x.float() * (FP8_MAX / amax)).to(torch.float8_e4m3fn)
    return F.pad(x8.view(torch.uint8), (0, width - x.shape[-1])).view(torch.float8_e4m3fn), (amax / FP8_MAX)[None]


def main() -> None:
    import cudnn

    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, cuDNN backend {cudnn.backend_version_string()}"
          f" (torch's {torch.backends.cudnn.version()}), cudnn-frontend {getattr(cudnn, '__version__', '?')}")
    handle = cudnn.create_handle()
    cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream().cuda_stream)
    gen = torch.Generator(device="cuda").manual_seed(0)
    quant = torch.compile(quantize, dynamic=False)

    print("\n| shape | d used | build | bf16 cuDNN TFLOP/s (ms) | 8-bit kernel | cuDNN FP8 (+ quantisation) | "
          "rel L2 bf16 / 8-bit / FP8 (logit std 1, 3) |")
    print("|---|---|---|---|---|---|---|")
    for name, shape in SHAPES.items():
        probe(cudnn, handle, name, shape, gen, quant)


def probe(cudnn, handle, name: str, shape: tuple[int, int, int, int], gen: torch.Generator, quant) -> None:
    nq, nk, heads, d = shape
    flops = 4 * nq * nk * d * heads
    q, k, v = inputs(nq, nk, heads, d, 1.0, gen)
    with fast_attention():
        t_bf16 = timed(lambda: sdpa(q, k, v))
    t_8bit = timed(lambda: attention8.attention(q, k, v))
    for width in (d, 80, 96, 128):
        if width < d:
            continue
        try:
            fp8_small = Fp8Attention(cudnn, 4096, nk, heads, width, handle, True) if name.startswith("2K") else None
            fp8 = Fp8Attention(cudnn, nq, nk, heads, width, handle, True)
        except Exception as e:  # unsupported configuration: try a wider head
            print(f"| {name} | {width} | {type(e).__name__}: {str(e)[:160]} | | | | |", flush=True)
            continue
        args = [x for t in (q, k, v) for x in quant(t, width)]
        t_fp8 = timed(lambda fp8=fp8, args=args: fp8(*args))
        t_all = timed(lambda fp8=fp8, width=width: fp8(*[x for t in (q, k, v) for x in quant(t, width)]))
        errors = []
        for std in (1.0, 3.0) if fp8_small is not None else ():
            qs, ks, vs = inputs(4096, nk, heads, d, std, gen)
            exact = sdpa(qs.float(), ks.float(), vs.float())
            with fast_attention():
                e_bf16 = rel_l2(sdpa(qs, ks, vs), exact)
            e_8 = rel_l2(attention8.attention(qs, ks, vs), exact)
            out = fp8_small(*[x for t in (qs, ks, vs) for x in quantize(t, width)])[..., :d]
            errors.append(f"{e_bf16:.1e} / {e_8:.1e} / {rel_l2(out, exact):.1e}")
        print(f"| {name} | {width} | ok | {flops / t_bf16 / 1e12:.0f} ({t_bf16 * 1e3:.2f}) | "
              f"{flops / t_8bit / 1e12:.0f} ({t_8bit * 1e3:.2f}) | {flops / t_fp8 / 1e12:.0f} ({t_fp8 * 1e3:.2f}; "
              f"{t_all * 1e3:.2f}) | {'; '.join(errors)} |", flush=True)
        return

if __name__ == "__main__":
    main()
