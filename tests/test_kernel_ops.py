"""The `torch.ops.pid.*` custom ops (pid_cli/kernels/ops.py) on the CPU, where each runs its torch reference
(kernels/reference.py): they must be the model's own torch ops, value for value, so that what the GPU kernels are
held to is the network's arithmetic. (The Triton kernels themselves run only on a GPU: tests/gpu/test_kernels.py.)"""

from __future__ import annotations

import torch

from pid_cli.model.layers import RMSNorm, apply_rope, rope_2d
from pid_cli.model.net import PiTBlock


def test_norm_rope_op_is_the_models_norm_then_rope():
    gen = torch.Generator().manual_seed(0)
    norm, rope = RMSNorm(72), rope_2d(72, 3, 4, None, None)
    norm.weight.data = 1 + 0.1 * torch.randn(72, generator=gen)
    qkv = torch.randn(2, 12, 3 * 5 * 72, generator=gen).bfloat16()
    k = qkv.unflatten(-1, (3, 5, 72)).unbind(2)[1]  # a strided view, as the attention makes it
    for x, weight in ((k, norm.weight), (k.float(), norm.weight), (k, norm.weight.bfloat16())):
        norm.weight.data = weight.data
        for dtype in (torch.float32, torch.bfloat16):
            out = torch.ops.pid.norm_rope(x, norm.weight, norm.eps, *rope, dtype)
            assert out.dtype == dtype
            assert torch.equal(out, apply_rope(norm(x), rope).to(dtype))


def test_pixel_mlp_op_is_the_pit_blocks_residuals():
    gen = torch.Generator().manual_seed(0)
    block = PiTBlock(pixel_dim=16, cond_dim=32, patch_size=4, attn_dim=32, heads=2)
    for name, p in block.named_parameters():
        p.data = torch.randn(p.shape, generator=gen) * 0.3 + (1 if "norm" in name else 0)
    block.mlp.bfloat16()  # the bf16 network's dtypes: norm weight and pixel stream fp32, the rest bf16
    xp = torch.randn(5, 16, 16, generator=gen)
    modulation = torch.randn(5, 16, 64, generator=gen).bfloat16()
    branch = torch.randn(5, 16, 16, generator=gen).bfloat16()
    expected = block.residuals(xp, modulation, branch)
    mlp, out = block.mlp, xp.clone()
    result = torch.ops.pid.pixel_mlp_(out, modulation, branch, block.norm2.weight, block.norm2.eps, mlp.fc1.weight,
                                      mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias)
    assert result is None  # it writes the pixel stream in place
    assert out.dtype == torch.float32 and torch.equal(out, expected)
    assert not torch.equal(out, xp)
