"""Downloads against a local server speaking the Hub protocol: nothing here touches the internet."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from pid_cli import hub
from pid_cli.cli import app
from pid_cli.registry import load_registry

try:
    from hubserver import COMMIT, DECOY, MODEL_FOLDER, fake_bytes, fake_hub, populate
except ImportError:  # tests/ imported as a package
    from tests.hubserver import COMMIT, DECOY, MODEL_FOLDER, fake_bytes, fake_hub, populate

__all__ = ["fake_hub"]  # the fixture, used by name below

GEMMA = "Efficient-Large-Model/gemma-2-2b-it"
FETCHED_FOLDER_FILES = {"config.json", "tokenizer_config.json", "tokenizer.model", "model.safetensors"}


@pytest.fixture
def reg():
    return load_registry(use_env=False)


@pytest.fixture
def served(fake_hub, reg):
    populate(fake_hub, reg.entries)
    return fake_hub


def resolve_gets(fake_hub) -> list[str]:
    return [r.path for r in fake_hub.requested("GET", "/resolve/")]


# ---------------------------------------------------------------------------------------------------------
# Plan and selection


def test_plan_for_a_variant_picks_every_backbone_and_only_their_files(served, reg):
    entries = reg.entries_for_variant("2kto4k")
    plan = hub.plan_downloads(entries)
    described = [i.describe() for i in plan]
    decoders = [i.ref.path for i in plan if i.role == "decoder"]
    assert sorted(e.id for e in entries) == ["flux-2kto4k-v1.5", "flux2-2kto4k-v1.5", "qwenimage-2kto4k-v1.5",
                                             "sd3-2kto4k-v1", "sdxl-2kto4k-v1"]
    assert len(decoders) == 5  # the superseded v1 flux/flux2 4K decoders are not among them:
    assert not any(d.startswith("checkpoints/PiD_res2kto4k_sr4x_official_flux") for d in decoders)
    assert {i.ref.path for i in plan if i.role == "vae weights"} == {
        "checkpoints/ae.safetensors", "checkpoints/flux2_ae.safetensors", "checkpoints/QwenImage_VAE_2d.pth",
        "checkpoints/sd3_vae/vae/diffusion_pytorch_model.safetensors", "checkpoints/sdxl_vae.safetensors"}
    text = [i for i in plan if i.role == "text encoder"]
    assert len(text) == 1 and len(text[0].entry_ids) == 5  # shared, fetched once
    assert len(described) == len(set(described)) == 11
    # Sizes are what the Hub reports; total = what is not on disk yet.
    assert all(i.size_exact for i in plan)
    assert text[0].size == sum(len(MODEL_FOLDER[f]) for f in FETCHED_FOLDER_FILES)
    assert hub.plan_total(plan) == (sum(i.size for i in plan), True)
    # Metadata only: one paths-info call for nvidia/PiD, no listing of the big repo, no transfer.
    assert len(served.requested("POST", "/api/models/nvidia/PiD/paths-info/")) == 1
    assert not served.requested(contains="/api/models/nvidia/PiD/tree")
    assert not resolve_gets(served)


def test_plan_includes_encoder_repos_and_honours_no_vae_no_text_encoder(served, reg):
    plan = hub.plan_downloads(reg.entries_for_variant("2k"))
    assert {i.ref.repo for i in plan if i.is_repo} == {
        GEMMA, "facebook/dinov2-with-registers-base", "google/siglip2-so400m-patch14-224"}
    lean = hub.plan_downloads([reg.resolve("flux")], vae=False, text_encoder=False)
    assert [i.role for i in lean] == ["decoder"]


def test_dry_run_prints_plan_and_downloads_nothing(served):
    result = CliRunner().invoke(app, ["download", "--variant", "2kto4k", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "Download plan" in result.output and "to download:" in result.output
    assert "PiD_v1pt5_res2kto4k_sr4x_official_qwenimage_distill_4step" in result.output
    assert not resolve_gets(served)


# ---------------------------------------------------------------------------------------------------------
# Cache layout, --dir, what gets fetched


def test_download_into_hf_cache_layout(served, reg, tmp_path):
    entry = reg.resolve("zimage-turbo", target="2k")  # alias of flux
    files = hub.ensure_files(entry)
    storage = tmp_path / "hf" / "models--nvidia--PiD"
    assert files.weights == storage / "snapshots" / COMMIT / entry.weights.path
    assert files.weights.is_symlink()
    assert files.weights.resolve() == storage / "blobs" / hashlib.sha256(fake_bytes(entry.weights.path)).hexdigest()
    assert (storage / "refs" / "main").read_text() == COMMIT
    assert files.vae == {"weights": storage / "snapshots" / COMMIT / "checkpoints/ae.safetensors"}
    gemma = tmp_path / "hf" / "models--Efficient-Large-Model--gemma-2-2b-it" / "snapshots" / COMMIT
    assert files.text_encoder == gemma
    assert {p.name for p in gemma.iterdir()} == FETCHED_FOLDER_FILES
    # Exactly the needed files were transferred: never the decoy, README or *.bin.
    gets = resolve_gets(served)
    assert len(gets) == 2 + len(FETCHED_FOLDER_FILES)
    assert not any(DECOY in g or g.endswith((".bin", "README.md")) for g in gets)


def test_second_run_uses_cache_without_transfer_or_rehash(served, reg, monkeypatch):
    entry = reg.resolve("flux", "2k")
    first = hub.ensure_files(entry)
    n_gets = len(resolve_gets(served))

    def no_hashing(*args, **kwargs):
        raise AssertionError("verified files must not be hashed again")

    monkeypatch.setattr(hub, "file_digests", no_hashing)
    assert hub.ensure_files(entry) == first
    assert len(resolve_gets(served)) == n_gets


def test_download_to_plain_dir(served, reg, tmp_path):
    out = tmp_path / "models"
    files = hub.ensure_files(reg.resolve("sdxl"), local_dir=out)
    assert files.entry.id == "sdxl-2kto4k-v1"
    assert files.weights == out / "nvidia/PiD" / files.entry.weights.path
    assert files.weights.is_file() and not files.weights.is_symlink()
    assert files.weights.read_bytes() == fake_bytes(files.entry.weights.path)
    assert files.vae["weights"] == out / "nvidia/PiD/checkpoints/sdxl_vae.safetensors"
    assert files.text_encoder == out / GEMMA
    assert not (tmp_path / "hf").exists()  # the HF cache was not touched


def test_dinov2_entry_resolves_files_and_encoder_folder(served, reg):
    files = hub.ensure_files(reg.resolve("dinov2"), text_encoder=False)
    assert set(files.vae) == {"stats", "encoder"}  # the RAE decoder is not used
    assert files.vae["stats"].name == "stat.pt"
    assert (files.vae["encoder"] / "config.json").is_file()
    assert files.text_encoder is None


# ---------------------------------------------------------------------------------------------------------
# Resume, offline, token


def test_resume_after_interrupted_transfer(served, reg, monkeypatch):
    from huggingface_hub import constants

    # huggingface_hub keeps what it received in whole chunks (10 MB); shrink them to fit the tiny file.
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 500)
    monkeypatch.setattr("time.sleep", lambda seconds: None)  # its pause before retrying
    entry = reg.resolve("flux2", "2k")
    served.cut_next_transfer("nvidia/PiD", entry.weights.path, after=1000)
    files = hub.ensure_files(entry, vae=False, text_encoder=False)
    assert files.weights.read_bytes() == fake_bytes(entry.weights.path)
    ranges = [r.headers.get("range") for r in served.requested("GET", entry.weights.path)]
    assert ranges == [None, "bytes=1000-"]  # the second request continued where the first one broke


# A killed `pid download` and the next run. The child shrinks huggingface_hub's 10 MB read size so a few KB
# reach the disk before the server stalls; the test kills it with SIGKILL once its partial file holds bytes.
CHILD = ("import runpy, sys; from huggingface_hub import constants; constants.DOWNLOAD_CHUNK_SIZE = 1000; "
         "sys.argv[0] = 'pid'; runpy.run_module('pid_cli.cli', run_name='__main__')")
BIG = 200_000


def _layout_args(layout, tmp_path):
    """(extra `pid download` options, ensure_files local_dir, folder the partial file is kept in)."""
    if layout == "cache":
        return [], None, tmp_path / "hf" / "models--nvidia--PiD" / "blobs"
    return ["--dir", str(tmp_path / "models")], tmp_path / "models", tmp_path / "models" / "nvidia/PiD/.cache/pid"


def _kill_download_midway(served, entry, tmp_path, layout) -> Path:
    """Run `pid download` for the entry's decoder in a child process, SIGKILL it in the middle of the file,
    return the partial file it left."""
    served.stall_next_transfer("nvidia/PiD", entry.weights.path, after=BIG // 4)
    options, _, partial_dir = _layout_args(layout, tmp_path)
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf-home"),  # no developer token in the child either
               PYTHONPATH=os.pathsep.join([str(Path(hub.__file__).parents[1]), os.environ.get("PYTHONPATH", "")]))
    child = subprocess.Popen([sys.executable, "-c", CHILD, "download", "-b", entry.backbone, "--variant",
                              entry.variant, "--no-vae", "--no-text-encoder", *options],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    try:
        while time.monotonic() < deadline and child.poll() is None:
            partial = next(iter(partial_dir.glob("*.incomplete")), None) if partial_dir.is_dir() else None
            if partial is not None and partial.stat().st_size > 0:
                break
            time.sleep(0.01)
        else:
            raise AssertionError(f"no partial file appeared; child: {child.poll()} {child.stderr.read()!r}")
    finally:
        child.kill()
        child.communicate(timeout=30)
    assert child.returncode == -signal.SIGKILL
    (partial,) = partial_dir.glob("*.incomplete")
    assert 0 < partial.stat().st_size < BIG
    return partial


def _decoder_gets(served, entry) -> list[str | None]:
    return [r.headers.get("range") for r in served.requested("GET", entry.weights.path)]


@pytest.mark.parametrize("layout", ["cache", "dir"])
def test_resume_across_runs_after_kill_9(served, reg, tmp_path, layout):
    entry = reg.resolve("flux2", "2k")
    data = fake_bytes(entry.weights.path, BIG)
    served.add("nvidia/PiD", entry.weights.path, data)
    kept = _kill_download_midway(served, entry, tmp_path, layout).stat().st_size
    files = hub.ensure_files(entry, vae=False, text_encoder=False, local_dir=_layout_args(layout, tmp_path)[1])
    assert _decoder_gets(served, entry) == [None, f"bytes={kept}-"]  # the second run asked only for the rest
    assert files.weights.read_bytes() == data
    assert hub._read_stamp(files.weights)["sha256"] == hashlib.sha256(data).hexdigest()  # verified
    assert files.weights.is_symlink() == (layout == "cache")
    assert not list(tmp_path.rglob("*.incomplete"))


@pytest.mark.parametrize("layout", ["cache", "dir"])
def test_partial_download_of_a_changed_file_is_discarded(served, reg, tmp_path, layout):
    entry = reg.resolve("flux2", "2k")
    served.add("nvidia/PiD", entry.weights.path, fake_bytes(entry.weights.path, BIG))
    _kill_download_midway(served, entry, tmp_path, layout)
    new = fake_bytes("a new upload", BIG)
    served.add("nvidia/PiD", entry.weights.path, new)  # the file changed upstream: another ETag
    files = hub.ensure_files(entry, vae=False, text_encoder=False, local_dir=_layout_args(layout, tmp_path)[1])
    assert _decoder_gets(served, entry) == [None, None]  # fetched whole, the old bytes were not continued
    assert files.weights.read_bytes() == new
    assert not list(tmp_path.rglob("*.incomplete"))


@pytest.mark.parametrize("layout", ["cache", "dir"])
def test_corrupt_partial_download_is_discarded_and_fetched_again(served, reg, tmp_path, layout, capsys,
                                                                 monkeypatch):
    entry = reg.resolve("flux2", "2k")
    data = fake_bytes(entry.weights.path, BIG)
    served.add("nvidia/PiD", entry.weights.path, data)
    partial = _kill_download_midway(served, entry, tmp_path, layout)
    kept = partial.stat().st_size
    partial.write_bytes(b"\0" * kept)  # damaged on disk: same ETag, wrong bytes
    loaded = []
    monkeypatch.setattr(hub, "verify_file", lambda path, *a, **k: loaded.append(path.read_bytes()))
    files = hub.ensure_files(entry, vae=False, text_encoder=False, local_dir=_layout_args(layout, tmp_path)[1])
    assert _decoder_gets(served, entry) == [None, f"bytes={kept}-", None]  # continued, refused, fetched again
    assert "does not hash to the Hub's SHA-256" in capsys.readouterr().err
    assert loaded == [data]  # the damaged file never reached its place
    assert files.weights.read_bytes() == data
    assert not list(tmp_path.rglob("*.incomplete"))


def test_offline_resolves_from_cache_without_network(served, reg, monkeypatch):
    entry = reg.resolve("qwenimage-2512")
    online = hub.ensure_files(entry)
    before = len(served.requests)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.ensure_files(entry) == online
    result = CliRunner().invoke(app, ["download", "--backbone", "qwenimage", "--variant", "2kto4k"])
    assert result.exit_code == 0, result.output
    assert len(served.requests) == before


def test_offline_with_missing_files_names_them_and_the_command(served, reg, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    entry = reg.resolve("zimage")
    with pytest.raises(hub.MissingFilesError) as err:
        hub.ensure_files(entry)
    message = str(err.value)
    assert entry.weights.path in message and "checkpoints/ae.safetensors" in message and GEMMA in message
    assert err.value.command == "pid download --backbone flux --variant 2k"
    assert err.value.command in message
    with pytest.raises(hub.MissingFilesError) as err:
        hub.ensure_files(entry, vae=False, text_encoder=False)
    assert err.value.files == [f"nvidia/PiD/{entry.weights.path}"]
    assert err.value.command == "pid download --backbone flux --variant 2k --no-vae --no-text-encoder"
    with pytest.raises(hub.MissingFilesError):
        hub.ensure_files(reg.resolve("flux"), download=False)  # what `pid decode --no-download` would use
    assert not served.requests


def test_token_header_is_sent(served, reg, monkeypatch):
    served.require_token = "hf_secret"
    entry = reg.resolve("sd3", "2k")
    with pytest.raises(hub.HubError, match="HF_TOKEN"):
        hub.ensure_files(entry, text_encoder=False)
    served.requests.clear()
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    hub.ensure_files(entry, text_encoder=False)
    assert served.requests and all(r.headers.get("authorization") == "Bearer hf_secret" for r in served.requests)


# ---------------------------------------------------------------------------------------------------------
# Verification


def test_hash_mismatch_is_refused_and_the_copy_deleted(served, reg, tmp_path):
    entry = reg.resolve("flux", "2k")
    data = fake_bytes(entry.weights.path)
    served.add("nvidia/PiD", entry.weights.path, data, sha256="f" * 64)  # the Hub claims another hash
    with pytest.raises(hub.VerificationError, match="sha256 mismatch") as err:
        hub.ensure_files(entry, vae=False, text_encoder=False)
    assert "deleted" in str(err.value)
    storage = tmp_path / "hf" / "models--nvidia--PiD"
    assert not list((storage / "blobs").iterdir())
    assert not (storage / "snapshots" / COMMIT / entry.weights.path).exists()
    served.add("nvidia/PiD", entry.weights.path, data)  # fixed upstream: the next run succeeds
    assert hub.ensure_files(entry, vae=False, text_encoder=False).weights.read_bytes() == data


def test_size_mismatch_is_refused(served, reg):
    entry = reg.resolve("flux", "2k")
    data = fake_bytes(entry.weights.path)
    served.add("nvidia/PiD", entry.weights.path, data, size=len(data) + 1, head_size=len(data))
    with pytest.raises(hub.VerificationError, match="size mismatch"):
        hub.ensure_files(entry, vae=False, text_encoder=False)
    served.add("nvidia/PiD", entry.weights.path, data, head_size=len(data) - 10)  # transfer vs. header
    with pytest.raises(hub.VerificationError, match="size"):
        hub.ensure_files(entry, vae=False, text_encoder=False)


def test_small_non_lfs_files_are_checked_by_git_blob_id(served, reg):
    entry = reg.resolve("flux", "2k")
    served.add(GEMMA, "config.json", b'{"model_type": "fake"}', lfs=False)
    served.repos[GEMMA]["config.json"].data = b'{"model_type": "evil"}'  # differs from the reported blob id
    with pytest.raises(hub.VerificationError, match="git blob id"):
        hub.ensure_files(entry, vae=False)


def test_registry_pin_that_disagrees_with_the_hub_is_refused(served, reg, tmp_path):
    entry = reg.resolve("flux", "2k")
    user = tmp_path / "pins.yaml"
    user.write_text(f"""
entries:
  - id: flux-2k
    base: flux-2k
    hub: {{repo: nvidia/PiD, path: {entry.weights.path}, sha256: {"ab" * 32}}}
""")
    pinned = load_registry([user], use_env=False).resolve("flux", "2k")
    with pytest.raises(hub.VerificationError, match="changed upstream"):
        hub.ensure_files(pinned, vae=False, text_encoder=False)


# ---------------------------------------------------------------------------------------------------------
# Converted files, local entries, the CLI


def test_converted_copy_is_preferred_when_current(served, reg, tmp_path):
    entry = reg.resolve("flux", "2k")
    sha = hashlib.sha256(fake_bytes(entry.weights.path)).hexdigest()
    target = hub.converted_path(entry)
    target.parent.mkdir(parents=True)
    save_file({"x": torch.zeros(1)}, str(target), metadata={"pid.entry": entry.id, "pid.source_sha256": sha})
    files = hub.ensure_files(entry, vae=False, text_encoder=False)
    assert files.weights == target and files.converted
    assert not served.requested("GET", entry.weights.path)
    save_file({"x": torch.zeros(1)}, str(target), metadata={"pid.entry": entry.id, "pid.source_sha256": "0" * 64})
    files = hub.ensure_files(entry, vae=False, text_encoder=False)  # stale: the Hub file changed
    assert not files.converted and files.weights.name == "model_ema_bf16.pth"


def test_local_file_entries_need_no_hub(fake_hub, tmp_path):
    weights = tmp_path / "mine.safetensors"
    weights.write_bytes(b"0" * 64)
    user = tmp_path / "mine.yaml"
    user.write_text("entries:\n  - {id: mine, base: flux-2k, variant: mine, path: mine.safetensors}\n")
    entry = load_registry([user], use_env=False).resolve("flux", "mine")
    files = hub.ensure_files(entry, vae=False, text_encoder=False)
    assert files.weights == weights and not fake_hub.requests
    weights.unlink()
    with pytest.raises(hub.MissingFilesError, match="local files do not exist"):
        hub.ensure_files(entry, vae=False, text_encoder=False)


def test_cli_download_prints_licence_once_and_list_shows_disk_state(served):
    runner = CliRunner()
    result = runner.invoke(app, ["download", "-b", "zimage", "-b", "sd3", "--variant", "2k", "--no-text-encoder"])
    assert result.exit_code == 0, result.output
    assert result.output.count("NSCLv1 License") == 1 and "non-commercial use only" in result.output
    assert not served.requested(contains=GEMMA)
    listed = runner.invoke(app, ["list", "--json"])
    assert listed.exit_code == 0, listed.output
    records = {r["id"]: r for r in json.loads(listed.output)}
    assert records["flux-2k"]["on_disk"]["decoder"] and records["flux-2k"]["on_disk"]["vae"]
    assert not records["flux-2k"]["on_disk"]["text_encoder"]
    assert records["flux2-2k"]["on_disk"]["decoder"] is None
    assert records["flux-2k"]["aliases"] == ["zimage", "zimage-turbo"]
    table = runner.invoke(app, ["list"])
    assert table.exit_code == 0 and "qwenimage" in table.output and "2kto4k-v1.5" in table.output


def test_cli_download_errors_are_clean(served):
    runner = CliRunner()
    result = runner.invoke(app, ["download"])
    assert result.exit_code == 1 and "--variant 2kto4k" in result.output
    result = runner.invoke(app, ["download", "--backbone", "dinov2", "--variant", "2kto4k"])
    assert result.exit_code == 1 and "Valid backbone/variant pairs" in result.output
    assert not served.requests


def test_text_encoder_snapshot_never_downloads(served, reg):
    with pytest.raises(hub.MissingFilesError, match="pid download"):
        hub.text_encoder_snapshot()
    assert not served.requests
    folder = hub.ensure_files(reg.resolve("flux"), vae=False).text_encoder
    assert hub.text_encoder_snapshot() == folder


def test_hub_metadata_reports_sizes_and_hashes(served):
    info = hub.remote_files("nvidia/PiD", "main", ["checkpoints/ae.safetensors", "README.md", "nope"],
                            hub.Settings.from_env())
    data = fake_bytes("checkpoints/ae.safetensors")
    assert info["checkpoints/ae.safetensors"] == hub.RemoteFile(
        "checkpoints/ae.safetensors", len(data), hashlib.sha256(data).hexdigest(), None)
    assert info["README.md"].sha256 is None and info["README.md"].git_oid
    assert "nope" not in info


def test_format_size():
    assert hub.format_size(None) == "?"
    assert hub.format_size(999) == "999 B"
    assert hub.format_size(2_800_398_630, exact=False) == "≈2.80 GB"
