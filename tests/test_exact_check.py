"""The 8-bit check (pipeline.Decoder): with an 8-bit mode on, the first image of each output size is decoded again on
the exact path and compared; its PSNR goes into that image's PNG and record, and below the threshold the size falls
back to the exact path with a warning.

On the CPU the 8-bit modes run their torch references (the device check lifted, as the CLI refuses them there);
a forced large error in those references must trip the check."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import yaml
from conftest import tiny_config, tiny_flux_entry
from PIL import Image
from safetensors.torch import save_file
from typer.testing import CliRunner

from pid_cli.cli import app
from pid_cli.kernels import reference
from pid_cli.model import PiDConfig, PiDNet, inference, layers, linear8
from pid_cli.pipeline import Decoder, ExactCheck, compare_levels
from pid_cli.registry import load_registry
from pid_cli.text import save_prompt_embeds


@pytest.fixture
def on_cpu(monkeypatch):
    """Lift the 8-bit modes' GPU checks: the CPU runs the same arithmetic through the kernels' torch references
    (denormals flushed: the random networks' tiny values made the CPU's float arithmetic twice as slow)."""
    monkeypatch.setattr(inference, "require_8bit_tensor_cores", lambda net, flag: None)
    monkeypatch.setattr(layers, "HAS_TRITON", True)
    monkeypatch.setattr(linear8, "probe", lambda device: None)
    torch.set_flush_denormal(True)
    yield
    torch.set_flush_denormal(False)


def attention8_entry(tmp_path):
    """A registry entry of random weights on disk whose head dims (64, 72) the 8-bit attention takes."""
    cfg = {**tiny_config("v1_flux"), "hidden_size": 128, "num_groups": 2, "pixel_attn_hidden_size": 144,
           "pixel_num_groups": 2}
    torch.manual_seed(0)
    net = PiDNet(PiDConfig.from_dict(cfg))
    for name, p in net.named_parameters():  # non-zero everywhere, so attention reaches the output
        p.data = torch.randn_like(p) * 0.2 if "norm" not in name else torch.ones_like(p)
    save_file(net.state_dict(), tmp_path / "net.safetensors")
    reg = tmp_path / "registry.yaml"
    reg.write_text(yaml.safe_dump({"version": 1, "entries": [
        tiny_flux_entry(net_config=cfg, path=str(tmp_path / "net.safetensors"))]}))
    return load_registry([reg]).get("tiny-flux")


def attention8_decoder(tmp_path, **kwargs) -> Decoder:
    entry = attention8_entry(tmp_path)
    return Decoder(entry, tmp_path / "net.safetensors", device="cpu", dtype="fp32", compile=False, **kwargs)


def decode(dec: Decoder, shape=(2, 16, 2, 2), seed=0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    latents, text = torch.randn(*shape, generator=gen), torch.randn(shape[0], 12, 32, generator=gen)
    return dec.decode_tensor(latents, text, 0.0, seeds=[7, 8][: shape[0]], steps=2)


def test_levels_comparison_reports_psnr_and_largest_step():
    a = torch.zeros(3, 4, 4)
    assert math.isinf(compare_levels(a, a, 40).psnr_db) and compare_levels(a, a, 40).passed
    b = a.clone()
    b[0, 0, 0] = 20 / 127.5  # one channel of one pixel 20 levels up (of 48 values)
    check = compare_levels(b, a, 40)
    assert check.max_delta == 20
    assert check.psnr_db == pytest.approx(10 * math.log10(255**2 / (400 / 48)))
    assert not ExactCheck(39.9, 3, 40).passed and ExactCheck(40.0, 3, 40).passed
    assert ExactCheck(math.inf, 0, 40).record() == {"psnr_db": None, "max_delta": 0, "threshold_db": 40,
                                                   "fallback": False}  # JSON has no Infinity


@pytest.mark.slow  # ~10 s: six decodes through the 8-bit attention's torch reference
def test_8bit_attention_is_checked_once_per_size_and_kept_when_close(tmp_path, on_cpu):
    dec = attention8_decoder(tmp_path, attention="8bit")
    exact = attention8_decoder(tmp_path)  # the same weights, no 8-bit mode
    assert dec.exact_net is not None and exact.exact_net is None  # no 8-bit mode: nothing to check against
    first = decode(dec)
    check = dec.last_check
    assert check is not None and check.passed and 20 < check.psnr_db < 100
    assert dec.checks == {(64, 64): check}
    plain = decode(exact)
    assert not torch.equal(first, plain)  # the 8-bit images are kept: they differ from the exact ones
    assert compare_levels(first[0], plain[0], 40).psnr_db == pytest.approx(check.psnr_db, abs=0.5)
    decode(dec)
    assert dec.last_check is None  # checked once per output size
    decode(dec, shape=(1, 16, 2, 4))
    assert dec.last_check is not None and set(dec.checks) == {(64, 64), (64, 128)}
    # the exact path shares the 8-bit network's weights (no second copy) but not its attention arithmetic
    params = {p.data_ptr() for p in dec.net.parameters()}
    assert all(p.data_ptr() in params for p in dec.exact_net.parameters())
    assert {m.sdpa for m in inference.attentions(dec.net)} == {inference.ATTENTION["8bit"]}
    assert {m.sdpa for m in inference.attentions(dec.exact_net)} == {layers.attention}


def test_a_large_8bit_error_falls_back_to_the_exact_path_for_that_size(tmp_path, on_cpu, monkeypatch):
    quantized = reference.attend_quantized
    monkeypatch.setattr(reference, "attend_quantized", lambda *a: -quantized(*a))  # a broken kernel
    dec = attention8_decoder(tmp_path, attention="8bit")
    exact = attention8_decoder(tmp_path)
    images = decode(dec)
    assert dec.last_check is not None and not dec.last_check.passed
    torch.testing.assert_close(images, decode(exact), rtol=0, atol=0)  # the whole batch, decoded exactly
    again = decode(dec, seed=1)
    assert dec.last_check is None  # not checked again: the size stays on the exact path
    torch.testing.assert_close(again, decode(exact, seed=1), rtol=0, atol=0)


def test_the_check_can_be_turned_off(tmp_path, on_cpu):
    dec = attention8_decoder(tmp_path, attention="8bit", check_psnr=None)
    decode(dec)
    assert dec.exact_net is None and dec.last_check is None and dec.checks == {}


@pytest.mark.parametrize("broken", [False, True])
def test_doctor_makes_the_same_check_on_the_weights_on_disk(tmp_path, on_cpu, monkeypatch, broken):
    from pid_cli import doctor

    if broken:
        product = linear8.reference_product
        monkeypatch.setattr(linear8, "reference_product", lambda *a: -product(*a))
    rows = {name: (ok, detail) for name, ok, detail in doctor.decode_checks(attention8_entry(tmp_path),
                                                                             torch.device("cpu"), True, size=64,
                                                                             threshold_db=25)}
    assert "tiny-flux's weights" in rows["full-size decode"][1]
    ok, detail = rows["8-bit check"]
    assert ok is not broken and "--attention 8bit --matmul fp8 at 64², tiny-flux's weights: PSNR" in detail
    assert ("below 25 dB" in detail) is broken  # tiny networks move more under FP8 than full-size ones


# ---------------------------------------------------------------------------------------------------------
# pid decode: stderr, PNG metadata, records


@pytest.fixture
def run_dir(tmp_path):
    reg = tmp_path / "registry.yaml"
    reg.write_text(yaml.safe_dump({"version": 1, "entries": [tiny_flux_entry()]}))
    emb = tmp_path / "emb.safetensors"
    save_prompt_embeds(emb, [""], torch.randn(1, 12, 32, generator=torch.Generator().manual_seed(0)))
    (tmp_path / "in").mkdir()
    gen = torch.Generator().manual_seed(1)
    save_file({"x": torch.randn(2, 16, 2, 2, generator=gen)}, tmp_path / "in" / "a.safetensors")
    save_file({"x": torch.randn(16, 2, 2, generator=gen)}, tmp_path / "in" / "b.safetensors")
    return tmp_path


def pid_decode(root, out, *extra):
    args = ["decode", str(root / "in"), "--backbone", "flux", "--variant", "tiny", "--registry", str(root /
            "registry.yaml"), "--prompt-embeds", str(root / "emb.safetensors"), "--out", str(root / out),
            "--quiet", "--json", "--dtype", "bf16", "--batch-size", "3", *extra]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    records = {json.loads(line)["input"].rsplit("/", 1)[1]: json.loads(line)
               for line in result.stdout.splitlines() if line.startswith("{")}
    return result, records


def test_pid_decode_records_the_check_in_the_checked_png_and_its_record(run_dir, on_cpu):
    # this 16-channel network's matmuls are few elements deep: FP8 moves it more than a full-size one (~38 dB)
    result, records = pid_decode(run_dir, "fp8", "--matmul", "fp8", "--check-psnr", "25")
    assert "note: 8-bit check at 64x64 (a_0.png): PSNR" in result.stderr
    check = records["a.safetensors"]["exact_check"]
    assert [c["output"].rsplit("/", 1)[1] for c in check] == ["a_0.png"] and not check[0]["fallback"]
    assert "exact_check" not in records["b.safetensors"]  # one image per output size is checked
    info = {name: Image.open(run_dir / "fp8" / name).info for name in ("a_0.png", "a_1.png", "b.png")}
    assert info["a_0.png"]["pid:8bit_check"].startswith(f"PSNR {check[0]['psnr_db']:.1f} dB")
    assert "pid:8bit_check" not in info["a_1.png"] and "pid:8bit_check" not in info["b.png"]
    assert all(i["pid:matmul"] == "fp8" for i in info.values())


def test_pid_decode_falls_back_with_a_warning_when_the_check_fails(run_dir, on_cpu, monkeypatch):
    product = linear8.reference_product
    monkeypatch.setattr(linear8, "reference_product", lambda *a: product(*a) * 1.3)  # a broken FP8 product
    result, records = pid_decode(run_dir, "fp8", "--matmul", "fp8")
    assert "warning: 8-bit check at 64x64 (a_0.png):" in result.stderr and "exact path from here on" in result.stderr
    check = records["a.safetensors"]["exact_check"][0]
    assert check["fallback"] and check["psnr_db"] < 25 and check["threshold_db"] == 40
    assert any("8-bit check" in w for w in records["a.safetensors"]["warnings"])
    pid_decode(run_dir, "exact")
    for name in ("a_0.png", "a_1.png", "b.png"):  # every image of that size: the exact path's pixels
        fp8, exact = (Image.open(run_dir / out / name) for out in ("fp8", "exact"))
        assert np.array_equal(np.asarray(fp8), np.asarray(exact))
        assert "pid:matmul" not in fp8.info and "exact path" in fp8.info["pid:8bit_fallback"]
    # a lower threshold, stated on the command line, keeps the 8-bit images
    result, records = pid_decode(run_dir, "low", "--matmul", "fp8", "--check-psnr", "1")
    assert not records["a.safetensors"]["exact_check"][0]["fallback"]
    assert Image.open(run_dir / "low" / "a_1.png").info["pid:matmul"] == "fp8"
    result, records = pid_decode(run_dir, "off", "--matmul", "fp8", "--check-psnr", "0")
    assert "8-bit check" not in result.stderr and "exact_check" not in records["a.safetensors"]
