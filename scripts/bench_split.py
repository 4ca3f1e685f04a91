"""One image split across 1, 2, 4 ... GPUs (`Decoder(helper_devices=...)`, `pid decode --gpus-per-image N`):
seconds per image at each size, side by side with one GPU, and each image's difference from one GPU's.

    python scripts/bench_split.py --gpus 1 2 4 --sizes 2048 4096
    python scripts/bench_split.py --gpus 1 2 --fault     # also: kill a helper mid-decode, time the failure,
                                                          # decode again on fresh helpers

Full-size random weights written as a local checkpoint (as bench_decode.py), both 8-bit modes unless
--modes says otherwise, compiled; each GPU count in a process of its own (one split decoder per process).
"""

from __future__ import annotations

import argparse
import functools
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_decode import prepare  # noqa: E402

from pid_cli.outputs import to_uint  # noqa: E402
from pid_cli.pipeline import Decoder  # noqa: E402
from pid_cli.registry import load_registry  # noqa: E402


def timed(fn) -> tuple[float, object]:
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start, out


def child(args: argparse.Namespace) -> None:
    entry = load_registry([args.registry]).get("bench")
    helpers = [f"cuda:{i}" for i in range(1, args.gpus[0])]
    attention, matmul = args.modes
    load_s, dec = timed(lambda: Decoder(entry, entry.weights.path, device="cuda:0", helper_devices=helpers,
                                        attention=attention, matmul=matmul, compile=True))
    result = {"load_s": load_s}
    scale = dec.scale
    for size in args.sizes:
        gen = torch.Generator().manual_seed(size)
        latent = torch.randn(1, entry.latent.channels, size // scale, size // scale, generator=gen)
        text = torch.randn(1, 300, 2304, generator=gen)

        decode = functools.partial(dec.decode_tensor, latent, text, 0.0, seeds=0)

        first_s, _ = timed(decode)
        timed(decode)
        times = []
        for _ in range(args.repeat):
            seconds, image = timed(decode)
            times.append(seconds)
        result[size] = {"first_s": first_s, "s": min(times), "spread": max(times) / min(times) - 1,
                        "image": torch.from_numpy(to_uint(image)),
                        "peak_gib": torch.cuda.max_memory_allocated(0) / 2**30}
    if args.fault and helpers:
        size = args.sizes[0]
        helper = dec._helpers.helpers[0]
        killer = threading.Timer(0.3 * result[size]["s"], os.kill, (helper.pid, signal.SIGKILL))
        killer.start()
        start = time.perf_counter()
        try:
            decode()
            result["fault"] = "the decode did not fail"
        except Exception as e:  # what a killed helper looks like is the measurement
            result["fault"] = f"failed after {time.perf_counter() - start:.1f} s: {e}"
        restart_s, image = timed(decode)
        diff = (torch.from_numpy(to_uint(image)).int() - result[size]["image"].int()).abs().max().item()
        again_s, _ = timed(decode)
        result["restart"] = (f"next decode on fresh helpers {restart_s:.1f} s (then {again_s:.3f} s), max Δ levels "
                             f"from before the fault: {diff}")
    dec.close()
    torch.save(result, args.result)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--entry", default="flux2-2kto4k-v1.5")
    ap.add_argument("--gpus", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--modes", nargs=2, default=["8bit", "fp8"], metavar=("ATTENTION", "MATMUL"))
    ap.add_argument("--fault", action="store_true")
    ap.add_argument("--registry", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.result:
        return child(args)
    with tempfile.TemporaryDirectory() as folder:
        registry, _, _ = prepare(Path(folder), args.entry, args.sizes[0], 0)
        print(f"# {torch.cuda.get_device_name(0)}, torch {torch.__version__}, {args.entry}, "
              f"--attention {args.modes[0]} --matmul {args.modes[1]}, compiled, batch 1", flush=True)
        print("| GPUs per image | size | s/image | speed-up | first decode s | spread | peak GiB (cuda:0) | "
              "max Δ levels vs 1 GPU | PSNR dB |")
        print("|---|---|---|---|---|---|---|---|---|")
        base: dict = {}
        for gpus in args.gpus:
            result_path = Path(folder) / f"result{gpus}.pt"
            command = [sys.executable, __file__, "--gpus", str(gpus), "--sizes", *map(str, args.sizes),
                       "--repeat", str(args.repeat), "--modes", *args.modes, "--registry", str(registry),
                       "--result", str(result_path)] + (["--fault"] if args.fault else [])
            subprocess.run(command, check=True)
            result = torch.load(result_path, weights_only=True)  # tensors, numbers and strings only
            for size in args.sizes:
                r = result[size]
                base.setdefault(size, r)
                diff = (r["image"].int() - base[size]["image"].int()).abs()
                mse = diff.double().pow(2).mean().item()
                psnr = float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(255.0**2 / mse)).item()
                print(f"| {gpus} | {size} | {r['s']:.3f} | {base[size]['s'] / r['s']:.2f}x | {r['first_s']:.1f} | "
                      f"{r['spread']:.1%} | {r['peak_gib']:.1f} | {diff.max().item()} | {psnr:.1f} |", flush=True)
            for key in ("fault", "restart"):
                if key in result:
                    print(f"# {gpus} GPUs, a helper killed mid-decode: {key}: {result[key]}", flush=True)


if __name__ == "__main__":
    main()
