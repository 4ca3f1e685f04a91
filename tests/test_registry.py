"""The registry: built-in entries against the spec and the parity manifests, resolution, user files, convert."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from pid_cli.cli import app
from pid_cli.registry import BUILTIN_REGISTRY, RegistryError, load_registry, normalise_variant

PARITY = Path(__file__).parent / "fixtures" / "pid_parity"
MANIFESTS = sorted((PARITY / "manifests").glob("*.json"))
RELEASED = ["flux-2k", "flux2-2k", "sd3-2k", "dinov2-2k", "siglip-2k", "sd3-2kto4k-v1", "sdxl-2kto4k-v1",
            "flux-2kto4k-v1.5", "flux2-2kto4k-v1.5", "qwenimage-2kto4k-v1.5"]


@pytest.fixture
def reg():
    return load_registry(use_env=False)


@pytest.fixture(autouse=True)
def _no_user_registry(monkeypatch, tmp_path):
    monkeypatch.delenv("PID_REGISTRY", raising=False)
    monkeypatch.setenv("PID_CACHE_DIR", str(tmp_path / "pid"))


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ---------------------------------------------------------------------------------------------------------
# Built-in entries


def test_builtin_has_the_ten_releases_and_two_superseded(reg):
    assert [e.id for e in reg.entries if not e.superseded] == RELEASED
    assert sorted(e.id for e in reg.entries if e.superseded) == ["flux-2kto4k-v1", "flux2-2kto4k-v1"]
    assert all(e.weights.repo == "nvidia/PiD" and e.weights.path.endswith("/model_ema_bf16.pth")
               for e in reg.entries)
    assert all(e.licence and (e.licence.name, e.licence.url) == (
        "NSCLv1 License", "https://huggingface.co/nvidia/PixelDiT-1300M-1024px/blob/main/LICENSE") for e in reg.entries)


@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda p: p.stem)
def test_net_config_is_verbatim_from_the_manifests(reg, manifest):
    m = json.loads(manifest.read_text())
    entry = next(e for e in reg.entries if e.experiment == m["experiment"])
    assert entry.net_config == m["net_config"]
    assert list(entry.net_config) == list(m["net_config"])  # same field order, for easy diffing
    assert entry.weights.path == m["checkpoint_file"]
    assert (entry.num_tensors, entry.tensor_bytes) == (m["num_tensors"], m["bytes_of_tensor_data_bf16"])


def test_superseded_v1_entries_use_the_2k_configuration(reg):
    for backbone in ("flux", "flux2"):
        old = reg.get(f"{backbone}-2kto4k-v1")
        assert old.net_config == reg.get(f"{backbone}-2k").net_config
        assert old.experiment == f"PiD_res2kto4k_sr4x_official_{backbone}_distill_4step"
        assert old.weights.path == f"checkpoints/{old.experiment}/model_ema_bf16.pth"


@pytest.mark.parametrize(("entry_id", "channels", "vae_factor", "unpatchify", "sr", "vae_path"), [
    ("flux-2k", 16, 8, 1, 4, "checkpoints/ae.safetensors"),
    ("flux2-2k", 128, 16, 1, 4, "checkpoints/flux2_ae.safetensors"),
    ("flux2-2kto4k-v1.5", 128, 16, 2, 4, "checkpoints/flux2_ae.safetensors"),
    ("sd3-2k", 16, 8, 1, 4, "checkpoints/sd3_vae/vae/diffusion_pytorch_model.safetensors"),
    ("sdxl-2kto4k-v1", 4, 8, 1, 4, "checkpoints/sdxl_vae.safetensors"),
    ("qwenimage-2kto4k-v1.5", 16, 8, 1, 4, "checkpoints/QwenImage_VAE_2d.pth"),
    ("dinov2-2k", 768, 16, 1, 4, "checkpoints/rae/stats/dinov2/wReg_base/imagenet1k_512/stat.pt"),
    ("siglip-2k", 1152, 16, 1, 8, None),  # the SigLIP-2 encoder folder alone (vae.repos)
])
def test_latent_geometry_and_paired_files_follow_the_spec(reg, entry_id, channels, vae_factor, unpatchify, sr,
                                                          vae_path):
    e = reg.get(entry_id)
    assert (e.latent.channels, e.latent.vae_factor, e.latent.unpatchify, e.sr_scale) == (
        channels, vae_factor, unpatchify, sr)
    assert vae_path in [f.path for f in e.vae.files.values()] if vae_path else not e.vae.files
    assert e.text_encoder.repo == "Efficient-Large-Model/gemma-2-2b-it"
    assert e.sampler.type == "sde" and e.sampler.t_list == (0.999, 0.866, 0.634, 0.342, 0.0)
    if e.latent.fixed_grid:  # RAE encoders: fixed token grid, always 2048x2048 out
        assert e.latent.fixed_grid[0] * vae_factor * sr == 2048
        assert e.output_sizes.buckets == ((2048, 2048),) and e.output_sizes.fixed


def test_normalisation_constants(reg):
    assert reg.get("flux-2k").latent.normalisation == {"kind": "affine", "shift": 0.1159, "scale": 0.3611}
    assert reg.get("sd3-2k").latent.normalisation["scale"] == 1.5305
    assert reg.get("sdxl-2kto4k-v1").latent.normalisation == {"kind": "affine", "shift": 0.0, "scale": 0.13025}
    qwen = reg.get("qwenimage-2kto4k-v1.5").latent.normalisation
    assert len(qwen["mean"]) == len(qwen["std"]) == 16 and qwen["std"][-1] == 1.916
    assert reg.get("flux2-2k").latent.patchify == 2


def test_output_sizes(reg):
    assert (2688, 1536) in reg.get("flux-2k").output_sizes.buckets
    assert reg.get("sd3-2kto4k-v1").output_sizes.levels[-1] == 3840
    assert reg.get("flux-2kto4k-v1.5").output_sizes.levels[-1] == 4096
    assert all(w % 64 == 0 and h % 64 == 0 for w, h in reg.get("flux-2kto4k-v1.5").output_sizes.buckets)


# ---------------------------------------------------------------------------------------------------------
# Resolution


@pytest.mark.parametrize(("backbone", "variant", "target", "expected"), [
    ("flux", None, None, "flux-2k"),
    ("zimage", "2k", None, "flux-2k"),
    ("zimage-turbo", "2kto4k", None, "flux-2kto4k-v1.5"),
    ("FLUX2-Klein-9B", None, "4k", "flux2-2kto4k-v1.5"),
    ("flux2-klein-4b", "2kto4k-v1", None, "flux2-2kto4k-v1"),  # superseded, only by exact name
    ("qwenimage-2512", None, None, "qwenimage-2kto4k-v1.5"),  # no 2k: the default falls through to 2kto4k
    ("sdxl", None, "4k", "sdxl-2kto4k-v1"),  # no v1.5 for sdxl: 2kto4k is v1
    ("sd3", "2kto4k", None, "sd3-2kto4k-v1"),
    ("sd3", None, "2k", "sd3-2k"),
    ("flux", "2kto4k_v1pt5", None, "flux-2kto4k-v1.5"),  # upstream's spelling
    ("siglip", "2K", None, "siglip-2k"),
])
def test_resolve(reg, backbone, variant, target, expected):
    assert reg.resolve(backbone, variant, target).id == expected


@pytest.mark.parametrize(("backbone", "variant", "target", "message"), [
    ("dinov2", "2kto4k", None, "no PiD checkpoint for backbone 'dinov2' with variant 2kto4k"),
    ("sdxl", "2k", None, "no PiD checkpoint for backbone 'sdxl'"),
    ("qwenimage", "2kto4k-v1", None, "with variant 2kto4k-v1"),
    ("sd4", None, None, "unknown backbone 'sd4'"),
    ("flux", "2k", "4k", "either a variant or a target"),
    ("flux", None, "8k", "unknown target '8k'"),
])
def test_invalid_requests_list_the_valid_pairs(reg, backbone, variant, target, message):
    with pytest.raises(RegistryError) as err:
        reg.resolve(backbone, variant, target)
    assert message in str(err.value)
    if "either" not in message and "target" not in message:
        assert "sdxl: 2kto4k-v1, 2kto4k" in str(err.value)
        assert "flux (also zimage, zimage-turbo): 2k, 2kto4k-v1, 2kto4k-v1.5, 2kto4k" in str(err.value)


def test_entries_for_variant(reg):
    ids = lambda entries: [e.id for e in entries]
    assert ids(reg.entries_for_variant("2kto4k")) == [
        "flux-2kto4k-v1.5", "flux2-2kto4k-v1.5", "sd3-2kto4k-v1", "sdxl-2kto4k-v1", "qwenimage-2kto4k-v1.5"]
    assert ids(reg.entries_for_variant(target="4k")) == ids(reg.entries_for_variant("2kto4k"))
    assert ids(reg.entries_for_variant("2kto4k-v1")) == ["sd3-2kto4k-v1", "sdxl-2kto4k-v1"]  # no superseded
    assert ids(reg.entries_for_variant("2kto4k-v1", backbones=["flux"])) == ["flux-2kto4k-v1"]
    assert ids(reg.entries_for_variant("2k")) == ["flux-2k", "flux2-2k", "sd3-2k", "dinov2-2k", "siglip-2k"]
    assert ids(reg.entries_for_variant(backbones=["zimage", "flux", "sdxl"])) == ["flux-2k", "sdxl-2kto4k-v1"]
    with pytest.raises(RegistryError, match="no backbone has a variant '4k-ultra'"):
        reg.entries_for_variant("4k-ultra")
    with pytest.raises(RegistryError, match="Valid backbone/variant pairs"):
        reg.entries_for_variant("2k", backbones=["flux", "sdxl"])


def test_normalise_variant():
    assert normalise_variant(" 2KTO4K_V1PT5 ") == "2kto4k-v1.5"


# ---------------------------------------------------------------------------------------------------------
# User registries


def test_user_registry_adds_entries_aliases_and_overrides(tmp_path):
    weights = tmp_path / "w" / "ft.safetensors"
    user = write(tmp_path / "user.yaml", """
aliases: {my-zimage: flux}
entries:
  - id: flux-ft
    base: flux-2kto4k-v1.5
    variant: ft
    path: w/ft.safetensors
  - id: sdxl-2kto4k-v1          # same id: replaces the built-in entry
    base: sdxl-2kto4k-v1
    answers_to: [2kto4k]
    hub: {repo: me/pid-mirror, path: sdxl.pth, revision: v2, size: 123}
""")
    reg = load_registry([user], use_env=False)
    ft = reg.resolve("my-zimage", "ft")
    assert ft.id == "flux-ft" and ft.weights.is_local and ft.weights.path == str(weights)
    assert ft.net_config == reg.get("flux-2kto4k-v1.5").net_config and ft.answers_to == ()
    assert ft.source == str(user)
    assert reg.resolve("flux", "2kto4k").id == "flux-2kto4k-v1.5"  # the fine-tune did not take over 2kto4k
    sdxl = reg.resolve("sdxl", target="4k")
    assert (sdxl.weights.repo, sdxl.weights.revision, sdxl.weights.size) == ("me/pid-mirror", "v2", 123)
    assert len([e for e in reg.entries if e.backbone == "sdxl"]) == 1
    assert sdxl.vae == load_registry(use_env=False).get("sdxl-2kto4k-v1").vae


def test_pid_registry_env_and_later_files_win(tmp_path, monkeypatch):
    a = write(tmp_path / "a.yaml", "entries:\n  - {id: a, base: flux-2k, variant: mine, path: /x/a.pth}\n")
    b = write(tmp_path / "b.yaml", "entries:\n  - {id: b, base: flux-2k, variant: mine, path: /x/b.pth}\n")
    c = write(tmp_path / "c.yaml", "entries:\n  - {id: c, base: flux-2k, variant: mine, path: /x/c.pth,"
                                   " answers_to: [2k]}\n")
    monkeypatch.setenv("PID_REGISTRY", os.pathsep.join([str(a), str(b)]))
    assert load_registry().resolve("flux", "mine").id == "b"
    reg = load_registry([c])  # --registry comes after $PID_REGISTRY
    assert reg.resolve("flux", "mine").id == "c"
    assert "a" not in reg.ids() and "b" not in reg.ids()  # same backbone/variant: replaced
    assert reg.resolve("flux", "2k").id == "flux-2k"  # the canonical name beats an answers_to name


@pytest.mark.parametrize(("text", "field", "message"), [
    ("entries:\n  - {id: x, base: flux-2k, variant: v, path: /a, sr_scale: 8}\n",
     "sr_scale", "disagrees with net_config.sr_scale = 4"),
    ("entries:\n  - {id: x, base: flux-2k, variant: v, path: /a,\n"
     "     latent: {channels: 32, vae_factor: 8}}\n", "latent.channels", "disagrees with net_config"),
    ("entries:\n  - {id: x, base: flux-2k, variant: v, path: /a, hub: {repo: a/b, path: c}}\n",
     "hub", "exactly one of"),
    ("entries:\n  - {id: x, base: flux-2k, variant: v, hub: {repo: a/b, path: c, sha256: xyz}}\n",
     "hub.sha256", "64 hexadecimal"),
    ("entries:\n  - {id: x, base: flux-2k, variant: v, hub: {repo: nope, path: c}}\n",
     "hub.repo", "owner/name"),
    ("entries:\n  - {id: x, base: flux-2k, variant: v, path: /a, weights: /b}\n",
     "weights", "unknown field"),
    ("entries:\n  - {id: x, base: flux-2k, variant: v, path: /a, sampler: {type: sde, t_list: [0.5, 0.9, 0]}}\n",
     "sampler.t_list", "non-increasing"),
    ("entries:\n  - {id: x, base: flux-2k, variant: v, path: /a, net_config: {sr_scale: '4'}}\n",
     "net_config.lq_latent_channels", "is required"),
    ("entries:\n  - {id: x, base: flux-2k, variant: v, path: /a, num_tensors: true}\n",
     "num_tensors", "got bool"),
    ("entries:\n  - {id: x, base: flux-2k, variant: v, path: /a,\n"
     "     output_sizes: {buckets: [2000x1000]}}\n", "output_sizes.buckets[0]", "multiples of 16"),
    ("entries:\n  - {id: x, base: nope, variant: v, path: /a}\n", "base", "no earlier entry"),
    ("entries:\n  - {id: x, backbone: flux, variant: v, path: /a}\n", "net_config", "is required"),
    ("entries:\n  - {id: x, base: flux-2k, variant: v, path: /a,\n"
     "     latent: {channels: 16, vae_factor: 8, normalisation: {kind: magic}}}\n",
     "latent.normalisation.kind", "unknown kind"),
    ("entries:\n  - {id: x, base: flux-2k, variant: v, path: /a}\n  - {id: x, base: flux-2k, variant: w, path: /a}\n",
     "id", "duplicate id"),
    ("entries:\n  - {id: x, base: flux-2k, variant: v, path: /a}\n  - {id: y, base: flux-2k, variant: v, path: /a}\n",
     "variant", "flux/v is already defined by 'x'"),
    ("version: 2\n", "version", "unsupported schema version"),
    ("entires: []\n", "entires", "unknown field"),
])
def test_validation_errors_name_file_entry_and_field(tmp_path, text, field, message):
    path = write(tmp_path / "bad.yaml", text)
    with pytest.raises(RegistryError) as err:
        load_registry([path], use_env=False)
    text = str(err.value)
    assert text.startswith(str(path)) and f"field '{field}'" in text and message in text
    if text.count("entry "):
        assert "entry " in text and ("'x'" in text or "'y'" in text or "#1" in text)


def test_registry_file_level_errors(tmp_path):
    with pytest.raises(RegistryError, match="cannot read registry file"):
        load_registry([tmp_path / "missing.yaml"], use_env=False)
    with pytest.raises(RegistryError, match="not valid YAML"):
        load_registry([write(tmp_path / "broken.yaml", "entries: [\n")], use_env=False)
    with pytest.raises(RegistryError, match="alias 'x' points to 'nowhere'"):
        load_registry([write(tmp_path / "alias.yaml", "aliases: {x: nowhere}\n")], use_env=False)
    with pytest.raises(RegistryError, match="shadows a backbone"):
        load_registry([write(tmp_path / "alias.yaml", "aliases: {sdxl: flux}\n")], use_env=False)


def test_cli_uses_registry_option_and_reports_errors(tmp_path):
    user = write(tmp_path / "u.yaml", "entries:\n  - {id: u, base: flux-2k, variant: u, path: /x/u.pth}\n")
    result = CliRunner().invoke(app, ["list", "--json", "--registry", str(user)])
    assert result.exit_code == 0, result.output
    assert "u" in [r["id"] for r in json.loads(result.output)]
    bad = write(tmp_path / "bad.yaml", "entries:\n  - {id: b, base: flux-2k, variant: u, path: 3}\n")
    result = CliRunner().invoke(app, ["list", "--registry", str(bad)])
    assert result.exit_code == 1 and f"{bad}: entry 'b' (#1): field 'path'" in result.output


def test_a_checkout_reads_the_top_level_registry(reg):
    """A source checkout or editable install reads the repository's registry.yaml; a wheel reads the copy setup.py
    puts in its pid_cli/ (tests/test_packaging.py)."""
    assert Path(__file__).resolve().parents[1] / "registry.yaml" == BUILTIN_REGISTRY
    assert reg.sources == (str(BUILTIN_REGISTRY),) and len(reg.entries) == 12


# ---------------------------------------------------------------------------------------------------------
# pid convert (strict validation against the entry, then safetensors)


def tiny_registry(tmp_path: Path) -> Path:
    """User entries with the tiny parity networks, so real validation runs in milliseconds."""
    lines = ["entries:"]
    for variant, base in (("v1_flux", "flux-2k"), ("v15_flux", "flux-2kto4k-v1.5"),
                          ("v1_sdxl", "sdxl-2kto4k-v1")):
        cfg = json.loads((PARITY / variant / "config.json").read_text())["tiny_net_config"]
        backbone = base.split("-")[0]
        lines.append(f"  - {{id: tiny-{variant}, base: {base}, variant: tiny-{variant}, backbone: {backbone},"
                     f" path: {PARITY / variant / 'model_ema_bf16.pth'}, net_config: {json.dumps(cfg)}}}")
    return write(tmp_path / "tiny.yaml", "\n".join(lines) + "\n")


@pytest.mark.parametrize("variant", ["v1_flux", "v15_flux"])
def test_convert_validates_and_writes_safetensors(tmp_path, variant):
    pytest.importorskip("pid_cli.model")
    from pid_cli.convert import convert_checkpoint
    from pid_cli.model import PiDConfig, PiDNet, load_weights, read_state_dict

    entry = load_registry([tiny_registry(tmp_path)], use_env=False).get(f"tiny-{variant}")
    src = PARITY / variant / "model_ema_bf16.pth"
    out = tmp_path / "out" / "model.safetensors"
    report = convert_checkpoint(src, out, entry)
    original = read_state_dict(src)
    with safe_open(str(out), framework="pt") as fh:
        keys, meta = set(fh.keys()), fh.metadata()
        assert all(fh.get_tensor(k).dtype == torch.bfloat16 for k in keys)
    assert keys == set(original) and not any(k.startswith("net.") for k in keys)
    assert report.num_tensors == len(keys) and report.dropped == ()
    assert meta["pid.entry"] == entry.id and json.loads(meta["pid.net_config"]) == entry.net_config
    assert len(meta["pid.source_sha256"]) == 64 and meta["pid.source_size"] == str(src.stat().st_size)
    converted = read_state_dict(out)
    assert all(torch.equal(converted[k], original[k]) for k in original)
    with torch.device("meta"):
        net = PiDNet(PiDConfig.from_dict(entry.net_config))
    load_weights(net, out)  # strict
    assert [p.name for p in out.parent.iterdir()] == ["model.safetensors"]  # no temp file left


def test_convert_refuses_a_checkpoint_of_another_network(tmp_path):
    pytest.importorskip("pid_cli.model")
    from pid_cli.convert import ConvertError, convert_checkpoint

    reg = load_registry([tiny_registry(tmp_path)], use_env=False)
    out = tmp_path / "model.safetensors"
    with pytest.raises(ConvertError, match="does not fit") as err:
        convert_checkpoint(PARITY / "v1_sdxl" / "model_ema_bf16.pth", out, reg.get("tiny-v1_flux"))
    assert "lq_proj.latent_proj.0.weight" in str(err.value) and "tiny-v1_flux" in str(err.value)
    with pytest.raises(ConvertError, match="does not fit"):  # the real-size network of the release
        convert_checkpoint(PARITY / "v1_flux" / "model_ema_bf16.pth", out, reg.get("flux-2k"))
    assert not out.exists()


def test_cli_convert(tmp_path):
    pytest.importorskip("pid_cli.model")
    from pid_cli import hub

    tiny = tiny_registry(tmp_path)
    src = PARITY / "v15_flux" / "model_ema_bf16.pth"
    runner = CliRunner()
    result = runner.invoke(app, ["convert", str(src), "--registry", str(tiny), "--backbone", "flux",
                                 "--variant", "tiny-v15_flux"])
    assert result.exit_code == 0, result.output
    entry = load_registry([tiny], use_env=False).get("tiny-v15_flux")
    assert "validated" in result.output and hub.converted_path(entry).is_file()  # where the loader looks
    # A file the registry lists is recognised by its path; anything else needs --backbone/--variant.
    result = runner.invoke(app, ["convert", str(src), "--registry", str(tiny), "-o", str(tmp_path / "x.st")])
    assert result.exit_code == 0 and (tmp_path / "x.st").is_file(), result.output
    stray = tmp_path / "stray.pth"
    stray.write_bytes(src.read_bytes())
    result = runner.invoke(app, ["convert", str(stray)])
    assert result.exit_code == 1 and "--backbone" in result.output
    release = tmp_path / "checkpoints" / "PiD_res2k_sr4x_official_flux_distill_4step" / "model_ema_bf16.pth"
    release.parent.mkdir(parents=True)
    release.write_bytes(src.read_bytes())
    result = runner.invoke(app, ["convert", str(release), "-o", str(tmp_path / "y.st")])
    assert result.exit_code == 1 and "flux-2k" in result.output and "does not fit" in result.output
