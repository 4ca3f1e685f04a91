"""Image encoders: strict, lossless key conversion and the encode → normalise formulas (docs/model.md#image-encoders).

Every VAE here is a tiny random network built from the shipped config with shrunk widths; the
BFL-layout files are written with an inverse mapping written independently of the loader (from
the renaming rules of upstream's SD3 loader), so a round trip checks the loader against those rules, not itself.
"""

from __future__ import annotations

import datetime
import re

import pytest
import torch
from diffusers import AutoencoderKLQwenImage
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers
from safetensors.torch import save_file

from pid_cli.vae import (
    FORMATS,
    KINDS,
    VAEError,
    build_codec,
    flux2_bn_stats,
    load_codec,
    load_config,
    normalize_flux2,
    patchify_flux2,
    resolve_kind,
    unpatchify_flux2,
)
from pid_cli.vae.qwenimage import QwenImageVAE2d

TINY_KL = {"block_out_channels": [8, 16, 16, 16], "norm_num_groups": 4}
TINY_QWEN = {"dim": 4}
TINY = {"flux1": TINY_KL, "flux2": TINY_KL, "sd3": TINY_KL, "sdxl": TINY_KL, "qwenimage": TINY_QWEN}
# Spec §7.3, Qwen-Image per-channel statistics.
QWEN_MEAN = [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508, 0.4134, -0.0715, 0.5517,
             -0.3632, -0.1922, -0.9497, 0.2503, -0.2921]
QWEN_STD = [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743, 3.2687, 2.1526, 2.8652, 1.5579,
            1.6382, 1.1253, 2.8251, 1.9160]
AFFINE = {"flux1": (0.1159, 0.3611), "sd3": (0.0609, 1.5305), "sdxl": (0.0, 0.13025)}  # (shift, scale)


def random_codec(kind: str, seed: int = 0):
    torch.manual_seed(seed)
    codec = build_codec(kind, overrides=TINY[kind])
    if kind == "flux2":  # non-trivial BatchNorm statistics
        codec.model.bn.running_mean.copy_(torch.randn(128) * 0.3)
        codec.model.bn.running_var.copy_(torch.rand(128) + 0.5)
    return codec


def images(b: int = 1, h: int = 32, w: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def state_of(codec) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in codec.model.state_dict().items()}


def to_bfl(state: dict[str, torch.Tensor], flux2: bool = False, levels: int = 4) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL(-Flux2) names → BFL/LDM names (upstream's SD3 renaming, inverted)."""
    out = {}
    for key, value in state.items():
        k = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", key)
        k = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", k)
        k = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets\.", lambda m: f"decoder.up.{levels - 1 - int(m[1])}.block.", k)
        k = re.sub(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
                   lambda m: f"decoder.up.{levels - 1 - int(m[1])}.upsample.", k)
        k = k.replace("mid_block.resnets.0.", "mid.block_1.").replace("mid_block.resnets.1.", "mid.block_2.")
        k = k.replace("mid_block.attentions.0.", "mid.attn_1.")
        for old, new in (("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."),
                         ("to_out.0.", "proj_out.")):
            if ".attn_1." in k:
                k = k.replace(f".attn_1.{old}", f".attn_1.{new}")
        k = k.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
        if flux2:
            k = re.sub(r"^quant_conv\.", "encoder.quant_conv.", k)
            k = re.sub(r"^post_quant_conv\.", "decoder.post_quant_conv.", k)
        if ".attn_1." in k and k.endswith("weight") and value.ndim == 2:
            value = value[:, :, None, None]  # linear → 1×1 conv
        out[k] = value
    return out


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ---- registry of kinds ----------------------------------------------------------------------------------


def test_kinds_and_registry_formats():
    assert set(FORMATS.values()) == set(KINDS)
    assert resolve_kind("bfl-flux1-ae") == "flux1" and resolve_kind("qwenimage-vae-2d") == "qwenimage"
    assert resolve_kind("rae-dinov2") == "dinov2" and resolve_kind("scale-rae-siglip2") == "siglip"
    for name in ("rae-dinov2", "scale-rae-siglip2", "dinov2", "siglip"):  # encoders only: no VAE baseline
        with pytest.raises(VAEError, match="no VAE baseline"):
            resolve_kind(name, decoder=True)
    with pytest.raises(VAEError, match="unknown VAE kind"):
        resolve_kind("vqgan")


def test_shipped_configs_match_spec():
    for kind, (shift, scale) in AFFINE.items():
        norm = load_config(kind)["latent"]["normalisation"]
        assert (norm["shift"], norm["scale"]) == (shift, scale)
    assert load_config("sdxl")["model"]["use_quant_conv"] and not load_config("flux1")["model"]["use_quant_conv"]
    assert load_config("flux2")["latent"] == {"channels": 128, "factor": 16,
                                              "normalisation": {"kind": "batchnorm", "eps": 1e-4, "patch": 2}}
    qwen = load_config("qwenimage")["latent"]["normalisation"]
    assert (qwen["mean"], qwen["std"]) == (QWEN_MEAN, QWEN_STD)
    diffusers_defaults = AutoencoderKLQwenImage(base_dim=4).config  # same statistics as diffusers ships
    assert list(diffusers_defaults.latents_mean) == QWEN_MEAN and list(diffusers_defaults.latents_std) == QWEN_STD


# ---- key conversion ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["flux1", "flux2", "sdxl"])
def test_bfl_layout_round_trip_is_lossless(kind, tmp_path):
    codec = random_codec(kind)
    state = state_of(codec)
    bfl = to_bfl(state, flux2=kind == "flux2")
    # Spot-check the BFL names the loader must understand.
    assert "encoder.down.0.block.0.norm1.weight" in bfl and "decoder.up.3.block.2.conv2.weight" in bfl
    assert "encoder.down.1.block.0.nin_shortcut.weight" in bfl and "decoder.up.0.upsample.conv.weight" not in bfl
    assert bfl["encoder.mid.attn_1.q.weight"].ndim == 4 and "decoder.norm_out.weight" in bfl
    if kind == "flux2":
        assert {"encoder.quant_conv.weight", "decoder.post_quant_conv.weight", "bn.running_mean"} <= bfl.keys()
    path = tmp_path / "ae.safetensors"
    save_file({k: v.contiguous() for k, v in bfl.items()}, path)
    loaded = load_codec(kind, path, overrides=TINY[kind])
    assert_same_state(state_of(loaded), state)
    x = images()
    assert torch.equal(loaded.encode(x), codec.encode(x))


@pytest.mark.parametrize("kind", ["sd3", "sdxl"])
def test_diffusers_layout_loads_as_is(kind, tmp_path):
    codec = random_codec(kind)
    state = state_of(codec)
    save_file(state, tmp_path / "vae.safetensors")
    assert_same_state(state_of(load_codec(kind, tmp_path / "vae.safetensors", overrides=TINY[kind])), state)
    # Pre-0.14 diffusers attention names, as .pth.
    legacy = {k.replace(".to_q.", ".query.").replace(".to_k.", ".key.").replace(".to_v.", ".value.")
              .replace(".to_out.0.", ".proj_attn."): v for k, v in state.items()}
    torch.save(legacy, tmp_path / "legacy.pth")
    assert_same_state(state_of(load_codec(kind, tmp_path / "legacy.pth", overrides=TINY[kind])), state)


def test_strict_loading_names_file_and_keys(tmp_path):
    state = to_bfl(state_of(random_codec("flux1")))
    bad = tmp_path / "extra.safetensors"
    save_file({**state, "encoder.down.0.block.0.extra.weight": torch.zeros(1)}, bad)
    with pytest.raises(VAEError, match=r"(?s)extra\.safetensors.*encoder\.down\.0\.block\.0\.extra\.weight"):
        load_codec("flux1", bad, overrides=TINY_KL)
    missing = dict(state)
    del missing["decoder.conv_in.bias"]
    save_file(missing, tmp_path / "missing.safetensors")
    with pytest.raises(VAEError, match=r"missing 1: decoder\.conv_in\.bias"):
        load_codec("flux1", tmp_path / "missing.safetensors", overrides=TINY_KL)
    # A file for a wider VAE: shapes differ.
    with pytest.raises(VAEError, match="wrong shape"):
        load_codec("flux1", tmp_path / "missing.safetensors")
    # Diffusers layout with a stray key.
    sd3 = state_of(random_codec("sd3"))
    save_file({**sd3, "encoder.stray": torch.zeros(2)}, tmp_path / "stray.safetensors")
    with pytest.raises(VAEError, match=r"(?s)stray\.safetensors.*unexpected 1: encoder\.stray"):
        load_codec("sd3", tmp_path / "stray.safetensors", overrides=TINY_KL)


def test_unreadable_weight_files(tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(VAEError, match=r"junk\.safetensors"):
        load_codec("flux1", tmp_path / "junk.safetensors")
    torch.save({"w": torch.zeros(1), "when": datetime.date(2026, 1, 1)}, tmp_path / "objects.pth")
    with pytest.raises(VAEError, match=r"objects\.pth: refused"):
        load_codec("flux1", tmp_path / "objects.pth")
    with pytest.raises(VAEError, match="no such VAE weight file"):
        load_codec("flux1", tmp_path / "absent.safetensors")


# ---- encode → normalise (docs/model.md#latent-conventions) -----------------------------------------------------------


@pytest.mark.parametrize("kind", ["flux1", "sd3", "sdxl"])
def test_affine_latents_follow_spec(kind):
    codec = random_codec(kind)
    vae, x = codec.model, images(2)
    with torch.no_grad():
        moments = vae.encoder(x)
        if vae.quant_conv is not None:  # SDXL only
            moments = vae.quant_conv(moments)
    mu = moments[:, : codec.channels]  # posterior mean: first C channels, never sampled
    shift, scale = AFFINE[kind]
    latent = codec.encode(x)
    assert latent.shape == (2, {"sdxl": 4}.get(kind, 16), 4, 4)
    torch.testing.assert_close(latent, scale * (mu - shift), rtol=0, atol=1e-6)
    torch.testing.assert_close(codec.encode(x), latent, rtol=0, atol=0)  # deterministic
    with torch.no_grad():
        expected = vae.decode(latent / scale + shift).sample.clamp(-1, 1)
    torch.testing.assert_close(codec.decode(latent), expected, rtol=0, atol=1e-6)


def test_affine_normalisation_runs_in_codec_dtype():
    codec = random_codec("flux1")
    codec16 = build_codec("flux1", state_of(codec), overrides=TINY_KL, dtype=torch.bfloat16)
    raw = codec16.encode_raw(images().bfloat16())
    assert raw.dtype == torch.bfloat16
    assert torch.equal(codec16.normalize(raw), 0.3611 * (raw - 0.1159))  # bf16 arithmetic, like upstream


def test_flux2_latent_follows_spec(tmp_path):
    codec = random_codec("flux2")
    vae, x = codec.model, images(1, 32, 64)
    with torch.no_grad():
        mu = vae.quant_conv(vae.encoder(x))[:, :32]  # [1, 32, 4, 8]
    mean, var = vae.bn.running_mean, vae.bn.running_var
    expected = torch.empty(1, 128, 2, 4)
    for c in range(32):
        for i in range(2):
            for j in range(2):
                m, v = mean[c * 4 + i * 2 + j], var[c * 4 + i * 2 + j]
                expected[0, c * 4 + i * 2 + j] = (mu[0, c, i::2, j::2] - m) / torch.sqrt(v + 1e-4)
    latent = codec.encode(x)
    torch.testing.assert_close(latent, expected, rtol=0, atol=2e-6)
    # The public helpers the latent side uses give the same numbers.
    torch.testing.assert_close(normalize_flux2(patchify_flux2(mu), mean, var), latent, rtol=0, atol=2e-6)
    assert torch.equal(unpatchify_flux2(patchify_flux2(mu)), mu)
    # Statistics straight from a BFL file, and a round trip through the decoder path.
    save_file({k: v.contiguous() for k, v in to_bfl(state_of(codec), flux2=True).items()}, tmp_path / "ae.safetensors")
    m2, v2 = flux2_bn_stats(tmp_path / "ae.safetensors")
    assert m2.shape == (128,) and torch.equal(m2, mean) and torch.equal(v2, var)
    torch.testing.assert_close(codec.denormalize(latent), mu, rtol=0, atol=1e-5)
    save_file(to_bfl(state_of(random_codec("flux1"))), tmp_path / "flux1_ae.safetensors")
    with pytest.raises(VAEError, match=r"flux1_ae\.safetensors: no bn\.running_mean"):
        flux2_bn_stats(tmp_path / "flux1_ae.safetensors")


def test_flux2_bn_counter_may_be_absent(tmp_path):
    """BFL's FLUX.2 file may lack BatchNorm's step counter, which no decode uses: it loads to the same codec."""
    bfl = to_bfl(state_of(random_codec("flux2")), flux2=True)
    save_file({k: v.contiguous() for k, v in bfl.items()}, tmp_path / "with.safetensors")
    del bfl["bn.num_batches_tracked"]
    save_file({k: v.contiguous() for k, v in bfl.items()}, tmp_path / "without.safetensors")
    without = load_codec("flux2", tmp_path / "without.safetensors", overrides=TINY_KL)
    with_counter = load_codec("flux2", tmp_path / "with.safetensors", overrides=TINY_KL)
    assert torch.equal(without.model.bn.running_mean, bfl["bn.running_mean"])
    with torch.no_grad():
        assert torch.equal(without.encode(images()), with_counter.encode(images()))


def test_qwenimage_latent_follows_spec():
    codec = random_codec("qwenimage")
    x = images()
    with torch.no_grad():
        mu = codec.model.conv1(codec.model.encoder(x))[:, :16]
    mean, std = torch.tensor(QWEN_MEAN).view(1, -1, 1, 1), torch.tensor(QWEN_STD).view(1, -1, 1, 1)
    latent = codec.encode(x)
    assert latent.shape == (1, 16, 4, 4)
    torch.testing.assert_close(latent, (mu - mean) * (1 / std), rtol=0, atol=1e-6)
    with torch.no_grad():
        expected = codec.model.decoder(codec.model.conv2(latent * std + mean)).clamp(-1, 1)
    torch.testing.assert_close(codec.decode(latent), expected, rtol=0, atol=1e-4)  # 1/(1/std) vs std round-off


def test_encode_checks_sizes():
    codec = random_codec("flux2")
    with pytest.raises(ValueError, match="divisible by 16"):
        codec.encode(images(1, 40, 48))
    with pytest.raises(ValueError, match=r"\[B, 128, h, w\]"):
        codec.decode(torch.zeros(1, 32, 2, 2))


# ---- Qwen-Image: the 2-D network equals diffusers' 3-D causal VAE on one frame ----------------------


def inflate_to_wan3d(state: dict[str, torch.Tensor], gen: torch.Generator) -> dict[str, torch.Tensor]:
    """2-D Wan tensors → a 3-D causal Wan file: each 3×3 / 1×1 conv kernel goes to the last temporal tap
    (the other taps get random values: causal zero padding must make them irrelevant), residual/head
    gammas gain a time axis, and random `time_conv` weights are added to the temporal resamplers
    (encoder downsamples 5 and 8, decoder upsamples 3 and 7 for temperal_downsample [F, T, T])."""
    out = {}
    for key, value in state.items():
        stays_2d = ".resample." in key or ".middle.1." in key  # nn.Conv2d / image RMS norm in the 3-D model too
        if key.endswith("weight") and value.ndim == 4 and not stays_2d:
            w = torch.randn(*value.shape[:2], value.shape[-1], *value.shape[2:], generator=gen)
            w[:, :, -1] = value
            value = w
        elif key.endswith("gamma") and not stays_2d:
            value = value[..., None]
        out[key] = value
        m = re.fullmatch(r"(encoder\.downsamples|decoder\.upsamples)\.(\d+)\.resample\.1\.weight", key)
        if m and int(m[2]) in ((5, 8) if m[1].startswith("encoder") else (3, 7)):
            dim = value.shape[1]
            out_c = dim if m[1].startswith("encoder") else 2 * dim
            prefix = key.removesuffix(".resample.1.weight")
            out[f"{prefix}.time_conv.weight"] = torch.randn(out_c, dim, 3, 1, 1, generator=gen)
            out[f"{prefix}.time_conv.bias"] = torch.randn(out_c, generator=gen)
    return out


def test_qwenimage_2d_equals_diffusers_3d_single_frame(tmp_path):
    gen = torch.Generator().manual_seed(3)
    codec = random_codec("qwenimage")
    for p in codec.model.parameters():  # random gammas and attention projection too
        p.data.copy_(torch.randn(p.shape, generator=gen) * (0.3 if p.ndim > 1 else 1))
    state2d = state_of(codec)
    wan3d = inflate_to_wan3d(state2d, gen)
    model3d = AutoencoderKLQwenImage(base_dim=4, z_dim=16).eval()
    diffusers_state = convert_wan_vae_to_diffusers(dict(wan3d))
    model3d.load_state_dict(diffusers_state, strict=True)  # every 3-D tensor placed, none left over

    x = images()
    with torch.no_grad():
        mu3d = model3d.encode(x[:, :, None]).latent_dist.mean[:, :, 0]
        rec3d = model3d.decode(mu3d[:, :, None]).sample[:, :, 0]
    torch.testing.assert_close(codec.encode_raw(x), mu3d, rtol=0, atol=1e-5)
    torch.testing.assert_close(codec.decode_raw(mu3d).clamp(-1, 1), rec3d, rtol=0, atol=1e-5)

    # The shipped 2-D layout, a 3-D Wan file and a diffusers file all load to the same 2-D weights.
    torch.save(state2d, tmp_path / "QwenImage_VAE_2d.pth")
    save_file({k: v.contiguous() for k, v in wan3d.items()}, tmp_path / "wan3d.safetensors")
    save_file({k: v.contiguous() for k, v in model3d.state_dict().items()}, tmp_path / "diffusers.safetensors")
    for name in ("QwenImage_VAE_2d.pth", "wan3d.safetensors", "diffusers.safetensors"):
        assert_same_state(state_of(load_codec("qwenimage", tmp_path / name, overrides=TINY_QWEN)), state2d)


def test_qwenimage_module_names_match_the_2d_file():
    keys = QwenImageVAE2d(dim=4).state_dict().keys()
    for k in ("encoder.conv1.weight", "encoder.downsamples.0.residual.0.gamma", "encoder.downsamples.0.residual.6.bias",
              "encoder.downsamples.2.resample.1.weight", "encoder.downsamples.3.shortcut.weight",
              "encoder.middle.1.to_qkv.weight", "encoder.head.2.weight", "conv1.weight", "conv2.bias",
              "decoder.upsamples.4.shortcut.weight", "decoder.upsamples.3.resample.1.weight", "decoder.head.0.gamma"):
        assert k in keys, k


def test_full_size_layouts_convert_on_meta():
    """The shipped (full-width) configs: BFL names map onto every diffusers tensor, and the diffusers
    Qwen-Image 3-D model reduces onto every tensor of the 2-D network (meta tensors, no memory)."""
    from diffusers import AutoencoderKL, AutoencoderKLFlux2

    from pid_cli.vae.flux2 import bfl_to_diffusers_flux2
    from pid_cli.vae.kl import bfl_to_diffusers
    from pid_cli.vae.qwenimage import diffusers_to_wan_names, wan3d_to_2d

    for kind, cls in (("flux1", AutoencoderKL), ("sdxl", AutoencoderKL), ("flux2", AutoencoderKLFlux2)):
        config = load_config(kind)["model"]
        with torch.device("meta"):
            state = cls(**config).state_dict()
        convert = bfl_to_diffusers_flux2 if kind == "flux2" else bfl_to_diffusers
        back = convert(to_bfl(state, flux2=kind == "flux2"), config, kind)
        assert {k: v.shape for k, v in back.items()} == {k: v.shape for k, v in state.items()}, kind
    with torch.device("meta"):
        model2d = QwenImageVAE2d(**load_config("qwenimage")["model"])
        state3d = AutoencoderKLQwenImage().state_dict()
    names = diffusers_to_wan_names(model2d)
    reduced = wan3d_to_2d({names.get(k, k): v for k, v in state3d.items() if ".time_conv." not in k})
    assert {k: v.shape for k, v in reduced.items()} == {k: v.shape for k, v in model2d.state_dict().items()}
    assert sum(v.numel() for v in reduced.values()) == sum(p.numel() for p in model2d.parameters())
