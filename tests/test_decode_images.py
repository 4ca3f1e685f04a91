"""`pid decode` with image inputs, `--fit`, `--compare` and `--color-fix`, end to end on CPU.

The decoder is the tiny upstream fixture (v1_flux: 8 px per latent cell × sr 4) and the VAE a tiny random
Flux.1 autoencoder saved to a file, both registered through a user registry (the VAE with a local `path`
and `vae.options.model_overrides` for its shrunk widths). Expected pixels are recomputed here from the
same codec, so the tests check the wiring (which latent, which reference, which resize), not just sizes.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from conftest import PARITY, tiny_config
from PIL import Image
from safetensors.torch import save_file
from typer.testing import CliRunner

from pid_cli.cli import app
from pid_cli.colorfix import color_fix, wavelet_split
from pid_cli.inputs.image_plan import crop_multiple, fit_sizes, load_image, plan_image
from pid_cli.inputs.images import choose_bucket, preprocess, read_image, resize_lanczos, to_tensor
from pid_cli.outputs import to_uint
from pid_cli.pipeline import Decoder
from pid_cli.registry import load_registry
from pid_cli.text import save_prompt_embeds
from pid_cli.vae import build_codec, load_codec

SCALE = 32  # output pixels per latent cell
TINY_KL = {"block_out_channels": [8, 16, 16, 16], "norm_num_groups": 4}


@pytest.fixture
def setup(tmp_path):
    """Registry (tiny decoder + tiny VAE file), prompt embeddings, an input folder, the codec itself."""
    torch.manual_seed(0)
    vae_file = tmp_path / "ae.safetensors"
    save_file({k: v.contiguous() for k, v in build_codec("flux1", overrides=TINY_KL).model.state_dict().items()},
              vae_file)
    reg = tmp_path / "registry.yaml"
    entry = {"id": "tiny-flux", "base": "flux-2k", "variant": "tiny",
             "path": str(PARITY / "v1_flux" / "model_fp32.safetensors"), "net_config": tiny_config("v1_flux"),
             "vae": {"format": "bfl-flux1-ae", "files": {"weights": {"path": str(vae_file)}},
                     "options": {"model_overrides": TINY_KL}},
             "output_sizes": {"buckets": ["256x192", "192x256", "128x128"], "multiple_of": 16}}
    reg.write_text(yaml.safe_dump({"version": 1, "entries": [entry]}))
    emb = tmp_path / "emb.safetensors"
    save_prompt_embeds(emb, [""], torch.randn(1, 12, 32, generator=torch.Generator().manual_seed(0)))
    inputs = tmp_path / "in"
    inputs.mkdir()
    return {"reg": reg, "emb": emb, "inputs": inputs, "out": tmp_path / "out", "entry": entry,
            "codec": load_codec("flux1", vae_file, overrides=TINY_KL)}


def _args(s, *extra):
    return ["decode", str(s["inputs"]), "--backbone", "flux", "--variant", "tiny", "--registry", str(s["reg"]),
            "--prompt-embeds", str(s["emb"]), "--out", str(s["out"]), "--quiet", "--json", *extra]


def _run(args):
    result = CliRunner().invoke(app, args)
    records = {r["input"].rsplit("/", 1)[-1]: r for r in map(json.loads, filter(None, result.stdout.splitlines()))
               if isinstance(r, dict)}
    return result, records


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path)).astype(np.int64)


def _as_float(path) -> torch.Tensor:
    """An 8-bit PNG as [1, 3, H, W] in [−1, 1]."""
    return torch.from_numpy(_pixels(path).astype(np.float32) / 127.5 - 1).permute(2, 0, 1)[None]


def _gradient(h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([xx * 255 // w, yy * 255 // h, 255 - xx * 200 // w], -1).astype(np.uint8)


def _latent(seed: int, h: int = 4, w: int = 4) -> torch.Tensor:
    return torch.randn(16, h, w, generator=torch.Generator().manual_seed(seed))


# ---- images decode end to end ----------------------------------------------------------------------------


def test_images_decode_end_to_end(setup):
    s, d = setup, setup["inputs"]
    photo = _gradient(36, 40)
    Image.fromarray(photo).save(d / "photo.png")
    Image.fromarray(photo).save(d / "photo_jpeg.jpg", quality=95)
    Image.fromarray(photo).save(d / "photo_webp.webp", lossless=True)
    Image.fromarray(np.full((32, 32, 3), 255, np.uint8)).save(d / "white.png")
    clear = np.concatenate([_gradient(32, 32), np.zeros((32, 32, 1), np.uint8)], axis=2)
    Image.fromarray(clear, "RGBA").save(d / "clear.png")  # fully transparent: composited over white
    Image.fromarray(photo[:, :, 1].astype(np.uint16) * 257).save(d / "grey16.png")
    import cv2

    cv2.imwrite(str(d / "deep.tiff"), (photo[:, :, ::-1].astype(np.uint16) * 257))  # 16-bit colour (BGR on disk)
    # The same photo through the latent route: encode it ourselves, store the latent, decode that.
    latent = s["codec"].encode(to_tensor(preprocess(photo, 16)))[0]  # [16, 4, 4]
    save_file({"latent": latent.contiguous()}, d / "encoded.safetensors")

    result, records = _run(_args(s))
    assert result.exit_code == 0, result.output
    assert {r["status"] for r in records.values()} == {"ok"} and len(records) == 8
    out = s["out"]
    for name in ("photo", "photo_jpeg", "photo_webp", "deep", "grey16"):
        assert Image.open(out / f"{name}.png").size == (4 * SCALE, 4 * SCALE)  # 40x36 → crop 32x32 → ×4
    info = Image.open(out / "photo.png").info
    assert info["pid:preprocess"] == "centre-crop 40x36 -> 32x32" and info["pid:degrade_sigma"] == "0"
    assert info["pid:source"].endswith("photo.png")
    # Image input == VAE-encode then latent input: the image is encoded by the registry's VAE, sigma 0.
    assert np.abs(_pixels(out / "photo.png") - _pixels(out / "encoded.png")).max() <= 1
    assert np.array_equal(_pixels(out / "photo.png"), _pixels(out / "photo_webp.png"))  # lossless: same pixels
    assert np.array_equal(_pixels(out / "photo.png"), _pixels(out / "deep.png"))  # 16-bit ×257 = the 8-bit photo
    assert np.array_equal(_pixels(out / "clear.png"), _pixels(out / "white.png"))  # RGBA rule: over white
    assert not np.array_equal(_pixels(out / "photo.png"), _pixels(out / "white.png"))  # pixels matter
    assert not np.array_equal(_pixels(out / "photo.png"), _pixels(out / "grey16.png"))


def test_fit_resizes_onto_the_nearest_bucket(setup):
    s = setup
    Image.fromarray(_gradient(75, 100)).save(s["inputs"] / "wide.png")
    Image.fromarray(_gradient(100, 75)).save(s["inputs"] / "tall.png")
    result, _ = _run(_args(s, "--fit"))
    assert result.exit_code == 0, result.output
    assert Image.open(s["out"] / "wide.png").size == (256, 192)  # 100x75 → 64x48 → 4× = the 4:3 bucket
    assert Image.open(s["out"] / "tall.png").size == (192, 256)
    assert Image.open(s["out"] / "wide.png").info["pid:preprocess"] == "fit 100x75 -> 64x48 (output 256x192)"
    s["out"] = s["out"].parent / "cropped"
    (s["inputs"] / "tall.png").unlink()
    assert _run(_args(s))[0].exit_code == 0
    assert Image.open(s["out"] / "wide.png").size == (384, 256)  # without --fit: centre-crop to 96x64, ×4


def test_fit_rule_on_the_released_sizes():
    reg = load_registry()
    long_4k, long_2k = (3072, 4608), (1536, 3072)
    v15, v1, k2 = reg.get("flux-2kto4k-v1.5"), reg.get("sd3-2kto4k-v1"), reg.get("flux-2k")
    assert choose_bucket(1000, 750, fit_sizes(v15, long_4k)) == (4096, 3072)  # the example
    assert choose_bucket(1920, 1080, fit_sizes(v15, long_4k)) == (4096, 2176)  # upstream's 16:9 bucket
    assert choose_bucket(1000, 750, fit_sizes(v1, long_4k)) == (3840, 2880)  # v1 lists square buckets only
    assert choose_bucket(1000, 750, fit_sizes(k2, long_2k)) == (2304, 1728)
    assert choose_bucket(1000, 750, fit_sizes(k2)) == (2304, 1728)
    assert fit_sizes(k2, long_4k) == []
    for entry in reg.entries:
        assert crop_multiple(entry) == 16, entry.id  # upstream's rule holds for every release


# ---- --compare and --color-fix -------------------------------------------------------------------------


def test_compare_writes_the_vae_decode_and_a_strip(setup):
    s, d = setup, setup["inputs"]
    z = _latent(1)
    save_file({"x": z}, d / "lat.safetensors")
    Image.fromarray(_gradient(32, 32)).save(d / "photo.png")
    result, _ = _run(_args(s, "--compare"))
    assert result.exit_code == 0, result.output
    out, codec = s["out"], s["codec"]
    assert sorted(p.name for p in out.iterdir()) == ["lat.compare.png", "lat.png", "lat.vae.png",
                                                     "photo.compare.png", "photo.png", "photo.vae.png"]
    # NAME.vae.png is the VAE's own decode of the same latent, Lanczos-upscaled to PiD's size.
    expected = to_uint(resize_lanczos(codec.decode(z[None]), (128, 128)))[0]
    assert np.abs(_pixels(out / "lat.vae.png") - expected).max() <= 1
    # an image's latent is rounded to bf16 before both decodes, as upstream's image path does
    photo_latent = codec.encode(to_tensor(_gradient(32, 32))).to(torch.bfloat16).float()
    expected = to_uint(resize_lanczos(codec.decode(photo_latent), (128, 128)))[0]
    assert np.abs(_pixels(out / "photo.vae.png") - expected).max() <= 1
    # Strips: [VAE | PiD] for latents, [input | VAE | PiD] for images, 16 px white gaps.
    strip = _pixels(out / "lat.compare.png")
    assert strip.shape == (128, 2 * 128 + 16, 3)
    assert np.array_equal(strip[:, :128], _pixels(out / "lat.vae.png"))
    assert (strip[:, 128:144] == 255).all()
    assert np.array_equal(strip[:, 144:], _pixels(out / "lat.png"))
    strip = _pixels(out / "photo.compare.png")
    assert strip.shape == (128, 3 * 128 + 32, 3)
    expected = to_uint(resize_lanczos(to_tensor(_gradient(32, 32)), (128, 128)))[0]
    assert np.abs(strip[:, :128] - expected).max() <= 1
    assert np.array_equal(strip[:, -128:], _pixels(out / "photo.png"))
    assert Image.open(out / "photo.compare.png").info["pid:baseline"] == "side by side: input | vae | pid"
    # --compare adds files; it does not change the PiD output.
    s["out"] = out.parent / "plain"
    assert _run(_args(s))[0].exit_code == 0
    assert np.array_equal(_pixels(s["out"] / "lat.png"), _pixels(out / "lat.png"))


def test_compare_resumes_per_file(setup):
    s = setup
    save_file({"x": _latent(2)}, s["inputs"] / "a.safetensors")
    assert _run(_args(s, "--compare"))[0].exit_code == 0
    mtime = (s["out"] / "a.png").stat().st_mtime_ns
    (s["out"] / "a.compare.png").unlink()
    records = _run(_args(s, "--compare"))[1]  # an item is done only when all its files exist
    assert records["a.safetensors"]["status"] == "ok" and (s["out"] / "a.compare.png").is_file()
    assert (s["out"] / "a.png").stat().st_mtime_ns == mtime  # the existing PNG is left alone
    records = _run(_args(s, "--compare"))[1]
    assert records["a.safetensors"]["status"] == "skipped"


def _known_image(h: int, w: int) -> torch.Tensor:
    """[1, 3, h, w]: a dark smooth field with fine texture plus the drift users report (brightened,
    green/blue cast), within (−1, 1) so no clamping interferes."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    base = torch.stack([-0.3 + 0.2 * torch.sin(3 * xx + c) * torch.cos(2 * yy - c) for c in (0.0, 1.0, 2.0)])
    texture = 0.05 * torch.randn(3, h, w, generator=torch.Generator().manual_seed(7))
    return (base + texture + torch.tensor([0.0, 0.1, 0.06]).view(3, 1, 1))[None]


@pytest.fixture
def fake_pid(monkeypatch):
    """PiD replaced by `_known_image`, so the colour fix can be checked against exact expectations."""

    def decode_tensor(self, latents, text, degrade_sigma=0.0, seeds=0, steps=4, pad_to=None):
        b, _, h, w = latents.shape
        return _known_image(*self.output_size((h, w))).expand(b, -1, -1, -1)

    monkeypatch.setattr(Decoder, "decode_tensor", decode_tensor)


def _low(x: torch.Tensor) -> torch.Tensor:
    return wavelet_split(x)[1]


def test_color_fix_matches_low_frequency_colour_to_the_vae(setup, fake_pid):
    s = setup
    z = _latent(3)
    save_file({"x": z}, s["inputs"] / "a.safetensors")
    root, outs = s["out"], {}
    for method in ("none", "mean-std", "wavelet"):
        s["out"] = root / method
        result, records = _run(_args(s, "--color-fix", method))
        assert result.exit_code == 0 and records["a.safetensors"]["status"] == "ok", result.output
        outs[method] = _as_float(s["out"] / "a.png")
        assert ("pid:color_fix" in Image.open(s["out"] / "a.png").info) == (method != "none")
    assert not (root / "mean-std" / "a.vae.png").exists()  # --color-fix alone writes no baseline files
    vae = s["codec"].decode(z[None])  # [1, 3, 32, 32]: the reference, at its own size
    pid = _known_image(128, 128)
    assert np.array_equal(_pixels(root / "none" / "a.png"), to_uint(pid)[0])  # none: PiD's pixels untouched
    # mean-std: exactly colorfix's map against the VAE decode of this latent; channel means now the VAE's.
    expected = to_uint(color_fix(pid, vae, "mean-std"))[0]
    assert np.abs(_pixels(root / "mean-std" / "a.png") - expected).max() <= 1
    drift = lambda x: (x.mean((2, 3)) - vae.mean((2, 3))).abs().max()
    assert drift(outs["mean-std"]) < 0.1 * drift(pid)  # only clamping at ±1 keeps it from 0
    # wavelet: colorfix's map against the Lanczos-upscaled VAE decode; the low band moves to the VAE's,
    # the high band (detail) stays PiD's.
    vae_up = resize_lanczos(vae, (128, 128))
    expected = to_uint(color_fix(pid, vae_up, "wavelet"))[0]
    assert np.abs(_pixels(root / "wavelet" / "a.png") - expected).max() <= 1
    fixed = outs["wavelet"]
    low_gap = lambda x: (_low(x) - _low(vae_up)).abs().mean()
    fine = lambda x: wavelet_split(x, levels=1)[0]  # pixel-scale detail: texture, edges
    assert low_gap(fixed) < 0.25 * low_gap(pid)
    assert (fine(fixed) - fine(pid)).abs().mean() < 0.1 * fine(pid).abs().mean()


def test_color_fix_on_the_real_decoder_moves_colour_towards_the_vae(setup):
    s = setup
    Image.fromarray(_gradient(32, 32)).save(s["inputs"] / "photo.png")
    root, outs = s["out"], {}
    for method in ("none", "wavelet"):
        s["out"] = root / method
        assert _run(_args(s, "--color-fix", method, "--compare"))[0].exit_code == 0
        outs[method] = _as_float(s["out"] / "photo.png")
    vae_up = _as_float(root / "none" / "photo.vae.png")
    assert (_low(outs["wavelet"]) - _low(vae_up)).abs().mean() < 0.5 * (_low(outs["none"]) - _low(vae_up)).abs().mean()
    assert np.array_equal(_pixels(root / "wavelet" / "photo.compare.png")[:, -128:],
                          _pixels(root / "wavelet" / "photo.png"))  # the strip shows the output as written


# ---- what is refused -----------------------------------------------------------------------------------


def test_images_need_an_encoder_pid_supports(setup):
    s = setup
    s["entry"]["vae"] = {"format": "custom-vae", "files": {"decoder": {"path": str(s["reg"])}}}
    s["reg"].write_text(yaml.safe_dump({"version": 1, "entries": [s["entry"]]}))
    Image.fromarray(_gradient(32, 32)).save(s["inputs"] / "photo.png")
    save_file({"x": _latent(4)}, s["inputs"] / "lat.safetensors")
    result, records = _run(_args(s))
    assert result.exit_code == 1
    assert records["lat.safetensors"]["status"] == "ok"  # latents still decode
    assert records["photo.png"]["status"] == "failed"
    error = records["photo.png"]["error"]
    assert "photo.png" in error and "unknown VAE kind 'custom-vae'" in error
    result = CliRunner().invoke(app, _args(s, "--compare"))
    assert result.exit_code == 2 and "--compare needs the flux VAE decoder" in result.output


def test_bad_options_and_sigma_on_images(setup, tmp_path):
    s = setup
    Image.fromarray(_gradient(32, 32)).save(s["inputs"] / "photo.png")
    result = CliRunner().invoke(app, _args(s, "--color-fix", "histogram"))
    assert result.exit_code == 2 and "--color-fix" in result.output
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"input": str(s["inputs"] / "photo.png"), "degrade_sigma": 1.5}) + "\n")
    args = _args(s)
    args[1] = str(manifest)
    result, records = _run(args)
    assert result.exit_code == 1
    assert "degrade_sigma 1.5 from the manifest is outside [0, 1]" in records["photo.png"]["error"]
    Image.fromarray(_gradient(8, 40)).save(s["inputs"] / "sliver.png")
    Image.fromarray(_gradient(16, 8208)).save(s["inputs"] / "banner.png")
    save_file({"x": _latent(6)}, s["inputs"] / "a.safetensors")
    save_file({"x": _latent(7)}, s["inputs"] / "a.vae.safetensors")  # its a.vae.png is a's baseline file
    result, records = _run(_args(s, "--compare"))
    assert "smaller than the 16-px minimum" in records["sliver.png"]["error"]
    assert "would decode to 32832x64; use --fit" in records["banner.png"]["error"]
    assert records["a.safetensors"]["status"] == "ok"
    assert "would both write" in records["a.vae.safetensors"]["error"]


def test_images_inside_the_output_folder_are_not_inputs(setup):
    s = setup
    s["out"] = s["inputs"]  # outputs land next to the latents
    save_file({"x": _latent(5)}, s["inputs"] / "a.safetensors")
    assert _run(_args(s, "--compare"))[0].exit_code == 0
    result, records = _run(_args(s, "--compare"))
    assert result.exit_code == 0 and list(records) == ["a.safetensors"]  # a.png, a.vae.png, … are not inputs
    assert records["a.safetensors"]["status"] == "skipped"
    assert "left out 3 image(s) inside the output folder" in result.stderr


def test_read_image_matches_what_the_runner_encodes(setup):
    """The runner's image path is images.read_image + preprocess + to_tensor (no other conversion)."""
    s = setup
    Image.fromarray(_gradient(36, 40)).save(s["inputs"] / "p.png")
    arr, _ = read_image(s["inputs"] / "p.png")
    entry = load_registry([s["reg"]]).resolve("flux", "tiny")
    plan = plan_image(entry, s["inputs"] / "p.png", 40, 36, None)
    assert torch.equal(load_image(entry, s["inputs"] / "p.png", plan), to_tensor(preprocess(arr, 16))[0])
