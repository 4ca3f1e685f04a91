"""FP8 linear layers for Ada/Hopper GPUs: the opt-in `--matmul fp8` precision mode.

Why it exists: with attention at its ceiling, the image-token matmuls (MMDiT qkv, projection and SwiGLU;
the PiT modulation, compression, attention projections) are the next largest share of a decode, and
Hopper's FP8 tensor cores run at twice the bf16 rate.

Scaling is per row on both sides, what `torch._scaled_mm` takes on Hopper:
  weight      one e4m3 scale per output channel (its max |w| / 448), computed once when the layer
              is converted; the bf16 weight is then dropped (half the memory).
  activation  one scale per token, computed on the fly; under torch.compile the max and the rounding
              fuse into the kernel that produces the activation.
The product accumulates in fp32 and is rescaled and rounded to bf16, the dtype the bf16 layer returns.
cuBLAS runs it with fast accumulation: Hopper's FP8 MMA adds each k-step into the fp32 accumulator with
fewer significant bits instead of cuBLAS promoting partial sums: faster on PiD's shapes (docs/performance.md#kernels;
`scripts/matmul8_bench.py` measures it), and against the promoted sums it moves the result by
0.6-1.3e-3 relative L2 with a mean drift of the magnitudes of -1e-4, beside 3.7e-2 from the e4m3 rounding of
the operands, and a whole decode's PSNR against the bf16 path stays 59.0 dB.
Text-stream, adaLN-of-timestep, embedding and per-pixel MLP layers stay bf16: they are a few rows or
a few channels wide, too small for FP8 to pay for its rounding.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pid_cli.kernels.constants import FP8_MAX

MATMUL_MODES = ("bf16", "fp8")  # "bf16": the Linears in their weight dtype (fp32 in an fp32 network)
FP8 = torch.float8_e4m3fn


def quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """x [M, K] → (x8 [M, K] e4m3, scale [M, 1] fp32) with x ≈ x8 · scale, each row scaled to e4m3's range."""
    x32 = x.float()
    scale = x32.abs().amax(-1, keepdim=True).clamp_min(1e-12) / FP8_MAX
    return (x32 / scale).to(FP8), scale


def linear(x: Tensor, weight8: Tensor, weight_scale: Tensor, bias: Tensor | None) -> Tensor:
    """x [..., K] (any float dtype) through an FP8 weight [N, K] with per-channel scales [1, N]
    → [..., N] bf16. On a GPU, cuBLAS's FP8 product; elsewhere (the tests) the same product of the
    dequantised operands: torch's CPU `_scaled_mm` takes per-row scales only from torch 2.13 on."""
    x8, x_scale = quantize_rows(x.reshape(-1, x.shape[-1]))
    if x.is_cuda:
        out = torch._scaled_mm(x8, weight8.t(), scale_a=x_scale, scale_b=weight_scale, bias=bias,
                               out_dtype=torch.bfloat16, use_fast_accum=True)  # [M, N]
    else:
        out = reference_product(x8, x_scale, weight8, weight_scale, bias)
    return out.view(*x.shape[:-1], -1)


def reference_product(x8: Tensor, x_scale: Tensor, weight8: Tensor, weight_scale: Tensor,
                      bias: Tensor | None) -> Tensor:
    """The scaled FP8 product in fp32 from plain torch ops: [M, K] · [N, K]ᵀ → [M, N] bf16."""
    out = (x8.float() @ weight8.float().T) * x_scale * weight_scale
    return (out if bias is None else out + bias.float()).to(torch.bfloat16)


def probe(device: torch.device) -> None:
    """Raise ValueError unless this torch build runs a per-row-scaled FP8 product on `device` (rowwise
    scaling needs recent cuBLAS/CUTLASS support per architecture): better refused at load than mid-run."""
    x = torch.ones(16, 32, device=device)
    try:
        weight8, scale, _ = quantize_weight(x, None)
        linear(x, weight8, scale, None)
    except RuntimeError as e:
        raise ValueError(f"--matmul fp8: this torch {torch.__version__} build cannot run per-row FP8 matmuls "
                         f"on {device} ({str(e).splitlines()[0]})") from e


def quantize_weight(weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
    """A Linear's weight [N, K] and bias [N] → what `linear` takes: (weight8, scale [1, N], bf16 bias)."""
    weight8, scale = quantize_rows(weight)
    return weight8, scale.view(1, -1), None if bias is None else bias.to(torch.bfloat16)


class Fp8Linear(nn.Module):
    """Replaces a Linear of a loaded network (the inference-only transform of `--matmul fp8`)."""

    def __init__(self, source: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = source.in_features, source.out_features
        weight8, scale, bias = quantize_weight(source.weight.detach(), source.bias)
        self.register_buffer("weight8", weight8)  # [N, K] e4m3
        self.register_buffer("weight_scale", scale)  # [1, N] fp32
        self.register_buffer("bias", None if bias is None else bias.detach())  # [N] bf16

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight8, self.weight_scale, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8"
