"""Latents as the tools people render with write them: ComfyUI, diffusers, InvokeAI.

Each producer's file is written here the way that producer writes it (the format re-expressed from its
published code, with the version named), and pid's reading is checked against what that producer hands its
own decoder: ComfyUI's LoadLatent followed by its latent format's `process_in` (the space the diffusion model,
and so PiD, works in), diffusers' own packing and unpacking functions, InvokeAI's `torch.save`.
"""

from __future__ import annotations

import json
import struct
import uuid
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from pid_cli.cli import app
from pid_cli.inputs.collection import collect_inputs
from pid_cli.inputs.latent_files import LatentError, read_as_pid, read_latent_file, scale_warning
from pid_cli.inputs.prompts import metadata_prompt
from pid_cli.registry import load_registry

REG = load_registry(use_env=False)
ENTRIES = {"sdxl": "sdxl-2kto4k-v1", "sd3": "sd3-2k", "flux": "flux-2k", "flux2": "flux2-2k",
           "qwenimage": "qwenimage-2kto4k-v1.5"}


def _latent(backbone: str):
    return REG.get(ENTRIES[backbone]).latent


def _read(path: Path, backbone: str, **kw):
    return read_as_pid(read_latent_file(path, kw.pop("key", None)), _latent(backbone), backbone, **kw)


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------------
# ComfyUI 0.3.64: nodes.py SaveLatent / LoadLatent and comfy/latent_formats.py, re-expressed.

def comfyui_save_latent(path: Path, samples: torch.Tensor, prompt: dict | None = None,
                        extra_pnginfo: dict | None = None, marker: bool = True, **extra: torch.Tensor) -> None:
    """SaveLatent.save: the latent and the version marker as tensors; the graph (API format, "prompt") and
    each extra_pnginfo entry (the UI graph, "workflow") as JSON strings in the safetensors metadata."""
    metadata = {"prompt": json.dumps(prompt) if prompt is not None else ""}
    for key, value in (extra_pnginfo or {}).items():
        metadata[key] = json.dumps(value)
    tensors = {"latent_tensor": samples.contiguous(), **extra}
    if marker:  # files saved before the marker existed lack it
        tensors["latent_format_version_0"] = torch.tensor([])
    save_file(tensors, str(path), metadata=metadata)


def comfyui_load_latent(path: Path) -> torch.Tensor:
    """LoadLatent.load: the legacy 1/0.18215 only when the marker *tensor* is absent."""
    latent = load_file(str(path))
    multiplier = 1.0 if "latent_format_version_0" in latent else 1.0 / 0.18215
    return latent["latent_tensor"].float() * multiplier


WAN21_MEAN = torch.tensor([-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                           0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921])
WAN21_STD = torch.tensor([2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                          3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160])
# latent_formats.<Format>.process_in / process_out for the formats ComfyUI assigns these models
# (supported_models: SDXL → SDXL, SD3 → SD3, Flux and Lumina2/Z-Image → Flux, Flux2 → Flux2, QwenImage → Wan21).
PROCESS_IN = {
    "sdxl": lambda x: x * 0.13025,
    "sd3": lambda x: (x - 0.0609) * 1.5305,
    "flux": lambda x: (x - 0.1159) * 0.3611,
    "flux2": lambda x: x,  # the batch-norm and the 2x2 fold live inside ComfyUI's FLUX.2 VAE
    "qwenimage": lambda x: (x - WAN21_MEAN.view(1, 16, 1, 1, 1)) / WAN21_STD.view(1, 16, 1, 1, 1),
}
PROCESS_OUT = {
    "sdxl": lambda x: x / 0.13025,
    "sd3": lambda x: x / 1.5305 + 0.0609,
    "flux": lambda x: x / 0.3611 + 0.1159,
    "flux2": lambda x: x,
    "qwenimage": lambda x: x * WAN21_STD.view(1, 16, 1, 1, 1) + WAN21_MEAN.view(1, 16, 1, 1, 1),
}
# What a KSampler's LATENT holds for each (Qwen-Image: EmptySD3LatentImage, made 5-D by fix_empty_latent_channels).
COMFY_SHAPES = {"sdxl": (2, 4, 8, 6), "sd3": (1, 16, 8, 6), "flux": (1, 16, 8, 6), "flux2": (1, 128, 4, 3),
                "qwenimage": (1, 16, 1, 8, 6)}


def _comfy_samples(backbone: str) -> torch.Tensor:
    """A LATENT in ComfyUI's space: a unit-scale model-space latent taken out through process_out."""
    return PROCESS_OUT[backbone](_randn(*COMFY_SHAPES[backbone]))


@pytest.mark.parametrize("backbone", sorted(ENTRIES))
def test_comfyui_latent_reads_as_comfyui_feeds_its_model(tmp_path, backbone):
    samples = _comfy_samples(backbone)
    path = tmp_path / "ComfyUI_00001_.latent"
    comfyui_save_latent(path, samples, prompt={"3": {"class_type": "KSampler"}})
    expected = PROCESS_IN[backbone](comfyui_load_latent(path))
    expected = expected[:, :, 0] if expected.dim() == 5 else expected
    reading = _read(path, backbone)
    assert reading.layout == ("pid" if backbone == "flux2" else "raw")
    torch.testing.assert_close(reading.latent, expected, rtol=1e-5, atol=1e-5)
    assert scale_warning(reading, str(path)) is None  # a right reading of a unit-scale latent is not questioned


def test_comfyui_legacy_latent_without_marker_is_rescaled_like_loadlatent(tmp_path):
    samples = _comfy_samples("sdxl") * 0.18215  # what a pre-marker SaveLatent stored
    comfyui_save_latent(tmp_path / "old.latent", samples, marker=False)
    expected = PROCESS_IN["sdxl"](comfyui_load_latent(tmp_path / "old.latent"))
    torch.testing.assert_close(_read(tmp_path / "old.latent", "sdxl").latent, expected)


def test_comfyui_extra_tensors_beside_the_latent_do_not_make_it_ambiguous(tmp_path):
    samples = _comfy_samples("flux")
    comfyui_save_latent(tmp_path / "masked.latent", samples, noise_mask=torch.ones(1, 1, 64, 48),
                        batch_index=torch.tensor([0]))
    torch.testing.assert_close(_read(tmp_path / "masked.latent", "flux").latent, PROCESS_IN["flux"](samples))


def test_comfyui_latent_renamed_to_safetensors_reads_the_same_and_has_no_caption(tmp_path):
    samples = _comfy_samples("flux")
    comfyui_save_latent(tmp_path / "c.safetensors", samples, prompt={"6": {"inputs": {"text": "a fox"}}})
    torch.testing.assert_close(_read(tmp_path / "c.safetensors", "flux").latent, PROCESS_IN["flux"](samples))
    assert metadata_prompt(tmp_path / "c.safetensors") is None  # ComfyUI's "prompt" is its graph, not a caption


def test_comfyui_latents_that_comfyui_does_not_write_are_refused_with_the_flag_that_fits(tmp_path):
    comfyui_save_latent(tmp_path / "f2_32.latent", _randn(1, 32, 8, 6))
    with pytest.raises(LatentError, match=r"f2_32.latent.*128 channels.*--latent-format raw"):
        _read(tmp_path / "f2_32.latent", "flux2")
    comfyui_save_latent(tmp_path / "rae.latent", _randn(1, 768, 32, 32))
    dinov2 = REG.get("dinov2-2k").latent
    with pytest.raises(LatentError, match=r"rae.latent: ComfyUI has no latent format.*--latent-format pid or raw"):
        read_as_pid(read_latent_file(tmp_path / "rae.latent"), dinov2, "dinov2")
    z = _randn(1, 768, 32, 32)
    comfyui_save_latent(tmp_path / "rae.latent", z)
    assert torch.equal(read_as_pid(read_latent_file(tmp_path / "rae.latent"), dinov2, "dinov2", "pid").latent, z)


def _png_text_chunks(path: Path) -> dict[str, tuple[str, str]]:
    """Text chunks as ComfyUI's frontend reads them (src/scripts/metadata/png.ts): tEXt and uncompressed iTXt;
    values with the chunk type that carried them."""
    data, offset, found = path.read_bytes(), 8, {}
    while offset < len(data):
        (length,), kind = struct.unpack(">I", data[offset:offset + 4]), data[offset + 4:offset + 8].decode()
        body = data[offset + 8:offset + 8 + length]
        if kind in ("tEXt", "iTXt"):
            key, _, rest = body.partition(b"\0")
            if kind == "iTXt":
                rest = rest[2:].split(b"\0", 2)[2]  # flag, method, language tag, translated keyword
            found[key.decode("latin-1")] = (rest.decode("utf-8"), kind)
        offset += 12 + length
        assert zlib.crc32(data[offset - 8 - length:offset - 4]) & 0xFFFFFFFF == struct.unpack(
            ">I", data[offset - 4:offset])[0]
    return found


@pytest.fixture
def tiny(tiny_run):
    """conftest's tiny decoder run, its input folder also under "in"."""
    return {**tiny_run, "in": tiny_run["inputs"]}


def _decode(tiny, *inputs: str, extra: tuple[str, ...] = ()):
    args = ["decode", *inputs, "--backbone", "flux", "--variant", "tiny", "--registry", str(tiny["reg"]),
            "--prompt-embeds", str(tiny["emb"]), "--out", str(tiny["out"]), "--quiet", "--json", *extra]
    result = CliRunner().invoke(app, args)
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    return result, {Path(r["input"]).name: r for r in records}


def test_comfyui_latent_decodes_like_its_normalised_latent_and_keeps_its_workflow(tiny):
    z = _randn(1, 16, 2, 2)
    graph = {"3": {"class_type": "KSampler", "inputs": {"seed": 7}}, "9": {"class_type": "SaveLatent"}}
    workflow = {"last_node_id": 9, "nodes": [{"id": 3, "type": "KSampler"}], "extra": {"ds": {"scale": 1}}}
    comfyui_save_latent(tiny["in"] / "comfy.latent", PROCESS_OUT["flux"](z), prompt=graph,
                        extra_pnginfo={"workflow": workflow})
    save_file({"latent": z}, tiny["in"] / "plain.safetensors")
    result, records = _decode(tiny, str(tiny["in"]))
    assert result.exit_code == 0, result.output
    assert {r["status"] for r in records.values()} == {"ok"} and not records["comfy.latent"]["warnings"]
    comfy = np.asarray(Image.open(tiny["out"] / "comfy.png")).astype(int)
    plain = np.asarray(Image.open(tiny["out"] / "plain.png")).astype(int)
    assert np.abs(comfy - plain).max() <= 1  # float round-off of raw → normalised, nothing more
    chunks = _png_text_chunks(tiny["out"] / "comfy.png")
    assert chunks["workflow"] == (json.dumps(workflow), "tEXt") and json.loads(chunks["workflow"][0]) == workflow
    assert chunks["prompt"] == (json.dumps(graph), "tEXt")
    assert chunks["pid:prompt"] == ("", "iTXt")  # the caption pid used: not ComfyUI's graph
    assert "workflow" not in _png_text_chunks(tiny["out"] / "plain.png")
    result, records = _decode(tiny, str(tiny["in"] / "comfy.latent"), extra=("--overwrite", "--no-metadata"))
    assert result.exit_code == 0 and "workflow" not in _png_text_chunks(tiny["out"] / "comfy.png")


# ---------------------------------------------------------------------------------------------------------
# diffusers 0.42: pipelines' output_type="latent", packed and unpacked with the pipelines' own functions.

def test_diffusers_flux_packed_latents_read_with_either_grid_or_the_pixel_size(tmp_path):
    from diffusers.pipelines.flux.pipeline_flux import FluxPipeline

    z = _randn(2, 16, 6, 10)  # FluxPipeline's latents are already (z - shift) * scale
    packed = FluxPipeline._pack_latents(z, 2, 16, 6, 10)  # what output_type="latent" returns: [2, 15, 64]
    expected = FluxPipeline._unpack_latents(packed, 48, 80, 8)  # what the pipeline hands its VAE, before unscaling
    save_file({"latents": packed}, tmp_path / "px.safetensors", metadata={"height": "48", "width": "80"})
    assert torch.equal(_read(tmp_path / "px.safetensors", "flux").latent, expected)
    save_file({"latents": packed}, tmp_path / "bare.safetensors")
    vae_grid = _read(tmp_path / "bare.safetensors", "flux", size=(6, 10))
    token_grid = _read(tmp_path / "bare.safetensors", "flux", size=(3, 5))
    assert torch.equal(vae_grid.latent, expected) and torch.equal(token_grid.latent, expected)
    assert "VAE's latent grid (a 48x80 px image)" in vae_grid.note and "token grid" in token_grid.note
    with pytest.raises(LatentError, match=r"bare.safetensors: --latent-size 5x5 does not fit.*--latent-size 6x10"):
        _read(tmp_path / "bare.safetensors", "flux", size=(5, 5))


def test_diffusers_flux2_packed_latents_and_klein_raw_latents(tmp_path):
    from diffusers.pipelines.flux2.pipeline_flux2 import Flux2Pipeline

    z = _randn(1, 128, 3, 5)  # batch-norm normalised, 2x2-patchified: the transformer's space
    packed = Flux2Pipeline._pack_latents(z).contiguous()  # [1, 15, 128]
    expected = Flux2Pipeline._unpack_latents_with_ids(packed, Flux2Pipeline._prepare_latent_ids(z))  # [1, 128, 3, 5]
    save_file({"latents": packed}, tmp_path / "f2.safetensors")
    for size in ((3, 5), (6, 10)):  # FLUX.2's token grid is its PiD grid; (6, 10) is the VAE's /8 grid
        assert torch.equal(_read(tmp_path / "f2.safetensors", "flux2", size=size).latent, expected)
    save_file({"latents": packed}, tmp_path / "f2px.safetensors", metadata={"height": "48", "width": "80"})
    assert torch.equal(_read(tmp_path / "f2px.safetensors", "flux2").latent, expected)

    # Flux2KleinPipeline(output_type="latent") returns the VAE's raw [B, 32, H/8, W/8]: it undoes the batch-norm
    # (latents * sqrt(var + eps) + mean) and the patchify before that return.
    mean, var, eps = _randn(128, seed=1), torch.rand(128, generator=torch.Generator().manual_seed(2)) + 0.5, 1e-4
    raw = Flux2Pipeline._unpatchify_latents(z * torch.sqrt(var + eps).view(1, -1, 1, 1) + mean.view(1, -1, 1, 1))
    torch.save(raw, tmp_path / "klein.pt")
    reading = _read(tmp_path / "klein.pt", "flux2", bn_stats=lambda: (mean, var))
    assert reading.layout == "raw"
    torch.testing.assert_close(reading.latent, z, rtol=1e-5, atol=1e-5)


def test_diffusers_qwenimage_packed_and_five_d_latents(tmp_path):
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import QwenImagePipeline

    z = _randn(1, 16, 6, 10)  # normalised with the VAE's latents_mean/std
    packed = QwenImagePipeline._pack_latents(z, 1, 16, 6, 10)
    unpacked = QwenImagePipeline._unpack_latents(packed, 48, 80, 8)  # [1, 16, 1, 6, 10]
    save_file({"latents": packed}, tmp_path / "q.safetensors", metadata={"height": "48", "width": "80"})
    save_file({"latents": unpacked}, tmp_path / "q5.safetensors")
    assert torch.equal(_read(tmp_path / "q.safetensors", "qwenimage").latent, unpacked[:, :, 0])
    assert torch.equal(_read(tmp_path / "q5.safetensors", "qwenimage").latent, unpacked[:, :, 0])


@pytest.mark.parametrize("backbone, shape", [("sd3", (1, 16, 8, 6)), ("sdxl", (2, 4, 8, 6)), ("flux", (1, 16, 8, 6))])
def test_diffusers_spatial_latents_of_sd3_sdxl_and_zimage_are_read_as_they_are(tmp_path, backbone, shape):
    z = _randn(*shape)  # SD3/SDXL/Z-Image pipelines return latents in the model's (normalised) space, unpacked
    save_file({"latents": z}, tmp_path / "l.safetensors")
    reading = _read(tmp_path / "l.safetensors", backbone)
    assert reading.layout == "pid" and torch.equal(reading.latent, z)


# ---------------------------------------------------------------------------------------------------------
# InvokeAI 5/6: context.tensors.save → ObjectSerializerDisk.save: torch.save(tensor, tensors/<Class>_<tid>-<uuid>).

def _invokeai_save(folder: Path, tensor: torch.Tensor) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"Tensor_140245861-{uuid.UUID(int=len(list(folder.iterdir())) + 1)}"
    torch.save(tensor, path)
    return path


def test_invokeai_latents_without_a_suffix_are_read_named_or_from_their_folder(tmp_path):
    z = _randn(1, 4, 8, 6)  # InvokeAI's SDXL denoise output: scaled latents (LatentsToImage divides them)
    path = _invokeai_save(tmp_path / "tensors", z)
    reading = _read(path, "sdxl")
    assert reading.layout == "pid" and torch.equal(reading.latent, z)
    (tmp_path / "tensors" / "LICENSE").write_text("not a latent")
    assert [s.path for s in collect_inputs([str(tmp_path / "tensors")])] == [path]
    assert [s.path for s in collect_inputs([str(path)])] == [path]
    with pytest.raises(ValueError, match=r"LICENSE: not a latent or image file.*without one holding"):
        collect_inputs([str(tmp_path / "tensors" / "LICENSE")])


def test_invokeai_latent_decodes_end_to_end(tiny):
    path = _invokeai_save(tiny["in"], _randn(1, 16, 2, 2))
    result, records = _decode(tiny, str(path))
    assert result.exit_code == 0, result.output
    assert records[path.name]["status"] == "ok" and (tiny["out"] / f"{path.name}.png").is_file()


# ---------------------------------------------------------------------------------------------------------
# A latent whose scale says it was read the wrong way.

@pytest.mark.parametrize("backbone", ["flux", "sd3", "sdxl", "qwenimage"])
def test_raw_vae_latent_read_as_normalised_warns_with_the_flag_that_fits(tmp_path, backbone):
    z = _randn(*COMFY_SHAPES[backbone])
    raw = PROCESS_OUT[backbone](z)  # vae.encode(...).latent_dist.mean, saved as is
    raw = raw[:, :, 0] if raw.dim() == 5 else raw
    save_file({"latent": raw}, tmp_path / "raw.safetensors")
    warning = scale_warning(_read(tmp_path / "raw.safetensors", backbone), "raw.safetensors")
    assert warning is not None and "raw.safetensors" in warning and warning.endswith("pass --latent-format raw")
    assert scale_warning(_read(tmp_path / "raw.safetensors", backbone, fmt="raw"), "raw.safetensors") is None
    z = z[:, :, 0] if z.dim() == 5 else z
    save_file({"latent": z}, tmp_path / "norm.safetensors")
    assert scale_warning(_read(tmp_path / "norm.safetensors", backbone), "norm.safetensors") is None
    warning = scale_warning(_read(tmp_path / "norm.safetensors", backbone, fmt="raw"), "norm.safetensors")
    assert warning is not None and warning.endswith("pass --latent-format pid")


def test_sdxl_noisy_latent_in_euler_frame_is_not_questioned():
    from pid_cli.inputs.latent_files import Reading

    sigma = 8.0  # x_t = x0 + σ·ε: RMS ~8 in the scheduler's frame, ~1 in the frame the decoder sees
    x_t = _randn(1, 4, 8, 8) + sigma * _randn(1, 4, 8, 8, seed=1)
    reading = Reading(x_t, "pid", other=("raw", x_t * 0.13025))
    assert scale_warning(reading, "x", 1 / (sigma * sigma + 1) ** 0.5) is None
    assert scale_warning(reading, "x") is not None


def test_raw_latent_warning_reaches_stderr_and_the_record(tiny):
    save_file({"latent": PROCESS_OUT["flux"](_randn(1, 16, 2, 2))}, tiny["in"] / "raw.safetensors")
    result, records = _decode(tiny, str(tiny["in"]))
    assert result.exit_code == 0, result.output
    (warning,) = records["raw.safetensors"]["warnings"]
    assert "raw.safetensors" in warning and "--latent-format raw" in warning
    assert f"warning: {warning}" in result.stderr
    assert "1 decoded, 0 failed, 1 with warnings" in result.stderr


def test_latent_size_says_how_it_was_read(tiny):
    from diffusers.pipelines.flux.pipeline_flux import FluxPipeline

    packed = FluxPipeline._pack_latents(_randn(1, 16, 2, 2), 1, 16, 2, 2)  # one token
    save_file({"latents": packed}, tiny["in"] / "p.safetensors")
    result, records = _decode(tiny, str(tiny["in"]), extra=("--latent-size", "2x2"))
    assert result.exit_code == 0, result.output
    assert "note: --latent-size 2x2 read as the VAE's latent grid (a 16x16 px image)" in result.stderr
    result, records = _decode(tiny, str(tiny["in"]), extra=("--latent-size", "3x3", "--overwrite"))
    assert result.exit_code == 1
    assert "give --latent-size 2x2" in records["p.safetensors"]["error"]
