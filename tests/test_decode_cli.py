"""`pid decode` end to end on CPU with the tiny upstream fixture weights, registered through a
user registry: formats, sizes, metadata, determinism, shards, resume, exit codes, interrupts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import yaml
from conftest import tiny_flux_entry
from PIL import Image
from safetensors.torch import save_file
from typer.testing import CliRunner

from pid_cli.cli import app
from pid_cli.inputs.images import read_image
from pid_cli.text import save_prompt_embeds

SCALE = 32  # tiny v1_flux: 8 px per latent cell × sr 4


@pytest.fixture
def setup(tmp_path):
    """A registry with the tiny flux decoder, prompt embeddings, and a folder of inputs."""
    reg = tmp_path / "registry.yaml"
    reg.write_text(yaml.safe_dump({"version": 1, "entries": [tiny_flux_entry()]}))
    gen = torch.Generator().manual_seed(0)
    emb = tmp_path / "emb.safetensors"
    save_prompt_embeds(emb, ["", "a red fox"], torch.randn(2, 12, 32, generator=gen))
    inputs = tmp_path / "in"
    inputs.mkdir()
    return {"reg": reg, "emb": emb, "inputs": inputs, "out": tmp_path / "out", "gen": gen}


def _args(s, *extra):
    return ["decode", str(s["inputs"]), "--backbone", "flux", "--variant", "tiny", "--registry", str(s["reg"]),
            "--prompt-embeds", str(s["emb"]), "--out", str(s["out"]), "--quiet", *extra]


def _run(args):
    result = CliRunner().invoke(app, args)
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    return result, records


def _latent(s, *shape):
    return torch.randn(*shape, generator=s["gen"])


def _pixels(path):
    return np.asarray(Image.open(path))


def test_every_format_and_layout_decodes(setup):
    s, d = setup, setup["inputs"]
    z = _latent(s, 3, 16, 2, 2)
    save_file({"latent": z[0]}, d / "chw.safetensors", metadata={"prompt": "a red fox"})
    torch.save({"latents": z[:2]}, d / "batch.pt")
    np.save(d / "one.npy", z[2:3].numpy())
    np.savez(d / "arrays.npz", samples=_latent(s, 1, 16, 2, 4).numpy())
    packed = z[:1].view(1, 16, 1, 2, 1, 2).permute(0, 2, 4, 1, 3, 5).reshape(1, 1, 64).contiguous()
    save_file({"latents": packed}, d / "packed.safetensors", metadata={"height": "16", "width": "16"})
    save_file({"latent_tensor": z[:1] / 0.3611 + 0.1159, "latent_format_version_0": torch.tensor([])},
              d / "comfy.latent", metadata={"prompt": "{}"})  # as ComfyUI's SaveLatent writes it
    result, records = _run(_args(s, "--json"))
    assert result.exit_code == 0, result.output
    assert sorted(r["status"] for r in records) == ["ok"] * 6
    out = s["out"]
    names = sorted(p.name for p in out.iterdir())
    assert names == ["arrays.png", "batch_0.png", "batch_1.png", "chw.png", "comfy.png", "one.png", "packed.png"]
    assert Image.open(out / "arrays.png").size == (4 * SCALE, 2 * SCALE)
    assert Image.open(out / "chw.png").size == (2 * SCALE, 2 * SCALE)
    # z[0] through three containers/layouts (seed 0, empty prompt) gives the same pixels
    assert np.abs(_pixels(out / "packed.png").astype(int) - _pixels(out / "batch_0.png")).max() <= 1
    assert np.abs(_pixels(out / "comfy.png").astype(int) - _pixels(out / "batch_0.png")).max() <= 1
    assert not np.array_equal(_pixels(out / "chw.png"), _pixels(out / "batch_0.png"))  # its prompt differs
    info = Image.open(out / "chw.png").info
    assert info["pid:backbone"] == "flux" and info["pid:variant"] == "tiny" and info["pid:prompt"] == "a red fox"
    assert info["pid:seed"] == "0" and info["pid:steps"] == "4" and info["pid:source"].endswith("chw.safetensors")
    assert Image.open(out / "batch_1.png").info["pid:seed"] == "1"


def test_deterministic_and_batch_invariant(setup, tmp_path):
    s = setup
    for i in range(5):
        save_file({"x": _latent(s, 16, 2, 2)}, s["inputs"] / f"{i}.safetensors")
    runs = {}
    settings = {"b1": ["--batch-size", "1"], "b3": ["--batch-size", "3"], "again": ["--batch-size", "1"]}
    for label, extra in settings.items():
        s["out"] = tmp_path / label
        assert _run(_args(s, *extra))[0].exit_code == 0
        runs[label] = {p.name: _pixels(p) for p in s["out"].iterdir()}
    assert runs["b1"].keys() == runs["b3"].keys() and len(runs["b1"]) == 5
    # each PNG says what its exact pixels depend on: batches of 3 and 2 here, fp32 eager on the CPU
    runtime = {label: {n: Image.open(tmp_path / label / n).info["pid:runtime"] for n in runs["b1"]}
               for label in ("b1", "b3")}
    stem = f"torch {torch.__version__}, cpu, float32, eager, batch "
    assert set(runtime["b1"].values()) == {stem + "1"}
    assert sorted(runtime["b3"].values()) == [stem + "2"] * 2 + [stem + "3"] * 3
    for name in runs["b1"]:
        assert np.array_equal(runs["b1"][name], runs["again"][name])  # same command, same pixels
        assert np.abs(runs["b1"][name].astype(int) - runs["b3"][name]).max() <= 1  # fp32 batching round-off only
    s["out"] = tmp_path / "seed1"
    assert _run(_args(s, "--seed", "1", "--batch-size", "1"))[0].exit_code == 0
    assert not np.array_equal(_pixels(s["out"] / "0.png"), runs["b1"]["0.png"])


def test_shards_cover_every_input_once(setup, tmp_path):
    s = setup
    for i in range(7):
        save_file({"x": _latent(s, 16, 2, 2)}, s["inputs"] / f"{i}.safetensors")
    seen = []
    for k in range(3):
        result, records = _run(_args(s, "--shard", f"{k}/3", "--json"))
        assert result.exit_code == 0
        seen += [r["input"] for r in records]
    assert sorted(seen) == sorted(str(p) for p in s["inputs"].iterdir())
    assert len({p.name for p in s["out"].iterdir()}) == 7


def test_rerun_skips_and_overwrite_redoes(setup):
    s = setup
    save_file({"x": _latent(s, 16, 2, 2)}, s["inputs"] / "a.safetensors")
    assert _run(_args(s))[0].exit_code == 0
    mtime = (s["out"] / "a.png").stat().st_mtime_ns
    result, records = _run(_args(s, "--json"))
    assert result.exit_code == 0 and [r["status"] for r in records] == ["skipped"]
    assert (s["out"] / "a.png").stat().st_mtime_ns == mtime
    result, records = _run(_args(s, "--json", "--overwrite"))
    assert [r["status"] for r in records] == ["ok"] and (s["out"] / "a.png").stat().st_mtime_ns != mtime


def test_bad_inputs_fail_alone_with_exit_code_1(setup, tmp_path):
    s = setup
    save_file({"x": _latent(s, 16, 2, 2)}, s["inputs"] / "good.safetensors")
    save_file({"x": _latent(s, 4, 2, 2)}, s["inputs"] / "sdxl.safetensors")
    save_file({"x": torch.full((16, 2, 2), float("inf"))}, s["inputs"] / "inf.safetensors")
    (s["inputs"] / "trunc.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    manifest_out = tmp_path / "records.jsonl"
    result, records = _run(_args(s, "--json", "--manifest-out", str(manifest_out)))
    assert result.exit_code == 1
    by_name = {os.path.basename(r["input"]): r for r in records}
    assert by_name["good.safetensors"]["status"] == "ok"
    assert "fits --backbone sdxl" in by_name["sdxl.safetensors"]["error"]
    assert "NaN or Inf" in by_name["inf.safetensors"]["error"]
    assert by_name["trunc.safetensors"]["status"] == "failed"
    assert [json.loads(line) for line in manifest_out.read_text().splitlines()] == records
    assert sorted(p.name for p in s["out"].iterdir()) == ["good.png"]


def test_fail_fast_stops_at_the_first_failure(setup):
    s = setup
    save_file({"x": _latent(s, 4, 2, 2)}, s["inputs"] / "a_bad.safetensors")
    for i in range(3):
        save_file({"x": _latent(s, 16, 2, 2)}, s["inputs"] / f"b{i}.safetensors")
    result, records = _run(_args(s, "--json", "--fail-fast"))
    assert result.exit_code == 1 and records[0]["status"] == "failed"
    assert not s["out"].exists() or not list(s["out"].iterdir())


@pytest.mark.parametrize("extra, message", [
    (["--backbone", "nope"], "unknown backbone"),
    (["--steps", "9"], "--steps"),
    (["--batch-size", "0"], "--batch-size"),
    (["--name", "{stem}{colour}.png"], "unknown field"),
    (["--attention", "4bit"], "--attention must be bf16 or 8bit"),
    (["--attention", "8bit"], "supports head dims 64..96; this checkpoint has [8]"),
    (["--compile", "maybe"], "--compile must be auto, on or off"),
    (["--matmul", "fp4"], "--matmul must be bf16 or fp8"),
    (["--matmul", "fp8"], "--matmul fp8 needs an NVIDIA GPU"),
])
def test_usage_errors_exit_2(setup, extra, message):
    s = setup
    save_file({"x": _latent(s, 16, 2, 2)}, s["inputs"] / "a.safetensors")
    result = CliRunner().invoke(app, _args(s, *extra))
    assert result.exit_code == 2 and message in result.output


def test_target_mismatch_suggests_the_right_target(setup):
    s = setup
    data = yaml.safe_load(s["reg"].read_text())
    data["targets"] = {"2k": "tiny", "4k": "tiny"}  # both targets pick the tiny checkpoint here
    s["reg"].write_text(yaml.safe_dump(data))
    save_file({"x": _latent(s, 16, 64, 64)}, s["inputs"] / "a.safetensors")  # decodes to 2048x2048
    args = [a for a in _args(s, "--json") if a not in ("--variant", "tiny")]
    result, records = _run([*args, "--target", "4k"])
    assert result.exit_code == 1
    assert "decodes to 2048x2048, not a 4k image; use --target 2k" in records[0]["error"]


def test_sixteen_bit_output(setup):
    s = setup
    save_file({"x": _latent(s, 16, 2, 2)}, s["inputs"] / "a.safetensors")
    assert _run(_args(s, "--bit-depth", "16", "--no-metadata"))[0].exit_code == 0
    data = (s["out"] / "a.png").read_bytes()
    assert data[24] == 16 and b"pid:backbone" not in data  # IHDR bit depth; no text chunks


def test_sixteen_bit_pixels_are_the_decoders_levels(setup, monkeypatch):
    """The 16-bit PNG holds round((x + 1) · 65535 / 2) of the decoded image, every level exact (levels above
    32767 included, which cross from the GPU as int16)."""
    from pid_cli import pipeline

    seen = []
    decode_tensor = pipeline.Decoder.decode_tensor
    monkeypatch.setattr(pipeline.Decoder, "decode_tensor",
                        lambda *a, **k: seen.append(decode_tensor(*a, **k)) or seen[-1])
    s = setup
    save_file({"x": _latent(s, 16, 2, 2)}, s["inputs"] / "a.safetensors")
    assert _run(_args(s, "--bit-depth", "16"))[0].exit_code == 0
    x = seen[0][0].float().clamp(-1, 1).numpy()  # float32 arithmetic, as the writer's
    expected = np.round((x + np.float32(1)) * np.float32(65535 / 2)).transpose(1, 2, 0)
    pixels, _ = read_image(s["out"] / "a.png")
    assert pixels.dtype == np.uint16 and np.array_equal(pixels, expected.astype(np.uint16))


def test_non_finite_pixels_fail_their_item_only(setup, monkeypatch):
    """A decode whose pixels hold NaN (a broken checkpoint, an overflow) fails that item and writes nothing."""
    from pid_cli import pipeline

    decode_tensor = pipeline.Decoder.decode_tensor

    def poisoned(self, latents, *args, **kwargs):
        images = decode_tensor(self, latents, *args, **kwargs).clone()
        images[0, 1, 3, 5] = float("nan")
        return images

    monkeypatch.setattr(pipeline.Decoder, "decode_tensor", poisoned)
    s = setup
    save_file({"x": _latent(s, 2, 16, 2, 2)}, s["inputs"] / "pair.safetensors")
    save_file({"x": _latent(s, 16, 2, 2)}, s["inputs"] / "single.safetensors")
    result, records = _run(_args(s, "--json", "--batch-size", "2"))
    assert result.exit_code == 1
    by_name = {os.path.basename(r["input"]): r for r in records}
    assert "the decoder produced NaN/Inf pixels; nothing was written" in by_name["pair.safetensors"]["error"]
    assert "NaN/Inf" in by_name["single.safetensors"]["error"]
    assert sorted(p.name for p in s["out"].iterdir()) == ["pair_1.png"]


@pytest.mark.slow  # a subprocess, signal or compile test: seconds of wall time
def test_a_slow_disk_holds_the_decode_back(setup, monkeypatch):
    """Decoded images waiting for a writer hold (pinned) host memory: at most 2 per writer thread wait, plus
    the one the decode thread is handing over, however far the writers fall behind."""
    from pid_cli import pipeline
    from pid_cli.decode import session

    counts = {"decoded": 0, "written": 0, "most_waiting": 0}
    decode_tensor, encode_png = pipeline.Decoder.decode_tensor, session.encode_png

    def decode(*args, **kwargs):
        images = decode_tensor(*args, **kwargs)
        counts["decoded"] += 1
        counts["most_waiting"] = max(counts["most_waiting"], counts["decoded"] - counts["written"])
        return images

    def slow_encode(*args, **kwargs):
        time.sleep(0.4)  # several decodes' time
        counts["written"] += 1
        return encode_png(*args, **kwargs)

    monkeypatch.setattr(pipeline.Decoder, "decode_tensor", decode)
    monkeypatch.setattr(session, "encode_png", slow_encode)
    monkeypatch.setattr(session.os, "cpu_count", lambda: 2)  # 2 writer threads
    s = setup
    for i in range(14):
        save_file({"x": _latent(s, 16, 2, 2)}, s["inputs"] / f"{i:02d}.safetensors")
    result, records = _run(_args(s, "--json"))
    assert result.exit_code == 0 and [r["status"] for r in records] == ["ok"] * 14
    assert counts["written"] == 14 and 3 <= counts["most_waiting"] <= 2 * 2 + 1


@pytest.mark.slow  # a subprocess, signal or compile test: seconds of wall time
def test_sigint_leaves_only_complete_pngs_and_rerun_finishes(setup):
    s = setup
    n = 24
    for i in range(n):
        save_file({"x": _latent(s, 16, 6, 6)}, s["inputs"] / f"{i:02d}.safetensors")
    cmd = [sys.executable, "-m", "pid_cli.cli", *_args(s, "--batch-size", "1")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and not (s["out"].exists() and any(s["out"].glob("*.png"))):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err.decode()
    done = sorted(s["out"].glob("*.png"))
    assert 0 < len(done) < n
    assert not list(s["out"].glob(".*"))  # no temporary or partial files
    for p in done:
        Image.open(p).load()  # every PNG that exists is complete
    result, records = _run(_args(s, "--json"))
    assert result.exit_code == 0
    assert len(list(s["out"].glob("*.png"))) == n
    assert sum(r["status"] == "skipped" for r in records) == len(done)


def test_fp8_matmuls_decode_and_are_recorded(setup, monkeypatch):
    """`--matmul fp8` end to end. The CLI refuses it on a CPU (no speed there), so the device check is lifted:
    torch._scaled_mm's CPU kernel does the same arithmetic."""
    from pid_cli.model import inference

    s = setup
    save_file({"x": _latent(s, 16, 2, 2)}, s["inputs"] / "a.safetensors")
    assert _run(_args(s, "--dtype", "bf16"))[0].exit_code == 0
    reference = _pixels(s["out"] / "a.png").astype(int)
    monkeypatch.setattr(inference, "require_8bit_tensor_cores", lambda net, flag: None)
    out = s["out"].parent / "fp8"
    # the 8-bit check off: this tiny network moves more under FP8 than its 40 dB (tests/test_exact_check.py)
    result, _ = _run([*_args(s, "--dtype", "bf16"), "--out", str(out), "--matmul", "fp8", "--check-psnr", "0"])
    assert result.exit_code == 0, result.output
    assert Image.open(out / "a.png").info["pid:matmul"] == "fp8"
    assert "pid:matmul" not in Image.open(s["out"] / "a.png").info
    diff = np.abs(_pixels(out / "a.png").astype(int) - reference)
    # rounded differently, the same image (this 16-channel network's matmuls are few elements deep, so
    # rounding averages out less than at full size, where a decode stays within 1 level:
    # docs/performance.md#speed-modes)
    assert diff.max() > 0 and diff.mean() < 3 and np.percentile(diff, 99) < 16
