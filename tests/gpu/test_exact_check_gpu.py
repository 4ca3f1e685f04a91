"""The 8-bit check on a GPU (pipeline.Decoder), with the real kernels: a decode in both 8-bit modes is checked once
per output size against the exact path and kept; a broken 8-bit attention trips the check, and that size then
decodes on the exact path, bit for bit what a decoder without 8-bit modes gives."""

from __future__ import annotations

import pytest
import torch
import yaml
from conftest import tiny_config, tiny_flux_entry
from safetensors.torch import save_file

from pid_cli.model import PiDConfig, PiDNet, inference
from pid_cli.pipeline import Decoder
from pid_cli.registry import load_registry

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def entry(tmp_path_factory):
    """Random weights of a small network whose head dims (64, 72) the 8-bit kernel takes."""
    folder = tmp_path_factory.mktemp("net")
    cfg = {**tiny_config("v1_flux"), "hidden_size": 128, "num_groups": 2, "pixel_attn_hidden_size": 144,
           "pixel_num_groups": 2}
    torch.manual_seed(0)
    net = PiDNet(PiDConfig.from_dict(cfg))
    for name, p in net.named_parameters():
        p.data = torch.randn_like(p) * 0.05 if "norm" not in name else torch.ones_like(p)
    save_file({k: v.bfloat16() for k, v in net.state_dict().items()}, folder / "net.safetensors")
    reg = folder / "registry.yaml"
    reg.write_text(yaml.safe_dump({"version": 1, "entries": [
        tiny_flux_entry(net_config=cfg, path=str(folder / "net.safetensors"))]}))
    return load_registry([reg]).get("tiny-flux")


def decode(dec: Decoder, hw=(16, 16), seed=0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    latents, text = torch.randn(2, 16, *hw, generator=gen), torch.randn(2, 12, 32, generator=gen)
    return dec.decode_tensor(latents, text, 0.2, seeds=[3, 4]).cpu()


@pytest.mark.parametrize("compile", [False, True])
def test_8bit_decodes_are_checked_once_per_size_and_kept(entry, compile):
    dec = Decoder(entry, entry.weights.path, device="cuda", attention="8bit", matmul="fp8", compile=compile,
                  check_psnr=20)
    plain = Decoder(entry, entry.weights.path, device="cuda", compile=False)
    images = decode(dec)
    check = dec.last_check
    print(f"\n8-bit check, 512x512 (compile {compile}): {check.describe()}")
    assert check is not None and check.passed and 20 < check.psnr_db < 80
    assert not torch.equal(images, decode(plain))
    decode(dec, seed=1)
    assert dec.last_check is None
    decode(dec, hw=(16, 24))
    assert dec.last_check is not None and len(dec.checks) == 2


def test_a_broken_8bit_attention_falls_back_to_the_exact_path(entry, monkeypatch):
    real = inference.ATTENTION["8bit"]
    monkeypatch.setitem(inference.ATTENTION, "8bit", lambda q, k, v: -real(q, k, v))
    dec = Decoder(entry, entry.weights.path, device="cuda", attention="8bit", compile=False)
    plain = Decoder(entry, entry.weights.path, device="cuda", compile=False)
    images = decode(dec)
    print(f"\nbroken 8-bit attention: {dec.last_check.describe()}")
    assert not dec.last_check.passed
    assert torch.equal(images, decode(plain))
    assert torch.equal(decode(dec, seed=1), decode(plain, seed=1)) and dec.last_check is None
