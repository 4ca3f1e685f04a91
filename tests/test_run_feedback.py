"""What a run tells its user: a closing summary, an empty input set named as such, cheap checks before any
download, and missing files reported at once and within seconds, offline or with the Hub out of reach."""

from __future__ import annotations

import re
import shlex
import socket
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from pid_cli.cli import app
from pid_cli.text import save_prompt_embeds

try:
    from hubserver import fake_hub, populate
except ImportError:  # tests/ imported as a package
    from tests.hubserver import fake_hub, populate

__all__ = ["fake_hub"]  # the fixture, used by name below

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def tiny(tiny_run):
    """conftest's tiny decoder run, its input folder also under "in"."""
    return {**tiny_run, "in": tiny_run["inputs"]}


def _decode(t, *extra: str, inputs: list[str] | None = None):
    args = ["decode", *(inputs or [str(t["in"])]), "--backbone", "flux", "--variant", "tiny", "--registry",
            str(t["reg"]), "--prompt-embeds", str(t["emb"]), "--out", str(t["out"]), "--quiet", *extra]
    return CliRunner().invoke(app, args)


def _good(t, name: str) -> None:
    save_file({"latent": torch.randn(1, 16, 2, 2)}, t["in"] / name)


def test_a_run_ends_with_a_summary_naming_every_failure_without_json_or_records(tiny):
    _good(tiny, "good.safetensors")
    (tiny["in"] / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    save_file({"latent": torch.randn(1, 4, 2, 2)}, tiny["in"] / "four.safetensors")
    result = _decode(tiny)
    assert result.exit_code == 1
    lines = result.stderr.splitlines()
    assert "pid decode: 3 input(s): 1 decoded, 2 failed" in lines
    corrupt = next(line for line in lines if "corrupt.safetensors" in line)
    four = next(line for line in lines if "four.safetensors" in line)
    assert corrupt.startswith("  failed: ") and "cannot read latent file" in corrupt
    assert four.startswith("  failed: ") and "4 channels fits --backbone sdxl" in four
    result = _decode(tiny)  # a rerun skips what exists and says so
    assert "1 skipped (outputs exist), 2 failed" in result.stderr


def test_the_summary_names_the_first_failures_and_counts_the_rest(tiny):
    for i in range(12):
        (tiny["in"] / f"bad{i:02}.safetensors").write_bytes(b"nonsense")
    result = _decode(tiny)
    assert result.exit_code == 1
    assert result.stderr.count("  failed: ") == 10
    assert "  … and 2 more failed (--manifest-out FILE or --json lists every record)" in result.stderr
    records = tiny["root"] / "records.jsonl"
    result = _decode(tiny, "--manifest-out", str(records))
    assert f"  … and 2 more failed (see {records})" in result.stderr and len(records.read_text().splitlines()) == 12


def test_an_empty_input_set_says_so(tiny):
    (tiny["in"] / "notes.txt").write_text("not an input")
    result = _decode(tiny)
    assert result.exit_code == 0
    assert "pid decode: nothing to decode: " in result.stderr and "holds no latent or image files" in result.stderr
    _good(tiny, "a.safetensors")
    result = _decode(tiny, "--shard", "1/2")
    assert result.exit_code == 0 and "the 1 input(s) all fall in other shards than 1/2" in result.stderr


# ---------------------------------------------------------------------------------------------------------
# Cheap before expensive: against a Hub that logs every request.

@pytest.fixture
def served(fake_hub):
    from pid_cli.registry import load_registry

    populate(fake_hub, load_registry(use_env=False).entries)
    return fake_hub


def test_the_readme_command_without_its_input_folder_downloads_nothing(served, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["decode", "latents/", "--backbone", "flux2", "--target", "4k", "--out",
                                      "renders/"])
    assert result.exit_code == 2 and "latents: no such file or folder" in result.stderr
    assert not served.requests


def test_inputs_prompts_and_out_are_checked_before_any_download(served, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    save_file({"latent": torch.randn(1, 16, 2, 2)}, inputs / "a.safetensors")
    base = ["decode", str(inputs), "--backbone", "flux", "--out", str(tmp_path / "out")]
    result = CliRunner().invoke(app, [*base, "--prompt-file", str(tmp_path / "missing.txt")])
    assert result.exit_code == 2 and "missing.txt: file not found" in result.stderr
    result = CliRunner().invoke(app, [*base, "--prompt-embeds", str(tmp_path / "missing.safetensors")])
    assert result.exit_code == 2 and "missing.safetensors" in result.stderr
    (inputs / "a.safetensors").write_bytes(b"truncated")
    result = CliRunner().invoke(app, base)  # every input fails in the prepass: nothing is worth fetching
    assert result.exit_code == 1 and "cannot read latent file" in result.stderr
    assert not served.requests


def _offline_message(result) -> str:
    assert result.exit_code == 2, result.output
    return result.stderr


def test_offline_a_run_names_every_missing_file_and_the_ways_out_at_once(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("PID_CACHE_DIR", str(tmp_path / "pid"))
    monkeypatch.delenv("PID_TEXT_ENCODER", raising=False)
    save_file({"latent": torch.randn(1, 16, 128, 128)}, tmp_path / "a.safetensors")
    started = time.monotonic()
    message = _offline_message(CliRunner().invoke(app, ["decode", str(tmp_path / "a.safetensors"), "--backbone",
                                                        "flux", "--out", str(tmp_path / "out")]))
    assert time.monotonic() - started < 30
    assert "flux-2k: these files are not on disk and downloading is off" in message
    assert "model_ema_bf16.pth (decoder" in message and "gemma-2-2b-it" in message and "(text encoder)" in message
    assert "ae.safetensors" not in message  # a latent needs no VAE
    assert "pid download --backbone flux --variant 2k" in message and "--prompt-embeds FILE" in message
    emb = tmp_path / "emb.safetensors"
    save_prompt_embeds(emb, [""], torch.zeros(1, 300, 2304, dtype=torch.bfloat16))
    message = _offline_message(CliRunner().invoke(app, ["decode", str(tmp_path / "a.safetensors"), "--backbone",
                                                        "flux", "--out", str(tmp_path / "out"), "--prompt-embeds",
                                                        str(emb)]))
    assert "gemma" not in message and "--prompt-embeds FILE" not in message


@pytest.fixture
def no_hub(tmp_path, monkeypatch):
    """HF_ENDPOINT on a local port nothing listens on: a machine without a route to the Hub."""
    from huggingface_hub import constants

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("PID_CACHE_DIR", str(tmp_path / "pid"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("PID_TEXT_ENCODER", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return f"http://127.0.0.1:{port}"


def test_with_the_hub_out_of_reach_a_run_fails_in_seconds_naming_every_file(tmp_path, no_hub):
    samples = tmp_path / "samples"
    samples.mkdir()
    (samples / "astronaut.png").write_bytes((REPO / "samples" / "astronaut.png").read_bytes())
    started = time.monotonic()
    message = _offline_message(CliRunner().invoke(app, ["decode", str(samples), "--backbone", "flux2", "--target",
                                                        "2k", "--out", str(tmp_path / "out")]))
    assert time.monotonic() - started < 20  # huggingface_hub's own retries took 24 s a file
    assert f"the Hub at {no_hub} cannot be reached" in message
    for part in ("flux2_distill_4step/model_ema_bf16.pth (decoder", "flux2_ae.safetensors (vae weights)",
                 "gemma-2-2b-it", "pid download --backbone flux2 --variant 2k"):
        assert part in message
    started = time.monotonic()
    result = CliRunner().invoke(app, ["download", "--variant", "2k", "--backbone", "flux2"])
    assert result.exit_code == 1 and "cannot be reached" in result.stderr and time.monotonic() - started < 20


def test_download_dry_run_offline_prints_whole_names_and_a_clean_total(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.delenv("COLUMNS", raising=False)
    result = CliRunner().invoke(app, ["download", "--variant", "2kto4k", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "to download: 11 of 11 item(s), ≈13.85 GB + 6 of unknown size (sizes from the registry: offline)" in \
        " ".join(result.output.split())
    assert "unknown sizes of" not in result.output and "…" not in result.output
    for name in ("checkpoints/PiD_v1pt5_res2kto4k_sr4x_official_qwenimage_distill_4step/model_ema_bf16.pth",
                 "checkpoints/sd3_vae/vae/diffusion_pytorch_model.safetensors"):
        assert name in result.output


def test_download_dry_run_with_the_hub_out_of_reach_plans_from_the_registry(no_hub):
    started = time.monotonic()
    result = CliRunner().invoke(app, ["download", "--variant", "2k", "--backbone", "sd3", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "sizes from the registry: the Hub is out of reach" in " ".join(result.output.split())
    assert time.monotonic() - started < 20


# ---------------------------------------------------------------------------------------------------------
# README's first command, on a machine that has nothing but this repository.

def _readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def test_readme_first_command_decodes_the_shipped_sample(tmp_path, monkeypatch):
    install, run = _readme_commands()[0].split(" && ", 1)
    assert install == "pip install torch -e ."
    argv = shlex.split(run)
    assert argv[:2] == ["pid", "decode"]
    folder = REPO / argv[2]
    images = sorted(p.name for p in folder.iterdir() if p.suffix == ".png")
    assert images == ["astronaut.png"] and "public domain" in " ".join((folder / "README.md").read_text().split())
    # Offline, the run gets as far as the files it must fetch: the sample was found, read and planned (the
    # VAE is needed because it is an image) and nothing else stood in the way.
    monkeypatch.chdir(tmp_path)
    (tmp_path / argv[2]).symlink_to(folder)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("PID_CACHE_DIR", str(tmp_path / "pid"))
    message = _offline_message(CliRunner().invoke(app, argv[1:]))
    assert "flux2-2k: these files are not on disk" in message and "flux2_ae.safetensors (vae weights)" in message
