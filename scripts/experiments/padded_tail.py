"""Experiment: what a compiled `pid decode` run's last, short batch costs, unpadded (a tree before the padding)
against padded to the full batch (this tree).

A run of 9 2K images in batches of 4 decodes 4 + 4 + 1. Compiled code and CUDA graphs are per shape, so the
last image compiles a batch of 1 again; padded, it runs as a batch of 4 whose three copies are dropped. Each tree
gets its own compile caches (Inductor's and Triton's), cold for its first run and warm for its second:

    mkdir .base && git archive REV | tar -x -C .base        # REV: the commit before the padding
    python scripts/experiments/padded_tail.py --trees base new     # then --trees new base: the other order

Printed per run: the wall time from process start to exit, and the batch size the last PNG's `pid:runtime`
names; then the 8-bit level difference of each image between the two trees.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import bench_decode  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trees", nargs=2, default=["base", "new"], choices=["base", "new"], help="run order")
    ap.add_argument("--images", type=int, default=9)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--size", type=int, default=2048)
    args = ap.parse_args()
    bench_decode.PID_ARGS[:] = ["--attention", "8bit", "--matmul", "fp8"]
    work = Path(tempfile.mkdtemp())
    registry, embeds, latents = bench_decode.prepare(work, "flux2-2kto4k-v1.5", args.size, args.images)
    rows = []
    for caches in ("cold", "warm"):
        for tree in args.trees:
            out = work / f"{tree}_{caches}"
            env = {k: v for k, v in os.environ.items() if k not in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
            env.update(HF_HUB_OFFLINE="1", PID_CACHE_DIR=str(work / f"pid_cache_{tree}"),
                       TRITON_CACHE_DIR=str(work / f"triton_cache_{tree}"))
            cmd = bench_decode.command(registry, embeds, latents, out, "cuda:0", "flux2", batch_size=args.batch_size)
            start = time.perf_counter()
            proc = subprocess.run(cmd, cwd=ROOT / ".base" if tree == "base" else ROOT, env=env, capture_output=True,
                                  text=True)
            wall = time.perf_counter() - start
            if proc.returncode != 0:
                raise SystemExit(f"{tree} failed:\n{proc.stderr[-3000:]}")
            pngs = sorted(out.glob("*.png"))
            last = Image.open(pngs[-1]).info["pid:runtime"].rsplit(", ", 1)[-1]
            rows.append(f"| {tree} | {caches} | {wall:.1f} | {len(pngs)} | {last} |")
            print(rows[-1], flush=True)
    for caches in ("cold", "warm"):
        base, new = (sorted((work / f"{tree}_{caches}").glob("*.png")) for tree in ("base", "new"))
        pairs = zip(base, new, strict=True)
        levels = [int(np.abs(np.asarray(Image.open(a), np.int16) - np.asarray(Image.open(b), np.int16)).max())
                  for a, b in pairs]
        print(f"{caches} caches, max 8-bit level difference base vs new per image: {levels}")
    print("\n| tree | compile caches | s, process start to exit | images | last image's batch |\n|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
