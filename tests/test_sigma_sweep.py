"""Image inputs at a degrade σ, and σ sweeps, as upstream's image path (`from_clean`, `--degrade_sigmas`) does them.

Upstream encodes the image, then for each σ draws ε (float32, on the decode device) from a generator seeded anew
for that σ, noises the clean latent (SDXL: sqrt(1-σ²)·x0 + σ·ε; every other backbone: (1-σ)·x0 + σ·ε; σ <= 0:
untouched), rounds it to bf16 and decodes it — PiD with that σ as its condition, and the VAE for the baseline. The
rule is written out again below (`upstream_noised`) and compared bit for bit with what pid hands its decoder.
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
from pid_cli.inputs.collection import InputError, parse_sigmas
from pid_cli.inputs.images import preprocess, resize_lanczos, to_tensor
from pid_cli.outputs import to_uint
from pid_cli.pipeline import Decoder
from pid_cli.registry import load_registry
from pid_cli.text import load_prompt_embeds, save_prompt_embeds
from pid_cli.vae import build_codec, load_codec

TINY_KL = {"block_out_channels": [8, 16, 16, 16], "norm_num_groups": 4}
BACKBONES = {  # backbone → (tiny fixture decoder, codec kind, registry VAE format, base entry)
    "flux": ("v1_flux", "flux1", "bfl-flux1-ae", "flux-2k"),
    "sdxl": ("v1_sdxl", "sdxl", "diffusers-sdxl-vae", "sdxl-2kto4k-v1"),
}


@pytest.fixture
def tiny(request, tmp_path):
    """A user registry with the backbone's tiny fixture decoder and a tiny random VAE of its kind (flux unless the
    test is parametrised with `backbone`: the sweep machinery is the same for every backbone, the noise is not)."""
    backbone = getattr(request, "param", "flux")
    fixture, kind, vae_format, base = BACKBONES[backbone]
    torch.manual_seed(0)
    vae_file = tmp_path / "vae.safetensors"
    save_file({k: v.contiguous() for k, v in build_codec(kind, overrides=TINY_KL).model.state_dict().items()},
              vae_file)
    entry = {"id": f"tiny-{backbone}", "base": base, "variant": "tiny",
             "path": str(PARITY / fixture / "model_fp32.safetensors"), "net_config": tiny_config(fixture),
             "vae": {"format": vae_format, "files": {"weights": {"path": str(vae_file)}},
                     "options": {"model_overrides": TINY_KL}},
             "output_sizes": {"buckets": ["128x128"], "multiple_of": 16}}
    (tmp_path / "registry.yaml").write_text(yaml.safe_dump({"version": 1, "entries": [entry]}))
    save_prompt_embeds(tmp_path / "emb.safetensors", [""],
                       torch.randn(1, 12, 32, generator=torch.Generator().manual_seed(0)))
    inputs = tmp_path / "in"
    inputs.mkdir()
    photo = _gradient(32, 48)
    Image.fromarray(photo).save(inputs / "photo.png")
    return {"backbone": backbone, "root": tmp_path, "in": inputs, "out": tmp_path / "out", "photo": photo,
            "codec": load_codec(kind, vae_file, overrides=TINY_KL)}


def _gradient(h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([xx * 255 // w, yy * 255 // h, 255 - xx * 200 // w], -1).astype(np.uint8)


def _decode(t, *extra, inputs=None, out=None):
    args = ["decode", *(inputs or [str(t["in"])]), "--backbone", t["backbone"], "--variant", "tiny",
            "--registry", str(t["root"] / "registry.yaml"), "--prompt-embeds", str(t["root"] / "emb.safetensors"),
            "--out", str(out or t["out"]), "--quiet", "--json", *extra]
    result = CliRunner().invoke(app, args)
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    return result, records


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path)).astype(np.int64)


def upstream_noised(clean: torch.Tensor, sigma: float, seed: int, backbone: str) -> torch.Tensor:
    """Upstream's image path, step by step: a generator seeded for this σ on the decode device (the CPU here), ε
    drawn in float32 in the clean latent's shape, the backbone's noising form, then the cast to bf16."""
    clean = clean.float()
    if sigma > 0.0:
        generator = torch.Generator(device="cpu").manual_seed(seed)
        noise = torch.randn(clean.shape, generator=generator, device=clean.device, dtype=clean.dtype)
        if backbone == "sdxl":
            clean = float(max(0.0, 1.0 - sigma * sigma) ** 0.5) * clean + sigma * noise
        else:
            clean = (1.0 - sigma) * clean + sigma * noise
    return clean.to(torch.bfloat16)


@pytest.fixture
def handed_to_pid(monkeypatch):
    """Every (latents, σ, seeds) pid hands its decoder, recorded before the real decode runs."""
    calls = []
    real = Decoder.decode_tensor

    def recording(self, latents, text, degrade_sigma=0.0, seeds=0, steps=4, pad_to=None):
        calls.append((latents.clone(), list(degrade_sigma), list(seeds)))
        return real(self, latents, text, degrade_sigma, seeds, steps, pad_to)

    monkeypatch.setattr(Decoder, "decode_tensor", recording)
    return calls


# ---- the noised latent is upstream's, bit for bit ------------------------------------------------------------


@pytest.mark.parametrize("tiny", list(BACKBONES), indirect=True)
@pytest.mark.parametrize("sigma", [0.0, 0.35, 0.8])
def test_the_noised_image_latent_is_upstreams_bit_for_bit(tiny, handed_to_pid, sigma):
    result, records = _decode(tiny, "--degrade-sigma", str(sigma), "--seed", "11")
    assert result.exit_code == 0, result.output
    ((latents, sigmas, seeds),) = handed_to_pid
    clean = tiny["codec"].encode(to_tensor(preprocess(tiny["photo"], 16)))  # [1, C, 4, 6]: the 48x32 photo at /8
    expected = upstream_noised(clean, sigma, 11, tiny["backbone"])
    assert latents.dtype == torch.float32 and torch.equal(latents, expected.float())
    # PiD is conditioned on that σ itself (for SDXL too: it is already the student's VP σ, not an Euler σ) ...
    assert sigmas == [sigma] and seeds == [11]
    if sigma:  # ... and the noise is really there: the other form would have given another latent
        other = upstream_noised(clean, sigma, 11, "flux" if tiny["backbone"] == "sdxl" else "sdxl")
        assert not torch.equal(latents, other.float())
    info = Image.open(tiny["out"] / "photo.png").info
    assert info["pid:degrade_sigma"] == f"{sigma:g}"
    assert records[0]["sigmas"] == [sigma] and records[0]["status"] == "ok"


@pytest.mark.parametrize("tiny", list(BACKBONES), indirect=True)
def test_compare_baseline_decodes_the_noised_latent(tiny):
    result, records = _decode(tiny, "--degrade-sigma", "0.5", "--compare")
    assert records[0]["sigmas"] == [0.5]
    assert result.exit_code == 0, result.output
    codec = tiny["codec"]
    noised = upstream_noised(codec.encode(to_tensor(preprocess(tiny["photo"], 16))), 0.5, 0, tiny["backbone"])
    expected = to_uint(resize_lanczos(codec.decode(noised.float()), (128, 192)))[0]
    assert np.abs(_pixels(tiny["out"] / "photo.vae.png") - expected).max() <= 1
    clean = to_uint(resize_lanczos(codec.decode(codec.encode(to_tensor(preprocess(tiny["photo"], 16)))),
                                   (128, 192)))[0]
    assert np.abs(_pixels(tiny["out"] / "photo.vae.png") - clean).max() > 8  # not the clean latent's decode


# ---- sweeps -----------------------------------------------------------------------------------------------------


def test_a_sweep_writes_one_png_per_sigma_each_equal_to_a_single_sigma_run(tiny):
    result, records = _decode(tiny, "--degrade-sigma", "0,0.3,0.6")
    assert result.exit_code == 0, result.output
    out = tiny["out"]
    names = ["photo_sigma0.png", "photo_sigma0.3.png", "photo_sigma0.6.png"]
    assert sorted(p.name for p in out.iterdir()) == sorted(names)
    (record,) = records
    assert [p.rsplit("/", 1)[-1] for p in record["outputs"]] == names and record["sigmas"] == [0.0, 0.3, 0.6]
    for name, sigma in zip(names, ("0", "0.3", "0.6"), strict=True):
        assert Image.open(out / name).info["pid:degrade_sigma"] == sigma
        single = tiny["root"] / f"single{sigma}"
        assert _decode(tiny, "--degrade-sigma", sigma, out=single)[0].exit_code == 0
        assert np.array_equal(_pixels(out / name), _pixels(single / "photo.png")), name
    assert not np.array_equal(_pixels(out / names[0]), _pixels(out / names[2]))  # σ changes the image


def test_a_sweep_split_across_batches_encodes_each_image_once(tiny, monkeypatch):
    """More σ than the batch size: the sweep's items fall into three batches, which reuse the first one's encode
    (the same clean latent for every σ, as upstream's one encode per image), and write the one-batch sweep's PNGs."""
    from pid_cli.vae.base import LatentCodec

    (tiny["in"] / "second.png").write_bytes((tiny["in"] / "photo.png").read_bytes())
    assert _decode(tiny, "--degrade-sigma", "0,0.3,0.6")[0].exit_code == 0  # batches of three: one per image
    encoded = []
    real = LatentCodec.encode
    monkeypatch.setattr(LatentCodec, "encode", lambda self, images: encoded.append(len(images)) or real(self, images))
    split = tiny["root"] / "split"
    result, _ = _decode(tiny, "--degrade-sigma", "0,0.3,0.6", "--batch-size", "1", out=split)
    assert result.exit_code == 0, result.output
    assert encoded == [1, 1]  # six batches, one encode per image
    for name in ("photo_sigma0.png", "photo_sigma0.3.png", "photo_sigma0.6.png", "second_sigma0.6.png"):
        assert np.array_equal(_pixels(split / name), _pixels(tiny["out"] / name)), name


def test_each_sigma_is_its_own_output_for_skip_and_resume(tiny):
    assert _decode(tiny, "--degrade-sigma", "0.2,0.5")[0].exit_code == 0
    lost = tiny["out"] / "photo_sigma0.5.png"
    kept = tiny["out"] / "photo_sigma0.2.png"
    before, mtime = _pixels(lost), kept.stat().st_mtime_ns
    lost.unlink()
    result, records = _decode(tiny, "--degrade-sigma", "0.2,0.5")
    assert result.exit_code == 0 and records[0]["status"] == "ok"
    assert np.array_equal(_pixels(lost), before) and kept.stat().st_mtime_ns == mtime  # only the lost one again
    assert _decode(tiny, "--degrade-sigma", "0.2,0.5")[1][0]["status"] == "skipped"


def test_sigma_field_of_name_and_manifest_sweeps(tiny):
    result, _ = _decode(tiny, "--degrade-sigma", "0.25,0.5", "--name", "sigma_{sigma:.3f}/{stem}.png")
    assert result.exit_code == 0, result.output
    assert sorted(str(p.relative_to(tiny["out"])) for p in tiny["out"].rglob("*.png")) == [
        "sigma_0.250/photo.png", "sigma_0.500/photo.png"]
    manifest = tiny["root"] / "m.jsonl"
    manifest.write_text(json.dumps({"input": "in/photo.png", "degrade_sigma": [0, 0.5], "output": "x.png"}) + "\n")
    result, records = _decode(tiny, inputs=[str(manifest)], out=tiny["root"] / "m")
    assert result.exit_code == 0 and records[0]["sigmas"] == [0.0, 0.5], result.output
    assert sorted(p.name for p in (tiny["root"] / "m").iterdir()) == ["x_sigma0.5.png", "x_sigma0.png"]
    assert np.array_equal(_pixels(tiny["root"] / "m" / "x_sigma0.5.png"), _pixels(tiny["out"] / "sigma_0.500" /
                                                                                  "photo.png"))


def test_one_sigma_keeps_the_names_of_a_run_without_one(tiny):
    assert _decode(tiny, "--degrade-sigma", "0.4")[0].exit_code == 0
    assert [p.name for p in tiny["out"].iterdir()] == ["photo.png"]


# ---- what does not apply is refused, never ignored ---------------------------------------------------------------


def test_sweep_spelling_and_its_refusals(tiny):
    assert parse_sigmas("0, 0.4,0.4,0.7") == (0.0, 0.4, 0.7)
    for bad in ("", "0,,1", "nan", "-0.1", "inf", "0.4;0.7"):
        with pytest.raises(InputError, match="comma"):
            parse_sigmas(bad)
    # upstream's spelling, `--degrade_sigmas 0 0.4`, would read 0.4 as an input: say what to type instead
    result, _ = _decode(tiny, "--degrade-sigma", "0", "0.4")
    assert result.exit_code == 2 and "0.4: no such file or folder" in result.output
    assert "--degrade-sigma 0,0.4" in result.output
    result, records = _decode(tiny, "--degrade-sigma", "0.2,1.5")
    assert result.exit_code == 1 and "degrade_sigma 1.5 from --degrade-sigma is outside [0, 1]" in records[0]["error"]


def test_options_that_do_not_apply_to_an_input_fail_it_with_a_reason(tiny):
    latent = tiny["in"] / "lat.safetensors"
    channels = 4 if tiny["backbone"] == "sdxl" else 16
    save_file({"x": torch.randn(channels, 4, 4)}, latent)
    result, records = _decode(tiny, "--degrade-sigma", "0,0.4")
    status = {r["input"].rsplit("/", 1)[-1]: r for r in records}
    assert result.exit_code == 1 and status["photo.png"]["status"] == "ok"
    assert "a σ sweep (--degrade-sigma: 0, 0.4) applies to image inputs" in status["lat.safetensors"]["error"]
    for flag, value, refused, why in [("--fit", None, "lat.safetensors", "--fit resizes image inputs"),
                                      ("--key", "x", "photo.png", "--key applies to latent files"),
                                      ("--latent-format", "raw", "photo.png", "--latent-format raw applies to latent"),
                                      ("--latent-size", "4x4", "photo.png", "--latent-size applies to latent")]:
        out = tiny["root"] / flag.strip("-")
        result, records = _decode(tiny, flag, *([value] if value else []), out=out)
        status = {r["input"].rsplit("/", 1)[-1]: r for r in records}
        assert result.exit_code == 1 and status[refused]["status"] == "failed", flag
        assert why in status[refused]["error"] and refused in status[refused]["error"]
        other = "photo.png" if refused == "lat.safetensors" else "lat.safetensors"
        assert status[other]["status"] == "ok", (flag, status[other])


# ---- the library reads σ as the CLI does --------------------------------------------------------------------


@pytest.mark.parametrize("tiny", ["sdxl"], indirect=True)
def test_library_decode_takes_a_stored_latents_sigma_as_the_cli_does(tiny):
    """SDXL's stored x_t come with an Euler σ, which the student sees in its variance-preserving frame; the
    conversion lives in the Decoder, so `Decoder.decode` and `pid decode` give one image for one latent and σ."""
    latent = torch.randn(4, 4, 4, generator=torch.Generator().manual_seed(3)) * 1.6  # an x_t at Euler σ 1.25
    save_file({"x": latent}, tiny["in"] / "xt.safetensors")
    (tiny["in"] / "photo.png").unlink()
    result, records = _decode(tiny, "--degrade-sigma", "1.25", "--seed", "4")
    assert result.exit_code == 0 and records[0]["sigmas"] == [1.25], result.output
    entry = load_registry([tiny["root"] / "registry.yaml"]).resolve("sdxl", "tiny")
    text = load_prompt_embeds(tiny["root"] / "emb.safetensors", model_max_length=12)[""]
    with Decoder(entry, entry.weights.path, device="cpu") as decoder:
        ours = decoder.decode(latent, prompt_embeds=text[None], degrade_sigma=1.25, seed=4)[0]
        unconverted = to_uint(decoder.decode_tensor(latent[None], text[None], 1.25, 4))[0]
    assert np.array_equal(ours, _pixels(tiny["out"] / "xt.png"))
    assert not np.array_equal(unconverted, ours)  # the frame matters: σ 1.25 is not the student's σ
