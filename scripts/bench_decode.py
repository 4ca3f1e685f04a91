"""`pid decode` end to end on one host with 1, 2, 4 ... GPUs: steady-state images/s and time to
first image, with full-size random weights written as a local checkpoint (no download).

    python scripts/bench_decode.py --size 2048 --images 48 --devices cuda:0 cuda:0,cuda:1
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pid_cli.model import PiDNet  # noqa: E402
from pid_cli.registry import load_registry  # noqa: E402
from pid_cli.text import save_prompt_embeds  # noqa: E402


def prepare(work: Path, entry_id: str, size: int, images: int) -> tuple[Path, Path, Path]:
    entry = load_registry().get(entry_id)
    with torch.device("meta"):
        net = PiDNet(**entry.net_config)
    gen = torch.Generator().manual_seed(0)
    state = {}
    for name, p in net.state_dict().items():
        t = torch.ones(p.shape) if "norm" in name else torch.randn(p.shape, generator=gen) * 0.02
        state[name] = t.to(torch.bfloat16)
    weights = work / "random_weights.safetensors"
    save_file(state, weights)
    registry = work / "registry.yaml"
    registry.write_text(yaml.safe_dump({"version": 1, "entries": [
        {"id": "bench", "base": entry_id, "variant": "bench", "path": str(weights)}]}))
    embeds = work / "prompt.safetensors"
    save_prompt_embeds(embeds, [""], torch.randn(1, 300, 2304, generator=gen).to(torch.bfloat16))
    latents = work / "latents"
    latents.mkdir()
    scale = entry.latent.vae_factor * entry.sr_scale
    for i in range(images):
        z = torch.randn(entry.latent.channels, size // scale, size // scale, generator=gen)
        save_file({"latent": z}, latents / f"{i:04d}.safetensors")
    return registry, embeds, latents


def decode(registry: Path, embeds: Path, latents: Path, out: Path, devices: str, backbone: str) -> dict:
    cmd = [sys.executable, "-m", "pid_cli.cli", "decode", str(latents), "--backbone", backbone, "--variant", "bench",
           "--registry", str(registry), "--prompt-embeds", str(embeds), "--out", str(out), "--devices", devices,
           "--batch-size", "1", "--json", "--quiet"]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    stamps = []
    for line in proc.stdout:
        if line.startswith("{"):
            assert json.loads(line)["status"] == "ok", line
            stamps.append(time.perf_counter() - start)
    if proc.wait() != 0:
        raise SystemExit(f"pid decode --devices {devices} failed ({proc.returncode}):\n{proc.stderr.read()[-3000:]}")
    n_dev = len(devices.split(","))
    steady = (len(stamps) - n_dev) / (stamps[-1] - stamps[n_dev - 1])  # after each GPU's first image
    return {"devices": devices, "images": len(stamps), "first_image_s": stamps[0], "total_s": stamps[-1],
            "steady_images_per_s": steady}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--entry", default="flux2-2kto4k-v1.5")
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--images", type=int, default=48)
    ap.add_argument("--devices", nargs="+", default=["cuda:0", "cuda:0,cuda:1"])
    args = ap.parse_args()
    backbone = load_registry().get(args.entry).backbone
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        registry, embeds, latents = prepare(work, args.entry, args.size, args.images)
        decode(registry, embeds, latents, work / "warmup", args.devices[-1], backbone)  # fills compile caches
        print(f"# {torch.cuda.get_device_name(0)} ×{torch.cuda.device_count()}, {args.entry}, {args.size}², "
              f"{args.images} images, batch 1, compile caches warm")
        print("| devices | images/s (steady) | speed-up | first image s | total s |")
        print("|---|---|---|---|---|")
        base = None
        for devices in args.devices:
            r = decode(registry, embeds, latents, work / devices.replace(",", "_").replace(":", ""), devices, backbone)
            base = base or r["steady_images_per_s"]
            print(f"| {devices} | {r['steady_images_per_s']:.2f} | {r['steady_images_per_s'] / base:.2f}x | "
                  f"{r['first_image_s']:.1f} | {r['total_s']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
