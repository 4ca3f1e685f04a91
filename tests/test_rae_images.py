"""Image inputs for the RAE (dinov2) and Scale-RAE (siglip) backbones: encoder parity with upstream, end to end.

The encoders are tiny random transformers models saved as Hugging Face folders. The reference side re-derives
upstream's encode path (nv-tlabs/PiD `dinov2_vae.py`, `scale_rae_vae.py`) step by step in plain torch, loading
the same folder the way upstream does (AutoModel / AutoImageProcessor); pid's side is `pid_cli.vae.rae`.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import PARITY, tiny_config
from PIL import Image
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from pid_cli.cli import app
from pid_cli.inputs.image_plan import load_image, plan_image
from pid_cli.registry import load_registry
from pid_cli.text import save_prompt_embeds
from pid_cli.vae import VAEError, load_rae_codec, resolve_kind

HIDDEN = 16  # = the tiny PiD decoder's lq_latent_channels
IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """Move every parameter off its default init (LayerNorm weight 1 / bias 0 would hide a dropped affine)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))


def dinov2_folder(root, patch: int = 4, table: int = 24, seed: int = 0):
    """A tiny DINOv2-with-registers checkpoint folder; its position table (table/patch)² is interpolated."""
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    folder = root / "dinov2"
    model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(
        hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, patch_size=patch,
        image_size=table, num_register_tokens=4))
    _perturb(model, seed)
    model.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "BitImageProcessor", "image_mean": IMAGENET[0], "image_std": IMAGENET[1],
        "do_normalize": True, "do_rescale": True, "rescale_factor": 1 / 255, "resample": 3}))
    return folder


def siglip_folder(root, patch: int = 8, size: int = 32, seed: int = 1):
    """A tiny whole SigLIP checkpoint (vision and text towers, as google/siglip2-so400m-patch14-224 ships)."""
    from transformers import SiglipConfig, SiglipModel

    folder = root / "siglip"
    model = SiglipModel(SiglipConfig(
        vision_config={"hidden_size": HIDDEN, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "intermediate_size": 32, "image_size": size, "patch_size": patch},
        text_config={"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32,
                     "vocab_size": 64, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}))
    _perturb(model, seed)
    model.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "SiglipImageProcessor", "image_mean": [0.5] * 3, "image_std": [0.5] * 3,
        "do_normalize": True, "do_rescale": True, "rescale_factor": 1 / 255, "resample": 2}))
    return folder


def stats_file(path, grid: int, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    torch.save({"mean": torch.randn(HIDDEN, grid, grid, generator=g),
                "var": torch.rand(HIDDEN, grid, grid, generator=g) * 3 + 0.05}, path)
    return path


# ---- upstream's encode path, re-derived (float32, no autocast) -----------------------------------------------


def upstream_dinov2(folder, stat_path, images, size):
    """DINOv2VAE.encode: [0,1], bicubic resize unless already size², processor mean/std, the encoder with its
    final LayerNorm's affine removed, CLS + registers dropped, tokens → grid, (z − mean)/sqrt(var + 1e-5)."""
    from transformers import AutoImageProcessor, AutoModel

    encoder = AutoModel.from_pretrained(folder).eval()
    encoder.layernorm.elementwise_affine = False
    encoder.layernorm.weight = None
    encoder.layernorm.bias = None
    proc = AutoImageProcessor.from_pretrained(folder)
    mean = torch.tensor(proc.image_mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(proc.image_std, dtype=torch.float32).view(1, 3, 1, 1)
    x = (images + 1.0) / 2.0
    if images.shape[-2] != size or images.shape[-1] != size:
        x = F.interpolate(x.float(), size=(size, size), mode="bicubic", align_corners=False)
    x = (x - mean) / std
    with torch.no_grad():
        tokens = encoder(x).last_hidden_state[:, 1 + encoder.config.num_register_tokens:]
    b, n, c = tokens.shape
    side = math.isqrt(n)
    z = tokens.transpose(1, 2).contiguous().view(b, c, side, side)
    stats = torch.load(stat_path, map_location="cpu")
    return (z.float() - stats["mean"].unsqueeze(0)) / torch.sqrt(stats["var"].unsqueeze(0) + 1e-5)


def upstream_siglip(folder, images, size):
    """ScaleRAEVAE.encode: [0,1], antialiased bicubic resize unless already size², processor mean/std, the
    vision tower with post_layernorm replaced by an identity, affine-free LayerNorm (eps 1e-6), tokens → grid."""
    from transformers import AutoImageProcessor, AutoModel

    vision = AutoModel.from_pretrained(folder).vision_model.eval()
    vision.post_layernorm = torch.nn.Identity()
    proc = AutoImageProcessor.from_pretrained(folder)
    mean = torch.tensor(proc.image_mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(proc.image_std, dtype=torch.float32).view(1, 3, 1, 1)
    x = (images + 1.0) / 2.0
    if images.shape[-2] != size or images.shape[-1] != size:
        x = F.interpolate(x.float(), size=(size, size), mode="bicubic", align_corners=False, antialias=True)
    x = (x - mean) / std
    with torch.no_grad():
        tokens = vision(x).last_hidden_state
    tokens = F.layer_norm(tokens.float(), (vision.config.hidden_size,), weight=None, bias=None, eps=1e-6)
    b, n, c = tokens.shape
    side = math.isqrt(n)
    return tokens.transpose(1, 2).contiguous().view(b, c, side, side)


def _images(seed: int, *shape: int) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# Odd sizes (non-square, larger and smaller than the encoder input), and one already at it (no resize).
SIZES = [(1, 48, 80), (2, 112, 32), (1, 16, 16), (1, 32, 32)]


def test_dinov2_image_latents_equal_upstreams_encode(tmp_path):
    folder, stats = dinov2_folder(tmp_path), stats_file(tmp_path / "stat.pt", grid=4)
    codec = load_rae_codec("dinov2", folder, stats, input_size=16, drop_tokens=5, dtype=torch.float32)
    assert (codec.channels, codec.factor, codec.grid) == (HIDDEN, 16, 4)
    for seed, (b, h, w) in enumerate(SIZES):
        images = _images(seed, b, 3, h, w)
        ours = codec.encode(images)
        assert ours.shape == (b, HIDDEN, 4, 4) and ours.dtype == torch.float32
        torch.testing.assert_close(ours, upstream_dinov2(folder, stats, images, 16), rtol=1e-5, atol=1e-5)


def test_siglip_image_latents_equal_upstreams_encode(tmp_path):
    folder = siglip_folder(tmp_path)
    codec = load_rae_codec("siglip", folder, input_size=32, dtype=torch.float32)
    assert (codec.channels, codec.factor, codec.grid) == (HIDDEN, 16, 4)
    for seed, (b, h, w) in enumerate(SIZES):
        images = _images(seed, b, 3, h, w)
        ours = codec.encode(images)
        assert ours.shape == (b, HIDDEN, 4, 4)
        torch.testing.assert_close(ours, upstream_siglip(folder, images, 32), rtol=1e-5, atol=1e-5)
        assert ours.mean(1).abs().max() < 1e-5  # normalised over channels, per position


def test_bf16_codec_rounds_the_pixel_statistics_as_upstreams_module_cast(tmp_path):
    codec = load_rae_codec("dinov2", dinov2_folder(tmp_path), stats_file(tmp_path / "stat.pt", grid=4),
                           input_size=16, dtype=torch.bfloat16)
    assert codec.pixel_mean.dtype == torch.bfloat16 and codec.pixel_mean.flatten()[0].item() == 0.484375
    latent = codec.encode(_images(0, 1, 3, 48, 80))
    assert latent.dtype == torch.bfloat16 and latent.shape == (1, HIDDEN, 4, 4) and torch.isfinite(latent).all()


# ---- what is refused ---------------------------------------------------------------------------------------


def test_statistics_that_do_not_fit_are_refused_naming_the_file(tmp_path):
    folder = dinov2_folder(tmp_path)
    wrong = tmp_path / "wrong.pt"
    torch.save({"mean": torch.zeros(HIDDEN, 5, 5), "var": torch.ones(HIDDEN, 5, 5)}, wrong)
    with pytest.raises(VAEError, match=r"wrong\.pt: 'mean' is torch.float32 \[16, 5, 5\]; expected .*\[16, 4, 4\]"):
        load_rae_codec("dinov2", folder, wrong, input_size=16)
    no_var = tmp_path / "no_var.pt"
    torch.save({"mean": torch.zeros(HIDDEN, 4, 4), "std": torch.ones(HIDDEN, 4, 4)}, no_var)
    with pytest.raises(VAEError, match=r"no_var\.pt: expected a dict with tensors 'mean' and 'var'.*found \['mean', "
                                       r"'std'\]"):
        load_rae_codec("dinov2", folder, no_var, input_size=16)
    code = tmp_path / "code.pt"
    torch.save({"mean": _Opaque(), "var": torch.ones(HIDDEN, 4, 4)}, code)
    with pytest.raises(VAEError, match=r"code\.pt: refused to load: the pickle holds objects other than tensors"):
        load_rae_codec("dinov2", folder, code, input_size=16)
    with pytest.raises(VAEError, match=r"stat\.pt.*was not resolved"):
        load_rae_codec("dinov2", folder, None, input_size=16)


class _Opaque:
    """Anything a weights-only unpickler must not build."""


def test_encoder_weights_that_do_not_fit_are_refused_strictly(tmp_path):
    folder = dinov2_folder(tmp_path)
    state = load_file(folder / "model.safetensors")
    state["encoder.layer.9.extra.weight"] = torch.zeros(2)
    del state["embeddings.register_tokens"]
    save_file(state, folder / "model.safetensors")
    with pytest.raises(VAEError, match=r"dinov2: does not fit the Dinov2WithRegistersModel.*\n  missing 1: "
                                       r"embeddings.register_tokens\n  unexpected 1: encoder.layer.9.extra.weight"):
        load_rae_codec("dinov2", folder, stats_file(tmp_path / "stat.pt", grid=4), input_size=16)
    sig = siglip_folder(tmp_path)  # the text tower is checked too, though never loaded
    state = load_file(sig / "model.safetensors")
    state["text_model.head.weight"] = torch.zeros(3, 3)
    save_file(state, sig / "model.safetensors")
    with pytest.raises(VAEError, match=r"does not fit the SiglipModel.*\n  wrong shape 1: text_model.head.weight"):
        load_rae_codec("siglip", sig, input_size=32)
    config = json.loads((sig / "config.json").read_text())
    (sig / "config.json").write_text(json.dumps({**config, "model_type": "siglip2"}))
    with pytest.raises(VAEError, match=r"config.json: model_type 'siglip2', expected 'siglip' or "):
        load_rae_codec("siglip", sig, input_size=32)


def test_grid_and_token_options_must_match_the_encoder(tmp_path):
    folder = dinov2_folder(tmp_path)
    with pytest.raises(VAEError, match=r"4 register tokens, so 5 special tokens .* drop_tokens 1"):
        load_rae_codec("dinov2", folder, stats_file(tmp_path / "stat.pt", grid=4), input_size=16, drop_tokens=1)
    with pytest.raises(VAEError, match="input size 18 is not a multiple of its patch size 4"):
        load_rae_codec("dinov2", folder, stats_file(tmp_path / "s.pt", grid=4), input_size=18)
    with pytest.raises(VAEError, match="takes 32² images, not 224²"):
        load_rae_codec("siglip", siglip_folder(tmp_path))  # upstream's 224 against a 32-px position table


def test_baselines_are_refused_while_encoding_is_allowed():
    assert resolve_kind("rae-dinov2") == "dinov2" and resolve_kind("scale-rae-siglip2") == "siglip"
    for name in ("rae-dinov2", "scale-rae-siglip2"):
        with pytest.raises(VAEError, match="no VAE baseline"):
            resolve_kind(name, decoder=True)


# ---- pid decode end to end -----------------------------------------------------------------------------------


@pytest.fixture
def rae_setup(tmp_path):
    """A user registry with tiny dinov2 and siglip entries: the tiny v1_flux PiD net at 16 px per latent cell,
    encoders with a 2x2 grid (dinov2 8² input, siglip 16² input), prompt embeddings, an input folder."""
    net = {**tiny_config("v1_flux"), "latent_spatial_down_factor": 16}
    weights = str(PARITY / "v1_flux" / "model_fp32.safetensors")
    dino = dinov2_folder(tmp_path)
    stats = stats_file(tmp_path / "stat.pt", grid=2)
    sig = siglip_folder(tmp_path, patch=8, size=16)
    sizes = lambda side: {"buckets": [f"{side}x{side}"], "multiple_of": 16, "fixed": True}
    entries = [
        {"id": "tiny-dinov2", "base": "dinov2-2k", "variant": "tiny", "path": weights, "net_config": net,
         "latent": {"channels": HIDDEN, "vae_factor": 16, "fixed_grid": [2, 2],
                    "normalisation": {"kind": "stats_file", "eps": 1e-5, "file_role": "stats"}},
         "vae": {"format": "rae-dinov2", "files": {"stats": {"path": str(stats)}},
                 "repos": {"encoder": {"path": str(dino)}}, "options": {"input_size": 8, "drop_tokens": 5}},
         "output_sizes": sizes(128)},
        {"id": "tiny-siglip", "base": "siglip-2k", "variant": "tiny", "path": weights,
         "net_config": {**net, "sr_scale": 8},
         "latent": {"channels": HIDDEN, "vae_factor": 16, "fixed_grid": [2, 2],
                    "normalisation": {"kind": "layernorm", "eps": 1e-6}},
         "vae": {"format": "scale-rae-siglip2", "repos": {"encoder": {"path": str(sig)}},
                 "options": {"input_size": 16}},
         "output_sizes": sizes(256)},
    ]
    reg = tmp_path / "registry.yaml"
    reg.write_text(yaml.safe_dump({"version": 1, "entries": entries}))
    emb = tmp_path / "emb.safetensors"
    save_prompt_embeds(emb, [""], torch.randn(1, 12, 32, generator=torch.Generator().manual_seed(0)))
    inputs = tmp_path / "in"
    inputs.mkdir()
    return {"reg": reg, "emb": emb, "inputs": inputs, "out": tmp_path / "out", "dinov2": (dino, stats),
            "siglip": (sig, None)}


def _decode(s, backbone, *extra):
    args = ["decode", str(s["inputs"]), "--backbone", backbone, "--variant", "tiny", "--registry", str(s["reg"]),
            "--prompt-embeds", str(s["emb"]), "--out", str(s["out"]), "--quiet", "--json", "--batch-size", "4",
            *extra]
    result = CliRunner().invoke(app, args)
    records = {r["input"].rsplit("/", 1)[-1]: r for r in map(json.loads, filter(None, result.stdout.splitlines()))
               if isinstance(r, dict)}
    return result, records


def _gradient(h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([xx * 255 // w, yy * 255 // h, 255 - xx * 200 // w], -1).astype(np.uint8)


@pytest.mark.parametrize(("backbone", "side", "size"), [("dinov2", 128, 8), ("siglip", 256, 16)])
def test_images_decode_end_to_end_through_the_rae_encoder(rae_setup, backbone, side, size):
    """Images of several odd sizes share one batch (their latent grid is fixed) and decode to the entry's one
    output size; each equals decoding upstream's encoding of the same cropped image stored as a latent."""
    s, d = rae_setup, rae_setup["inputs"]
    Image.fromarray(_gradient(37, 50)).save(d / "wide.png")  # centre-cropped to 48x32, then squashed to size²
    Image.fromarray(_gradient(70, 33)).save(d / "tall.png")  # 32x64
    entry = load_registry([s["reg"]]).get(f"tiny-{backbone}")
    plan = plan_image(entry, d / "wide.png", 50, 37, None)
    image = load_image(entry, d / "wide.png", plan)[None]  # [1, 3, 32, 48], as pid crops it
    folder, stats = s[backbone]
    ref = upstream_dinov2(folder, stats, image, size) if backbone == "dinov2" else upstream_siglip(folder, image, size)
    save_file({"latent": ref[0].contiguous()}, d / "upstream.safetensors")

    result, records = _decode(s, backbone)
    assert result.exit_code == 0, result.output
    assert {r["status"] for r in records.values()} == {"ok"} and len(records) == 3
    for name in ("wide", "tall", "upstream"):
        assert Image.open(s["out"] / f"{name}.png").size == (side, side)
    ours, theirs = (np.asarray(Image.open(s["out"] / f"{n}.png")).astype(int) for n in ("wide", "upstream"))
    assert np.abs(ours - theirs).max() <= 1
    assert Image.open(s["out"] / "wide.png").info["pid:preprocess"] == (
        f"centre-crop 50x37 -> 48x32, resized by the {backbone} encoder to its fixed square input")


@pytest.mark.parametrize(("backbone", "flag"), [("dinov2", "--compare"), ("siglip", "--color-fix")])
def test_compare_and_color_fix_are_refused_up_front(rae_setup, backbone, flag):
    Image.fromarray(_gradient(32, 32)).save(rae_setup["inputs"] / "photo.png")
    result, _ = _decode(rae_setup, backbone, *([flag] if flag == "--compare" else [flag, "wavelet"]))
    assert result.exit_code == 2
    assert f"{flag} needs the {backbone} VAE decoder" in result.output and "no VAE baseline" in result.output
    assert not rae_setup["out"].exists() or not any(rae_setup["out"].iterdir())


def test_offline_without_the_encoder_names_it_and_the_download_command(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "in").mkdir()
    Image.fromarray(_gradient(32, 32)).save(tmp_path / "in" / "photo.png")
    emb = tmp_path / "emb.safetensors"
    save_prompt_embeds(emb, [""], torch.zeros(1, 300, 2304))
    result = CliRunner().invoke(app, ["decode", str(tmp_path / "in"), "--backbone", "dinov2", "--prompt-embeds",
                                      str(emb), "--out", str(tmp_path / "out")])
    assert result.exit_code != 0
    text = " ".join(result.output.split())
    assert "facebook/dinov2-with-registers-base" in text and "(vae encoder" in text
    assert "imagenet1k_512/stat.pt (vae stats" in text and "downloading is off" in text
    assert "pid download" in text and "--backbone dinov2" in text


def test_download_plan_and_list_cover_what_images_need():
    from pid_cli import hub

    reg = load_registry()
    for entry_id, roles in (("dinov2-2k", {"vae stats", "vae encoder"}), ("siglip-2k", {"vae encoder"})):
        items = hub.plan_downloads([reg.get(entry_id)], text_encoder=False, query_hub=False)
        assert {i.role for i in items} - {"decoder"} == roles  # no RAE decoders: pid builds none
    records = {r["id"]: r["image_inputs"] for r in hub.list_records(reg)}
    assert all(records.values())
    table = CliRunner().invoke(app, ["list"], env={"COLUMNS": "200"}).stdout
    assert "latents only" not in table and "dinov2" in table and "siglip" in table


def test_fit_crops_square_before_the_fixed_square_encoder(rae_setup):
    s = rae_setup
    Image.fromarray(_gradient(37, 50)).save(s["inputs"] / "wide.png")
    result, records = _decode(s, "dinov2", "--fit")
    assert result.exit_code == 0 and records["wide.png"]["status"] == "ok", result.output
    info = Image.open(s["out"] / "wide.png").info
    assert Image.open(s["out"] / "wide.png").size == (128, 128)
    assert info["pid:preprocess"] == "fit 50x37 -> 32x32 (output 128x128)"  # square, not stretched
