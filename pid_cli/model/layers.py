"""Building blocks shared by the patch (MMDiT) and pixel (PiT) streams.

Dtype policy (see `PiDNet.to_inference_dtype`): every Linear/Conv casts its input to its
own weight dtype, and attention runs in the dtype of its values. With fp32 weights the whole
network is fp32. With bf16 matmul weights and fp32 norm weights, the same code reproduces
the dtype flow upstream gets from `torch.autocast(bfloat16)` over fp32 master weights
(docs/model.md#precision): matmuls, attention and the `gate * branch` products in bf16, residual streams,
norms, RoPE and gates in fp32.
"""

from __future__ import annotations

import importlib.util
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pid_cli.kernels import ops as _ops  # noqa: F401  (registers torch.ops.pid.*)

# Our GPU kernels and torch.compile's GPU code are Triton. torch's CUDA wheels for Linux bring it; other builds
# (Windows) may not, and there a GPU decodes with the torch ops instead. A constant, so compiled code reads it freely.
HAS_TRITON = importlib.util.find_spec("triton") is not None


def triton_kernels(t: Tensor) -> bool:
    """Whether our Triton kernels take the work on t: a CUDA tensor, with Triton installed."""
    return t.is_cuda and HAS_TRITON


class Linear(nn.Linear):
    """nn.Linear that runs in its weight dtype, as autocast would."""

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight, self.bias)


class Conv2d(nn.Conv2d):
    """nn.Conv2d that runs in its weight dtype, as autocast would."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.to(self.weight.dtype))


class GroupNorm(nn.GroupNorm):
    """GroupNorm computed in fp32 (autocast's rule for group_norm); returns fp32.

    The statistics go through a plain reduction instead of `F.group_norm`: with 4 groups the
    fused CUDA kernel runs one thread block per group and took a large share of upstream's decode
    (docs/performance.md#machinery).
    """

    def forward(self, x: Tensor) -> Tensor:
        b, c = x.shape[:2]
        groups = x.float().view(b, self.num_groups, -1)
        var, mean = torch.var_mean(groups, dim=-1, correction=0, keepdim=True)
        normed = ((groups - mean) * torch.rsqrt(var + self.eps)).view(x.shape)
        affine = (1, c) + (1,) * (x.dim() - 2)
        return normed * self.weight.float().view(affine) + self.bias.float().view(affine)


class RMSNorm(nn.Module):
    """RMSNorm whose statistics are fp32 and whose result is rounded back to the input
    dtype *before* the weight multiplies it (the weight's dtype then decides the output)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


def narrow_linear(linear: nn.Linear, x: Tensor) -> Tensor:
    """`linear(x)` for a Linear with a handful of inputs or outputs (the 3-channel pixel embedding and output
    layer), as products and sums in fp32 from the operands rounded to the weight dtype, the result rounded to
    it as the Linear's would be. Why: cuBLAS runs these shapes as misaligned GEMMs far below memory bandwidth
    (docs/performance.md#machinery); written elementwise, torch.compile
    fuses them with the norm or position embedding beside them. The loop runs over the narrow side, so eager
    mode allocates nothing larger than the input or output."""
    weight = linear.weight.float()  # [N, K]
    x = x.to(linear.weight.dtype).float()
    n_out, n_in = weight.shape
    if n_in <= n_out:
        out = sum(x[..., j, None] * weight[:, j] for j in range(n_in))  # [..., N]
    else:
        out = torch.stack([(x * weight[i]).sum(-1) for i in range(n_out)], -1)  # [..., N]
    if linear.bias is not None:
        out = out + linear.bias.float()
    return out.to(linear.weight.dtype)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale) + shift


class SwiGLU(nn.Module):
    """Gated MLP of the MMDiT blocks: w2(silu(w1 x) * w3 x), no biases."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = Linear(dim, hidden, bias=False)
        self.w3 = Linear(dim, hidden, bias=False)
        self.w2 = Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class GeluMLP(nn.Module):
    """Per-pixel MLP of the PiT blocks (exact erf GELU)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = Linear(dim, hidden)
        self.fc2 = Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class TimestepEmbedder(nn.Module):
    """sin/cos features of t (already ×1000) with max_period 10, cos half first, then an MLP."""

    def __init__(self, hidden: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(Linear(freq_dim, hidden), nn.SiLU(), Linear(hidden, hidden))

    def forward(self, t: Tensor) -> Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]  # [B, half]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))  # [B, hidden]


class LinearEmbedder(nn.Module):
    """A Linear projection, optionally followed by RMSNorm (the text embedder)."""

    def __init__(self, dim_in: int, dim_out: int, norm: bool = False):
        super().__init__()
        self.proj = Linear(dim_in, dim_out)
        self.norm = RMSNorm(dim_out) if norm else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.proj(x))


# ---------------------------------------------------------------------------------------
# Rotary position embeddings. Tables are (cos, sin) pairs of shape [N, head_dim/2], fp32.


def rope_2d(head_dim: int, grid_h: int, grid_w: int, ref_h: int | None, ref_w: int | None,
            theta: float = 10000.0, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """2D RoPE over a grid whose positions always span [0, 16] on each axis.

    With a reference grid (`ntk_aware` mode) the base is NTK-scaled per axis by
    (grid/ref)^(d_ax/(d_ax-2)), d_ax = head_dim/2; `None` means the `original` mode.
    Pairs alternate x, y frequencies: pair 2k uses x-frequency k, pair 2k+1 y-frequency k.
    """
    d_ax = head_dim // 2

    def axis_theta(grid: int, ref: int | None) -> float:
        if ref is None or d_ax <= 2:
            return theta
        return theta * (grid / ref) ** (d_ax / (d_ax - 2))

    exponents = torch.arange(0, head_dim, 4, device=device)[: head_dim // 4].float() / head_dim
    freqs_x = 1.0 / (axis_theta(grid_w, ref_w) ** exponents)
    freqs_y = 1.0 / (axis_theta(grid_h, ref_h) ** exponents)
    ys, xs = torch.meshgrid(torch.linspace(0, 16, grid_h, device=device),
                            torch.linspace(0, 16, grid_w, device=device), indexing="ij")
    angles_x = torch.outer(xs.reshape(-1), freqs_x)  # [N, head_dim/4]
    angles_y = torch.outer(ys.reshape(-1), freqs_y)
    angles = torch.stack([angles_x, angles_y], dim=-1).reshape(grid_h * grid_w, -1)  # [N, head_dim/2]
    return torch.cos(angles), torch.sin(angles)


def rope_1d(head_dim: int, length: int, theta: float = 10000.0,
            device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """Plain 1D RoPE over integer positions (the text stream)."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))
    angles = torch.arange(length, device=device).float()[:, None] * freqs[None]  # [N, head_dim/2]
    return torch.cos(angles), torch.sin(angles)


def norm_rope(norm: RMSNorm, x: Tensor, rope: tuple[Tensor, Tensor] | None, out_dtype: torch.dtype) -> Tensor:
    """`apply_rope(norm(x), rope)` for the q or k heads x [B, N, heads, head_dim], rounded to out_dtype, the
    dtype attention takes them in (V's): on CUDA the `pid::norm_rope` op, one Triton kernel (kernels/norm_rope.py;
    torch.compile's own kernel for it runs far below memory bandwidth), which writes q and k once at that width."""
    if triton_kernels(x) and rope is not None:
        return torch.ops.pid.norm_rope(x, norm.weight, norm.eps, *rope, out_dtype)
    return apply_rope(norm(x), rope).to(out_dtype)


def apply_rope(x: Tensor, rope: tuple[Tensor, Tensor] | None) -> Tensor:
    """Rotate consecutive pairs of x [B, N, heads, head_dim] in fp32; returns fp32."""
    if rope is None:
        return x
    cos, sin = (r[None, :, None, :] for r in rope)  # [1, N, 1, head_dim/2]
    pairs = x.float().unflatten(-1, (-1, 2))
    a, b = pairs[..., 0], pairs[..., 1]
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)


def fast_attention():
    """Prefer cuDNN's fused attention on GPUs (faster than the flash backend for PiD's head dims 64 and 72, see
    docs/performance.md#attention-backends), falling back in order."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
             SDPBackend.MATH]
    return sdpa_kernel(order, set_priority=True)


def attention(q: Tensor, k: Tensor | tuple[Tensor, Tensor], v: Tensor | tuple[Tensor, Tensor]) -> Tensor:
    """Exact attention (SDPA in the dtype of v: fp32 in an fp32 network) over [B, N, heads, head_dim] inputs, keys
    and values whole or as (text, image) parts along the tokens; returns [B, N, heads·head_dim]. `attention8.attention`
    is the opt-in 8-bit form with the same signature."""
    k, v = (torch.cat(t, 1) if isinstance(t, tuple) else t for t in (k, v))
    q, k, v = (t.to(v.dtype).transpose(1, 2) for t in (q, k, v))  # [B, heads, N, head_dim]
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).flatten(2)
