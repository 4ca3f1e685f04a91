"""Experiment: are a compiled GPU decode's pixels the same in every process, and at every batch size?

A render farm reruns a failed shard on another node, whose compile caches are cold, and `--batch-size auto`
batches differently with free memory. Inductor benchmarks some of its kernels' configurations the first time
they run and keeps the fastest; for reductions that choice changes the summation order, so two processes
could pick differently and differ in the last bits. Each run here is a fresh process with its own Inductor
cache folder (cold unless two runs name the same one):

    python scripts/experiments/reproducibility.py --runs a b a --policy ours8fp8
    python scripts/experiments/reproducibility.py --runs c d --policy ours8fp8 --env TORCHINDUCTOR_DETERMINISTIC=1

Every run decodes seed 0 at batch 1 and seeds 0-3 at batch 4 (--batch) (each item's inputs from its own generator, so
item 0 of the batch has batch 1's inputs), then times 3 decodes at batch 1. Printed: each run's seconds per
image, and the max difference (float, and 8-bit levels) of every image against the first run's batch-1 image.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))


def inputs(entry, size: int, seeds: list[int], device) -> tuple:
    scale = entry.latent.vae_factor * entry.sr_scale
    items = []
    for s in seeds:
        gen = torch.Generator(device=device).manual_seed(1000 + s)
        items.append((torch.randn(1, 300, 2304, device=device, generator=gen),
                       torch.randn(1, entry.latent.channels, size // scale, size // scale, device=device,
                                   generator=gen)))
    y, lq = (torch.cat(parts) for parts in zip(*items, strict=True))
    return y, lq, [torch.Generator(device=device).manual_seed(s) for s in seeds]


def child(policy: str, size: int, batch: int, result: Path) -> None:
    from bench import build

    from pid_cli.registry import load_registry
    from pid_cli.sampler import draw_noise, sample, schedule

    device = torch.device("cuda")
    entry = load_registry().get("flux2-2kto4k-v1.5")
    net = build(entry, policy, device)

    def decode(seeds: list[int]) -> torch.Tensor:
        y, lq, gens = inputs(entry, size, seeds, device)
        noise = draw_noise((len(seeds), 3, size, size), gens, device)
        sigma = torch.zeros(len(seeds), device=device)
        with torch.inference_mode():
            return sample(net, noise, y, lq, sigma, t_list=schedule(4, entry.sampler.t_list), generator=gens)

    out = {"b1": decode([0]).float().cpu()}
    out["b4"] = decode(list(range(batch))).float().cpu() if batch > 1 else out["b1"]
    decode([0])  # the batch-1 graph is captured on the second decode of that size
    times = []
    for _ in range(3):
        torch.cuda.synchronize()
        start = time.perf_counter()
        image = decode([0])
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    out["b1_again"] = image.float().cpu()
    out["seconds"] = torch.tensor(statistics.median(times))
    torch.save(out, result)


def levels(x: torch.Tensor) -> torch.Tensor:
    return ((x.clamp(-1, 1) + 1) * 127.5).round()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", nargs="+", default=["a", "b", "a"], help="one fresh process per name; a name is "
                    "its Inductor cache folder, so a repeated name runs with that folder warm")
    ap.add_argument("--policy", default="ours8fp8")
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=4, help="the larger batch whose item 0 is compared (1: none)")
    ap.add_argument("--env", nargs="*", default=[], metavar="NAME=VALUE", help="set in every run, e.g. "
                    "TORCHINDUCTOR_DETERMINISTIC=1")
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.policy, args.size, args.batch, args.child)
        return
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, {args.policy}, {args.size}², "
          f"{' '.join(args.env) or 'no extra environment'}")
    print(f"| run (cache) | s/image | b1 vs first b1: max |Δ| float, levels | b{args.batch}[0] vs first b1 "
          "| b1 again vs b1 |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as work:
        first = None
        for name in args.runs:
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": f"{work}/cache-{name}",
                   "TRITON_CACHE_DIR": f"{work}/triton-{name}"}
            env.update(pair.split("=", 1) for pair in args.env)
            result = Path(work) / "result.pt"
            subprocess.run([sys.executable, __file__, "--policy", args.policy, "--size", str(args.size),
                            "--batch", str(args.batch), "--child", str(result)], check=True, env=env)
            r = torch.load(result, weights_only=True)
            first = r["b1"] if first is None else first

            def diff(x: torch.Tensor, ref: torch.Tensor) -> str:
                return f"{(x - ref).abs().max().item():.2e}, {(levels(x) - levels(ref)).abs().max().item():.0f}"

            print(f"| {name} | {r['seconds'].item():.4f} | {diff(r['b1'], first)} | {diff(r['b4'][:1], first)} | "
                  f"{diff(r['b1_again'], r['b1'])} |", flush=True)


if __name__ == "__main__":
    main()
