"""The Triton kernels behind `pid::quantize_kv8` on a GPU: K/V quantisation for the 8-bit attention kernel
(`reference.quantize_kv`'s arithmetic; attention8.py has the why).

Why: torch.compile's kernels for the same ops concatenate the text and image keys, then compute the key mean, the
block maxima and the rounding reading K three times and V twice, and their transposed FP8 store of V ran at about a
third of the card's bandwidth. These read the text and image parts where the projections left them (no
concatenation), K and V twice each, and write K8 and V8 once with 16-byte stores (timings: docs/performance.md#kernels;
`scripts/kv_quant_bench.py` measures them side by side with Inductor's).
  stats     one program per (256 keys, batch·head): partial sums of K and partial max |V| per channel.
  reduce    one program per batch·head: the key mean (the sum, then / N, as torch's mean) and V's channel scales.
  quantise  program (2·block, bh) quantises a block of 128 keys of K: centred, one scale from its max |k|, INT8
            rows (half to even, as torch.round); program (2·block + 1, bh) the same block of V: scaled per
            channel, e4m3, stored transposed [D_V, keys] with its keys in `reference.mma_key_order`, the ones
            channel and zero padding after the data. K and V in separate programs: each holds half the registers,
            so twice as many share an SM, their loads and stores out of step.
Channels are split as attention8 splits them, 64 plus a power-of-two remainder. Divisions round as IEEE division
(torch's), through a reciprocal computed once per channel or block and one correction FMA per value (`_div`).
Results equal `quantize_kv`'s torch ops except where a different summation order of the key mean moves a value
across a rounding boundary (K8 off by one in a few dozen of 26M values at 2K).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from pid_cli.kernels import constants
from pid_cli.kernels.constants import KEY_BLOCK, split_widths

INT8_MAX: tl.constexpr = tl.constexpr(constants.INT8_MAX)
FP8_MAX: tl.constexpr = tl.constexpr(constants.FP8_MAX)
ROUND: tl.constexpr = tl.constexpr(12582912.0)  # 1.5·2^23: the low bits of x + ROUND are x rounded, |x| < 2^22

CHUNK = 256  # keys per program of the statistics pass
PARTS = 128  # partials per step of the reduce kernel's loop
WARPS = {"stats": 8, "reduce": 4, "quantize": 8}


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
    select per row (not per element) whichever part its key is in; offsets in 32 bits (the wrapper checks)."""
    return tl.where(keys < n_a, a + keys * stride_a, b + (keys - n_a) * stride_b), keys < n


@triton.jit
def _workspace(WS, bhs, n_chunks, HEAD_DIM: tl.constexpr):
    """The fp32 scratch: partial K sums and max |V| [BH, chunks, D] each, then the key mean and 1 / V's scales
    [BH, D] each (one allocation: each costs the host microseconds, in a call that lasts few hundred)."""
    parts = bhs * n_chunks * HEAD_DIM
    return WS, WS + parts, WS + 2 * parts, WS + 2 * parts + bhs * HEAD_DIM


@triton.jit
def _div(x, y, r):
    """x / y rounded as IEEE division, given r = 1 / y rounded (y, r broadcast to x): q = x·r is within an ulp,
    x - q·y is exact in an FMA, and q + (x - q·y)·r is then the rounded quotient (Markstein; div.rn's own fast
    path, less its per-element reciprocal, range check and slow-path branch). 3 instructions, not ~10."""
    y, r = tl.broadcast_to(y, x.shape), tl.broadcast_to(r, x.shape)
    q = x * r
    return tl.fma(tl.fma(-q, y, x), r, q)


@triton.jit
def _stats(k_rows, v_rows, key_ok, out_k, out_v, chans, HEAD_DIM: tl.constexpr):
    """Partial K sums and max |V| of channels `chans` over one chunk's keys."""
    ok = key_ok[:, None] & (chans < HEAD_DIM)[None, :]
    k = tl.load(k_rows[:, None] + chans[None, :], mask=ok, other=0.0).to(tl.float32)  # [CHUNK, chans]
    v = tl.load(v_rows[:, None] + chans[None, :], mask=ok, other=0.0).to(tl.float32)
    tl.store(out_k + chans, tl.sum(k, 0), mask=chans < HEAD_DIM)
    tl.store(out_v + chans, tl.max(tl.abs(v), 0), mask=chans < HEAD_DIM)


@triton.jit
def _stats_kernel(KA, KB, VA, VB, WS, ka_b, ka_n, kb_b, kb_n, va_b, va_n, vb_b, vb_n, heads, n_a, n, n_chunks,
                  HEAD_DIM: tl.constexpr, REST: tl.constexpr, CHUNK: tl.constexpr):
    chunk, bh = tl.program_id(0), tl.program_id(1)
    ka, kb, va, vb = _heads(KA, KB, VA, VB, ka_b, kb_b, va_b, vb_b, bh, heads, HEAD_DIM)
    KSUM, VMAX, _, _ = _workspace(WS, tl.num_programs(1), n_chunks, HEAD_DIM)
    keys = chunk * CHUNK + tl.arange(0, CHUNK)
    k_rows, key_ok = _rows(ka, kb, ka_n, kb_n, n_a, n, keys)
    v_rows, _ = _rows(va, vb, va_n, vb_n, n_a, n, keys)
    out = (bh * n_chunks + chunk) * HEAD_DIM  # KSUM, VMAX [BH, chunks, D]
    _stats(k_rows, v_rows, key_ok, KSUM + out, VMAX + out, tl.arange(0, 64), HEAD_DIM)
    if REST > 0:
        _stats(k_rows, v_rows, key_ok, KSUM + out, VMAX + out, 64 + tl.arange(0, REST), HEAD_DIM)


@triton.jit
def _reduce(KSUM, VMAX, KMEAN, VRCP, VSCALE, bh, n_keys, n_chunks, chans, HEAD_DIM: tl.constexpr,
            PARTS: tl.constexpr):
    """Channels `chans` of one batch·head's key mean, V scales and their reciprocals from its partials."""
    chan_ok = chans < HEAD_DIM
    k_sum = tl.zeros(chans.shape, tl.float32)
    v_max = tl.zeros(chans.shape, tl.float32)
    for first in range(0, n_chunks, PARTS):
        part = first + tl.arange(0, PARTS)
        at = (bh * n_chunks + part)[:, None] * HEAD_DIM + chans[None, :]  # [PARTS, chans]
        ok = (part < n_chunks)[:, None] & chan_ok[None, :]
        k_sum += tl.sum(tl.load(KSUM + at, mask=ok, other=0.0), 0)
        v_max = tl.maximum(v_max, tl.max(tl.load(VMAX + at, mask=ok, other=0.0), 0))
    # torch's mean: the sum, then / N; divisions IEEE (Triton's `/` on fp32 is approximate on GPUs)
    k_mean = tl.math.div_rn(k_sum, tl.full(chans.shape, n_keys, tl.float32))
    v_scale = tl.math.div_rn(tl.maximum(v_max, 1e-20), tl.full(chans.shape, FP8_MAX, tl.float32))
    tl.store(KMEAN + bh * HEAD_DIM + chans, k_mean, mask=chan_ok)
    tl.store(VSCALE + bh * HEAD_DIM + chans, v_scale, mask=chan_ok)
    tl.store(VRCP + bh * HEAD_DIM + chans, tl.math.div_rn(tl.full(chans.shape, 1.0, tl.float32), v_scale),
             mask=chan_ok)


@triton.jit
def _reduce_kernel(WS, VSCALE, n_keys, n_chunks, HEAD_DIM: tl.constexpr, REST: tl.constexpr, PARTS: tl.constexpr):
    bh = tl.program_id(0)
    KSUM, VMAX, KMEAN, VRCP = _workspace(WS, tl.num_programs(0), n_chunks, HEAD_DIM)
    _reduce(KSUM, VMAX, KMEAN, VRCP, VSCALE, bh, n_keys, n_chunks, tl.arange(0, 64), HEAD_DIM, PARTS)
    if REST > 0:
        _reduce(KSUM, VMAX, KMEAN, VRCP, VSCALE, bh, n_keys, n_chunks, 64 + tl.arange(0, REST), HEAD_DIM, PARTS)


@triton.jit
def _centred_keys(k, key_ok, mean, chans, HEAD_DIM: tl.constexpr):
    """K (loaded) of channels `chans` less the key mean, fp32 [KEY_BLOCK, chans], zero for padding keys and
    channels."""
    ok = key_ok[:, None] & (chans < HEAD_DIM)[None, :]
    return tl.where(ok, k.to(tl.float32) - tl.load(mean + chans, mask=chans < HEAD_DIM, other=0.0)[None, :], 0.0)


@triton.jit
def _int8(x, scale, rcp):
    """torch.round(x / scale) as INT8, |x / scale| ≤ 127: fp32 addition rounds half to even, as torch.round, and
    the low byte of ROUND + r's bits is r in two's complement."""
    return (_div(x, scale, rcp) + ROUND).to(tl.int32, bitcast=True).to(tl.int8)


@triton.jit
def _quantize_k(ka, kb, KMEAN, K8, KSCALE, ka_n, kb_n, n_a, n, n_pad, bh, block,
                HEAD_DIM: tl.constexpr, QK_REST: tl.constexpr, KEY_BLOCK: tl.constexpr):
    """K [KEY_BLOCK, D_QK]: centred, one scale per block (its max |k|), INT8 rows; padding keys, channels zero."""
    lo = tl.arange(0, 64)
    keys = block * KEY_BLOCK + tl.arange(0, KEY_BLOCK)
    rows, key_ok = _rows(ka, kb, ka_n, kb_n, n_a, n, keys)
    k = tl.load(rows[:, None] + lo[None, :], mask=key_ok[:, None], other=0.0)
    if QK_REST > 0:
        hi = 64 + tl.arange(0, QK_REST)
        k_hi = tl.load(rows[:, None] + hi[None, :], mask=key_ok[:, None] & (hi < HEAD_DIM)[None, :], other=0.0)
    k = _centred_keys(k, key_ok, KMEAN + bh * HEAD_DIM, lo, HEAD_DIM)
    k_amax = tl.max(tl.max(tl.abs(k), 1), 0)
    if QK_REST > 0:
        k_hi = _centred_keys(k_hi, key_ok, KMEAN + bh * HEAD_DIM, hi, HEAD_DIM)
        k_amax = tl.maximum(k_amax, tl.max(tl.max(tl.abs(k_hi), 1), 0))
    k_scale = tl.math.div_rn(tl.maximum(k_amax, 1e-20), INT8_MAX)  # scalars
    k_rcp = tl.math.div_rn(1.0, k_scale)
    tl.store(KSCALE + bh * (n_pad // KEY_BLOCK) + block, k_scale)
    d_qk: tl.constexpr = 64 + QK_REST
    k8_rows = K8 + (bh.to(tl.int64) * n_pad + keys)[:, None] * d_qk  # [KEY_BLOCK, 1]
    tl.store(k8_rows + lo[None, :], _int8(k, k_scale, k_rcp))
    if QK_REST > 0:
        tl.store(k8_rows + hi[None, :], _int8(k_hi, k_scale, k_rcp))


@triton.jit
def _quantize_v(va, vb, VRCP, V8, VSCALE, va_n, vb_n, n_a, n, n_pad, bh, block,
                HEAD_DIM: tl.constexpr, V_REST: tl.constexpr, KEY_BLOCK: tl.constexpr):
    """V [D_V, KEY_BLOCK] transposed, scaled per channel, rounded to e4m3, each channel's 128 keys stored as 128
    bytes in a row (Triton transposes the bf16 tile through shared memory with ldmatrix.trans); the ones
    channel and zero padding in the remainder tile. Column p holds the key that `mma_key_order` moves to p, so
    the relabelling is of the rows loaded: key 16·j1 + 8·j0 + 4·c1 + 2·c0 + b of a group of 32 goes to
    16·j1 + 8·c1 + 4·c0 + 2·j0 + b."""
    lo = tl.arange(0, 64)
    hi = 64 + tl.arange(0, V_REST)  # the remainder: channels ≥ 64, the ones channel (D), zero padding
    first = block * KEY_BLOCK
    p = tl.arange(0, KEY_BLOCK)
    keys = first + (p & ~14) + ((p >> 1) & 1) * 8 + ((p >> 3) & 1) * 4 + ((p >> 2) & 1) * 2
    rows, key_ok = _rows(va, vb, va_n, vb_n, n_a, n, keys)
    v = tl.load(rows[None, :] + lo[:, None], mask=key_ok[None, :], other=0.0)  # [64, KEY_BLOCK]
    if HEAD_DIM > 64:
        v_hi = tl.load(rows[None, :] + hi[:, None], mask=(hi < HEAD_DIM)[:, None] & key_ok[None, :], other=0.0)
    stats = bh * HEAD_DIM  # VRCP, VSCALE [BH, D]
    v8_rows = V8 + bh.to(tl.int64) * (64 + V_REST) * n_pad + first + p[None, :]  # [1, KEY_BLOCK]
    v = _div(v.to(tl.float32), tl.load(VSCALE + stats + lo)[:, None], tl.load(VRCP + stats + lo)[:, None])
    tl.store(v8_rows + lo[:, None] * n_pad, v.to(tl.float8e4nv))
    if HEAD_DIM > 64:
        v_hi = _div(v_hi.to(tl.float32), tl.load(VSCALE + stats + hi, mask=hi < HEAD_DIM, other=1.0)[:, None],
                    tl.load(VRCP + stats + hi, mask=hi < HEAD_DIM, other=1.0)[:, None])
    else:
        v_hi = tl.zeros([V_REST, KEY_BLOCK], tl.float32)
    v_hi = tl.where((hi == HEAD_DIM)[:, None] & key_ok[None, :], 1.0, v_hi)
    tl.store(v8_rows + hi[:, None] * n_pad, v_hi.to(tl.float8e4nv))


@triton.jit
def _quantize_kernel(KA, KB, VA, VB, WS, K8, KSCALE, V8, VSCALE, ka_b, ka_n, kb_b, kb_n, va_b, va_n, vb_b, vb_n,
                     heads, n_a, n, n_pad, n_chunks,
                     HEAD_DIM: tl.constexpr, QK_REST: tl.constexpr, V_REST: tl.constexpr, KEY_BLOCK: tl.constexpr):
    """Program (2·block + 0, bh) quantises a block of K, (2·block + 1, bh) the same block of V: each program
    holds half the data in registers, so twice as many fit on an SM, with their loads, waits and stores out of
    step (one program doing both held 105 registers: two per SM, each all load, then all arithmetic)."""
    block, bh = tl.program_id(0) // 2, tl.program_id(1)
    ka, kb, va, vb = _heads(KA, KB, VA, VB, ka_b, kb_b, va_b, vb_b, bh, heads, HEAD_DIM)
    _, _, KMEAN, VRCP = _workspace(WS, tl.num_programs(1), n_chunks, HEAD_DIM)
    if tl.program_id(0) % 2 == 0:
        _quantize_k(ka, kb, KMEAN, K8, KSCALE, ka_n, kb_n, n_a, n, n_pad, bh, block, HEAD_DIM, QK_REST, KEY_BLOCK)
    else:
        _quantize_v(va, vb, VRCP, V8, VSCALE, va_n, vb_n, n_a, n, n_pad, bh, block, HEAD_DIM, V_REST, KEY_BLOCK)


def takes(ka: Tensor, kb: Tensor, va: Tensor, vb: Tensor) -> bool:
    """Whether `launch` takes these parts: head dims attention8 supports, each part [B, N_i, heads, D] with
    strides (.., .., D, 1), and row offsets within a batch element that fit the kernels' 32 bits."""
    d, heads = ka.shape[3], ka.shape[2]
    if not constants.supported(d) or any(t.stride()[2:] != (d, 1) or t.shape[2:] != (heads, d)
                                          for t in (ka, kb, va, vb)):
        return False
    n_pad = -(-(ka.shape[1] + kb.shape[1]) // KEY_BLOCK) * KEY_BLOCK
    return (n_pad + CHUNK) * max(t.stride(1) for t in (ka, kb, va, vb)) < 2**31


def launch(ka: Tensor, kb: Tensor, va: Tensor, vb: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """`reference.quantize_kv(cat([ka, kb], 1), cat([va, vb], 1))` without the concatenation: the text and image
    parts [B, N_i, heads, D] of K and V (N_i may be 0) that `takes` accepts (views into the projections' outputs
    are fine)."""
    if not takes(ka, kb, va, vb):
        raise ValueError(f"kv_quant: K/V parts of shapes {[tuple(t.shape) for t in (ka, kb, va, vb)]} and "
                         f"strides {[t.stride() for t in (ka, kb, va, vb)]}: expected [B, N, heads, D] with head "
                         f"stride D, D in {constants.MIN_HEAD_DIM}..{constants.MAX_HEAD_DIM}, offsets < 2^31")
    batch, n_a, heads, d = ka.shape
    n = n_a + kb.shape[1]
    strides = [st for t in (ka, kb, va, vb) for st in t.stride()[:2]]  # batch, token strides of each
    n_pad = -(-n // KEY_BLOCK) * KEY_BLOCK
    qk_rest, v_rest = split_widths(d)
    rest = triton.next_power_of_2(d - 64) if d > 64 else 0  # channels ≥ 64 that hold data
    n_chunks = triton.cdiv(n, CHUNK)
    bhs, dev = batch * heads, kb.device
    ws = torch.empty(2 * bhs * (n_chunks + 1) * d, device=dev)  # see `_workspace`
    k8 = torch.empty(batch, heads, n_pad, 64 + qk_rest, dtype=torch.int8, device=dev)
    k_scale = torch.empty(batch, heads, n_pad // KEY_BLOCK, device=dev)
    v8 = torch.empty(batch, heads, 64 + v_rest, n_pad, dtype=torch.float8_e4m3fn, device=dev)
    v_scale = torch.empty(batch, heads, d, device=dev)
    _stats_kernel[(n_chunks, bhs)](ka, kb, va, vb, ws, *strides, heads, n_a, n, n_chunks,
                                   HEAD_DIM=d, REST=rest, CHUNK=CHUNK, num_warps=WARPS["stats"])
    _reduce_kernel[(bhs,)](ws, v_scale, float(n), n_chunks, HEAD_DIM=d, REST=rest, PARTS=PARTS,
                           num_warps=WARPS["reduce"])
    _quantize_kernel[(2 * (n_pad // KEY_BLOCK), bhs)](
        ka, kb, va, vb, ws, k8, k_scale, v8, v_scale, *strides, heads, n_a, n, n_pad, n_chunks,
        HEAD_DIM=d, QK_REST=qk_rest, V_REST=v_rest, KEY_BLOCK=KEY_BLOCK, num_warps=WARPS["quantize"])
    return k8, k_scale, v8, v_scale
