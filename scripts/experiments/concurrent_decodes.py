"""Experiment: do two decodes in flight on one GPU (two threads, two CUDA streams, one network replica each) make
more images/s than one decoder? Kernels of one decode leave SMs idle at their tails (a last partial wave) and in
short kernels; a second stream's kernels could fill them.

    python scripts/experiments/concurrent_decodes.py --size 2048 --batches 1 2 4 --images 16

Full-size random weights (bench.py's `ours8fp8` policy: compiled, CUDA graphs, both 8-bit modes). Each replica
captures its graphs on a capture stream of its own (cuBLAS keeps one workspace per stream: two graphs captured
on one stream would share it, and race when replayed at once). Prints images/s of one decoder and of two
concurrent ones, and whether the concurrent images equal the sequential ones bit for bit.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench import build  # noqa: E402

from pid_cli.registry import load_registry  # noqa: E402
from pid_cli.sampler import draw_noise, sample, schedule  # noqa: E402


def decode(net, size: int, batch: int, seed: int, entry, device) -> torch.Tensor:
    scale = entry.latent.vae_factor * entry.sr_scale
    gen = torch.Generator(device=device).manual_seed(seed)
    y = torch.randn(batch, 300, 2304, device=device, generator=gen)
    lq = torch.randn(batch, entry.latent.channels, size // scale, size // scale, device=device, generator=gen)
    sigma = torch.zeros(batch, device=device)
    gens = [torch.Generator(device=device).manual_seed(seed * 100 + i) for i in range(batch)]
    noise = draw_noise((batch, 3, size, size), gens, device)
    with torch.inference_mode():
        return sample(net, noise, y, lq, sigma, t_list=schedule(4, entry.sampler.t_list), generator=gens)


def worker(net, stream, seeds, out: dict, decode_args: tuple) -> None:
    """Decode one image batch per seed on `stream`, into out[seed]."""
    size, batch, entry, device = decode_args
    with torch.cuda.stream(stream):
        for i in seeds:
            out[i] = decode(net, size, batch, i, entry, device)
    stream.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--entry", default="flux2-2kto4k-v1.5")
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--images", type=int, default=16, help="images per measurement (each decoder half of them)")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    device = torch.device("cuda")
    entry = load_registry().get(args.entry)
    print(f"# {torch.cuda.get_device_name(device)}, torch {torch.__version__}, {entry.id}, {args.size}², ours8fp8")
    nets = [build(entry, "ours8fp8", device) for _ in range(2)]
    streams = [torch.cuda.Stream(device) for _ in range(2)]
    capture_streams = [torch.cuda.Stream(device) for _ in range(2)]  # one per replica (see the docstring)
    print("| batch | one decoder images/s | two concurrent images/s | gain | concurrent images = sequential |")
    print("|---|---|---|---|---|")
    for batch in args.batches:
        for k, net in enumerate(nets):  # compile + capture this batch size, sequentially, on its own stream
            torch.cuda.graphs.graph.default_capture_stream = capture_streams[k]
            with torch.cuda.stream(streams[k]):
                for _ in range(2):
                    decode(net, args.size, batch, 0, entry, device)
        torch.cuda.synchronize()
        decodes = max(2, args.images // batch) // 2 * 2
        for _ in range(args.rounds):
            torch.cuda.synchronize()
            start = time.perf_counter()
            with torch.cuda.stream(streams[0]):
                seq = [decode(nets[0], args.size, batch, i, entry, device) for i in range(decodes)]
            torch.cuda.synchronize()
            one = decodes * batch / (time.perf_counter() - start)

            conc: dict[int, torch.Tensor] = {}
            torch.cuda.synchronize()
            start = time.perf_counter()
            threads = [threading.Thread(target=worker, args=(nets[k], streams[k], range(k, decodes, 2), conc,
                                                             (args.size, batch, entry, device))) for k in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            two = decodes * batch / (time.perf_counter() - start)
            same = all(torch.equal(seq[i], conc[i]) for i in range(decodes))
            print(f"| {batch} | {one:.3f} | {two:.3f} | {two / one:.3f}× | {same} |", flush=True)
        print(f"# peak allocated {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB (two replicas)")


if __name__ == "__main__":
    main()
