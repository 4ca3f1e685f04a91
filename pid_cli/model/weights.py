"""Reading released PiD weight files and loading them strictly.

Upstream loads with `strict=False`, so a checkpoint of the wrong family silently keeps
random weights and produces garbage images. We refuse any missing, unexpected or
mis-shaped tensor and say which checkpoint the file looks like instead.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

# Keys of training-only modules that may appear in a file but are never built here.
_IGNORED_PREFIXES = ("lq_proj.lq_aux_rgb_head.",)
# Whole sub-models of a training checkpoint that are not the decoder.
_FOREIGN_PREFIXES = ("net_ema.", "fake_score.", "discriminator.")
# Latent channel count → backbones whose latents have it (to name what a file is for).
_BACKBONES_BY_CHANNELS = {4: "sdxl", 16: "flux / zimage / sd3 / qwenimage", 32: "flux2 (v1.5, unpatchified)",
                          128: "flux2", 768: "dinov2", 1152: "siglip"}


class WeightsError(ValueError):
    """A weight file that cannot be read, or that does not fit the network."""


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Tensors of a `.pth` (tensor-only pickle, never arbitrary objects) or `.safetensors`
    file, with upstream's `net.` prefix removed and non-decoder sub-models dropped."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such weight file")
    raw = _read_safetensors(path) if path.suffix == ".safetensors" else _read_pickle(path)
    state: dict[str, Tensor] = {}
    for key, value in raw.items():
        if not isinstance(value, Tensor):
            raise WeightsError(f"{path}: entry {key!r} is a {type(value).__name__}, expected a tensor")
        if key.startswith(_FOREIGN_PREFIXES):
            continue
        state[key.removeprefix("net.")] = value
    if not state:
        raise WeightsError(f"{path}: holds no decoder tensors (expected keys like 'net.s_embedder.proj.weight')")
    return state


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except (SafetensorError, OSError, ValueError) as e:
        raise WeightsError(f"{path}: not a readable safetensors file ({e})") from e


def _read_pickle(path: Path) -> dict[str, Tensor]:
    try:
        # mmap spares a copy of multi-GB files; only the zip container supports it
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        raise WeightsError(f"{path}: refused to load: the pickle holds objects other than tensors "
                           f"(pid never executes code from weight files). Details: {e}") from e
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise WeightsError(f"{path}: not a readable PyTorch weight file (truncated or corrupt?): {e}") from e
    for wrapper in ("state_dict", "model"):  # common training-checkpoint containers
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict):
        raise WeightsError(f"{path}: holds a {type(obj).__name__}, expected a dict of tensors")
    return obj


def describe_state(shapes: dict[str, tuple[int, ...]]) -> str:
    """A human description of which PiD checkpoint family a set of tensor shapes belongs to."""
    conv0 = shapes.get("lq_proj.latent_proj.0.weight")
    if conv0 is None or "s_embedder.proj.weight" not in shapes:
        return "not a PiD decoder (no 's_embedder' / 'lq_proj.latent_proj.0' tensors)"
    gate = shapes.get("lq_proj.gate_modules.0.content_proj.weight", (0,))
    v15 = "lq_proj.pit_head.weight" in shapes
    family = "v1.5 (2kto4k-v1.5)" if v15 else "v1 (2k / 2kto4k-v1)"
    gate_kind = "per-token" if gate[0] == 1 else "per-token-per-dim"
    backbone = _BACKBONES_BY_CHANNELS.get(conv0[1], "an unknown backbone")
    return (f"a PiD {family} decoder for {conv0[1]}-channel latents ({backbone}), "
            f"LQ width {conv0[0]}, {gate_kind} gates, {len(shapes)} tensors")


def check_state(net: nn.Module, state: dict[str, Tensor], source: str) -> None:
    """Raise WeightsError unless `state` has exactly the network's keys and shapes."""
    expected = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items() if not k.startswith(_IGNORED_PREFIXES)}
    missing = sorted(expected.keys() - found.keys())
    unexpected = sorted(found.keys() - expected.keys())
    misshaped = sorted(k for k in expected.keys() & found.keys() if expected[k] != found[k])
    if not (missing or unexpected or misshaped):
        return
    lines = [f"{source}: does not fit this network (strict loading; nothing was loaded)."]
    if missing:
        lines.append(f"  missing {len(missing)}: {_some(missing)}")
    if unexpected:
        lines.append(f"  unexpected {len(unexpected)}: {_some(unexpected)}")
    if misshaped:
        lines.append(f"  wrong shape {len(misshaped)}: "
                     + _some([f"{k} file {list(found[k])} vs network {list(expected[k])}" for k in misshaped]))
    lines.append(f"  the file looks like {describe_state(found)}")
    lines.append(f"  the network expects {describe_state(expected)}")
    raise WeightsError("\n".join(lines))


def _some(items: list[str], limit: int = 8) -> str:
    return ", ".join(items[:limit]) + (f", … ({len(items) - limit} more)" if len(items) > limit else "")


def load_weights(net: nn.Module, path: str | Path) -> nn.Module:
    """Load a released weight file into `net`, strictly.

    A network built on the `meta` device adopts the file's tensors as they are (no copy;
    dtype from the file, usually bf16); otherwise values are copied into the existing
    parameters, keeping their dtype (bf16 → fp32 is exact).
    """
    state = read_state_dict(path)
    check_state(net, state, str(path))
    state = {k: v for k, v in state.items() if not k.startswith(_IGNORED_PREFIXES)}
    on_meta = any(p.is_meta for p in net.parameters())
    net.load_state_dict(state, strict=True, assign=on_meta)
    return net


def fill_random(net: nn.Module, std: float = 0.02, generator: torch.Generator | None = None) -> nn.Module:
    """Random but sane weights for timing without a checkpoint (speed does not depend on the values): norm weights
    1, the latent gates' scalar log_alpha 1.6, everything else N(0, std)."""
    for name, p in net.named_parameters():
        if "norm" in name:
            p.data.fill_(1.0)
        elif p.dim() == 0:
            p.data.fill_(1.6)
        else:
            p.data.normal_(0, std, generator=generator)
    return net
