"""Experiment: `attention8.quantize_kv` as three Triton kernels that read the text and image keys where the
projections left them, against the Inductor-compiled torch ops the network runs now.

    python scripts/experiments/kv_quant.py            # on a GPU: agreement, then µs per call side by side
    python scripts/experiments/kv_quant.py --cpu      # Triton's interpreter on the CPU: agreement, small shapes

Why: in a 2K decode with both 8-bit modes Inductor's K/V quantisation kernels take ~14 ms of 337 (~250 µs per
MMDiT attention call, H100 profile, BENCHMARKS.md): the concatenation of text and image keys, the K mean, the K
block maxima and the rounding read K three times, V twice, and the transposed FP8 write of V ran at about a third
of the card's bandwidth. Reading K and V twice and writing them once is ~4 passes of ~51 MB: < 100 µs.

The first version of this script (two kernels) was slower than Inductor on an H100, µs per call, Inductor vs
it, (B, text, image, heads, D): (1, 300, 16384, 24, 64) 365 vs 659; (1, 0, 16384, 16, 72) 179 vs 414;
(1, 300, 65536, 24, 64) 901 vs 2524; (1, 0, 65536, 16, 72) 510 vs 1357. Its V8 store was transposed with the
key relabelling computed per element, one byte per thread per row (uncoalesced); every quantise program re-read
all per-chunk partial statistics (hundreds of MB of L2 traffic); K was loaded twice per block; tiles were 128
channels wide for head dim 64 (the ones channel made it 65); the statistics pass had ~400 programs, each a loop.

This version: channels split as attention8 splits them, 64 + a power-of-two remainder (none for K at D = 64),
so no tile is wider than the data by more than a remainder's padding. K and V must have head stride D (a
constant in the kernels: Triton specialises only strides divisible by 16, and without knowing that each head
starts 16 bytes aligned it loads D = 72's bf16 one element at a time).
  stats     one program per (chunk of 256 keys, batch·head), 8 warps: partial sums of K, partial max |V| per
            channel, [BH, chunks, D] fp32 each (16684 keys, 24 heads: 1,584 programs).
  reduce    one program per batch·head, 4 warps, 128 partials per step: the key mean (the sum, then / N, as
            torch's mean) and V's channel scales.
  quantise  one program per (block of 128 keys, batch·head), 8 warps. K, loaded once: centred, the block's
            scale from its max, rounded to INT8 (half to even) and stored as rows [keys, D_QK]. V: loaded
            transposed [channels, 128 keys] with the keys already in `mma_key_order` (the relabelling is of the
            rows loaded, per key, not per element; each key's row is its own memory segment anyway), scaled,
            rounded to e4m3 and each channel's 128 bytes stored contiguously (Triton transposes the bf16 tile
            through shared memory with ldmatrix.trans); the ones channel and zero padding in the remainder tile.
Divisions are IEEE (`div_rn`: Triton's `/` on fp32 is div.full.f32, approximate; likely the old version's K8
values off by one), so rounding matches torch's eager ops except where the key mean's summation order moves a
value across a rounding boundary (Inductor's own mean and divisions may differ from eager's in the last bit).

Measured (H100, torch 2.11, Triton 3.6; µs per call, Inductor's compiled torch ops vs these kernels):
(1, 300, 16384, 24, 64) 335 vs 279; (1, 0, 16384, 16, 72) 251 vs 301; (1, 300, 65536, 24, 64) 954 vs 541;
(1, 0, 65536, 16, 72) 506 vs 532. K8 differs from Inductor's by one step in a few dozen of 26M values and V8 by
one e4m3 step in ~0.02% (Inductor divides with the approximate `/`). Not moved into the network: inside it Inductor
fuses the concatenation into the projections' consumers and its quantisation took ~250 µs per 2K MMDiT call
(profile, BENCHMARKS.md), no more than these kernels; the 4K MMDiT gain would be ~0.6% of a decode, and head
dim 72 is slower at both sizes. With `--cpu` (Triton 3.6's interpreter) K8 and both scales equal the torch ops'
exactly; V8 differs by at most one e4m3 step, in ~2% of the values: the interpreter's float → e4m3 conversion
does not round to nearest even (Hopper's does), so the CPU check accepts that.
Compiled for sm_90 (Triton 3.6): no spills at D = 64 or 72 (registers: stats 70/72, reduce 71/55,
quantise 64/80; K, V, K8 and V8 move in 16-byte vectors); at D = 96 the reduce kernel keeps one value on the stack
across div_rn's slow-path call.
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
ROUND: tl.constexpr = tl.constexpr(12582912.0)  # 1.5·2^23: the low bits of x + ROUND are x rounded, |x| < 2^22

CHUNK = 256  # keys per program of the statistics pass
PARTS = 128  # partials per step of the reduce kernel's loop
WARPS = {"stats": 8, "reduce": 4, "quantize": 8}  # with 4, quantise spills at D = 72 (128 registers)


@triton.jit
def _heads(KA, KB, VA, VB, ka_b, kb_b, va_b, vb_b, bh, heads, HEAD_DIM: tl.constexpr):
    """Where (batch, head) bh starts in the text and image parts of K and V. The head stride is HEAD_DIM, a
    constant: Triton specialises only strides divisible by 16, and without knowing that a head starts 16 bytes
    aligned at D = 72 it loads bf16 elements one by one."""
    b, h = (bh // heads).to(tl.int64), (bh % heads) * HEAD_DIM
    return KA + b * ka_b + h, KB + b * kb_b + h, VA + b * va_b + h, VB + b * vb_b + h


@triton.jit
def _rows(a, b, stride_a, stride_b, n_a, n, keys):
    """Row pointers of `keys` in [a; b] (the text part, then the image part) and whether each key exists: one
    load per element whichever part its key is in."""
    keys = keys.to(tl.int64)
    return tl.where(keys < n_a, a + keys * stride_a, b + (keys - n_a) * stride_b), keys < n


@triton.jit
def _div(x, y):
    """x / y rounded as IEEE division (Triton's `/` on fp32 is approximate on GPUs), y broadcast to x."""
    return tl.math.div_rn(x, tl.broadcast_to(y, x.shape))


@triton.jit
def _stats(k_rows, v_rows, key_ok, out_k, out_v, chans, HEAD_DIM: tl.constexpr):
    """Partial K sums and max |V| of channels `chans` over one chunk's keys."""
    ok = key_ok[:, None] & (chans < HEAD_DIM)[None, :]
    k = tl.load(k_rows[:, None] + chans[None, :], mask=ok, other=0.0).to(tl.float32)  # [CHUNK, chans]
    v = tl.load(v_rows[:, None] + chans[None, :], mask=ok, other=0.0).to(tl.float32)
    tl.store(out_k + chans, tl.sum(k, 0), mask=chans < HEAD_DIM)
    tl.store(out_v + chans, tl.max(tl.abs(v), 0), mask=chans < HEAD_DIM)


@triton.jit
def _stats_kernel(KA, KB, VA, VB, KSUM, VMAX, ka_b, ka_n, kb_b, kb_n, va_b, va_n, vb_b, vb_n, heads, n_a, n, n_chunks,
                  HEAD_DIM: tl.constexpr, REST: tl.constexpr, CHUNK: tl.constexpr):
    chunk, bh = tl.program_id(0), tl.program_id(1)
    ka, kb, va, vb = _heads(KA, KB, VA, VB, ka_b, kb_b, va_b, vb_b, bh, heads, HEAD_DIM)
    keys = chunk * CHUNK + tl.arange(0, CHUNK)
    k_rows, key_ok = _rows(ka, kb, ka_n, kb_n, n_a, n, keys)
    v_rows, _ = _rows(va, vb, va_n, vb_n, n_a, n, keys)
    out = (bh * n_chunks + chunk) * HEAD_DIM  # KSUM, VMAX [BH, chunks, D]
    _stats(k_rows, v_rows, key_ok, KSUM + out, VMAX + out, tl.arange(0, 64), HEAD_DIM)
    if REST > 0:
        _stats(k_rows, v_rows, key_ok, KSUM + out, VMAX + out, 64 + tl.arange(0, REST), HEAD_DIM)


@triton.jit
def _reduce(KSUM, VMAX, KMEAN, VSCALE, bh, n_keys, n_chunks, chans, HEAD_DIM: tl.constexpr, PARTS: tl.constexpr):
    """Channels `chans` of one batch·head's key mean and V scales from its partials."""
    chan_ok = chans < HEAD_DIM
    k_sum = tl.zeros(chans.shape, tl.float32)
    v_max = tl.zeros(chans.shape, tl.float32)
    for first in range(0, n_chunks, PARTS):
        part = first + tl.arange(0, PARTS)
        at = (bh * n_chunks + part)[:, None] * HEAD_DIM + chans[None, :]  # [PARTS, chans]
        ok = (part < n_chunks)[:, None] & chan_ok[None, :]
        k_sum += tl.sum(tl.load(KSUM + at, mask=ok, other=0.0), 0)
        v_max = tl.maximum(v_max, tl.max(tl.load(VMAX + at, mask=ok, other=0.0), 0))
    k_mean = _div(k_sum, tl.full(chans.shape, n_keys, tl.float32))  # torch's mean: the sum, then / N
    v_scale = _div(tl.maximum(v_max, 1e-20), tl.full(chans.shape, FP8_MAX, tl.float32))
    tl.store(KMEAN + bh * HEAD_DIM + chans, k_mean, mask=chan_ok)
    tl.store(VSCALE + bh * HEAD_DIM + chans, v_scale, mask=chan_ok)


@triton.jit
def _reduce_kernel(KSUM, VMAX, KMEAN, VSCALE, n_keys, n_chunks,
                   HEAD_DIM: tl.constexpr, REST: tl.constexpr, PARTS: tl.constexpr):
    bh = tl.program_id(0)
    _reduce(KSUM, VMAX, KMEAN, VSCALE, bh, n_keys, n_chunks, tl.arange(0, 64), HEAD_DIM, PARTS)
    if REST > 0:
        _reduce(KSUM, VMAX, KMEAN, VSCALE, bh, n_keys, n_chunks, 64 + tl.arange(0, REST), HEAD_DIM, PARTS)


@triton.jit
def _centred_keys(rows, key_ok, mean, chans, HEAD_DIM: tl.constexpr):
    """K of channels `chans` less the key mean, fp32 [KEY_BLOCK, chans], zero for padding keys and channels."""
    ok = key_ok[:, None] & (chans < HEAD_DIM)[None, :]
    k = tl.load(rows[:, None] + chans[None, :], mask=ok, other=0.0).to(tl.float32)
    return tl.where(ok, k - tl.load(mean + chans, mask=chans < HEAD_DIM, other=0.0)[None, :], 0.0)


@triton.jit
def _int8(x, scale):
    """torch.round(x / scale) as INT8, |x / scale| ≤ 127: fp32 addition rounds half to even, as torch.round, and
    the low byte of ROUND + r's bits is r in two's complement."""
    return (_div(x, scale) + ROUND).to(tl.int32, bitcast=True).to(tl.int8)


@triton.jit
def _quantize_kernel(KA, KB, VA, VB, KMEAN, K8, KSCALE, V8, VSCALE, ka_b, ka_n, kb_b, kb_n, va_b, va_n, vb_b, vb_n,
                     heads, n_a, n, n_pad,
                     HEAD_DIM: tl.constexpr, QK_REST: tl.constexpr, V_REST: tl.constexpr, KEY_BLOCK: tl.constexpr):
    block, bh = tl.program_id(0), tl.program_id(1)
    ka, kb, va, vb = _heads(KA, KB, VA, VB, ka_b, kb_b, va_b, vb_b, bh, heads, HEAD_DIM)
    first = block * KEY_BLOCK
    lo = tl.arange(0, 64)
    stats = bh * HEAD_DIM  # KMEAN, VSCALE [BH, D]

    # K [KEY_BLOCK, D_QK]: centred, one scale per block (its max |k|), INT8 rows; padding keys, channels zero
    keys = first + tl.arange(0, KEY_BLOCK)
    rows, key_ok = _rows(ka, kb, ka_n, kb_n, n_a, n, keys)
    k = _centred_keys(rows, key_ok, KMEAN + stats, lo, HEAD_DIM)
    k_amax = tl.max(tl.max(tl.abs(k), 1), 0)
    if QK_REST > 0:
        k_hi = _centred_keys(rows, key_ok, KMEAN + stats, 64 + tl.arange(0, QK_REST), HEAD_DIM)
        k_amax = tl.maximum(k_amax, tl.max(tl.max(tl.abs(k_hi), 1), 0))
    k_scale = tl.math.div_rn(tl.maximum(k_amax, 1e-20), INT8_MAX)  # scalars
    tl.store(KSCALE + bh * (n_pad // KEY_BLOCK) + block, k_scale)
    d_qk: tl.constexpr = 64 + QK_REST
    k8_rows = K8 + (bh.to(tl.int64) * n_pad + keys)[:, None] * d_qk  # [KEY_BLOCK, 1]
    tl.store(k8_rows + lo[None, :], _int8(k, k_scale))
    if QK_REST > 0:
        tl.store(k8_rows + (64 + tl.arange(0, QK_REST))[None, :], _int8(k_hi, k_scale))

    # V [D_V, KEY_BLOCK] transposed: column p holds the key that `mma_key_order` moves to p, so the relabelling is
    # of the rows loaded: key 16·j1 + 8·j0 + 4·c1 + 2·c0 + b of a group of 32 goes to 16·j1 + 8·c1 + 4·c0 + 2·j0 + b
    p = tl.arange(0, KEY_BLOCK)
    keys = first + (p & ~14) + ((p >> 1) & 1) * 8 + ((p >> 3) & 1) * 4 + ((p >> 2) & 1) * 2
    rows, key_ok = _rows(va, vb, va_n, vb_n, n_a, n, keys)
    v8_rows = V8 + bh.to(tl.int64) * (64 + V_REST) * n_pad + first + p[None, :]  # [1, KEY_BLOCK]
    v = tl.load(rows[None, :] + lo[:, None], mask=key_ok[None, :], other=0.0).to(tl.float32)  # [64, KEY_BLOCK]
    v = _div(v, tl.load(VSCALE + stats + lo)[:, None])
    tl.store(v8_rows + lo[:, None] * n_pad, v.to(tl.float8e4nv))  # each channel's 128 keys: 128 bytes in a row
    hi = 64 + tl.arange(0, V_REST)  # the remainder: channels ≥ 64, the ones channel (D), zero padding
    if HEAD_DIM > 64:
        ok = (hi < HEAD_DIM)[:, None] & key_ok[None, :]
        v_hi = tl.load(rows[None, :] + hi[:, None], mask=ok, other=0.0).to(tl.float32)  # [V_REST, KEY_BLOCK]
        v_hi = _div(v_hi, tl.load(VSCALE + stats + hi, mask=hi < HEAD_DIM, other=1.0)[:, None])
    else:
        v_hi = tl.zeros([V_REST, KEY_BLOCK], tl.float32)
    v_hi = tl.where((hi == HEAD_DIM)[:, None] & key_ok[None, :], 1.0, v_hi)
    tl.store(v8_rows + hi[:, None] * n_pad, v_hi.to(tl.float8e4nv))


def quantize_kv(k_parts: list[Tensor], v_parts: list[Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """`attention8.quantize_kv(cat(k_parts, 1), cat(v_parts, 1))` without the concatenation: one or two parts
    [B, N_i, heads, D], each with strides (.., .., D, 1) (views into the projections' outputs are fine)."""
    if len(k_parts) == 1:
        k_parts, v_parts = [k_parts[0][:, :0], k_parts[0]], [v_parts[0][:, :0], v_parts[0]]
    (ka, kb), (va, vb) = k_parts, v_parts
    batch, n_a, heads, d = ka.shape
    n = n_a + kb.shape[1]
    assert attention8.supported(d)
    assert all(t.stride()[2:] == (d, 1) and t.shape[2:] == (heads, d) for t in (ka, kb, va, vb))
    qk_rest, v_rest = split_widths(d)
    rest = triton.next_power_of_2(d - 64) if d > 64 else 0  # channels ≥ 64 that hold data
    n_pad = -(-n // KEY_BLOCK) * KEY_BLOCK
    n_chunks = triton.cdiv(n, CHUNK)
    dev = kb.device
    k_sum = torch.empty(batch * heads, n_chunks, d, device=dev)
    v_max = torch.empty_like(k_sum)
    k_mean = torch.empty(batch * heads, d, device=dev)
    k8 = torch.empty(batch, heads, n_pad, 64 + qk_rest, dtype=torch.int8, device=dev)
    k_scale = torch.empty(batch, heads, n_pad // KEY_BLOCK, device=dev)
    v8 = torch.empty(batch, heads, 64 + v_rest, n_pad, dtype=torch.float8_e4m3fn, device=dev)
    v_scale = torch.empty(batch, heads, d, device=dev)
    strides = [st for t in (ka, kb, va, vb) for st in t.stride()[:2]]  # batch, token strides of each
    _stats_kernel[(n_chunks, batch * heads)](ka, kb, va, vb, k_sum, v_max, *strides, heads, n_a, n, n_chunks,
                                             HEAD_DIM=d, REST=rest, CHUNK=CHUNK, num_warps=WARPS["stats"])
    _reduce_kernel[(batch * heads,)](k_sum, v_max, k_mean, v_scale, float(n), n_chunks,
                                     HEAD_DIM=d, REST=rest, PARTS=PARTS, num_warps=WARPS["reduce"])
    _quantize_kernel[(n_pad // KEY_BLOCK, batch * heads)](
        ka, kb, va, vb, k_mean, k8, k_scale, v8, v_scale, *strides, heads, n_a, n, n_pad,
        HEAD_DIM=d, QK_REST=qk_rest, V_REST=v_rest, KEY_BLOCK=KEY_BLOCK, num_warps=WARPS["quantize"])
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
    # the last shape has more than PARTS chunks: the reduce kernel's loop runs twice
    for shape in [(2, 77, 1000, 3, 64), (1, 0, 333, 2, 72), (1, 5, 300, 2, 96), (1, 7, 33000, 1, 64)]:
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
