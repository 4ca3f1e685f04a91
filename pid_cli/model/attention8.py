"""The opt-in `--attention 8bit` precision mode: attention with Q·K in INT8 and P·V in FP8 on Hopper GPUs.

The arithmetic and why it is shaped so: kernels/attention8.py. Here the network's entry point: K and V go through
the `pid::quantize_kv8` op (their text and image parts, which it reads without concatenating them), then
`pid::attention8` (kernels/ops.py): Triton kernels on CUDA, the same arithmetic in torch ops on the CPU
(`kernels/reference.py`, which the tests and `tests/gpu/test_kernels.py` hold against exact attention). Its speed and
error per card: docs/performance.md#speed-modes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pid_cli.kernels import ops as _ops  # noqa: F401  (registers torch.ops.pid.*)
from pid_cli.kernels.constants import MAX_HEAD_DIM, MIN_HEAD_DIM, supported

__all__ = ["MAX_HEAD_DIM", "MIN_HEAD_DIM", "attention", "supported"]


def attention(q: Tensor, k: Tensor | tuple[Tensor, Tensor], v: Tensor | tuple[Tensor, Tensor]) -> Tensor:
    """8-bit attention (`layers.attention`'s signature). q [B, Nq, heads, D], k, v [B, N, heads, D] or their text and
    image parts (the keys are their concatenation, which the quantisation reads without making) → [B, Nq, heads·D]
    in v's dtype. `kernels.reference.attention8` is the same result computed with torch ops."""
    k_parts, v_parts = ((t[:, :0], t) if isinstance(t, Tensor) else t for t in (k, v))
    packed = torch.ops.pid.quantize_kv8(*k_parts, *v_parts)
    out = torch.ops.pid.attention8(q.to(v_parts[1].dtype), *packed, k_parts[0].shape[1] + k_parts[1].shape[1])
    return out.flatten(2)  # [B, Nq, heads·D]
