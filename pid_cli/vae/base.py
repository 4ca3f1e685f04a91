"""What every image encoder family shares: the codec interface, its shipped configs and strict loading.

PiD consumes the *normalised* latent of a backbone (docs/model.md#latent-conventions), so a codec is "VAE + that
backbone's normalisation": `encode` goes image → latent handed to PiD, `decode` is the exact
inverse route (denormalise → VAE decoder) used for `--compare` and the colour fix.
"""

from __future__ import annotations

import copy
import json
import pickle
import zipfile
from abc import ABC, abstractmethod
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn


class VAEError(ValueError):
    """A VAE weight file that cannot be read, or that does not fit the codec's architecture."""


def load_config(kind: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The shipped config of `kind` (pid_cli/vae/configs/KIND.json), with `overrides` merged into
    its "model" block (tests shrink channel counts this way). Never fetched from the network."""
    try:
        text = resources.files("pid_cli.vae").joinpath("configs", f"{kind}.json").read_text()
    except FileNotFoundError as e:
        raise ValueError(f"no shipped VAE config for {kind!r}") from e
    config = json.loads(text)
    config["model"] = {**config["model"], **copy.deepcopy(overrides or {})}
    return config


def read_tensors(path: str | Path) -> dict[str, Tensor]:
    """All tensors of a `.safetensors` file or a tensor-only `.pth`/`.pt`/`.bin` pickle (never
    arbitrary objects: weight files must not run code)."""
    path = Path(path)
    if not path.is_file():
        raise VAEError(f"{path}: no such VAE weight file")
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as f:
                return {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (no __iter__)
        except (SafetensorError, OSError, ValueError) as e:
            raise VAEError(f"{path}: not a readable safetensors file ({e})") from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        raise VAEError(f"{path}: refused to load: the pickle holds objects other than tensors ({e})") from e
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise VAEError(f"{path}: not a readable PyTorch weight file (truncated or corrupt?): {e}") from e
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise VAEError(f"{path}: expected a dict of tensors")
    return dict(obj)


def load_strict(model: nn.Module, state: dict[str, Tensor], source: str,
                names: dict[str, str] | None = None) -> nn.Module:
    """Load `state` into `model` (built on the meta device) so that every tensor of the file lands and
    every tensor of the model is filled, with equal shapes; otherwise raise naming the file and keys.
    `names` maps converted keys back to the file's own names for the message."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    names = names or {}
    file_key = lambda k: f"{names[k]} (as {k})" if names.get(k, k) != k else k
    missing = sorted(expected.keys() - found.keys())
    unexpected = sorted(file_key(k) for k in found.keys() - expected.keys())
    misshaped = [f"{file_key(k)} file {list(found[k])} vs model {list(expected[k])}"
                 for k in sorted(expected.keys() & found.keys()) if expected[k] != found[k]]
    if missing or unexpected or misshaped:
        lines = [f"{source}: does not fit the {type(model).__name__} of this codec (strict loading)."]
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshaped)):
            if keys:
                lines.append(f"  {label} {len(keys)}: {_some(keys)}")
        raise VAEError("\n".join(lines))
    model.load_state_dict({k: v.contiguous() for k, v in state.items()}, strict=True, assign=True)
    return model


def _some(items: list[str], limit: int = 8) -> str:
    return ", ".join(items[:limit]) + (f", … ({len(items) - limit} more)" if len(items) > limit else "")


def track_renames(state: dict[str, Tensor], convert: Any, source: str, names: dict[str, str] | None = None,
                  **kwargs: Any) -> dict[str, Tensor]:
    """Run a diffusers key-conversion function `convert(state, **kwargs)` losslessly.

    diffusers' converters silently drop keys they do not know. We run them on meta-device stand-ins,
    follow each output tensor back to the input key it is (or is a view of), and copy the real
    tensor over reshaped; an input key that reaches no output is an error naming it. `names`, if
    given, receives new key → input key (for error messages).
    """
    dummies = {k: torch.empty(v.shape, device="meta") for k, v in state.items()}
    origin = {id(t): k for k, t in dummies.items()}
    out: dict[str, Tensor] = {}
    used: set[str] = set()
    for new_key, t in convert(dummies, **kwargs).items():
        if t is None:  # a key the converter expected but the file lacks: load_strict reports it
            continue
        src = origin.get(id(t)) or origin.get(id(t._base))
        if src is None:
            raise VAEError(f"{source}: key conversion produced {new_key!r} from no input tensor")
        out[new_key] = state[src].reshape(t.shape)
        used.add(src)
        if names is not None:
            names[new_key] = src
    if dropped := sorted(state.keys() - used):
        raise VAEError(f"{source}: {len(dropped)} tensors have no place in the model: {_some(dropped)}")
    return out


def default_dtype(device: torch.device | str) -> torch.dtype:
    """bf16 on accelerators (what upstream encodes with, docs/model.md#image-encoders), float32 on CPU."""
    return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16


class LatentCodec(ABC):
    """A backbone's image autoencoder plus its latent normalisation (docs/model.md#image-encoders).

    encode: images [B, 3, H, W] in [-1, 1], H and W multiples of `factor`
            → normalised PiD latent [B, channels, H/factor, W/factor] (posterior mean, never sampled)
    decode: normalised latent → images [B, 3, H, W] in [-1, 1], float32, clamped
    """

    kind: str
    channels: int  # channels of the latent handed to PiD
    factor: int  # image pixels per latent cell
    model: nn.Module

    def __init__(self, config: dict[str, Any], model: nn.Module, device: torch.device | str,
                 dtype: torch.dtype | None) -> None:
        self.config = config
        self.channels = config["latent"]["channels"]
        self.factor = config["latent"]["factor"]
        self.device = torch.device(device)
        self.dtype = dtype or default_dtype(self.device)
        # nn.Module.to: diffusers' override warns about fp32-only modules even when there are none.
        self.model = nn.Module.to(model, device=self.device, dtype=self.dtype).eval().requires_grad_(False)

    @abstractmethod
    def encode_raw(self, images: Tensor) -> Tensor:
        """Posterior mean of the VAE, before normalisation, in the codec dtype."""

    @abstractmethod
    def normalize(self, raw: Tensor) -> Tensor:
        """Raw posterior mean → PiD latent (the formulas of docs/model.md#latent-conventions)."""

    @abstractmethod
    def denormalize(self, latent: Tensor) -> Tensor:
        """PiD latent → what the VAE decoder takes (exact inverse of `normalize`)."""

    @abstractmethod
    def decode_raw(self, raw: Tensor) -> Tensor:
        """VAE decoder on a raw latent; unclamped, in the codec dtype."""

    @torch.inference_mode()
    def encode(self, images: Tensor) -> Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images [B, 3, H, W], got {list(images.shape)}")
        h, w = images.shape[-2:]
        if h % self.factor or w % self.factor:
            raise ValueError(f"{self.kind} encoder needs sides divisible by {self.factor}, got {w}x{h} "
                             "(crop with pid_cli.inputs.images.preprocess first)")
        return self.normalize(self.encode_raw(images.to(self.device, self.dtype)))

    @torch.inference_mode()
    def decode(self, latent: Tensor) -> Tensor:
        if latent.ndim != 4 or latent.shape[1] != self.channels:
            raise ValueError(f"expected a {self.kind} latent [B, {self.channels}, h, w], got {list(latent.shape)}")
        raw = self.denormalize(latent.to(self.device, self.dtype))
        return self.decode_raw(raw).float().clamp(-1, 1)
