"""Experiment: `attention8.quantize_kv` as two Triton kernels that read the text and image keys where the
projections left them, against the Inductor-compiled torch ops the network runs now.

    python scripts/experiments/kv_quant.py            # on a GPU: agreement, then µs per call side by side
    python scripts/experiments/kv_quant.py --cpu      # Triton's interpreter on the CPU: agreement, small shapes

Why: in a 2K decode with both 8-bit modes Inductor's K/V quantisation kernels take ~15 ms of 337 (H100 profile,
BENCHMARKS.md): the concatenation of text and image keys, the K mean, the K block maxima and the rounding read K
three times, V twice, and the transposed FP8 write of V ran at about a third of the card's bandwidth. Here:
  stats     one program per (chunk of keys, batch·head): partial sums of K and partial max |V| per channel.
  quantise  one program per (block of 128 keys, batch·head): the key mean and V's channel scales from the
            partials, then K centred, scaled per block and rounded to INT8, and V scaled, rounded to e4m3 and
            written transposed, its keys in `mma_key_order`, with the ones channel and zero padding.
K and V are each read twice, once per kernel, and written once. Rounding differs from the torch ops only where
Triton's fp32 division lands on the other side of a rounding boundary.

Status: not yet run on a GPU. With `--cpu` (Triton 3.6's interpreter) K8 and both scales equal the torch ops'
exactly; V8 differs by at most one e4m3 step, in ~2% of the values: the interpreter's float → e4m3 conversion
does not round to nearest even (Hopper's does), so the CPU check accepts that, and the GPU check does not.
For the network it would replace `attention8.quantize_kv` (and the concatenation) behind a custom op.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

if "--cpu" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # read when triton is imported
sys.path[:0] = [str(Path(__file__).resolve().parents[2]), str(Path(__file__).resolve().parents[1])]

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from torch import Tensor  # noqa: E402

from pid_cli.model import attention8  # noqa: E402
from pid_cli.model.attention8 import KEY_BLOCK, split_widths  # noqa: E402

INT8_MAX: tl.constexpr = tl.constexpr(attention8.INT8_MAX)
FP8_MAX: tl.constexpr = tl.constexpr(attention8.FP8_MAX)
ROUND: tl.constexpr = tl.constexpr(12582912.0)  # 1.5·2^23: x + ROUND − ROUND is x rounded to an integer, |x| < 2^22

CHUNK = 1024  # keys per program of the statistics pass
ROWS = 32  # keys (or partials) per step of a loop


@triton.jit
def _load_keys(a, b, stride_a, stride_b, n_a, n, keys, chans, chan_ok):
    """Rows `keys` of [a; b] (the text part, then the image part), channels `chans`, fp32; zero past n."""
    in_a = keys < n_a
    in_b = (keys >= n_a) & (keys < n)
    x = tl.load(a + keys[:, None] * stride_a + chans[None, :], mask=in_a[:, None] & chan_ok[None, :], other=0.0)
    x += tl.load(b + (keys - n_a)[:, None] * stride_b + chans[None, :], mask=in_b[:, None] & chan_ok[None, :],
                 other=0.0)
    return x.to(tl.float32)


@triton.jit
def _heads(KA, KB, VA, VB, ka_b, ka_h, kb_b, kb_h, va_b, va_h, vb_b, vb_h, bh, heads):
    """Where (batch, head) bh starts in the text and image parts of K and V."""
    b, h = (bh // heads).to(tl.int64), bh % heads
    return KA + b * ka_b + h * ka_h, KB + b * kb_b + h * kb_h, VA + b * va_b + h * va_h, VB + b * vb_b + h * vb_h


@triton.jit
def _stats_kernel(KA, KB, VA, VB, KSUM, VMAX, ka_b, ka_n, ka_h, kb_b, kb_n, kb_h, va_b, va_n, va_h, vb_b, vb_n,
                  vb_h, heads, n_a, n, n_chunks,
                  HEAD_DIM: tl.constexpr, D_POW2: tl.constexpr, CHUNK: tl.constexpr, ROWS: tl.constexpr):
    chunk, bh = tl.program_id(0), tl.program_id(1)
    ka, kb, va, vb = _heads(KA, KB, VA, VB, ka_b, ka_h, kb_b, kb_h, va_b, va_h, vb_b, vb_h, bh, heads)
    chans = tl.arange(0, D_POW2)
    chan_ok = chans < HEAD_DIM
    k_sum = tl.zeros([D_POW2], tl.float32)
    v_max = tl.zeros([D_POW2], tl.float32)
    for start in range(chunk * CHUNK, tl.minimum(chunk * CHUNK + CHUNK, n), ROWS):
        keys = start + tl.arange(0, ROWS)
        k = _load_keys(ka, kb, ka_n, kb_n, n_a, n, keys, chans, chan_ok)
        v = _load_keys(va, vb, va_n, vb_n, n_a, n, keys, chans, chan_ok)
        k_sum += tl.sum(k, 0)
        v_max = tl.maximum(v_max, tl.max(tl.abs(v), 0))
    out = (bh * n_chunks + chunk) * D_POW2 + chans
    tl.store(KSUM + out, k_sum)
    tl.store(VMAX + out, v_max)


@triton.jit
def _quantize_kernel(KA, KB, VA, VB, KSUM, VMAX, K8, KSCALE, V8, VSCALE, ka_b, ka_n, ka_h, kb_b, kb_n, kb_h,
                     va_b, va_n, va_h, vb_b, vb_n, vb_h, heads, n_a, n, n_pad, n_chunks,
                     HEAD_DIM: tl.constexpr, D_POW2: tl.constexpr, D_QK: tl.constexpr, D_V: tl.constexpr,
                     KEY_BLOCK: tl.constexpr, ROWS: tl.constexpr):
    block, bh = tl.program_id(0), tl.program_id(1)
    ka, kb, va, vb = _heads(KA, KB, VA, VB, ka_b, ka_h, kb_b, kb_h, va_b, va_h, vb_b, vb_h, bh, heads)
    chans = tl.arange(0, D_POW2)
    chan_ok = chans < HEAD_DIM

    # per-head statistics from the partials: the key mean, V's channel scales
    k_sum = tl.zeros([D_POW2], tl.float32)
    v_max = tl.zeros([D_POW2], tl.float32)
    for first in range(0, n_chunks, ROWS):
        part = first + tl.arange(0, ROWS)
        at = (bh * n_chunks + part)[:, None] * D_POW2 + chans[None, :]
        k_sum += tl.sum(tl.load(KSUM + at, mask=(part < n_chunks)[:, None], other=0.0), 0)
        v_max = tl.maximum(v_max, tl.max(tl.load(VMAX + at, mask=(part < n_chunks)[:, None], other=0.0), 0))
    k_mean = k_sum / n  # [D_POW2]
    v_scale = tl.maximum(v_max, 1e-20) / FP8_MAX

    # K: centred, one scale per block of keys (its max over the block first), INT8 [keys, D_QK], zero padding;
    # V: scaled per channel, e4m3, transposed [D_V, keys], keys relabelled as attention8.mma_key_order. In groups
    # of 32 keys, the relabelling's span: small tiles, and each channel's 32 bytes land in one memory segment.
    k_amax = 0.0
    for group in range(KEY_BLOCK // 32):
        keys = block * KEY_BLOCK + group * 32 + tl.arange(0, 32)
        k = _load_keys(ka, kb, ka_n, kb_n, n_a, n, keys, chans, chan_ok)
        k = tl.where((keys < n)[:, None] & chan_ok[None, :], k - k_mean[None, :], 0.0)
        k_amax = tl.maximum(k_amax, tl.max(tl.max(tl.abs(k), 1), 0))
    k_scale = tl.maximum(k_amax, 1e-20) / INT8_MAX
    tl.store(KSCALE + bh * (n_pad // KEY_BLOCK) + block, k_scale)
    v_rows = V8 + bh.to(tl.int64) * D_V * n_pad
    for group in range(KEY_BLOCK // 32):
        keys = block * KEY_BLOCK + group * 32 + tl.arange(0, 32)
        key_ok = keys < n
        k = _load_keys(ka, kb, ka_n, kb_n, n_a, n, keys, chans, chan_ok)
        k = tl.where(key_ok[:, None] & chan_ok[None, :], k - k_mean[None, :], 0.0)
        k8 = ((k / k_scale + ROUND) - ROUND).to(tl.int8)  # half to even, as torch.round (fp32 addition rounds so)
        tl.store(K8 + (bh.to(tl.int64) * n_pad + keys)[:, None] * D_QK + chans[None, :], k8,
                 mask=chans[None, :] < D_QK)
        v = _load_keys(va, vb, va_n, vb_n, n_a, n, keys, chans, chan_ok) / v_scale[None, :]
        v = tl.where(chans[None, :] == HEAD_DIM, tl.where(key_ok, 1.0, 0.0)[:, None], v)  # the ones channel
        low = keys % 32  # key 16·j1 + 8·j0 + 4·c1 + 2·c0 + b of its group moves to 16·j1 + 8·c1 + 4·c0 + 2·j0 + b
        column = keys - low + (low & 17) + ((low >> 1) & 3) * 4 + ((low >> 3) & 1) * 2
        tl.store(v_rows + chans[None, :] * n_pad + column[:, None], v.to(tl.float8e4nv), mask=chans[None, :] < D_V)
    if block == 0:
        tl.store(VSCALE + bh * HEAD_DIM + chans, v_scale, mask=chan_ok)


def quantize_kv(k_parts: list[Tensor], v_parts: list[Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """`attention8.quantize_kv(cat(k_parts, 1), cat(v_parts, 1))` without the concatenation: one or two parts
    [B, N_i, heads, D], each with unit channel stride (views into the projections' outputs are fine)."""
    if len(k_parts) == 1:
        k_parts, v_parts = [k_parts[0][:, :0], k_parts[0]], [v_parts[0][:, :0], v_parts[0]]
    (ka, kb), (va, vb) = k_parts, v_parts
    batch, n_a, heads, d = ka.shape
    n = n_a + kb.shape[1]
    assert all(t.stride(-1) == 1 and t.shape[2:] == (heads, d) for t in (ka, kb, va, vb))
    qk_rest, v_rest = split_widths(d)
    d_qk, d_v = 64 + qk_rest, 64 + v_rest
    d_pow2 = triton.next_power_of_2(max(d + 1, d_qk, d_v))  # channels of a tile: D_QK, D_V, the ones channel
    n_pad = -(-n // KEY_BLOCK) * KEY_BLOCK
    n_chunks = triton.cdiv(n, CHUNK)
    dev = kb.device
    k_sum = torch.empty(batch * heads, n_chunks, d_pow2, device=dev)
    v_max = torch.empty_like(k_sum)
    k8 = torch.empty(batch, heads, n_pad, d_qk, dtype=torch.int8, device=dev)
    k_scale = torch.empty(batch, heads, n_pad // KEY_BLOCK, device=dev)
    v8 = torch.empty(batch, heads, d_v, n_pad, dtype=torch.float8_e4m3fn, device=dev)
    v_scale = torch.empty(batch, heads, d, device=dev)
    strides = [st for t in (ka, kb, va, vb) for st in t.stride()[:3]]  # batch, token, head strides of each
    _stats_kernel[(n_chunks, batch * heads)](ka, kb, va, vb, k_sum, v_max, *strides, heads, n_a, n, n_chunks,
                                             HEAD_DIM=d, D_POW2=d_pow2, CHUNK=CHUNK, ROWS=ROWS)
    _quantize_kernel[(n_pad // KEY_BLOCK, batch * heads)](
        ka, kb, va, vb, k_sum, v_max, k8, k_scale, v8, v_scale, *strides, heads, n_a, n, n_pad, n_chunks,
        HEAD_DIM=d, D_POW2=d_pow2, D_QK=d_qk, D_V=d_v, KEY_BLOCK=KEY_BLOCK, ROWS=ROWS,
        num_warps=8)  # with 4, 64-bit addresses of 32 × 128 tiles spill (Triton 3.6, sm_90)
    return k8, k_scale, v8, v_scale


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
    """The kernels in Triton's interpreter against the torch ops, allowing one e4m3 step in V8 (see above)."""
    gen = torch.Generator().manual_seed(0)
    for shape in [(2, 77, 1000, 3, 64), (1, 0, 333, 2, 72), (1, 5, 300, 2, 96)]:
        ks, vs = projections(*shape, "cpu", gen)
        ours, theirs = quantize_kv(ks, vs), attention8.quantize_kv(torch.cat(ks, 1), torch.cat(vs, 1))
        assert all(a.shape == b.shape and a.dtype == b.dtype for a, b in zip(ours, theirs, strict=True))
        v8, v8_ref = (attention8.mma_key_order(t.float(), inverse=True) for t in (ours[2], theirs[2]))
        step = 2.0 ** (torch.floor(torch.log2(v8_ref.abs().clamp_min(2**-6))) - 3)  # e4m3's spacing
        binade_edge = (v8 == v8_ref / 2) & (torch.log2(v8_ref.abs()) % 1 == 0)  # the interpreter's round-up slip
        ok = torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1]) and torch.equal(ours[3], theirs[3])
        ok &= bool(((v8 - v8_ref).abs() <= step).logical_or(binade_edge).all())
        print(f"{shape}: {agreement(ours, theirs)}: {'ok' if ok else 'MISMATCH'}")


def main() -> None:
    if "--cpu" in sys.argv:
        return cpu_check()
    from attention8_bench import timed

    gen = torch.Generator(device="cuda").manual_seed(0)
    reference = torch.compile(lambda ks, vs: attention8.quantize_kv(torch.cat(ks, 1), torch.cat(vs, 1)),
                              dynamic=False)
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| shape (B, text, image, heads, D) | Inductor µs | these kernels µs | agreement |")
    print("|---|---|---|---|")
    for shape in [(1, 300, 16384, 24, 64), (1, 0, 16384, 16, 72), (1, 300, 65536, 24, 64), (1, 0, 65536, 16, 72),
                  (2, 77, 1000, 3, 64), (1, 0, 333, 2, 72)]:
        ks, vs = projections(*shape, "cuda", gen)
        ours, theirs = quantize_kv(ks, vs), reference(ks, vs)
        t_ref = timed(lambda ks=ks, vs=vs: reference(ks, vs))
        t_ours = timed(lambda ks=ks, vs=vs: quantize_kv(ks, vs))
        print(f"| {shape} | {t_ref * 1e6:.0f} | {t_ours * 1e6:.0f} | {agreement(ours, theirs)} |", flush=True)


if __name__ == "__main__":
    main()
