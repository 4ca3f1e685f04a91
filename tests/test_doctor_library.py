"""`pid doctor` and the library API (`pid_cli.Decoder`)."""

from __future__ import annotations

import os
import shutil

import numpy as np
import torch
import yaml
from conftest import PARITY, tiny_config
from typer.testing import CliRunner

import pid_cli
from pid_cli import doctor
from pid_cli.cli import app
from pid_cli.registry import load_registry


def test_doctor_passes_on_a_healthy_install():
    result = CliRunner().invoke(app, ["doctor", "--no-timing"])
    assert result.exit_code == 0, result.output
    assert "upstream parity (cpu)" in result.output and "ok" in result.output


def test_doctor_fails_when_the_computation_is_wrong(tmp_path, monkeypatch):
    broken = tmp_path / "parity"
    shutil.copytree(doctor.FIXTURE, broken)
    from pid_cli.model import read_state_dict

    state = {k: v.clone() for k, v in read_state_dict(broken / "model_ema_bf16.pth").items()}  # off the mmap
    state["final_layer.linear.bias"] = state["final_layer.linear.bias"] + 0.01  # a subtly wrong weight
    torch.save({f"net.{k}": v for k, v in state.items()}, broken / "model_ema_bf16.pth")
    monkeypatch.setattr(doctor, "FIXTURE", broken)
    result = CliRunner().invoke(app, ["doctor", "--no-timing"])
    assert result.exit_code == 1 and "FAIL" in result.output


def test_compiled_decoders_keep_their_kernel_cache_with_pids_cache(tmp_path, monkeypatch):
    entry = _tiny_entry(tmp_path)
    monkeypatch.setenv("PID_CACHE_DIR", str(tmp_path / "pid-cache"))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "recorded")  # so the teardown restores the original state
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    pid_cli.Decoder(entry, entry.weights.path, compile=False)
    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ  # an eager decoder leaves torch alone
    pid_cli.Decoder(entry, entry.weights.path, compile=True)
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "pid-cache" / "inductor")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    pid_cli.Decoder(entry, entry.weights.path, compile=True)
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine")  # the user's choice wins


def _tiny_entry(tmp_path):
    reg = tmp_path / "registry.yaml"
    reg.write_text(yaml.safe_dump({"version": 1, "entries": [{
        "id": "tiny", "base": "flux-2k", "variant": "tiny", "path": str(PARITY / "v1_flux" / "model_fp32.safetensors"),
        "net_config": tiny_config("v1_flux")}]}))
    return load_registry([reg]).resolve("zimage", "tiny")  # an alias resolves to the flux entry


def test_decoder_library_api(tmp_path):
    entry = _tiny_entry(tmp_path)
    dec = pid_cli.Decoder(entry, entry.weights.path)
    latents = torch.randn(2, 16, 2, 3, generator=torch.Generator().manual_seed(0))
    text = torch.randn(1, 12, 32, generator=torch.Generator().manual_seed(1))
    images = dec.decode(latents, prompt_embeds=text.expand(2, -1, -1), seed=7)
    assert images.shape == (2, 64, 96, 3) and images.dtype == np.uint8
    again = dec.decode(latents[1:], prompt_embeds=text, seed=[8])  # item 1 of the batch used seed 7 + 1
    assert np.abs(again[0].astype(int) - images[1]).max() <= 1
    deep = dec.decode(latents[:1], prompt_embeds=text, seed=7, bit_depth=16)
    assert deep.dtype == np.uint16 and np.abs(deep[0] // 257 - images[0].astype(int)).max() <= 1


def test_list_says_which_backbones_take_images():
    import json

    result = CliRunner().invoke(app, ["list", "--json"])
    assert result.exit_code == 0
    records = {r["id"]: r["image_inputs"] for r in json.loads(result.stdout)}
    assert records["dinov2-2k"] is True and records["siglip-2k"] is True  # the RAE encoders take images too
    assert all(records.values())
    table = CliRunner().invoke(app, ["list"], env={"COLUMNS": "200"}).stdout
    assert "latents only" not in table and "dinov2" in table


def test_doctor_reports_the_8bit_modes_per_gpu_architecture(monkeypatch):
    """`pid doctor`'s rows for --attention 8bit and --matmul fp8 (no GPU here: the capability and the
    FP8 probe are stood in for)."""
    import torch

    from pid_cli import doctor
    from pid_cli.model import linear8

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (8, 0))
    attention, matmul = doctor._eight_bit_status(torch.device("cuda:0"))
    assert attention == matmul == "not available: needs 8-bit tensor cores (sm_89 or newer), this GPU is sm_80"

    def refuse(device):
        raise ValueError("--matmul fp8: this torch build cannot run per-row FP8 matmuls")

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (9, 0))
    monkeypatch.setattr(linear8, "probe", refuse)
    attention, matmul = doctor._eight_bit_status(torch.device("cuda:0"))
    assert attention.startswith(("available as --attention 8bit (sm_90", "not available: Triton"))
    assert matmul == "not available: --matmul fp8: this torch build cannot run per-row FP8 matmuls"
    monkeypatch.setattr(linear8, "probe", lambda device: None)
    assert doctor._eight_bit_status(torch.device("cuda:0"))[1] == "available as --matmul fp8 (sm_90)"
