"""Our GPU kernels against the arithmetic they replace: the opt-in 8-bit attention kernel and FP8 matmuls against
their CPU references, the q/k norm + RoPE, PiT per-pixel and sampler-step Triton kernels against the torch ops, and
the kernels on a second GPU. tests/test_kernel_ops.py and tests/test_speed_modes.py hold the references to the
network's arithmetic on the CPU; the kernels themselves run only here."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pid_cli.kernels import reference
from pid_cli.model import attention8, linear8
from pid_cli.model.layers import RMSNorm, apply_rope, norm_rope, rope_2d
from pid_cli.model.net import PiTBlock
from pid_cli.sampler import STUDENT_T_LIST, step

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16"}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 of a (any device) from b (CPU)."""
    return ((a.float().cpu() - b).norm() / b.norm()).item()


@pytest.mark.parametrize("b, nq, nk, heads, d", [
    pytest.param(*shape, id="B{}-Nq{}-Nk{}-h{}-D{}".format(*shape))
    for shape in [(2, 1000, 1300, 3, 64), (1, 4096, 4396, 24, 64), (2, 777, 777, 4, 72), (1, 4096, 4096, 16, 72)]])
def test_attention8_kernel_lands_where_its_reference_does(b, nq, nk, heads, d, cuda, measured):
    """Relative L2 against fp32 attention: the reference (the 8-bit arithmetic itself, 3.6–3.8e-2 measured,
    docs/performance.md#speed-modes) under 0.06, and the kernel at most 15 % (+1e-3) above the reference: it may sum
    in other orders, not add error of its own. Batch > 1, query count ≠ key count, key counts not whole blocks."""
    gen = torch.Generator(device=cuda).manual_seed(0)
    q, k, v = (torch.randn(b, n, heads, d, device=cuda, generator=gen) for n in (nq, nk, nk))
    q, k = q * 1.5, k + 0.3
    exact = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    exact = exact.transpose(1, 2).flatten(2).cpu()  # [B, Nq, heads·D], as the kernel's entry point returns
    q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
    r_ref, r_kernel = rel(reference.attention8(q, k, v).flatten(2), exact), rel(attention8.attention(q, k, v), exact)
    measured(f"8-bit attention {(b, nq, nk, heads, d)}: relative L2 vs fp32, reference {r_ref:.2e}, "
             f"kernel {r_kernel:.2e}")
    assert r_ref < 0.06
    assert r_kernel < 1.15 * r_ref + 1e-3


@pytest.mark.parametrize("m, k, n", [pytest.param(*shape, id="M{}-K{}-N{}".format(*shape))
                                     for shape in [(16384, 1536, 4608), (8192, 4096, 1152), (300, 1152, 3456)]])
def test_fp8_linear_gpu_matches_cpu(m, k, n, cuda, measured):
    """`--matmul fp8` on the GPU (cuBLAS) computes what the CPU (the tests' reference) does with the same quantised
    operands, within relative L2 5e-3 (cuBLAS's fast accumulation alone moves it 0.6–1.3e-3, model/linear8.py), and
    costs what docs/performance.md#speed-modes says against the fp32 product (2.6–3.7e-2, the e4m3 rounding of the
    operands), within 5e-2."""
    gen = torch.Generator(device=cuda).manual_seed(0)
    x = torch.randn(m, k, device=cuda, generator=gen).bfloat16()
    w = (torch.randn(n, k, device=cuda, generator=gen) * k**-0.5).bfloat16()
    bias = torch.randn(n, device=cuda, generator=gen).bfloat16()
    operands = linear8.quantize_weight(w, bias)
    gpu = linear8.linear(x, *operands)
    cpu = linear8.linear(x.cpu(), *(t.cpu() for t in operands))  # reference_product's arithmetic
    exact = (x.double() @ w.double().T + bias.double()).cpu()
    r_same, r_exact = rel(gpu, cpu.float()), rel(gpu, exact)
    measured(f"FP8 linear {(m, k, n)}: relative L2, GPU vs CPU same operands {r_same:.2e}, vs fp32 product "
             f"{r_exact:.2e}")
    assert r_same < 5e-3
    assert r_exact < 5e-2


@pytest.mark.parametrize("x_dtype, w_dtype", [
    pytest.param(x, w, id=f"x_{DTYPE_NAMES[x]}-w_{DTYPE_NAMES[w]}")
    for x, w in [(torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32)]])
@pytest.mark.parametrize("n, heads, d", [pytest.param(*shape, id="N{}-h{}-D{}".format(*shape))
                                         for shape in [(1000, 3, 64), (4096, 16, 72)]])
def test_norm_rope_kernel_matches_torch_ops(n, heads, d, x_dtype, w_dtype, cuda, measured):
    """The q/k RMSNorm + RoPE kernel against the torch ops it replaces, on strided k views of a qkv projection,
    stored in the input's dtype as the network asks (V's): relative L2 within 2e-3 for bf16 inputs (an element may
    round to the other bf16 neighbour of the normalised value), 1e-6 for fp32 ones."""
    gen = torch.Generator(device=cuda).manual_seed(0)
    qkv = torch.randn(2, n, 3 * heads * d, device=cuda, generator=gen).to(x_dtype)
    k = qkv.unflatten(-1, (3, heads, d)).unbind(2)[1]
    norm = RMSNorm(d).to(cuda)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(d, device=cuda, generator=gen) + 0.5)
    norm.to(w_dtype)
    rope = rope_2d(d, 1, n, None, None, device=cuda)
    with torch.inference_mode():
        r = rel(norm_rope(norm, k, rope, x_dtype), apply_rope(norm(k), rope).to(x_dtype).cpu())
    bound = 2e-3 if x_dtype == torch.bfloat16 else 1e-6
    measured(f"q/k norm + RoPE {(n, heads, d)}, {x_dtype} / {w_dtype}: relative L2 vs torch ops {r:.2e} "
             f"(bound {bound:.0e})")
    assert r <= bound


@pytest.mark.parametrize("tokens, c", [pytest.param(t, c, id=f"tokens{t}-C{c}")
                                       for t, c in [(2048, 16), (333, 32), (77, 64)]])
def test_pixel_mlp_kernel_matches_torch_ops(tokens, c, cuda, measured):
    """A PiT block's per-pixel tail (`PiTBlock.post` after its projections): the fused kernel against the torch ops
    of `PiTBlock.residuals` in the bf16 network, within relative L2 1e-3: the kernel reproduces every bf16 rounding,
    and differs only where another fp32 summation order moves a value across a rounding boundary
    (kernels/pixel_mlp.py). At PiD's pixel width (16) and two others it takes."""
    gen = torch.Generator(device=cuda).manual_seed(0)
    block = PiTBlock(c, 64, 16, 64, 4).to(cuda)
    with torch.no_grad():
        for name, param in block.named_parameters():
            param.normal_(1.0 if "norm" in name else 0.0, 0.1 if "norm" in name or "bias" in name else 0.25,
                          generator=gen)
    block.mlp.bfloat16()
    xp = torch.randn(tokens, 256, c, device=cuda, generator=gen)
    modulation = (torch.randn(tokens, 256, 4 * c, device=cuda, generator=gen) * 0.5).bfloat16()
    branch = torch.randn(tokens, 256, c, device=cuda, generator=gen).bfloat16()
    with torch.inference_mode():
        expected = block.residuals(xp, modulation, branch)
        mlp = block.mlp
        torch.ops.pid.pixel_mlp_(xp, modulation, branch, block.norm2.weight, block.norm2.eps, mlp.fc1.weight,
                                 mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias)
    r = rel(xp, expected.cpu())
    measured(f"PiT per-pixel tail ({tokens * 256} pixels, C {c}): relative L2 vs torch ops {r:.2e}, max abs "
             f"{(xp - expected).abs().max().item():.2e}")
    assert r <= 1e-3


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_kernels_on_second_gpu(measured):
    """Our Triton kernels (attention, q/k norm + RoPE, PiT per-pixel tail) on the second GPU while the first is
    current (a `pid decode` worker running eager) give bit for bit what they give on the first GPU: launched on the
    tensors' device and stream."""
    torch.cuda.set_device(0)
    q, k, v = (torch.randn(1, 1000, 4, 64, generator=torch.Generator().manual_seed(i)).bfloat16() for i in range(3))
    norm, rope = RMSNorm(64), rope_2d(64, 1, 1000, None, None)
    xp = torch.randn(40, 256, 16, generator=torch.Generator().manual_seed(3))
    pixel_args = [torch.randn(*shape, generator=torch.Generator().manual_seed(i)).bfloat16()
                  for i, shape in enumerate([(40, 256, 64), (40, 256, 16), (64, 16), (64,), (16, 64), (16,)])]
    pixel_args[2:2] = [torch.ones(16), 1e-6]  # norm weight, eps
    results = []
    for dev in ("cuda:0", "cuda:1"):
        with torch.inference_mode():
            a = attention8.attention(q.to(dev), k.to(dev), v.to(dev))
            b = norm_rope(norm.to(dev), k.to(dev), tuple(r.to(dev) for r in rope), k.dtype)
            c = xp.to(dev)
            torch.ops.pid.pixel_mlp_(c, *(t.to(dev) if isinstance(t, torch.Tensor) else t for t in pixel_args))
        results.append({"attention8": a.cpu(), "norm_rope": b.cpu(), "pixel_mlp_": c.cpu()})
    differ = [name for name in results[0] if not torch.equal(results[0][name], results[1][name])]
    measured(f"kernels on cuda:1 while cuda:0 is current: {f'differ in {differ}' if differ else 'same as on cuda:0'}")
    assert not differ


T = torch.tensor(STUDENT_T_LIST, dtype=torch.float32).tolist()  # the schedule's float32 values, as sample passes them


@pytest.mark.parametrize("k", range(len(T) - 1), ids=lambda k: f"step{k}")
@pytest.mark.parametrize("shape, v_dtype", [pytest.param((2, 3, 64, 96), torch.float32, id="2x3x64x96-v_fp32"),
                                            pytest.param((1, 3, 37, 53), torch.bfloat16, id="1x3x37x53-v_bf16")])
def test_sampler_step_kernel_bit_identical(shape, v_dtype, k, cuda, measured):
    """The sampler step's Triton kernel equals the step's torch ops on the CPU bit for bit (float64 x0, float32
    re-noising; the last step returns x0), with a float32 and a bf16 velocity and an odd size."""
    gen = torch.Generator().manual_seed(0)
    x, e = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    v = (torch.randn(shape, generator=gen) * 1.7).to(v_dtype)
    noise = e if T[k + 1] > 0 else None
    want = step(x, v, T[k], T[k + 1], noise)
    got = step(x.to(cuda), v.to(cuda), T[k], T[k + 1], None if noise is None else noise.to(cuda)).cpu()
    measured(f"sampler step {k}, {shape}, v {v_dtype}: max |Δ| vs torch ops {(got - want).abs().max().item():.2e}")
    assert torch.equal(got, want)
