"""8-bit attention for Hopper GPUs: the opt-in `--attention 8bit` precision mode.

Why it exists: at 4096² attention is ~80% of a decode (1.65e15 FLOP per image) and cuDNN's bf16
kernel already runs at its ceiling (~430 TFLOP/s on an H100). Hopper's 8-bit tensor cores have twice
the bf16 rate, and PyTorch's SDPA refuses 8-bit inputs, so the kernel is ours (Triton). At PiD's head
dims the softmax's per-element work (exp2, conversions), not the tensor cores, bounds it: 593-597 TFLOP/s
(MMDiT) and 459-465 (PiT) at 4K on an H100, 1.3-1.4x cuDNN (BENCHMARKS.md).

Q·K runs in INT8 and P·V in FP8 (e4m3), the split SageAttention made popular: logits are sums of
many products whose operands have a bounded range, where INT8's uniform 8 bits lose ~4x less than
FP8's 4-bit mantissa; probabilities span decades, which only a float format keeps.
  Q  one scale per query row (its max |q| / 127), rounded to INT8 inside the kernel from bf16.
  K  the per-head mean over all keys removed first (adding q·mean to a whole row of logits leaves
     softmax unchanged, and it shrinks what 8 bits must hold), then one scale per block of 128 keys.
  V  one FP8 scale per channel over all keys; stored transposed, [.., head_dim, keys], as Hopper's
     8-bit MMA wants its second operand, with one more channel of ones after the last (see P), and its keys
     in the order in which the kernel hands P to the P·V product (see `mma_key_order`).
  P  the softmax numerator exp2(s - max) ∈ (0, 1] times 448, e4m3's full range. The softmax denominator is
     the sum of the FP8 numerators, the weights that multiply V. At head dim 64 the ones channel of V makes
     the P·V product compute it: one adder less per logit, where per-logit work bounds the kernel (+7-8%
     on an H100). Above 64 the kernel sums the unrounded numerators instead (faster there; the two sums
     differ by ~1e-3 relative).
Logits, the running max and both accumulators stay fp32.

Head dims 64 (MMDiT) and 72 (PiT) are what PiD has. Triton blocks are powers of two, so a head dim
above 64 is split into a 64-wide part and a zero-padded remainder (32 wide for Q·K, whose 8-bit MMA
needs K ≥ 32); V's channels plus the ones channel are split alike (64 + 16 for both head dims).

On a GPU `quantize_kv`'s arithmetic runs as Triton kernels (`kv_quant_kernel`) that read the text and image
parts of K and V where the projections left them, without concatenating them.

`reference_attention` computes the same quantised arithmetic with plain torch ops on any device; the
tests hold it against exact attention on the CPU, and `scripts/gpu_parity.py` holds the kernel against
both on a GPU.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from pid_cli.model.layers import on_device

KEY_BLOCK = 128  # keys per K scale; the kernel's BLOCK_N divides it
INT8_MAX = 127.0
FP8_MAX = 448.0  # largest finite float8_e4m3fn
MIN_HEAD_DIM, MAX_HEAD_DIM = 64, 96


def supported(head_dim: int) -> bool:
    return MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM


def split_widths(head_dim: int) -> tuple[int, int]:
    """Widths of the zero-padded remainder above the first 64 channels: (for Q·K, for P·V, whose remainder
    also holds the ones channel)."""
    def pow2(n: int) -> int:
        return 1 << (n - 1).bit_length()

    rest = head_dim - 64
    return (max(32, pow2(rest)) if rest else 0), max(16, pow2(rest + 1))


def mma_key_order(x: Tensor, inverse: bool = False) -> Tensor:
    """Reorder the last axis (keys, a multiple of 32) the way the kernel feeds P to Hopper's FP8 MMA.

    Why: the Q·K product leaves each thread, per row and group of 32 keys, the logits of keys 8j + 2c + b
    (c = lane % 4; j < 4, b < 2), while the P·V product wants from that thread P of keys 16h + 4c + e (h < 2,
    e < 4). Moving those values between threads cost ~100 shuffle and select instructions per block of 128
    logits, a tenth of a loop bound by instruction issue. A sum over keys does not care about their order, so
    the kernel instead relabels key 16·j1 + 8·j0 + 4·c1 + 2·c0 + b as 16·j1 + 8·c1 + 4·c0 + 2·j0 + b, which
    keeps every value in the thread that computed it, and V's keys are stored relabelled alike."""
    groups = x.unflatten(-1, (-1, 2, 2, 2, 2, 2))  # [..., N/32, j1, j0, c1, c0, b]
    groups = groups.movedim(-2, -4) if inverse else groups.movedim(-4, -2)  # ↔ [..., N/32, j1, c1, c0, j0, b]
    return groups.flatten(-6)


def _round_int8(x: Tensor) -> Tensor:
    return torch.round(x).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)


def quantize_kv(k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """k, v [B, N, heads, D] → k8 [B, heads, Np, Dqk] int8, k_scale [B, heads, Np/128] fp32,
    v8 [B, heads, Dv, Np] float8_e4m3fn (transposed), v_scale [B, heads, D] fp32; Np is N rounded up
    to 128; padding rows and channels are zero, except channel D of v8: ones. v8's keys are in
    `mma_key_order`."""
    n, d = k.shape[1], k.shape[3]
    qk_rest, v_rest = split_widths(d)
    n_pad = -(-n // KEY_BLOCK) * KEY_BLOCK
    k = k.float()
    k = (k - k.mean(1, keepdim=True)).transpose(1, 2)  # [B, heads, N, D]
    k = F.pad(k, (0, 64 + qk_rest - d, 0, n_pad - n))  # [B, heads, Np, Dqk]
    blocks = k.unflatten(2, (n_pad // KEY_BLOCK, KEY_BLOCK))  # [B, heads, Np/128, 128, Dqk]
    k_scale = blocks.abs().amax((-1, -2)).clamp_min(1e-20) / INT8_MAX  # [B, heads, Np/128]
    k8 = _round_int8(blocks / k_scale[..., None, None]).flatten(2, 3)
    v = v.float()
    v_scale = v.abs().amax(1).clamp_min(1e-20) / FP8_MAX  # [B, heads, D]
    v = (v / v_scale[:, None]).permute(0, 2, 3, 1)  # [B, heads, D, N]
    v = torch.cat([v, torch.ones_like(v[:, :, :1])], 2)  # [B, heads, D + 1, N]: the denominator's channel
    v = F.pad(v, (0, n_pad - n, 0, 64 + v_rest - d - 1))  # [B, heads, Dv, Np]
    return k8, k_scale, mma_key_order(v).to(torch.float8_e4m3fn).contiguous(), v_scale


def attend_quantized(q: Tensor, k8: Tensor, k_scale: Tensor, v8: Tensor, v_scale: Tensor, n_kv: int) -> Tensor:
    """The kernel's arithmetic on `quantize_kv`'s outputs with plain torch ops, P quantised against the exact
    row max rather than the kernel's running one: the op's CPU implementation and the reference the GPU
    kernel is held to. q [B, Nq, heads, D] → [B, Nq, heads, D] in q's dtype."""
    d = q.shape[-1]
    q32 = q.float().transpose(1, 2)  # [B, heads, Nq, D]
    q_scale = q32.abs().amax(-1, keepdim=True).clamp_min(1e-20) / INT8_MAX
    q8 = _round_int8(q32 / q_scale).float()
    keys = (k8.float().unflatten(2, (-1, KEY_BLOCK)) * k_scale[..., None, None]).flatten(2, 3)[:, :, :n_kv, :d]
    logits = (q8 @ keys.transpose(-1, -2)) * q_scale * (math.log2(math.e) / math.sqrt(d))  # log2 units
    p = torch.exp2(logits - logits.amax(-1, keepdim=True)) * FP8_MAX
    p8 = p.to(torch.float8_e4m3fn).float()
    values = mma_key_order(v8.float(), inverse=True)[:, :, :d + 1, :n_kv].transpose(-1, -2)  # [B, heads, N, D + 1]
    weighted = p8 @ values  # [B, heads, Nq, D + 1]: the last channel sums the weights (V's ones)
    out = weighted[..., :d] / weighted[..., d:] * v_scale[:, :, None, :]
    return out.transpose(1, 2).to(q.dtype)


def reference_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """`attention`'s result computed with torch ops on any device. q [B, Nq, heads, D], k, v [B, N, heads, D]
    → [B, Nq, heads, D] in v's dtype."""
    return attend_quantized(q.to(v.dtype), *quantize_kv(k, v), k.shape[1])


def attention(q: Tensor, k: Tensor | tuple[Tensor, Tensor], v: Tensor | tuple[Tensor, Tensor]) -> Tensor:
    """8-bit attention on a CUDA GPU. q [B, Nq, heads, D], k, v [B, N, heads, D] or their text and image parts
    (the keys are their concatenation, which the quantisation reads without making) → [B, Nq, heads, D] in v's
    dtype."""
    k_parts, v_parts = ((t[:, :0], t) if isinstance(t, Tensor) else t for t in (k, v))
    packed = torch.ops.pid.quantize_kv8(*k_parts, *v_parts)
    return torch.ops.pid.attention8(q.to(v_parts[1].dtype), *packed, k_parts[0].shape[1] + k_parts[1].shape[1])


@torch.library.custom_op("pid::quantize_kv8", mutates_args=())
def _quantize_kv8_op(k_text: Tensor, k_image: Tensor, v_text: Tensor,
                     v_image: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from pid_cli.model import kv_quant_kernel

    if not kv_quant_kernel.takes(k_text, k_image, v_text, v_image):  # strides the network never makes
        return _quantize_parts(k_text, k_image, v_text, v_image)
    with on_device(k_image):
        return kv_quant_kernel.launch(k_text, k_image, v_text, v_image)


@_quantize_kv8_op.register_kernel("cpu")
def _quantize_parts(k_text: Tensor, k_image: Tensor, v_text: Tensor,
                    v_image: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return quantize_kv(torch.cat([k_text, k_image], 1), torch.cat([v_text, v_image], 1))


@_quantize_kv8_op.register_fake
def _(k_text: Tensor, k_image: Tensor, v_text: Tensor, v_image: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    b, n_text, heads, d = k_text.shape
    n_pad = -(-(n_text + k_image.shape[1]) // KEY_BLOCK) * KEY_BLOCK
    qk_rest, v_rest = split_widths(d)
    return (k_image.new_empty(b, heads, n_pad, 64 + qk_rest, dtype=torch.int8),
            k_image.new_empty(b, heads, n_pad // KEY_BLOCK, dtype=torch.float32),
            k_image.new_empty(b, heads, 64 + v_rest, n_pad, dtype=torch.float8_e4m3fn),
            k_image.new_empty(b, heads, d, dtype=torch.float32))


@torch.library.custom_op("pid::attention8", mutates_args=())
def _attention8_op(q: Tensor, k8: Tensor, k_scale: Tensor, v8: Tensor, v_scale: Tensor, n_kv: int) -> Tensor:
    from pid_cli.model import attention8_kernel

    with on_device(q):
        return attention8_kernel.launch(q, k8, k_scale, v8, v_scale, n_kv)


@_attention8_op.register_kernel("cpu")
def _(q: Tensor, k8: Tensor, k_scale: Tensor, v8: Tensor, v_scale: Tensor, n_kv: int) -> Tensor:
    return attend_quantized(q, k8, k_scale, v8, v_scale, n_kv)  # for tests: the same arithmetic, slowly


@_attention8_op.register_fake
def _(q: Tensor, k8: Tensor, k_scale: Tensor, v8: Tensor, v_scale: Tensor, n_kv: int) -> Tensor:
    return q.new_empty(q.shape)
