"""Experiment: `pid decode --batch-size auto` end to end on a GPU, with full-size random weights.

    python scripts/experiments/decode_batches.py            # 16 2K latents: --batch-size 1 vs auto, twice, interleaved
    python scripts/experiments/decode_batches.py --mixed    # 8 2K + 3 4K latents, auto: run cold, then warm

Both 8-bit modes, compiled (`bench_decode.py`'s runs). Prints when each PNG's record arrived (seconds from process
start) and, for the first form, the steady rate after the 4th PNG (auto batches 4 at 2K: its second batch starts
there).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "scripts"), str(ROOT)]

import bench_decode  # noqa: E402

from pid_cli.registry import load_registry  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mixed", action="store_true")
    args = ap.parse_args()
    entry = load_registry().get("flux2-2kto4k-v1.5")
    work = Path(tempfile.mkdtemp())
    registry, embeds, latents = bench_decode.prepare(work, entry.id, 2048, 8 if args.mixed else 16)
    if args.mixed:
        scale = entry.latent.vae_factor * entry.sr_scale
        gen = torch.Generator().manual_seed(1)
        for i in range(3):
            z = torch.randn(entry.latent.channels, 4096 // scale, 4096 // scale, generator=gen)
            save_file({"latent": z}, latents / f"4k_{i}.safetensors")
    runs = ["auto", "auto"] if args.mixed else ["1", "auto", "1", "auto"]
    print(f"# {torch.cuda.get_device_name()}")
    for i, batch_size in enumerate(runs):
        # bench_decode's command asks for batch 1; a later --batch-size wins
        bench_decode.PID_ARGS[:] = ["--attention", "8bit", "--matmul", "fp8", "--batch-size", batch_size]
        times = bench_decode.decode(registry, embeds, latents, work / f"out_{i}", "cuda:0", entry.backbone)["stamps"]
        line = f"--batch-size {batch_size}: first PNG {times[0]:.1f} s, last {times[-1]:.1f} s"
        if not args.mixed:
            line += f", steady after the 4th {(len(times) - 4) / (times[-1] - times[3]):.2f} images/s"
        print(f"{line}; PNGs at {[round(t, 2) for t in times]}", flush=True)


if __name__ == "__main__":
    main()
