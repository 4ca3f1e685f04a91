"""Experiment: does an image's place in a compiled batch move its pixels?

`pid decode` pads a compiled run's short batches to the full batch size with copies of their last image. If the
pixels depend only on the batch's size, not on where an image sits in it, a resumed run (or one over some of the
inputs) writes what the whole run would have. One full-size random network, compiled, at 2K:

    python scripts/experiments/batch_position.py

Printed per mode (both 8-bit modes, then the default bf16 one): the batch of 4 decoded twice, subsets of it
decoded again padded to 4, and item 2 decoded alone at batch 1, each against the batch of 4 (max |Δ| on the
network's [-1, 1] output).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT))

import bench_decode  # noqa: E402

from pid_cli.pipeline import Decoder  # noqa: E402
from pid_cli.registry import load_registry  # noqa: E402


def main() -> None:
    registry, _, folder = bench_decode.prepare(Path(tempfile.mkdtemp()), "flux2-2kto4k-v1.5", 2048, 4)
    entry = load_registry([registry]).get("bench")
    latents = torch.stack([load_file(p)["latent"] for p in sorted(folder.iterdir())])  # [4, C, h, w]
    text = torch.randn(4, 300, 2304, generator=torch.Generator().manual_seed(1)).bfloat16().float()
    seeds = [10, 11, 12, 13]
    for mode in ({"attention": "8bit", "matmul": "fp8"}, {}):
        decoder = Decoder(entry, entry.weights.path, device="cuda", compile=True, **mode)
        full = decoder.decode_tensor(latents, text, seeds=seeds).float().cpu()
        again = decoder.decode_tensor(latents, text, seeds=seeds).float().cpu()
        print(f"{mode or 'bf16'}: the batch of 4 again: max |d| {(again - full).abs().max().item():.3e}")
        for picked in ([2], [1, 2], [3], [0, 1, 2]):
            got = decoder.decode_tensor(latents[picked], text[picked], seeds=[seeds[i] for i in picked],
                                        pad_to=4).float().cpu()
            delta = (got - full[picked]).abs().max().item()
            print(f"{mode or 'bf16'}: items {picked} padded to 4: max |d| {delta:.3e}")
        alone = decoder.decode_tensor(latents[2:3], text[2:3], seeds=[12]).float().cpu()
        print(f"{mode or 'bf16'}: item 2 at batch 1: max |d| {(alone - full[2:3]).abs().max().item():.3e}")
        del decoder
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
