"""Triton-free constants and layout rules shared by the kernels, their torch references and the model code."""

from __future__ import annotations

# 8-bit attention (`attention8`, `kv_quant`, `reference.quantize_kv`)
KEY_BLOCK = 128  # keys per K scale; the attention kernel's BLOCK_N divides it
INT8_MAX = 127.0
FP8_MAX = 448.0  # largest finite float8_e4m3fn
MIN_HEAD_DIM, MAX_HEAD_DIM = 64, 96  # the head dims 8-bit attention takes


def supported(head_dim: int) -> bool:
    """Whether 8-bit attention takes heads of this width."""
    return MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM


def split_widths(head_dim: int) -> tuple[int, int]:
    """Widths of the zero-padded remainder above the first 64 channels: (for Q·K, for P·V, whose remainder
    also holds the ones channel)."""
    def pow2(n: int) -> int:
        return 1 << (n - 1).bit_length()

    rest = head_dim - 64
    return (max(32, pow2(rest)) if rest else 0), max(16, pow2(rest + 1))
