"""Time the real PiD decode path (network + 4-step sampler) of any registry entry with random
weights, side by side with upstream's execution policy, on one GPU.

    python scripts/bench.py --entry flux2-2kto4k-v1.5 --sizes 2048 4096 --batch 1
    python scripts/bench.py --sizes 2048 --batch 4 --policies ours          # throughput
    python scripts/bench.py --sizes 2048 --policies ours8fp8 --baseline     # and upstream's policy beside it

Policies (every result has its reference in the same run; each policy and size runs in a fresh process of its
own, since compile state left by one policy slowed another's: see `isolated`):
  upstream  fp32 weights under bf16 autocast, eager, PyTorch's default SDPA choice, the latent
            branch recomputed every step, no chunking (what upstream's demos run)
  eager     ours without torch.compile: bf16 weights, cuDNN attention first, latent branch once
            per decode, chunked per-pixel work
  ours      eager + torch.compile of the blocks, sampler steps replayed from a CUDA graph (what `pid decode`
            runs on a GPU)
  ours8     ours with `--attention 8bit` (INT8 Q·K, FP8 P·V kernel)
  oursfp8   ours with `--matmul fp8` (FP8 image-token matmuls)
  ours8fp8  ours with both
  upstream-compiled
            upstream's policy under torch.compile of the whole network (upstream's `--compile`)
With --error, each policy's decoded image is also compared with the `ours` image of the same noise
and weights (PSNR in 8-bit levels, max |Δ| in levels): the cost in pixels of a policy's arithmetic.
Prints s/image, images/s, peak GPU memory and model FLOP utilisation (model FLOPs of the standard
forward × steps ÷ time ÷ the bf16 matmul rate measured on the same card in the same run).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pid_cli.model import PiDConfig, PiDNet, inference
from pid_cli.model.layers import fast_attention
from pid_cli.model.weights import fill_random
from pid_cli.registry import load_registry
from pid_cli.sampler import draw_noise, sample, schedule


class Uncached(torch.nn.Module):
    """Hides `condition` so the sampler calls the full forward every step, as upstream does."""

    def __init__(self, net: PiDNet):
        super().__init__()
        self.net = net

    def forward(self, *args):
        return self.net(*args)


def build(entry, policy: str, device: torch.device) -> torch.nn.Module:
    with torch.device("meta"):
        net = PiDNet(PiDConfig.from_dict(entry.net_config))
    net = fill_random(net.to_empty(device=device).eval().requires_grad_(False),
                      generator=torch.Generator(device=device).manual_seed(0))
    if policy.startswith("upstream"):
        net.float()
        net.pixel_chunk = 1 << 30  # and the plain PiT modulation: the whole 6·C·P² output, as upstream computes it
        return torch.compile(Uncached(net)) if policy == "upstream-compiled" else Uncached(net)
    net.to_inference_dtype(torch.bfloat16)
    return inference.deploy(net, attention="8bit" if policy in ("ours8", "ours8fp8") else "bf16",
                            matmul="fp8" if policy in ("oursfp8", "ours8fp8") else "bf16",
                            compile=policy != "eager", cuda_graphs=policy != "eager")


def model_flops(entry, size: int, batch: int) -> float:
    """FLOPs of one standard forward (linear + attention + conv), counted on the meta device."""
    with torch.device("meta"):
        net = PiDNet(PiDConfig.from_dict(entry.net_config))
        scale = entry.latent.vae_factor * entry.sr_scale
        args = (torch.empty(batch, 3, size, size), torch.empty(batch), torch.empty(batch, 300, 2304),
                torch.empty(batch, entry.latent.channels, size // scale, size // scale), torch.empty(batch))
        counter = FlopCounterMode(display=False)
        with counter:
            net(*args)
    return counter.get_total_flops()


def matmul_rate(device: torch.device) -> float:
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(10):
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * 8192**3 / statistics.median(times)


def run(entry, policy: str, size: int, batch: int, steps: int, repeat: int, device: torch.device,
        profile: bool = False, trace: Path | None = None) -> dict:
    """One policy at one size; `main` calls it in a process of its own (see `isolated`)."""
    torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    net = build(entry, policy, device)
    scale = entry.latent.vae_factor * entry.sr_scale
    gen = torch.Generator(device=device).manual_seed(1)
    y = torch.randn(batch, 300, 2304, device=device, generator=gen)
    lq = torch.randn(batch, entry.latent.channels, size // scale, size // scale, device=device, generator=gen)
    sigma = torch.zeros(batch, device=device)
    t_list = schedule(steps, entry.sampler.t_list)
    upstream = policy.startswith("upstream")
    autocast = (lambda: torch.autocast("cuda", torch.bfloat16)) if upstream else contextlib.nullcontext
    backends = contextlib.nullcontext if upstream else fast_attention

    def once() -> tuple[float, torch.Tensor]:
        gens = [torch.Generator(device=device).manual_seed(i) for i in range(batch)]
        noise = draw_noise((batch, 3, size, size), gens, device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        with torch.inference_mode(), autocast(), backends():
            out = sample(net, noise, y, lq, sigma, t_list=t_list, generator=gens)
        end.record()
        torch.cuda.synchronize()
        assert torch.isfinite(out).all()
        return start.elapsed_time(end) / 1e3, out

    first, _ = once()  # includes compilation for `ours`
    ready = time.perf_counter() - t0
    times, outs = zip(*(once() for _ in range(repeat)), strict=True)
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            once()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=45, max_name_column_width=110))
        if trace:
            prof.export_chrome_trace(str(trace.with_name(f"{trace.stem}-{policy}-{size}{trace.suffix}")))
    seconds = statistics.median(times)
    return {"policy": policy, "size": size, "batch": batch, "steps": steps, "s_per_image": seconds / batch,
            "images_per_s": batch / seconds, "spread": (max(times) - min(times)) / seconds,
            "first_call_s": first, "ready_s": ready,
            "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30,
            "reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30,
            "image": ((outs[-1].float().clamp(-1, 1) + 1) * 127.5).round().cpu()}


def compare(image: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """PSNR (dB, peak 255) and max |Δ| in 8-bit levels."""
    diff = image - reference
    mse = diff.pow(2).mean().item()
    return (10 * math.log10(255**2 / mse) if mse else math.inf), diff.abs().max().item()


def isolated(args: argparse.Namespace, policy: str, size: int) -> dict:
    """One policy at one size in a fresh Python process: `run`'s result, its image included. A process shares
    compile state between policies: run after `ours`, upstream's whole-network compile took 0.564-0.586 s per 2K
    image in three runs, and 0.473 s run first (H100, docs/performance.md#how-we-measure), so no two policies share
    one any more."""
    with tempfile.TemporaryDirectory() as folder:
        result = Path(folder) / "result.pt"
        command = [sys.executable, __file__, "--entry", args.entry, "--sizes", str(size), "--batch", str(args.batch),
                   "--steps", str(args.steps), "--repeat", str(args.repeat), "--policies", policy,
                   "--result", str(result)]
        if args.profile:
            command += ["--profile"] + (["--trace", str(args.trace)] if args.trace else [])
        subprocess.run(command, check=True)
        return torch.load(result, weights_only=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--entry", default="flux2-2kto4k-v1.5")
    ap.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--policies", nargs="+", default=["upstream", "eager", "ours"])
    ap.add_argument("--baseline", action="store_true",
                    help="also run `upstream` (upstream's execution policy on this network) as the reference")
    ap.add_argument("--json", type=Path, help="append one JSON line per result here")
    ap.add_argument("--profile", action="store_true", help="print the top GPU kernels of one decode per run")
    ap.add_argument("--trace", type=Path, help="with --profile: also write each run's Chrome trace, named after this")
    ap.add_argument("--error", action="store_true", help="PSNR / max |Δ| of each policy's image against `ours`")
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)  # the process of one policy: where its result goes
    args = ap.parse_args()
    if args.baseline and "upstream" not in args.policies:
        args.policies = ["upstream", *args.policies]
    device = torch.device("cuda")
    entry = load_registry().get(args.entry)
    if args.result:
        (size,), (policy,) = args.sizes, args.policies
        torch.save(run(entry, policy, size, args.batch, args.steps, args.repeat, device, args.profile, args.trace),
                   args.result)
        return
    rate = matmul_rate(device)
    torch.cuda.empty_cache()  # the children need the card, not this process's matmul operands
    print(f"# {torch.cuda.get_device_name(device)}, torch {torch.__version__}, {entry.id}, "
          f"bf16 matmul {rate / 1e12:.0f} TFLOP/s, each policy in its own process", flush=True)
    print("| policy | size | batch | s/image | images/s | peak GiB | reserved GiB | MFU | first call s | spread |"
          + (" PSNR vs ours dB | max Δ levels |" if args.error else ""))
    print("|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if args.error else ""))
    policies = (["ours"] + [p for p in args.policies if p != "ours"]) if args.error else args.policies
    for size in args.sizes:
        flops = model_flops(entry, size, args.batch) * args.steps
        reference = None
        for policy in policies:
            r = isolated(args, policy, size)
            image = r.pop("image")
            r["mfu"] = flops / (r["s_per_image"] * args.batch) / rate
            r["device"] = torch.cuda.get_device_name(device)
            line = (f"| {policy} | {size} | {args.batch} | {r['s_per_image']:.3f} | {r['images_per_s']:.2f} | "
                    f"{r['peak_gib']:.1f} | {r['reserved_gib']:.1f} | {r['mfu']:.0%} | {r['first_call_s']:.1f} | "
                    f"{r['spread']:.1%} |")
            if args.error:
                reference = image if reference is None else reference
                r["psnr_db"], r["max_diff"] = compare(image, reference)
                line += f" {r['psnr_db']:.1f} | {r['max_diff']:.0f} |"
            print(line, flush=True)
            if args.json:
                with args.json.open("a") as f:
                    f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
