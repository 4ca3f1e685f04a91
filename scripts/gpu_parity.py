"""The upstream parity fixtures on a GPU: fp32 (TF32 off) must meet the fixture's relative-L2
bound (1e-5; GPU kernels sum in other orders than the CPU reference, so single elements can
move more than the CPU max-abs bound), the bf16 policy and the compiled path must stay within
the stated bf16 bound (relative L2 2e-2). Then the opt-in 8-bit attention kernel and FP8 matmuls against
their CPU references, the q/k norm + RoPE and PiT per-pixel kernels against the torch ops, sampler steps
replayed from CUDA graphs against the same steps without them, the sampler step's kernel against its torch
ops, and the pixels `pid decode` copies off the GPU.

    python scripts/gpu_parity.py                                  # every part, each in a process of its own
    python scripts/gpu_parity.py --parts fixture:v15_flux2 graphs   # some of them
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pid_cli.model import PiDConfig, PiDNet, inference, load_weights
from pid_cli.model.layers import fast_attention
from pid_cli.outputs import HostPixels, to_uint
from pid_cli.sampler import STUDENT_T_LIST, sample, step

PARITY = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "pid_parity"


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float().cpu() - b).norm() / b.norm()).item()


def check_attention8(dev: torch.device) -> float:
    """The 8-bit kernel must land where its torch reference does (relative L2 against fp32 attention),
    including batch > 1, query count ≠ key count and key counts that are not whole blocks."""
    import torch.nn.functional as F

    from pid_cli.kernels import reference
    from pid_cli.model import attention8

    print("\n| 8-bit attention shape (B, Nq, Nk, heads, D) | reference vs fp32 | kernel vs fp32 |")
    print("|---|---|---|")
    gen = torch.Generator(device=dev).manual_seed(0)
    failed = 0.0
    for b, nq, nk, heads, d in [(2, 1000, 1300, 3, 64), (1, 4096, 4396, 24, 64), (2, 777, 777, 4, 72),
                                (1, 4096, 4096, 16, 72)]:
        q, k, v = (torch.randn(b, n, heads, d, device=dev, generator=gen) for n in (nq, nk, nk))
        q, k = q * 1.5, k + 0.3
        exact = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        exact = exact.transpose(1, 2).cpu()
        q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
        r_ref, r_kernel = rel(reference.attention8(q, k, v), exact), rel(attention8.attention(q, k, v), exact)
        print(f"| {(b, nq, nk, heads, d)} | {r_ref:.2e} | {r_kernel:.2e} |", flush=True)
        if not (r_ref < 0.06 and r_kernel < 1.15 * r_ref + 1e-3):
            failed = 1.0
    return failed


def check_linear8(dev: torch.device) -> float:
    """`--matmul fp8` on the GPU (cuBLAS) must compute what the CPU (the tests' reference) does with the same
    quantised operands, and cost what docs/performance.md#speed-modes says against the fp32 product."""
    from pid_cli.model import linear8

    print("\n| FP8 linear shape (M, K, N) | GPU vs CPU same operands | vs fp32 product |")
    print("|---|---|---|")
    gen = torch.Generator(device=dev).manual_seed(0)
    failed = 0.0
    for m, k, n in [(16384, 1536, 4608), (8192, 4096, 1152), (300, 1152, 3456)]:
        x = torch.randn(m, k, device=dev, generator=gen).bfloat16()
        w = (torch.randn(n, k, device=dev, generator=gen) * k**-0.5).bfloat16()
        bias = torch.randn(n, device=dev, generator=gen).bfloat16()
        operands = linear8.quantize_weight(w, bias)
        gpu = linear8.linear(x, *operands)
        cpu = linear8.linear(x.cpu(), *(t.cpu() for t in operands))  # reference_product's arithmetic
        exact = (x.double() @ w.double().T + bias.double()).cpu()
        r_same, r_exact = rel(gpu, cpu.float()), rel(gpu, exact)
        print(f"| {(m, k, n)} | {r_same:.2e} | {r_exact:.2e} |", flush=True)
        if not (r_same < 5e-3 and r_exact < 5e-2):
            failed = 1.0
    return failed


def check_norm_rope(dev: torch.device) -> float:
    """The q/k RMSNorm + RoPE kernel against the torch ops it replaces, on strided q/k views of a qkv
    projection, stored in the input's dtype as the network asks (V's): bf16 inputs may differ where the
    normalised value rounds to the other bf16 neighbour."""
    from pid_cli.model.layers import RMSNorm, apply_rope, norm_rope, rope_2d

    print("\n| q/k norm + RoPE (tokens, heads, D), input / weight dtype | rel. L2 vs torch ops |")
    print("|---|---|")
    gen = torch.Generator(device=dev).manual_seed(0)
    failed = 0.0
    for n, heads, d in [(1000, 3, 64), (4096, 16, 72)]:
        for x_dtype, w_dtype in [(torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16),
                                 (torch.float32, torch.float32)]:
            qkv = torch.randn(2, n, 3 * heads * d, device=dev, generator=gen).to(x_dtype)
            k = qkv.unflatten(-1, (3, heads, d)).unbind(2)[1]
            norm = RMSNorm(d).to(dev)
            with torch.no_grad():
                norm.weight.copy_(torch.rand(d, device=dev, generator=gen) + 0.5)
            norm.to(w_dtype)
            rope = rope_2d(d, 1, n, None, None, device=dev)
            with torch.inference_mode():
                r = rel(norm_rope(norm, k, rope, x_dtype), apply_rope(norm(k), rope).to(x_dtype).cpu())
            print(f"| {(n, heads, d)}, {x_dtype} / {w_dtype} | {r:.2e} |", flush=True)
            if r > (2e-3 if x_dtype == torch.bfloat16 else 1e-6):
                failed = 1.0
    return failed


def check_pixel_mlp(dev: torch.device) -> float:
    """A PiT block's per-pixel tail (`PiTBlock.post` after its projections): the fused kernel against the torch
    ops of `PiTBlock.residuals` in the bf16 network, at PiD's pixel width (16) and two others it takes."""
    from pid_cli.model.net import PiTBlock

    print("\n| PiT per-pixel tail (pixels, C) | rel. L2 vs torch ops | max abs |")
    print("|---|---|---|")
    gen = torch.Generator(device=dev).manual_seed(0)
    failed = 0.0
    for tokens, c in [(2048, 16), (333, 32), (77, 64)]:
        block = PiTBlock(c, 64, 16, 64, 4).to(dev)
        with torch.no_grad():
            for name, param in block.named_parameters():
                param.normal_(1.0 if "norm" in name else 0.0, 0.1 if "norm" in name or "bias" in name else 0.25,
                              generator=gen)
        block.mlp.bfloat16()
        xp = torch.randn(tokens, 256, c, device=dev, generator=gen)
        modulation = (torch.randn(tokens, 256, 4 * c, device=dev, generator=gen) * 0.5).bfloat16()
        branch = torch.randn(tokens, 256, c, device=dev, generator=gen).bfloat16()
        with torch.inference_mode():
            expected = block.residuals(xp, modulation, branch)
            mlp = block.mlp
            torch.ops.pid.pixel_mlp_(xp, modulation, branch, block.norm2.weight, block.norm2.eps, mlp.fc1.weight,
                                     mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias)
        r, worst = rel(xp, expected.cpu()), (xp - expected).abs().max().item()
        print(f"| {tokens * 256}, {c} | {r:.2e} | {worst:.2e} |", flush=True)
        if r > 1e-3:
            failed = 1.0
    return failed


def check_other_device() -> float:
    """Our Triton kernels (attention, q/k norm + RoPE, PiT per-pixel tail) on the second GPU while the first is
    current (a `pid decode` worker running eager): they must give what they give on the first GPU, launched on the
    tensors' device and stream."""
    from pid_cli.model import attention8
    from pid_cli.model.layers import RMSNorm, norm_rope, rope_2d

    if torch.cuda.device_count() < 2:
        print("\nkernels on cuda:1 while cuda:0 is current: not checked (one GPU)")
        return 0.0
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
        results.append((a.cpu(), b.cpu(), c.cpu()))
    same = all(torch.equal(x, y) for x, y in zip(*results, strict=True))
    print(f"\nkernels on cuda:1 while cuda:0 is current: {'same as on cuda:0' if same else 'MISMATCH'}")
    return 0.0 if same else 1.0


def check_step_graphs(dev: torch.device) -> float:
    """Sampler steps replayed from CUDA graphs (`PiDNet.use_cuda_graphs`) give bit for bit what the same network
    gives without them, eager and compiled, over decodes with new noise, text and latents (the graph's inputs
    refilled each time) and a second batch size (a second graph)."""
    cfg = json.loads((PARITY / "v15_flux2" / "config.json").read_text())["tiny_net_config"]
    fx = {k: v.float().to(dev) for k, v in load_file(PARITY / "v15_flux2" / "fixture.safetensors").items()}
    gen = torch.Generator(device=dev).manual_seed(0)
    decodes = []
    for batch in (1, 1, 2, 1):
        x, y, lq = (torch.randn(batch, *fx[k].shape[1:], device=dev, generator=gen)
                    for k in ("chain_x_0", "chain_y", "chain_lq_latent"))
        eps = [torch.randn(x.shape, device=dev, generator=gen) for _ in range(3)]
        decodes.append((x, y, lq, torch.full((batch,), 0.1, device=dev), eps))
    failed = 0.0
    for policy in ("bf16", "bf16+compile"):
        outs = []
        for graphed in (False, True):
            net = load_weights(PiDNet(PiDConfig.from_dict(cfg)).eval(),
                               PARITY / "v15_flux2" / "model_fp32.safetensors").to(dev)
            net.pixel_chunk = 5
            net.to_inference_dtype(torch.bfloat16)
            if policy.endswith("compile"):
                inference.compile_blocks(net)
            if graphed:
                net.use_cuda_graphs()
            with torch.inference_mode(), fast_attention():
                outs.append([sample(net, x, y, lq, sigma, eps=eps).cpu() for x, y, lq, sigma, eps in decodes])
            if graphed:
                captured = sum(g.graph is not None for g in net._step_graphs.graphs.values())
        same = all(torch.equal(a, b) for a, b in zip(*outs, strict=True))
        worst = max((a - b).abs().max().item() for a, b in zip(*outs, strict=True))
        print(f"\nsampler steps from CUDA graphs ({policy}, {captured} graphs): "
              f"{'bit-identical' if same and captured == 2 else f'MISMATCH (max |Δ| {worst:.2e})'}")
        failed = max(failed, 0.0 if same and captured == 2 else 1.0)
    return failed


def check_sampler_step(dev: torch.device) -> float:
    """The sampler step's Triton kernel equals the step's torch ops on the CPU bit for bit (float64 x0, float32
    re-noising), for every step of the schedule, with a float32 and a bf16 velocity and an odd size."""
    gen = torch.Generator().manual_seed(0)
    t = torch.tensor(STUDENT_T_LIST, dtype=torch.float32).tolist()
    failed = 0.0
    for shape, v_dtype in (((2, 3, 64, 96), torch.float32), ((1, 3, 37, 53), torch.bfloat16)):
        x, e = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
        v = (torch.randn(shape, generator=gen) * 1.7).to(v_dtype)
        for k in range(len(t) - 1):
            noise = e if t[k + 1] > 0 else None
            want = step(x, v, t[k], t[k + 1], noise)
            got = step(x.to(dev), v.to(dev), t[k], t[k + 1], None if noise is None else noise.to(dev)).cpu()
            if not torch.equal(got, want):
                print(f"sampler step {k}, {tuple(shape)}, v {v_dtype}: MISMATCH, max |Δ| "
                      f"{(got - want).abs().max().item():.2e}")
                failed = 1.0
    print(f"sampler step kernel: {'bit-identical to the torch ops' if not failed else 'MISMATCH'}")
    return failed


def check_host_pixels(dev: torch.device) -> float:
    """The GPU's PNG levels, copied behind the decode into pinned memory, equal the CPU's; NaN items are flagged."""
    images = torch.rand(3, 3, 256, 384, generator=torch.Generator().manual_seed(0)) * 2.2 - 1.1
    images[1, 2, 7, 9] = float("nan")
    failed = 0.0
    for bits in (8, 16):
        host = HostPixels(images.to(dev), bits)
        expected = to_uint(images.nan_to_num(), bits)
        same = [np.array_equal(host.get(i), expected[i]) for i in (0, 2)]
        ok = all(same) and host.get(1) is None
        print(f"{bits}-bit pixels through pinned memory: {'equal to the CPU levels' if ok else 'MISMATCH'}")
        failed = max(failed, 0.0 if ok else 1.0)
    return failed


VARIANTS = ("v1_flux", "v1_sdxl", "v15_flux", "v15_flux2")
PARTS = (*(f"fixture:{v}" for v in VARIANTS), "graphs", "kernels")


def check_fixture(variant: str, dev: torch.device) -> float:
    """One tiny released family's fixture, fp32, bf16 and bf16 + compile: the forward and the 4-step sample."""
    cfg = json.loads((PARITY / variant / "config.json").read_text())["tiny_net_config"]
    fx = {k: v.float() for k, v in load_file(PARITY / variant / "fixture.safetensors").items()}
    failed = 0.0
    for policy in ("fp32", "bf16", "bf16+compile"):
        net = load_weights(PiDNet(PiDConfig.from_dict(cfg)).eval(), PARITY / variant / "model_fp32.safetensors").to(dev)
        net.pixel_chunk = 5
        if policy != "fp32":
            net.to_inference_dtype(torch.bfloat16)
        if policy.endswith("compile"):
            inference.compile_blocks(net)
        g = {k: v.to(dev) for k, v in fx.items()}
        with torch.inference_mode(), fast_attention():
            out = net(g["x"], g["t"], g["y"], g["lq_latent"], g["degrade_sigma"])
            smp = sample(net, g["chain_x_0"], g["chain_y"], g["chain_lq_latent"], g["chain_degrade_sigma"],
                         eps=[g[f"chain_eps_{i}"] for i in (1, 2, 3)])
        fwd_abs = (out.float().cpu() - fx["out"]).abs().max().item()
        smp_abs = (smp.cpu() - fx["chain_sample"]).abs().max().item()
        r = rel(out, fx["out"])
        print(f"| {variant} | {policy} | {fwd_abs:.2e} | {r:.2e} | {smp_abs:.2e} |", flush=True)
        if r > (1e-5 if policy == "fp32" else 2e-2):
            failed = 1.0
    return failed


def run_part(part: str, dev: torch.device) -> float:
    if part.startswith("fixture:"):
        return check_fixture(part.removeprefix("fixture:"), dev)
    if part == "graphs":
        return check_step_graphs(dev)
    return max(check_attention8(dev), check_linear8(dev), check_norm_rope(dev), check_pixel_mlp(dev),
               check_other_device(), check_sampler_step(dev), check_host_pixels(dev))


def main() -> int:
    """Each part in a process of its own, all at once: compiling the tiny networks is CPU work, serial inside one
    process (~250 s in one process on an H200 host), and the GPU work is small. Output in the parts' order."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", nargs="+", choices=PARTS, help="default: all (on the CPU: the fixtures)")
    ap.add_argument("--device", default="cuda", help="cpu: the fixture parts, to check this script off a GPU")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # run the one part given, here
    args = ap.parse_args()
    args.parts = args.parts or [p for p in PARTS if args.device != "cpu" or p.startswith("fixture:")]
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    if args.child:
        return int(run_part(args.parts[0], torch.device(args.device)) > 0)
    children = [subprocess.Popen([sys.executable, __file__, "--child", "--device", args.device, "--parts", part],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                for part in args.parts]
    print("| variant | policy | forward max abs | forward rel L2 | sample max abs |")
    print("|---|---|---|---|---|")
    failed = []
    for part, child in zip(args.parts, children, strict=True):
        output, _ = child.communicate()
        print(output.rstrip("\n"), flush=True)
        if child.returncode:
            failed.append(f"{part} (exit {child.returncode})")
    print(f"FAIL: {', '.join(failed)}" if failed else "PASS")
    return int(bool(failed))


if __name__ == "__main__":
    sys.exit(main())
