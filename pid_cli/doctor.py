"""`pid doctor`: is this install able to decode, and how fast?

Checks the software stack, replays a bundled upstream parity fixture (a tiny random-weight v1.5
network in the released on-disk format, with upstream's forward output and 4-step trace) through
the real loader and sampler, lists the weights on disk, and on a GPU times a full-size decode and, where the
8-bit modes run, makes the 8-bit check `pid decode` makes (pipeline.Decoder) on that decode.
"""

from __future__ import annotations

import json
import time
from importlib.resources import files
from pathlib import Path

import torch

from pid_cli import __version__
from pid_cli.model.layers import HAS_TRITON

FIXTURE = Path(str(files("pid_cli") / "data" / "parity"))


def check_parity(device: torch.device) -> tuple[bool, str]:
    """Upstream's golden tensors through `load_weights` + `PiDNet` + `sample`, in float32."""
    from safetensors.torch import load_file

    from pid_cli.model import PiDConfig, PiDNet, load_weights
    from pid_cli.sampler import sample

    cfg = json.loads((FIXTURE / "config.json").read_text())["tiny_net_config"]
    fx = {k: v.float().to(device) for k, v in load_file(FIXTURE / "fixture.safetensors").items()}
    net = load_weights(PiDNet(PiDConfig.from_dict(cfg)).eval(), FIXTURE / "model_ema_bf16.pth").to(device)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.inference_mode():
            out = net(fx["x"], fx["t"], fx["y"], fx["lq_latent"], fx["degrade_sigma"])
            chain = sample(net, fx["chain_x_0"], fx["chain_y"], fx["chain_lq_latent"], fx["chain_degrade_sigma"],
                           eps=[fx[f"chain_eps_{i}"] for i in (1, 2, 3)])
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    rel = ((out - fx["out"]).norm() / fx["out"].norm()).item()
    chain_err = (chain - fx["chain_sample"]).abs().max().item()
    ok = rel <= 1e-5 and chain_err <= 2e-4
    return ok, f"forward relative L2 {rel:.1e} (bound 1e-5), 4-step sample max |Δ| {chain_err:.1e} (bound 2e-4)"


def full_size_network(entry, device: torch.device):
    """The entry's network in bf16 on `device`: its weights if they are on disk, else random ones (speed does not
    depend on the values; the 8-bit check's error does). Returns (network, what its weights are)."""
    from pid_cli import hub
    from pid_cli.model import PiDConfig, PiDNet
    from pid_cli.model.weights import fill_random
    from pid_cli.pipeline import load_network

    try:
        weights = hub.ensure_files(entry, vae=False, text_encoder=False, download=False).weights
        return load_network(entry.net_config, str(weights), device, dtype="bfloat16"), f"{entry.id}'s weights"
    except Exception:  # not downloaded (or unreadable: the decode itself reports that)
        pass
    with torch.device("meta"):
        net = PiDNet(PiDConfig.from_dict(entry.net_config))
    net = fill_random(net.to_empty(device=device).eval().requires_grad_(False))
    return net.to_inference_dtype(torch.bfloat16), "random weights"


def decode_once(net, entry, device: torch.device, size: int) -> tuple[torch.Tensor, float]:
    """One seeded decode at size² (fixed text and latent): (image [1, 3, size, size], seconds)."""
    from pid_cli.model.layers import fast_attention
    from pid_cli.sampler import draw_noise, sample

    scale = entry.latent.vae_factor * entry.sr_scale
    inputs = torch.Generator(device=device).manual_seed(1)
    y = torch.randn(1, 300, entry.net_config["txt_embed_dim"], device=device, generator=inputs)
    lq = torch.randn(1, entry.latent.channels, size // scale, size // scale, device=device, generator=inputs)
    gen = torch.Generator(device=device).manual_seed(0)
    noise = draw_noise((1, 3, size, size), gen, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda device: None
    sync(device)
    start = time.perf_counter()
    with torch.inference_mode(), fast_attention():
        image = sample(net, noise, y, lq, torch.zeros(1, device=device), generator=gen)
    sync(device)
    return image, time.perf_counter() - start


def decode_checks(entry, device: torch.device, eight_bit: bool, size: int = 2048,
                  threshold_db: float | None = None) -> list[tuple[str, bool | None, str]]:
    """Rows: seconds per full-size decode (bf16, eager: the compiled path is faster) and, with `eight_bit`, the
    8-bit check of `pid decode`: the same decode with `--attention 8bit --matmul fp8`, against the exact one."""
    from pid_cli.model import inference
    from pid_cli.pipeline import CHECK_PSNR_DB, compare_levels

    net, weights = full_size_network(entry, device)
    net = inference.deploy(net)
    times = [decode_once(net, entry, device, size) for _ in range(3)]
    best = min(t for _, t in times[1:])
    rows = [("full-size decode", None, f"{entry.id} at {size}², {weights}: {best:.2f} s/image eager "
                                       f"({1 / best:.2f} images/s); `pid decode` compiles the blocks and runs faster")]
    if eight_bit:
        fast = inference.deploy(inference.twin(net), attention="8bit", matmul="fp8")
        decode_once(fast, entry, device, size)  # builds the kernels
        check = compare_levels(decode_once(fast, entry, device, size)[0][0], times[0][0][0],
                               threshold_db or CHECK_PSNR_DB)
        rows.append(("8-bit check", check.passed, f"--attention 8bit --matmul fp8 at {size}², {weights}: "
                                                  f"{check.describe()}"))
    return rows


def _triton_status() -> str:
    if not HAS_TRITON:
        return "not installed: GPU decodes run eager on the torch ops (slower; pip install triton)"
    import triton

    return f"{triton.__version__}: runs our GPU kernels and compiled decodes"


def _eight_bit_status(device: torch.device) -> tuple[str, str]:
    """(--attention 8bit, --matmul fp8) availability on this GPU: both need 8-bit tensor cores."""
    from pid_cli.model import linear8

    capability = torch.cuda.get_device_capability(device)
    arch = f"sm_{capability[0]}{capability[1]}"
    if capability < (8, 9):
        missing = f"not available: needs 8-bit tensor cores (sm_89 or newer), this GPU is {arch}"
        return missing, missing
    attention = (f"available as --attention 8bit ({arch})" if HAS_TRITON else
                 "not available: Triton is not installed")
    try:
        linear8.probe(device)
        matmul = f"available as --matmul fp8 ({arch})"
    except ValueError as e:
        matmul = f"not available: {e}"
    return attention, matmul


def run(time_gpu: bool = True) -> list[tuple[str, bool | None, str]]:
    """(check, passed (None: information), detail) rows."""
    rows: list[tuple[str, bool | None, str]] = [("pid", None, __version__), ("torch", None, torch.__version__)]
    cuda = torch.cuda.is_available()
    device = torch.device("cuda:0" if cuda else "cpu")
    if cuda:
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        rows.append(("GPUs", None, ", ".join(names)))
        rows.append(("bf16", torch.cuda.is_bf16_supported(), "supported" if torch.cuda.is_bf16_supported()
                     else "not supported: use --dtype fp32"))
        rows.append(("cuDNN attention", torch.backends.cuda.cudnn_sdp_enabled(),
                     "enabled (preferred)" if torch.backends.cuda.cudnn_sdp_enabled() else
                     "disabled: flash/efficient SDPA will be used (slower)"))
        rows.append(("Triton", HAS_TRITON, _triton_status()))
        attention8, matmul8 = _eight_bit_status(device)
        rows.append(("8-bit attention", None, attention8))
        rows.append(("FP8 matmuls", None, matmul8))
    else:
        rows.append(("GPUs", None, "none: decoding runs on the CPU in fp32 (slow at 2K/4K)"))
    try:
        ok, detail = check_parity(device)
    except Exception as e:  # the point of doctor is to report, not to crash
        ok, detail = False, f"{type(e).__name__}: {e}"
    rows.append((f"upstream parity ({device.type})", ok, detail))
    try:
        from pid_cli import hub
        from pid_cli.registry import load_registry

        reg = load_registry()
        records = hub.list_records(reg, hub.Settings.from_env(None, offline=True))
        on_disk = [f"{r['backbone']} {r['variant']}" for r in records if r["on_disk"]["decoder"]]
        rows.append(("weights on disk", None, ", ".join(on_disk) or "none yet (`pid download --variant 2kto4k`)"))
    except Exception as e:
        reg = None
        rows.append(("registry", False, f"{type(e).__name__}: {e}"))
    if cuda and time_gpu and reg is not None:
        eight_bit = attention8.startswith("available") and matmul8.startswith("available")
        try:
            rows.extend(decode_checks(reg.resolve("flux2", "2kto4k"), device, eight_bit))
        except Exception as e:
            rows.append(("full-size decode", False, f"{type(e).__name__}: {e}"))
    return rows
