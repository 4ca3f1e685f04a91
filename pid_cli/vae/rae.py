"""Representation encoders: DINOv2 for RAE (backbone dinov2) and SigLIP-2 for Scale-RAE (backbone siglip).

These two backbones have no VAE: their latent space is a frozen vision transformer's token grid. Both
encoders take one fixed square input, so any image (centre-cropped to 16-px multiples like every other
input) is resized to it, stretched if it is not square, and the latent grid never depends on the image:

    dinov2: [-1, 1] → [0, 1] → bicubic to 448² (float32, no antialias) → processor mean/std (ImageNet)
            → DINOv2-with-registers-base, its final LayerNorm without affine → drop CLS + 4 registers
            → [B, 768, 32, 32] → (z − mean)/sqrt(var + 1e-5) per (C, H, W), RAE's `stat.pt`, in float32
    siglip: [-1, 1] → [0, 1] → bicubic to 224² with antialias → processor mean/std (0.5)
            → SigLIP-2 So400M/14 vision tower up to (not through) its post-layernorm
            → LayerNorm over channels without affine (eps 1e-6, float32) → [B, 1152, 16, 16]

PiD calls the latent 1/16 of a virtual 512² (dinov2) or 256² (siglip) image, so its output is always
2048×2048. Precision follows upstream: the resize in float32, the encoder in the codec dtype (bf16 on a
GPU), the latent normalisation in float32; the mean/std pass through the codec dtype first, because
upstream's module cast rounds them too.

The encoders are transformers' own classes, built from the checkpoint folder's `config.json` and filled
strictly from its safetensors (a SigLIP file holds the text tower too: it is checked, not loaded). The
RAE / Scale-RAE *decoders* are not built (upstream loads them non-strictly from pickles), so these codecs
encode only: there is no VAE baseline for `--compare` / `--color-fix`.
"""

from __future__ import annotations

import json
import math
import pickle
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from pid_cli.vae.base import LatentCodec, VAEError, load_strict, read_tensors

RAE_KINDS = ("dinov2", "siglip")
VIRTUAL_FACTOR = 16  # image pixels per latent cell at the native 512² / 256², as PiD's config counts them
NO_DECODER = {
    "dinov2": "pid does not build the RAE ViT-XL decoder (upstream loads it non-strictly from a pickle), so "
              "dinov2 has no VAE baseline",
    "siglip": "pid does not build the Scale-RAE ViT-XL decoder (upstream loads it non-strictly from a pickle), "
              "so siglip has no VAE baseline",
}


@dataclass(frozen=True)
class _Recipe:
    """What upstream fixes per encoder (`dinov2_vae.py`, `scale_rae_vae.py`)."""

    name: str
    input_size: int  # the square every image is resized to
    antialias: bool  # of that bicubic resize
    eps: float  # of the latent normalisation (stats) or the affine-free LayerNorm


RECIPES = {
    "dinov2": _Recipe("DINOv2-with-registers", 448, antialias=False, eps=1e-5),
    "siglip": _Recipe("SigLIP", 224, antialias=True, eps=1e-6),
}


# ---- reading the checkpoint folder ----------------------------------------------------------------------


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise VAEError(f"{path}: no such file ({what})") from None
    except (OSError, ValueError) as e:
        raise VAEError(f"{path}: not readable JSON ({what}): {e}") from None
    if not isinstance(data, dict):
        raise VAEError(f"{path}: expected a JSON object ({what})")
    return data


def processor_stats(folder: Path) -> tuple[Tensor, Tensor]:
    """The image processor's per-channel (mean, std) from `preprocessor_config.json`, float32 [1, 3, 1, 1]."""
    path = folder / "preprocessor_config.json"
    data = _read_json(path, "the encoder's image processor")
    stats = []
    for key in ("image_mean", "image_std"):
        value = data.get(key)
        ok = isinstance(value, list) and len(value) == 3 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
        if not ok or (key == "image_std" and min(value) <= 0):
            raise VAEError(f"{path}: expected '{key}' as 3 finite numbers{' > 0' if key == 'image_std' else ''}, "
                           f"got {str(value)[:80]}")
        stats.append(torch.tensor(value, dtype=torch.float32).view(1, 3, 1, 1))
    return stats[0], stats[1]


def _weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = _read_json(index, "the weight index").get("weight_map")
        if not isinstance(shards, dict):
            raise VAEError(f"{index}: no 'weight_map'")
        return [folder / name for name in sorted(set(map(str, shards.values())))]
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return [folder / name]
    raise VAEError(f"{folder}: no encoder weights (model.safetensors, its index, or pytorch_model.bin)")


def encoder_tensors(folder: Path, wanted: Callable[[str], bool]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(every tensor of the folder's weights as a shape-only meta tensor, the real tensors whose names are
    `wanted`). Safetensors are read lazily, so unwanted tensors (SigLIP's text tower) never load; a `.bin`
    is read with weights_only."""
    shapes: dict[str, Tensor] = {}
    tensors: dict[str, Tensor] = {}
    for path in _weight_files(folder):
        if path.suffix != ".safetensors":
            state = read_tensors(path)
            shapes.update({k: torch.empty(v.shape, device="meta") for k, v in state.items()})
            tensors.update({k: v for k, v in state.items() if wanted(k)})
            continue
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 (no __iter__)
                    shapes[key] = torch.empty(f.get_slice(key).get_shape(), device="meta")
                    if wanted(key):
                        tensors[key] = f.get_tensor(key)
        except (SafetensorError, OSError, ValueError) as e:
            raise VAEError(f"{path}: not a readable safetensors file ({e})") from e
    return shapes, tensors


def _model_config(folder: Path, accepted: tuple[str, ...]) -> dict[str, Any]:
    config = _read_json(folder / "config.json", "the encoder's transformers config")
    if config.get("model_type") not in accepted:
        raise VAEError(f"{folder / 'config.json'}: model_type {config.get('model_type')!r}, expected "
                       f"{' or '.join(map(repr, accepted))}")
    return config


# Checkpoints on the Hub keep the attention names of transformers 4; transformers 5 renamed them (its loader
# maps them the same way). A file name the model knows as is stays as is.
_DINOV2_RENAMES = (("attention.attention.query.", "attention.q_proj."),
                   ("attention.attention.key.", "attention.k_proj."),
                   ("attention.attention.value.", "attention.v_proj."),
                   ("attention.output.dense.", "attention.o_proj."))


def _model_names(state: dict[str, Tensor], model: nn.Module, renames: tuple[tuple[str, str], ...]
                 ) -> tuple[dict[str, Tensor], dict[str, str]]:
    """`state` under the model's names, and model name → file name for the renamed keys (error messages)."""
    known = set(model.state_dict())
    out, names = {}, {}
    for key, value in state.items():
        new = key
        if key not in known:
            for old, replacement in renames:
                new = new.replace(old, replacement)
        out[new] = value
        if new != key:
            names[new] = key
    return out, names


def load_dinov2(folder: Path) -> nn.Module:
    """Dinov2WithRegistersModel filled strictly from `folder`, its final LayerNorm then without affine
    (RAE's "normalised" DINOv2: upstream drops that weight and bias)."""
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    config = Dinov2WithRegistersConfig.from_dict(_model_config(folder, ("dinov2_with_registers",)))
    _, state = encoder_tensors(folder, lambda key: True)
    with torch.device("meta"):
        model = Dinov2WithRegistersModel(config)
    state, names = _model_names(state, model, _DINOV2_RENAMES)
    load_strict(model, state, str(folder), names)
    model.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps, elementwise_affine=False)
    return model


def load_siglip(folder: Path) -> nn.Module:
    """SiglipVisionModel filled strictly from `folder`: a whole SigLIP checkpoint (`model_type` siglip, the
    file checked against the whole model, only `vision_model.*` loaded) or a vision-only one."""
    from transformers import SiglipConfig, SiglipModel, SiglipVisionConfig, SiglipVisionModel

    config = _model_config(folder, ("siglip", "siglip_vision_model"))
    whole = config["model_type"] == "siglip"
    vision = SiglipConfig.from_dict(config).vision_config if whole else SiglipVisionConfig.from_dict(config)
    shapes, state = encoder_tensors(folder, lambda key: not whole or key.startswith("vision_model."))
    if whole:
        with torch.device("meta"):
            load_strict(SiglipModel(SiglipConfig.from_dict(config)), shapes, str(folder))
    state = {key.removeprefix("vision_model."): value for key, value in state.items()}
    with torch.device("meta"):
        model = SiglipVisionModel(vision)
    load_strict(model, state, str(folder))
    # A non-persistent buffer, so still on the meta device: the patch index 0..N-1, as transformers makes it.
    embeddings = model.embeddings
    embeddings.register_buffer("position_ids", torch.arange(embeddings.num_positions).expand((1, -1)),
                               persistent=False)
    return model


def read_latent_stats(path: Path, shape: tuple[int, int, int], keys: tuple[str, str] = ("mean", "var")
                      ) -> tuple[Tensor, Tensor]:
    """RAE's per-position latent statistics (mean, var) as float32 [1, C, H, W]-broadcastable tensors.

    `stat.pt` is a dict of tensors ({"mean": [C, H, W], "var": [C, H, W]}), read with weights_only; each
    side of a statistic is the latent's or 1 (shared). Other entries, unused upstream too, are ignored."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except FileNotFoundError:
        raise VAEError(f"{path}: no such statistics file") from None
    except pickle.UnpicklingError as e:
        raise VAEError(f"{path}: refused to load: the pickle holds objects other than tensors ({e})") from e
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise VAEError(f"{path}: not a readable PyTorch statistics file (truncated or corrupt?): {e}") from e
    want = f"a dict with tensors {keys[0]!r} and {keys[1]!r} of shape {list(shape)}"
    if not isinstance(obj, dict) or not all(isinstance(obj.get(k), Tensor) for k in keys):
        found = sorted(map(str, obj)) if isinstance(obj, dict) else type(obj).__name__
        raise VAEError(f"{path}: expected {want}, found {found}")
    stats = []
    for key in keys:
        value = obj[key]
        fits = value.ndim == 3 and all(s in (1, n) for s, n in zip(value.shape, shape, strict=True))
        if not fits or not value.is_floating_point():
            raise VAEError(f"{path}: {key!r} is {value.dtype} {list(value.shape)}; expected {want} "
                           "(or 1 along a shared side)")
        value = value.float()
        if not torch.isfinite(value).all() or (key == keys[1] and (value < 0).any()):
            raise VAEError(f"{path}: {key!r} has {'negative or ' if key == keys[1] else ''}non-finite values")
        stats.append(value[None])  # [1, C, H, W]
    return stats[0], stats[1]


# ---- the codec --------------------------------------------------------------------------------------------


class RepresentationCodec(LatentCodec):
    """A frozen ViT's patch tokens on their fixed grid, normalised as the PiD decoder of `kind` takes them.

    encode: images [B, 3, H, W] in [-1, 1] (any size, sides multiples of 16) → latent [B, C, g, g]
    """

    def __init__(self, kind: str, model: nn.Module, pixel_mean: Tensor, pixel_std: Tensor, *, input_size: int,
                 patch_size: int, special_tokens: int = 0, latent_stats: tuple[Tensor, Tensor] | None = None,
                 eps: float, device: torch.device | str, dtype: torch.dtype | None = None) -> None:
        self.kind = kind
        self.input_size, self.grid = input_size, input_size // patch_size
        self.special_tokens = special_tokens  # DINOv2: CLS + registers, ahead of the patch tokens
        self.eps = float(eps)
        config = {"latent": {"channels": model.config.hidden_size, "factor": VIRTUAL_FACTOR}}
        super().__init__(config, model, device, dtype)
        # Upstream keeps mean/std as buffers of the encoder module, so its cast to bf16 rounds them (0.485 →
        # 0.484375); the arithmetic itself is in the dtype of the pixels.
        self.pixel_mean = pixel_mean.to(self.device, self.dtype)
        self.pixel_std = pixel_std.to(self.device, self.dtype)
        self.latent_stats = None if latent_stats is None else tuple(s.to(self.device) for s in latent_stats)

    def encode_raw(self, images: Tensor) -> Tensor:
        x = (images + 1) / 2  # [B, 3, H, W] in [0, 1]
        size = self.input_size
        if x.shape[-2:] != (size, size):  # squashed to the square, aspect ratio not kept (as upstream)
            x = F.interpolate(x.float(), size=(size, size), mode="bicubic", align_corners=False,
                              antialias=RECIPES[self.kind].antialias)
        x = (x - self.pixel_mean.to(x.dtype)) / self.pixel_std.to(x.dtype)
        tokens = self._patch_tokens(x.to(self.dtype))  # [B, g·g, C], row-major over the grid
        b, n, c = tokens.shape
        if n != self.grid * self.grid:
            raise VAEError(f"{self.kind} encoder gave {n} patch tokens, expected {self.grid}x{self.grid}")
        return tokens.transpose(1, 2).contiguous().view(b, c, self.grid, self.grid)  # token t → (t // g, t % g)

    def _patch_tokens(self, x: Tensor) -> Tensor:
        if self.kind == "dinov2":
            return self.model(pixel_values=x).last_hidden_state[:, self.special_tokens:]
        # SigLIP: the encoder's last hidden state, before the post-layernorm (upstream swaps it for an identity).
        return self.model.encoder(inputs_embeds=self.model.embeddings(x)).last_hidden_state

    def normalize(self, raw: Tensor) -> Tensor:
        if self.latent_stats is not None:
            mean, var = self.latent_stats
            return ((raw.float() - mean) / torch.sqrt(var + self.eps)).to(self.dtype)
        b, c, h, w = raw.shape  # LayerNorm of each token over its channels, no affine
        tokens = F.layer_norm(raw.flatten(2).transpose(1, 2).float(), (c,), eps=self.eps)  # [B, h·w, C]
        return tokens.transpose(1, 2).reshape(b, c, h, w).to(self.dtype)

    def denormalize(self, latent: Tensor) -> Tensor:
        raise VAEError(NO_DECODER[self.kind])

    def decode_raw(self, raw: Tensor) -> Tensor:
        raise VAEError(NO_DECODER[self.kind])

    def decode(self, latent: Tensor) -> Tensor:
        raise VAEError(NO_DECODER[self.kind])


def load_rae_codec(kind: str, encoder_dir: str | Path, stats_path: str | Path | None = None, *,
                   input_size: int | None = None, eps: float | None = None,
                   stat_keys: tuple[str, str] = ("mean", "var"), drop_tokens: int | None = None,
                   device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> RepresentationCodec:
    """The `kind` encoder from a transformers checkpoint folder (config.json, preprocessor_config.json,
    weights), plus for dinov2 the `stat.pt` statistics. `input_size`, `eps` default to upstream's;
    `drop_tokens`, if given, must equal what the config implies (1 + registers)."""
    if kind not in RECIPES:
        raise VAEError(f"no representation encoder {kind!r}; known: {', '.join(RECIPES)}")
    recipe, folder = RECIPES[kind], Path(encoder_dir)
    if not folder.is_dir():
        raise VAEError(f"{folder}: no such encoder folder ({recipe.name})")
    size = input_size or recipe.input_size
    if kind == "dinov2":
        if stats_path is None:
            raise VAEError("dinov2: the RAE latent statistics file (stat.pt) was not resolved")
        model = load_dinov2(folder)
        patch, special = model.config.patch_size, 1 + model.config.num_register_tokens
        if drop_tokens is not None and drop_tokens != special:
            raise VAEError(f"{folder}: the config has {special - 1} register tokens, so {special} special tokens "
                           f"precede the patches; the registry says drop_tokens {drop_tokens}")
    else:
        if stats_path is not None:
            raise VAEError("siglip: the Scale-RAE latent is layer-normalised; it takes no statistics file")
        model, special = load_siglip(folder), 0
        patch = model.config.patch_size
        if size != model.config.image_size:  # SigLIP's position table is not interpolated
            raise VAEError(f"{folder}: the SigLIP encoder takes {model.config.image_size}² images, not {size}²")
    if size % patch:
        raise VAEError(f"{recipe.name} input size {size} is not a multiple of its patch size {patch}")
    grid, channels = size // patch, model.config.hidden_size
    stats = None if stats_path is None else read_latent_stats(Path(stats_path), (channels, grid, grid), stat_keys)
    mean, std = processor_stats(folder)
    return RepresentationCodec(kind, model, mean, std, input_size=size, patch_size=patch, special_tokens=special,
                               latent_stats=stats, eps=recipe.eps if eps is None else eps, device=device,
                               dtype=dtype)


def rae_codec_for(kind: str, files: Mapping[str, Path], normalisation: Mapping[str, Any],
                  options: Mapping[str, Any], device: torch.device | str,
                  dtype: torch.dtype | None = None) -> RepresentationCodec:
    """`load_rae_codec` as a registry entry describes it: `files` maps its vae roles to paths (the `encoder`
    folder; for dinov2 the statistics under `normalisation.file_role`), `normalisation` (`latent.normalisation`)
    gives the eps and the statistics' key names, `options` (`vae.options`) may set `input_size`, `drop_tokens`."""
    expected = {"dinov2": "stats_file", "siglip": "layernorm"}
    if normalisation.get("kind") != expected.get(kind):
        raise VAEError(f"{kind}: latent.normalisation.kind is {normalisation.get('kind')!r}; the {kind} encoder "
                       f"normalises with {expected.get(kind)!r}")
    if "encoder" not in files:
        raise VAEError(f"{kind}: the registry entry names no vae 'encoder' folder")
    for key in ("input_size", "drop_tokens"):
        value = options.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise VAEError(f"{kind}: vae.options.{key} must be a whole number >= 1, got {value!r}")
    stats = files.get(str(normalisation.get("file_role", "stats"))) if kind == "dinov2" else None
    keys = (str(normalisation.get("mean_key", "mean")), str(normalisation.get("var_key", "var")))
    return load_rae_codec(kind, files["encoder"], stats, input_size=options.get("input_size"),
                          eps=normalisation.get("eps"), drop_tokens=options.get("drop_tokens"), stat_keys=keys,
                          device=device, dtype=dtype)
