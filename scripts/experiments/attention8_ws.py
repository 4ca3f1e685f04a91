"""Experiment: the head-dim-64 8-bit attention (pid_cli/model/attention8.py's arithmetic) as a Gluon kernel in
FlashAttention-3's shape, timed against the Triton kernel that `--attention 8bit` runs.

    python scripts/experiments/attention8_ws.py          # on a Hopper GPU: agreement, then TFLOP/s side by side

Why: the Triton kernel's warpgroups wait for their Q·K product before the softmax and for P·V before the next key
block (its SASS, BENCHMARKS.md). Here, in each CTA, a producer warp streams K/V blocks by TMA into a ring of
shared-memory stages, and two consumer warpgroups of 64 query rows each issue block j's Q·K and block j-1's P·V
asynchronously, then run block j's softmax while P·V is on the tensor cores (FlashAttention-3's intra-warpgroup
order; accumulators are read only once no product writing them is in flight, else ptxas serialises every
wgmma). The weights stay fp32 across the loop and become FP8 operands in the next trip: 8-bit values carried
around the loop cost a byte shuffle each.
No masking: keys are padded to whole blocks with zero K rows and zero V columns, the ones channel included, so
a padded key adds nothing; its logit, 0, cannot raise a row's max since K is mean-centred (a row's mean logit is
0).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[2]), str(Path(__file__).resolve().parents[1])]

import torch  # noqa: E402
from torch import Tensor  # noqa: E402
from triton.experimental import gluon  # noqa: E402
from triton.experimental.gluon import language as gl  # noqa: E402
from triton.experimental.gluon.language.nvidia.hopper import (  # noqa: E402
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor  # noqa: E402

from pid_cli.model.attention8 import KEY_BLOCK  # noqa: E402
from pid_cli.model.attention8_kernel import LOG2_FP8_MAX, MAGIC, MAGIC_BITS  # noqa: E402

HEAD_DIM = 64
V_ROWS = 80  # quantize_kv's rows of V per (batch, head) at head dim 64: 64 channels, ones, zero padding
BLOCK_N = 128  # keys per block: one K scale
BLOCK_M = 128  # two consumer warpgroups of 64 rows


@gluon.jit
def _load_block(k_desc, v_desc, ones_desc, k_smem, v_smem, ones_smem, ready, block, bh, n_pad,
                STAGES: gl.constexpr, pred):
    stage = block % STAGES
    bar = ready.index(stage)
    nbytes: gl.constexpr = k_desc.block_type.nbytes + v_desc.block_type.nbytes + ones_desc.block_type.nbytes
    mbarrier.expect(bar, nbytes, pred=pred)
    tma.async_copy_global_to_shared(k_desc, [bh * n_pad + block * 128, 0], bar, k_smem.index(stage), pred=pred)
    tma.async_copy_global_to_shared(v_desc, [bh * 80, block * 128], bar, v_smem.index(stage), pred=pred)
    tma.async_copy_global_to_shared(ones_desc, [bh * 80 + 64, block * 128], bar, ones_smem.index(stage), pred=pred)


@gluon.jit
def _softmax(s, m_i, factor):
    """Block logits s (int32 Q·K) → the new running max, the factor rescaling what came before, and the
    weights in fp32: they become FP8 operands only in the next trip of the loop, since 8-bit values carried
    around it cost a byte shuffle each."""
    sf = (s + MAGIC_BITS).to(gl.float32, bitcast=True)  # MAGIC + s, exactly
    m_new = gl.maximum(m_i, (gl.max(sf, 1) - MAGIC) * factor)
    alpha = gl.exp2(m_i - m_new)
    # (s − MAGIC)·factor − (m_new − log2 448) as one fused multiply-add per logit; see attention8_kernel._attend
    bias = MAGIC * factor + (m_new - LOG2_FP8_MAX)
    return m_new, alpha, gl.exp2(sf * factor[:, None] - bias[:, None])  # (0, 448]


@gluon.jit
def _weigh_values(p, acc, v_tile, ones_tile, no_den, p_layout: gl.constexpr, pl_layout: gl.constexpr):
    """Issue P·V into acc and, afresh, P·ones (the block's denominator, see attention8_kernel._attend), P the
    weights p rounded to FP8."""
    p8 = gl.convert_layout(p.to(gl.float8e4nv), p_layout)
    den_blk = warpgroup_mma(gl.convert_layout(p8, pl_layout, assert_trivial=True), ones_tile.permute((1, 0)),
                            no_den, use_acc=False, is_async=True)
    acc = warpgroup_mma(p8, v_tile.permute((1, 0)), acc, is_async=True)
    return acc, den_blk


@gluon.jit
def _producer(k_desc, v_desc, ones_desc, k_smem, v_smem, ones_smem, ready, empty, bh, n_pad):
    """One warp streams K/V blocks into the ring; a stage is refilled once both consumers released it."""
    STAGES: gl.constexpr = k_smem.shape[0]
    n_blocks = n_pad // 128
    for j in range(n_blocks):
        mbarrier.wait(empty.index(j % STAGES), ((j // STAGES) & 1) ^ 1, pred=j >= STAGES)
        _load_block(k_desc, v_desc, ones_desc, k_smem, v_smem, ones_smem, ready, j, bh, n_pad, STAGES, True)


@gluon.jit
def _consumer(q_ptr, out_ptr, q_smem, k_smem, v_smem, ones_smem, ready, empty, ks_ptr, vs_ptr,
              stride_qb, stride_qn, stride_qh, stride_ob, stride_on, stride_oh, n_q, n_pad, heads, qk_scale,
              bh, row0):
    """One warpgroup: 64 query rows through every key block, FlashAttention-3's order (see the module)."""
    STAGES: gl.constexpr = k_smem.shape[0]
    D: gl.constexpr = 64
    BN: gl.constexpr = 128
    BLOCK_M: gl.constexpr = 64
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BN, 32])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, D, 32])
    l_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, 8, 32])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=4)
    pl_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=l_layout, k_width=4)
    q_layout: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 8], threads_per_warp=[4, 8],
                                              warps_per_cta=[4, 1], order=[1, 0])
    rows_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    b = (bh // heads).to(gl.int64)
    h = bh % heads
    n_blocks = n_pad // BN

    rows = row0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, q_layout))
    cols = gl.arange(0, D, layout=gl.SliceLayout(0, q_layout))
    q_rows = q_ptr + b * stride_qb + h * stride_qh + rows.to(gl.int64)[:, None] * stride_qn
    q = gl.load(q_rows + cols[None, :], mask=(rows < n_q)[:, None], other=0.0).to(gl.float32)
    q_scale = gl.maximum(gl.max(gl.abs(q), 1), 1e-20) / 127.0
    x = q / q_scale[:, None]
    q_smem.store(gl.where(x >= 0, x + 0.5, x - 0.5).to(gl.int8))
    fence_async_shared()
    row_factor = gl.convert_layout(q_scale * qk_scale, rows_s)

    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=rows_s)
    acc = gl.zeros([BLOCK_M, D], gl.float32, layout=o_layout)
    den = gl.zeros([BLOCK_M, 8], gl.float32, layout=l_layout)
    no_logits = gl.zeros([BLOCK_M, BN], gl.int32, layout=s_layout)
    no_den = gl.zeros([BLOCK_M, 8], gl.float32, layout=l_layout)

    mbarrier.wait(ready.index(0), 0)
    s = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)), no_logits, use_acc=False)
    m_i, alpha, p = _softmax(s, m_i, row_factor * gl.load(ks_ptr + bh * n_blocks))
    for j in range(1, n_blocks):
        stage = j % STAGES
        prev = (j - 1) % STAGES
        mbarrier.wait(ready.index(stage), (j // STAGES) & 1)
        s = warpgroup_mma(q_smem, k_smem.index(stage).permute((1, 0)), no_logits, use_acc=False, is_async=True)
        acc, den_blk = _weigh_values(p, acc, v_smem.index(prev), ones_smem.index(prev), no_den, p_layout,
                                     pl_layout)
        s = warpgroup_mma_wait(2, deps=[s])
        m_i, alpha, p = _softmax(s, m_i, row_factor * gl.load(ks_ptr + bh * n_blocks + j))
        acc, den_blk = warpgroup_mma_wait(0, deps=[acc, den_blk])
        mbarrier.arrive(empty.index(prev), count=1)
        acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
        den = (den + den_blk) * gl.convert_layout(alpha, gl.SliceLayout(1, l_layout))[:, None]
    last = (n_blocks - 1) % STAGES
    acc, den_blk = _weigh_values(p, acc, v_smem.index(last), ones_smem.index(last), no_den, p_layout, pl_layout)
    acc, den_blk = warpgroup_mma_wait(0, deps=[acc, den_blk])
    den = den + den_blk

    den_cols = gl.arange(0, 8, layout=gl.SliceLayout(0, l_layout))
    total = gl.sum(gl.where(den_cols[None, :] == 0, den, 0.0), 1)
    inv = gl.convert_layout(1.0 / total, gl.SliceLayout(1, o_layout))
    o_cols = gl.arange(0, D, layout=gl.SliceLayout(0, o_layout))
    o_rows = row0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, o_layout))
    v_scale = gl.load(vs_ptr + bh * D + o_cols)
    out = (acc * v_scale[None, :] * inv[:, None]).to(out_ptr.dtype.element_ty)
    o_ptrs = out_ptr + b * stride_ob + h * stride_oh + o_rows.to(gl.int64)[:, None] * stride_on + o_cols[None, :]
    gl.store(o_ptrs, out, mask=(o_rows < n_q)[:, None])


@gluon.jit
def _attention8_wgmma_kernel(q_ptr, out_ptr, k_desc, v_desc, ones_desc, ks_ptr, vs_ptr,
                             stride_qb, stride_qn, stride_qh, stride_ob, stride_on, stride_oh,
                             n_q, n_pad, heads, qk_scale,
                             BLOCK_M: gl.constexpr, STAGES: gl.constexpr, num_warps: gl.constexpr):
    """BLOCK_M = 128: two consumer warpgroups of 64 rows (the default partition and a worker) share the K/V ring
    that a producer warp fills; nothing makes all warps of the CTA wait for each other inside the loop."""
    D: gl.constexpr = 64
    BN: gl.constexpr = 128
    bh = gl.program_id(1)
    row0 = gl.program_id(0) * BLOCK_M
    k_smem = gl.allocate_shared_memory(gl.int8, [STAGES, BN, D], k_desc.layout)
    v_smem = gl.allocate_shared_memory(gl.float8e4nv, [STAGES, D, BN], v_desc.layout)
    ones_smem = gl.allocate_shared_memory(gl.float8e4nv, [STAGES, 8, BN], ones_desc.layout)
    q_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([64, D], gl.int8)
    q_smem = gl.allocate_shared_memory(gl.int8, [2, 64, D], q_layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=1)
        mbarrier.init(empty.index(s), count=2)
    gl.warp_specialize([
        (_consumer, (q_ptr, out_ptr, q_smem.index(0), k_smem, v_smem, ones_smem, ready, empty, ks_ptr, vs_ptr,
                     stride_qb, stride_qn, stride_qh, stride_ob, stride_on, stride_oh, n_q, n_pad, heads, qk_scale,
                     bh, row0)),
        (_consumer, (q_ptr, out_ptr, q_smem.index(1), k_smem, v_smem, ones_smem, ready, empty, ks_ptr, vs_ptr,
                     stride_qb, stride_qn, stride_qh, stride_ob, stride_on, stride_oh, n_q, n_pad, heads, qk_scale,
                     bh, row0 + 64)),
        (_producer, (k_desc, v_desc, ones_desc, k_smem, v_smem, ones_smem, ready, empty, bh, n_pad)),
    ], [4, 1], [232, 40])


def descriptors(k8: Tensor, v8: Tensor) -> tuple[TensorDescriptor, TensorDescriptor, TensorDescriptor]:
    """TMA descriptors of K [B·heads·Np, 64] in blocks of 128 keys, and of V [B·heads·80, Np]: its 64 channels
    and, apart, the 8 rows from the ones channel on, both 128 keys wide."""
    k2 = k8.view(-1, HEAD_DIM)
    v2 = v8.view(-1, v8.shape[-1])
    k_layout = gl.NVMMASharedLayout.get_default_for([BLOCK_N, HEAD_DIM], gl.int8)
    v_layout = gl.NVMMASharedLayout.get_default_for([HEAD_DIM, BLOCK_N], gl.float8e4nv)
    ones_layout = gl.NVMMASharedLayout.get_default_for([8, BLOCK_N], gl.float8e4nv)
    return (TensorDescriptor.from_tensor(k2, [BLOCK_N, HEAD_DIM], k_layout),
            TensorDescriptor.from_tensor(v2, [HEAD_DIM, BLOCK_N], v_layout),
            TensorDescriptor.from_tensor(v2, [8, BLOCK_N], ones_layout))


def launch(q: Tensor, k8: Tensor, k_scale: Tensor, v8: Tensor, v_scale: Tensor, stages: int = 3) -> Tensor:
    """q [B, Nq, heads, 64] and `quantize_kv`'s outputs (Np a multiple of 128) → [B, Nq, heads, 64] in q's dtype."""
    if q.stride(-1) != 1:
        q = q.contiguous()
    b, n_q, heads, d = q.shape
    assert d == HEAD_DIM and v8.shape[2] == V_ROWS and k8.shape[2] % KEY_BLOCK == 0
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    grid = (-(-n_q // BLOCK_M), b * heads)
    _attention8_wgmma_kernel[grid](
        q, out, *descriptors(k8, v8), k_scale, v_scale, q.stride(0), q.stride(1), q.stride(2),
        out.stride(0), out.stride(1), out.stride(2), n_q, k8.shape[2], heads, math.log2(math.e) / math.sqrt(d),
        BLOCK_M=BLOCK_M, STAGES=stages, num_warps=4)
    return out


def natural_key_order(packed: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """`quantize_kv`'s outputs with V's keys back in their natural order: this kernel's P keeps the order of the
    Q·K product, unlike the Triton kernel's (attention8.mma_key_order)."""
    from pid_cli.model import attention8

    k8, k_scale, v8, v_scale = packed
    return k8, k_scale, attention8.mma_key_order(v8.float(), inverse=True).to(v8.dtype).contiguous(), v_scale


def main() -> None:
    from attention8_bench import SHAPES, inputs, timed

    from pid_cli.model import attention8, attention8_kernel

    def rel(a: Tensor, b: Tensor) -> float:
        return ((a.float() - b.float()).norm() / b.float().norm()).item()

    gen = torch.Generator(device="cuda").manual_seed(0)
    print(f"# {torch.cuda.get_device_name()}")
    print("| shape (B, Nq, Nk, heads) | vs Triton kernel | vs reference | vs exact (Triton kernel vs exact) |")
    print("|---|---|---|---|")
    for b, nq, nk, heads in [(2, 1000, 1300, 3), (1, 777, 777, 4), (1, 4096, 4396, 24), (1, 65, 129, 2)]:
        q, k, v = (torch.cat([t, t.flip(1)])[:b] for t in inputs(nq, nk, heads, HEAD_DIM, 2.0, gen))
        packed = attention8.quantize_kv(k, v)
        exact = torch.nn.functional.scaled_dot_product_attention(
            *(t.float().transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
        ours, triton_out = launch(q, *natural_key_order(packed)), attention8_kernel.launch(q, *packed, nk)
        print(f"| {(b, nq, nk, heads)} | {rel(ours, triton_out):.1e} | "
              f"{rel(ours, attention8.attend_quantized(q, *packed, nk)):.2e} | "
              f"{rel(ours, exact):.3e} ({rel(triton_out, exact):.3e}) |")
    print("\n| shape | Triton kernel TFLOP/s | this kernel, 2 / 3 / 4 stages |")
    print("|---|---|---|")
    for name, (nq, nk, heads, d) in SHAPES.items():
        if d != HEAD_DIM:
            continue
        q, k, v = inputs(nq, nk, heads, d, 2.0, gen)
        packed = attention8.quantize_kv(k, v)
        natural = natural_key_order(packed)
        flop = 4 * nq * nk * d * heads
        base = flop / timed(lambda q=q, p=packed, n=nk: attention8_kernel.launch(q, *p, n)) / 1e12
        ws = [flop / timed(lambda q=q, p=natural, s=s: launch(q, *p, s)) / 1e12 for s in (2, 3, 4)]
        print(f"| {name} | {base:.0f} | {' / '.join(f'{t:.0f}' for t in ws)} |")


if __name__ == "__main__":
    main()
