import sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import torch
from attention8_bench import inputs, timed, SHAPES
from pid_cli.model import attention8, attention8_kernel

def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()

gen = torch.Generator(device="cuda").manual_seed(0)
print(torch.cuda.get_device_name())
variants = [(0, 3), (2, 2), (2, 3)]
for name, (nq, nk, h, d) in SHAPES.items():
    q, k, v = inputs(nq, nk, h, d, 2.0, gen)
    k8, ks, v8, vs = attention8.quantize_kv(k, v)
    flop = 4 * nq * nk * d * h
    small = slice(0, 2048)
    exact = torch.nn.functional.scaled_dot_product_attention(*(t.float().transpose(1, 2) for t in (q[:, small], k, v))).transpose(1, 2)
    row = [name]
    for _ in range(2):  # twice, interleaved, to see the noise
        for split, deg in variants:
            fn = lambda: attention8_kernel.launch(q, k8, ks, v8, vs, nk, split=split, deg=deg)
            t = timed(fn)
            err = rel(attention8_kernel.launch(q[:, small], k8, ks, v8, vs, nk, split=split, deg=deg), exact)
            row.append(f"s{split}d{deg} {flop / t / 1e12:.0f}TF err {err:.3e}")
    print(" | ".join(row))
