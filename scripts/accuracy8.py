"""The pixel error of each 8-bit speed mode against the exact path, over a family of weight distributions.

    python scripts/accuracy8.py --json accuracy8.json                  # the family at 2048 and 4096 (~3-4 min, H100)
    python scripts/accuracy8.py --members w03-g05-s1 w03-g05-s3 --json accuracy8.json        # a part of it
    python scripts/accuracy8.py --sizes 2048 --fp32-floor --json floor.json   # and exact bf16 against fp32
    python scripts/accuracy8.py --device cpu --tiny                    # the plumbing, on a tiny network (tests)

Why a family: what `--attention 8bit` (INT8 Q·K, FP8 P·V) and `--matmul fp8` cost in pixels depends on the
weights (how large the activations are, how much each gate passes on, how peaked attention is), and the released
weights cannot be loaded here. So the full-size network of a registry entry is built with random weights from a
few named distributions (matmul weight std, the adaLN gate biases, the q/k RMSNorm weights that set how wide
attention logits spread), each decoded at each size from the same seeded noise, text and latent, and the figure
to publish is the worst case over the family.

Per member, size and mode: PSNR in 8-bit levels against the exact image (`outputs.to_uint`'s rounding), max |Δ|
in levels and the share of pixel values off by more than 2 levels. Modes: `8bit` (attention), `fp8` (image-token
matmuls), `8bit+fp8`, and `8bit+fp8 keep-ends` (both, except in the first and last MMDiT and PiT blocks). One
build per member serves every mode: the attention mode is reversible, FP8 conversion is one-way, so the
conversions run in the order keep-ends (middle blocks), then the rest. Eager (no compilation, no CUDA graphs):
the modes' arithmetic, without what fusion changes in roundings. `--fp32-floor` adds the exact bf16 decode
against an fp32 network's at the smallest size: how faithful bf16 itself is. On a CPU (`--device cpu --tiny`)
the modes run the kernels' torch references, without the GPU checks.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pid_cli.model import PiDConfig, PiDNet, inference
from pid_cli.model.layers import RMSNorm, fast_attention
from pid_cli.outputs import level_difference, to_uint
from pid_cli.registry import load_registry
from pid_cli.sampler import draw_noise, sample, schedule


@dataclass(frozen=True)
class Member:
    name: str
    weight_std: float  # every Linear / Conv2d weight ~ N(0, std); biases and the text position table N(0, 0.02)
    gate_bias: float  # added to the biases of the adaLN gate rows (MMDiT chunks 2 and 5 of 6; PiT the same per pixel)
    qk_norm: float  # q/k RMSNorm weights: logits spread qk_norm² times wider; other norm weights 1


# In the order they run, the most telling first (a run cut short keeps what it measured, --json included): the
# init of the last published measurement, the sharpest attention, large weights with sharp attention, bench.py's init
FAMILY = [Member("w03-g05-s1", 0.03, 0.5, 1.0), Member("w03-g05-s3", 0.03, 0.5, 3.0),
          Member("w05-g05-s2", 0.05, 0.5, 2.0), Member("w02-g0-s1", 0.02, 0.0, 1.0),
          Member("w05-g05-s1", 0.05, 0.5, 1.0), Member("w03-g0-s2", 0.03, 0.0, 2.0)]
MODES = ("8bit", "fp8", "8bit+fp8", "8bit+fp8 keep-ends")  # each against "exact"
# --tiny: the entry's network with head dims 64 and 72 (what 8-bit attention takes), a few blocks, small images
TINY = {"hidden_size": 128, "num_groups": 2, "pixel_hidden_size": 4, "pixel_attn_hidden_size": 144,
        "pixel_num_groups": 2, "patch_depth": 4, "pixel_depth": 2, "patch_size": 4, "txt_embed_dim": 32,
        "txt_max_length": 12, "rope_ref_h": 64, "rope_ref_w": 64, "lq_hidden_dim": 8}


def build(config: PiDConfig, member: Member, device: torch.device, dtype: torch.dtype, seed: int,
          gain: float = 1.0) -> PiDNet:
    """The network with `member`'s random weights (the same for every dtype; matmul weights' std × `gain`), cast
    and split as `deploy` does."""
    with torch.device("meta"):
        net = PiDNet(config)
    net = net.to_empty(device=device).eval().requires_grad_(False)
    gen = torch.Generator(device=device).manual_seed(seed)
    for module in net.modules():
        for name, p in module.named_parameters(recurse=False):
            if p.dim() == 0:
                p.data.fill_(1.6)  # the latent gates' log_alpha, as scripts/bench.py sets it
            elif name == "weight" and isinstance(module, (RMSNorm, nn.GroupNorm)):
                p.data.fill_(1.0)
            elif name == "weight" and isinstance(module, (nn.Linear, nn.Conv2d)):
                p.data.normal_(0, member.weight_std * gain, generator=gen)
            else:
                p.data.normal_(0, 0.02, generator=gen)
    d, c, pixels = config.hidden_size, config.pixel_hidden_size, config.patch_size**2
    for block in net.patch_blocks:
        for modulation in (block.adaLN_modulation_img[0], block.adaLN_modulation_txt[0]):
            modulation.bias.data.view(6, d)[[2, 5]] += member.gate_bias
    for block in net.pixel_blocks:  # rows pixel-major: p·6C + chunk·C + channel
        block.adaLN_modulation[0].bias.data.view(pixels, 6, c)[:, [2, 5]] += member.gate_bias
    for attn in inference.attentions(net):
        for name, norm in attn.named_children():
            if name.startswith(("q_norm", "k_norm")):
                norm.weight.data.fill_(member.qk_norm)
    return inference.split_pixel_modulation(net.to_inference_dtype(dtype))


def set_attention(module: nn.Module, mode: str, checked: bool) -> None:
    if checked:
        inference.set_attention(module, mode)
    else:  # the CPU: the op's torch reference, without the GPU checks
        for attn in inference.attentions(module):
            attn.sdpa = inference.ATTENTION[mode]


def to_fp8(module: nn.Module, checked: bool) -> None:
    (inference.use_fp8_matmuls if checked else inference.convert_fp8_linears)(module)


def make_inputs(config: PiDConfig, entry, size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Text [1, T, txt_dim] and latent [1, C, size/(vae·sr)]², seeded, the same for every member and mode."""
    gen = torch.Generator(device=device).manual_seed(1)
    cells = max(1, size // (entry.latent.vae_factor * entry.sr_scale))
    y = torch.randn(1, config.txt_max_length, config.txt_embed_dim, device=device, generator=gen)
    return y, torch.randn(1, entry.latent.channels, cells, cells, device=device, generator=gen)


def decode(net: PiDNet, inputs, size: int, args, device: torch.device) -> np.ndarray:
    """One 4-step decode (or --steps) from seeded noise → [H, W, 3] uint8 levels."""
    y, lq = inputs
    gens = [torch.Generator(device=device).manual_seed(2)]
    noise = draw_noise((1, 3, size, size), gens, device)
    sigma = torch.full((1,), args.sigma, device=device)
    with torch.inference_mode(), fast_attention() if device.type == "cuda" else contextlib.nullcontext():
        out = sample(net, noise, y, lq, sigma, t_list=args.t_list, generator=gens)
    return to_uint(out)[0]


def compare(image: np.ndarray, reference: np.ndarray) -> dict:
    psnr, diff = level_difference(image, reference)
    return {"psnr_db": psnr, "max_diff": int(diff.max()), "over2": float((diff > 2).mean())}


def run_member(member: Member, config: PiDConfig, entry, args, device: torch.device, inputs: dict) -> dict:
    checked = device.type == "cuda"
    t0 = time.perf_counter()
    floor = []
    if args.fp32_floor:
        net32, size = build(config, member, device, torch.float32, args.seed, args.gain), min(args.sizes)
        floor.append((size, decode(net32, inputs[size], size, args, device)))
        del net32
    net = build(config, member, device, torch.bfloat16, args.seed, args.gain)
    exact = {size: decode(net, inputs[size], size, args, device) for size in args.sizes}
    clipped = {size: float(((image == 0) | (image == 255)).mean()) for size, image in exact.items()}
    rows = []

    def measure(mode: str) -> None:
        for size in args.sizes:
            start = time.perf_counter()
            image = decode(net, inputs[size], size, args, device)
            rows.append({"member": member.name, "size": size, "mode": mode, **compare(image, exact[size]),
                         "exact_clipped": clipped[size],
                         "decode_s": time.perf_counter() - start})

    set_attention(net, "8bit", checked)
    measure("8bit")
    set_attention(net, "bf16", checked)
    for block in [*net.patch_blocks[1:-1], *net.pixel_blocks[1:-1]]:  # all but the first and last of each kind
        set_attention(block, "8bit", checked)
        to_fp8(block, checked)
    measure("8bit+fp8 keep-ends")
    set_attention(net, "bf16", checked)
    to_fp8(net, checked)  # the ends too (converted blocks are left as they are)
    measure("fp8")
    set_attention(net, "8bit", checked)
    measure("8bit+fp8")
    rows.sort(key=lambda r: (args.sizes.index(r["size"]), MODES.index(r["mode"])))
    floor_rows = [{"member": member.name, "size": size, **compare(exact[size], image)} for size, image in floor]
    return {"rows": rows, "floor": floor_rows, "seconds": time.perf_counter() - t0}


def worst(rows: list[dict], sizes: list[int]) -> list[dict]:
    table = []
    for mode in MODES:
        for size in sizes:
            sel = [r for r in rows if r["mode"] == mode and r["size"] == size]
            low = min(sel, key=lambda r: r["psnr_db"])
            high = max(sel, key=lambda r: r["max_diff"])
            table.append({"mode": mode, "size": size, "min_psnr_db": low["psnr_db"], "min_psnr_member": low["member"],
                          "max_diff": high["max_diff"], "max_diff_member": high["member"],
                          "max_over2": max(r["over2"] for r in sel)})
    return table


def environment(device: torch.device) -> dict:
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"card": card, "torch": torch.__version__, "commit": commit}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--entry", default="flux2-2kto4k-v1.5")
    ap.add_argument("--sizes", type=int, nargs="+", help="output sizes (default 2048 4096; --tiny: 32 64)")
    ap.add_argument("--members", nargs="+", choices=[m.name for m in FAMILY], help="a part of the family")
    ap.add_argument("--sigma", type=float, default=0.3, help="degrade σ of the latent")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0, help="weight seed (the same for every member)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="a tiny network and sizes (tests, CPU)")
    ap.add_argument("--fp32-floor", action="store_true", help="also exact bf16 against fp32, at the smallest size")
    ap.add_argument("--json", type=Path, help="write every number here")
    args = ap.parse_args()
    device = torch.device(args.device)
    entry = load_registry().get(args.entry)
    config = PiDConfig.from_dict({**entry.net_config, **(TINY if args.tiny else {})})
    args.sizes = args.sizes or ([32, 64] if args.tiny else [2048, 4096])
    # --tiny: matmul weights' std × √(width ratio), so activations are as large as at full width
    args.gain = math.sqrt(entry.net_config["hidden_size"] / config.hidden_size)
    args.t_list = schedule(args.steps, entry.sampler.t_list)
    family = [m for m in FAMILY if not args.members or m.name in args.members]
    env = environment(device)
    print(f"# {env['card']}, torch {env['torch']}, commit {env['commit']}, {entry.id}{' (tiny)' * args.tiny}, "
          f"σ {args.sigma}, {args.steps} steps, weight seed {args.seed}, eager", flush=True)
    print("\n| member | matmul weight std | gate bias | q/k norm weight |\n|---|---|---|---|")
    for m in family:
        print(f"| {m.name} | {m.weight_std} | {m.gate_bias} | {m.qk_norm} |")
    print("\n| member | size | mode | PSNR dB | max Δ levels | > 2 levels | exact clipped | decode s |\n"
          "|---|---|---|---|---|---|---|---|", flush=True)
    inputs = {size: make_inputs(config, entry, size, device) for size in args.sizes}
    rows, floor, seconds = [], [], {}
    for member in family:
        result = run_member(member, config, entry, args, device, inputs)
        rows += result["rows"]
        floor += result["floor"]
        seconds[member.name] = result["seconds"]
        for r in result["rows"]:
            print(f"| {r['member']} | {r['size']} | {r['mode']} | {r['psnr_db']:.1f} | {r['max_diff']} | "
                  f"{r['over2']:.4%} | {r['exact_clipped']:.1%} | {r['decode_s']:.2f} |", flush=True)
        if args.json:  # after every member: a run cut short keeps what it measured
            report = {**env, "entry": entry.id, "tiny": args.tiny, "sizes": args.sizes, "sigma": args.sigma,
                      "steps": args.steps, "seed": args.seed, "family": [asdict(m) for m in family], "modes": MODES,
                      "complete": len(seconds) == len(family), "results": rows, "worst": worst(rows, args.sizes),
                      "fp32_floor": floor, "seconds_per_member": seconds}
            args.json.write_text(json.dumps(report, indent=1))
    print(f"\nWorst case over the family ({len(family)} members):\n\n"
          "| mode | size | min PSNR dB | (member) | max Δ levels | (member) | max > 2 levels |\n"
          "|---|---|---|---|---|---|---|")
    for w in worst(rows, args.sizes):
        print(f"| {w['mode']} | {w['size']} | {w['min_psnr_db']:.1f} | {w['min_psnr_member']} | {w['max_diff']} | "
              f"{w['max_diff_member']} | {w['max_over2']:.4%} |")
    if floor:
        print("\nExact bf16 against the fp32 network (if no better than a mode's figure, that member measures how "
              "much the network amplifies any rounding, not the mode):\n\n"
              "| member | size | PSNR dB | max Δ levels | > 2 levels |\n|---|---|---|---|---|")
        for f in floor:
            print(f"| {f['member']} | {f['size']} | {f['psnr_db']:.1f} | {f['max_diff']} | {f['over2']:.4%} |")
    print(f"\nseconds per member: {', '.join(f'{k} {v:.0f}' for k, v in seconds.items())}")


if __name__ == "__main__":
    main()
