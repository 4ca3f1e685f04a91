"""`pid decode` end to end on one host with 1, 2, 4 ... GPUs: steady-state images/s and time to
first image, with full-size random weights written as a local checkpoint (no download).

    python scripts/bench_decode.py --size 2048 --images-per-gpu 48 --devices cuda:0 cuda:0,cuda:1
    python scripts/bench_decode.py --first-image      # one image: --compile on vs auto (eager for short runs)
    python scripts/bench_decode.py --devices cuda:0 cuda:0,cuda:1,cuda:2,cuda:3 --separate
                 # also N separate `pid decode --devices cuda:K --shard K/N` commands, side by side
    python scripts/bench_decode.py --size 4096 --devices cuda:0 cuda:0,cuda:1 --gpus-per-image 2
                 # also each image split across 2 GPUs (latency), beside one image per GPU (throughput)
    python scripts/bench_decode.py --pid-args "--attention 8bit --matmul fp8"    # options for every run

Every configuration decodes the same number of images per GPU, so each has the same steady window.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pid_cli.model import PiDConfig, PiDNet  # noqa: E402
from pid_cli.registry import load_registry  # noqa: E402
from pid_cli.text import save_prompt_embeds  # noqa: E402


def prepare(work: Path, entry_id: str, size: int, images: int) -> tuple[Path, Path, Path]:
    entry = load_registry().get(entry_id)
    with torch.device("meta"):
        net = PiDNet(PiDConfig.from_dict(entry.net_config))
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


PID_ARGS: list[str] = []  # --pid-args


def command(registry: Path, embeds: Path, latents: Path, out: Path, devices: str, backbone: str,
            compile: str = "on", batch_size: int = 1) -> list[str]:
    return [sys.executable, "-m", "pid_cli.cli", "decode", str(latents), "--backbone", backbone, "--variant", "bench",
           "--registry", str(registry), "--prompt-embeds", str(embeds), "--out", str(out), "--devices", devices,
           "--batch-size", str(batch_size), "--json", "--quiet", "--compile", compile, *PID_ARGS]


def subset(latents: Path, count: int) -> Path:
    """A folder of the first `count` latents (hard links)."""
    folder = latents.parent / f"latents_{count}"
    if not folder.exists():
        folder.mkdir()
        for src in sorted(latents.iterdir())[:count]:
            os.link(src, folder / src.name)
    return folder


def decode(registry: Path, embeds: Path, latents: Path, out: Path, devices: str, backbone: str,
           compile: str = "on", gpus_per_image: int = 1) -> dict:
    cmd = command(registry, embeds, latents, out, devices, backbone, compile)
    cmd += ["--gpus-per-image", str(gpus_per_image)] if gpus_per_image > 1 else []
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
    n_dev = len(devices.split(",")) // gpus_per_image  # workers, each writing its first image after compiling
    steady = (len(stamps) - n_dev) / (stamps[-1] - stamps[n_dev - 1]) if len(stamps) > n_dev else float("nan")
    return {"devices": devices, "images": len(stamps), "first_image_s": stamps[0], "total_s": stamps[-1],
            "steady_images_per_s": steady, "stamps": stamps}


def decode_processes(registry: Path, embeds: Path, latents: Path, out: Path, devices: str, backbone: str) -> dict:
    """One `pid decode` process per GPU, each on its shard of the inputs, all started together."""
    gpus = devices.split(",")
    start = time.perf_counter()
    procs = [subprocess.Popen([*command(registry, embeds, latents, out, gpu, backbone), "--shard", f"{k}/{len(gpus)}"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"}) for k, gpu in enumerate(gpus)]
    stamps: list[list[float]] = [[] for _ in procs]

    def read(k: int) -> None:
        for line in procs[k].stdout:
            if line.startswith("{"):
                assert json.loads(line)["status"] == "ok", line
                stamps[k].append(time.perf_counter() - start)

    readers = [threading.Thread(target=read, args=(k,)) for k in range(len(procs))]
    for t in readers:
        t.start()
    for t in readers:
        t.join()
    for p in procs:
        if p.wait() != 0:
            raise SystemExit(f"pid decode failed ({p.returncode}):\n{p.stderr.read()[-3000:]}")
    every = sorted(t for s in stamps for t in s)
    all_started = max(s[0] for s in stamps)  # every GPU has written its first image
    after = [t for t in every if t > all_started]
    return {"devices": devices, "images": len(every), "first_image_s": every[0], "total_s": every[-1],
            "steady_images_per_s": len(after) / (every[-1] - all_started)}


def first_image(entry_id: str, size: int) -> None:
    backbone = load_registry().get(entry_id).backbone
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        registry, embeds, latents = prepare(work, entry_id, size, 1)
        decode(registry, embeds, latents, work / "warmup", "cuda:0", backbone, "on")  # fills compile caches
        print(f"# {torch.cuda.get_device_name(0)}, {entry_id}, {size}², one image, compile caches warm")
        print("| --compile | first image s (process start to PNG written) |")
        print("|---|---|")
        for i, mode in enumerate(["on", "auto", "on", "auto"]):
            r = decode(registry, embeds, latents, work / f"run{i}", "cuda:0", backbone, mode)
            print(f"| {mode} | {r['first_image_s']:.1f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--entry", default="flux2-2kto4k-v1.5")
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--images-per-gpu", type=int, default=32)
    ap.add_argument("--devices", nargs="+", default=["cuda:0", "cuda:0,cuda:1"])
    ap.add_argument("--first-image", action="store_true", help="time one-image runs, --compile on vs auto")
    ap.add_argument("--separate", action="store_true",
                    help="also run one separate `pid decode --devices cuda:K --shard K/N` per GPU")
    ap.add_argument("--gpus-per-image", type=int, default=1,
                    help="also run each multi-GPU configuration with `--gpus-per-image N` (one image split)")
    ap.add_argument("--pid-args", default="", help="extra `pid decode` options for every run")
    args = ap.parse_args()
    PID_ARGS.extend(shlex.split(args.pid_args))
    if args.first_image:
        return first_image(args.entry, args.size)
    backbone = load_registry().get(args.entry).backbone
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        most = max(len(d.split(",")) for d in args.devices)
        registry, embeds, latents = prepare(work, args.entry, args.size, args.images_per_gpu * most)
        warm = subset(latents, most)
        decode(registry, embeds, warm, work / "warmup", args.devices[-1], backbone)  # fills compile caches
        print(f"# {torch.cuda.get_device_name(0)} ×{torch.cuda.device_count()}, {args.entry}, {args.size}², "
              f"{args.images_per_gpu} images per GPU, batch 1, compile caches warm {' '.join(PID_ARGS)}")
        print("| devices | mode | images/s (steady) | speed-up | first image s | total s |")
        print("|---|---|---|---|---|---|")
        base = None
        for devices in args.devices:
            n_dev = len(devices.split(","))
            modes = ["--devices", "separate"] if args.separate and n_dev > 1 else ["--devices"]
            if args.gpus_per_image > 1 and n_dev > 1 and n_dev % args.gpus_per_image == 0:
                modes.append(f"--gpus-per-image {args.gpus_per_image}")
            for mode in modes:
                run = decode_processes if mode == "separate" else \
                    functools.partial(decode, gpus_per_image=int(mode.split()[-1]) if " " in mode else 1)
                out = work / f"{mode.strip('-').replace(' ', '')}-{devices.replace(',', '_').replace(':', '')}"
                images = subset(latents, args.images_per_gpu * len(devices.split(",")))
                r = run(registry, embeds, images, out, devices, backbone)
                rate = r["steady_images_per_s"]
                base = base or rate
                print(f"| {devices} | {mode} | {rate:.2f} | {rate / base:.2f}x | {r['first_image_s']:.1f} | "
                      f"{r['total_s']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
