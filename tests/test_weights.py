"""Released checkpoints load strictly; wrong or damaged files fail with a clear message."""

from __future__ import annotations

import json
import os
import pickle
import shutil

import pytest
import torch
from conftest import PARITY, tiny_config
from safetensors.torch import save_file

from pid_cli.model import PiDConfig, PiDNet, WeightsError, load_weights, read_state_dict

MANIFESTS = sorted((PARITY / "manifests").glob("*.json"))


def test_ten_manifests_are_bundled():
    assert len(MANIFESTS) == 10


@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda p: p.stem)
def test_full_size_network_has_the_released_keys_and_shapes(manifest):
    info = json.loads(manifest.read_text())
    with torch.device("meta"):
        net = PiDNet(PiDConfig.from_dict(info["net_config"]))
    ours = {k: list(v.shape) for k, v in net.state_dict().items()}
    released = {k.removeprefix("net."): shape for k, (shape, _dtype) in info["state_dict"].items()}
    assert ours == released
    assert sum(v.numel() for v in net.state_dict().values()) == info["total_params"]


@pytest.mark.parametrize("variant", ["v1_flux", "v15_flux2"])
def test_meta_built_network_adopts_file_tensors(variant):
    with torch.device("meta"):
        net = PiDNet(PiDConfig.from_dict(tiny_config(variant)))
    load_weights(net, PARITY / variant / "model_ema_bf16.pth")
    assert not any(p.is_meta for p in net.parameters())
    assert all(p.dtype == torch.bfloat16 for p in net.parameters())


def test_truncated_file_is_refused(tmp_path):
    src = PARITY / "v1_flux" / "model_ema_bf16.pth"
    bad = tmp_path / "model_ema_bf16.pth"
    bad.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    with pytest.raises(WeightsError, match="truncated or corrupt"):
        load_weights(PiDNet(PiDConfig.from_dict(tiny_config("v1_flux"))), bad)


def test_truncated_safetensors_is_refused(tmp_path):
    src = PARITY / "v1_flux" / "model_fp32.safetensors"
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(src.read_bytes()[:1000])
    with pytest.raises(WeightsError, match="not a readable safetensors"):
        load_weights(PiDNet(PiDConfig.from_dict(tiny_config("v1_flux"))), bad)


def test_file_of_another_variant_names_what_it_is():
    net = PiDNet(PiDConfig.from_dict(tiny_config("v1_flux")))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(WeightsError) as err:
        load_weights(net, PARITY / "v15_flux2" / "model_ema_bf16.pth")
    msg = str(err.value)
    assert "v15_flux2" in msg and "unexpected" in msg and "lq_proj.pit_head.weight" in msg
    assert "looks like a PiD v1.5 (2kto4k-v1.5) decoder for 32-channel latents" in msg
    assert "expects a PiD v1 (2k / 2kto4k-v1) decoder for 16-channel latents" in msg
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items()), "a failed load changed weights"


def test_one_extra_key_is_refused(tmp_path):
    state = read_state_dict(PARITY / "v1_sdxl" / "model_fp32.safetensors")
    state["patch_blocks.0.extra.weight"] = torch.zeros(2)
    path = tmp_path / "extra.safetensors"
    save_file(state, path)
    with pytest.raises(WeightsError, match=r"unexpected 1: patch_blocks\.0\.extra\.weight"):
        load_weights(PiDNet(PiDConfig.from_dict(tiny_config("v1_sdxl"))), path)


def test_missing_and_misshaped_keys_are_listed(tmp_path):
    state = read_state_dict(PARITY / "v1_sdxl" / "model_fp32.safetensors")
    del state["final_layer.linear.bias"]
    state["y_pos_embedding"] = torch.zeros(1, 3, 16)
    path = tmp_path / "bad.safetensors"
    save_file(state, path)
    with pytest.raises(WeightsError) as err:
        load_weights(PiDNet(PiDConfig.from_dict(tiny_config("v1_sdxl"))), path)
    assert "missing 1: final_layer.linear.bias" in str(err.value)
    assert "y_pos_embedding file [1, 3, 16] vs network [1, 12, 16]" in str(err.value)


def _holds(net: PiDNet, state: dict[str, torch.Tensor]) -> bool:
    """Every tensor of the network equals the file's tensor of that name (as the network's dtype)."""
    return all(torch.equal(v, state[k].to(v.dtype)) for k, v in net.state_dict().items())


def test_training_only_aux_head_in_a_file_is_ignored(tmp_path):
    state = read_state_dict(PARITY / "v15_flux" / "model_fp32.safetensors")
    state["lq_proj.lq_aux_rgb_head.3.weight"] = torch.zeros(48, 8)
    path = tmp_path / "with_aux.safetensors"
    save_file(state, path)
    net = load_weights(PiDNet(PiDConfig.from_dict(tiny_config("v15_flux"))), path)
    assert _holds(net, state) and not any("aux_rgb_head" in k for k in net.state_dict())


def test_unprefixed_and_wrapped_pickles_load(tmp_path):
    state = read_state_dict(PARITY / "v1_flux" / "model_ema_bf16.pth")
    path = tmp_path / "wrapped.pth"
    torch.save({"state_dict": state}, path)
    assert _holds(load_weights(PiDNet(PiDConfig.from_dict(tiny_config("v1_flux"))), path), state)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch /tmp/pid_pwned",))


@pytest.mark.parametrize("container", ["zip", "legacy"])
def test_code_executing_pickle_is_refused(tmp_path, container):
    marker = "/tmp/pid_pwned"
    if os.path.exists(marker):
        os.remove(marker)
    path = tmp_path / "evil.pth"
    payload = {"net.s_embedder.proj.weight": _Exploit()}
    if container == "zip":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    with pytest.raises(WeightsError, match="refused to load"):
        read_state_dict(path)
    assert not os.path.exists(marker)


def test_not_a_decoder_file(tmp_path):
    path = tmp_path / "vae.safetensors"
    save_file({"encoder.conv_in.weight": torch.zeros(4, 3, 3, 3)}, path)
    with pytest.raises(WeightsError, match="not a PiD decoder"):
        load_weights(PiDNet(PiDConfig.from_dict(tiny_config("v1_flux"))), path)


def test_missing_file(tmp_path):
    with pytest.raises(WeightsError, match="no such weight file"):
        read_state_dict(tmp_path / "nope.pth")


def test_config_fields():
    cfg = tiny_config("v15_flux")
    assert cfg["repa_encoder_index"] == 2 and cfg["lq_aux_rgb_head"] is True  # accepted and ignored
    net = PiDNet(PiDConfig.from_dict(cfg))
    assert not any("aux" in k for k in net.state_dict())
    with pytest.raises(ValueError, match="enable_ed"):
        PiDNet(PiDConfig.from_dict({**cfg, "enable_ed": True}))
    with pytest.raises(TypeError, match=r"unknown configuration field.*bogus"):
        PiDNet(PiDConfig.from_dict({**cfg, "bogus": 1}))
    with pytest.raises(ValueError, match="lq_gate_type"):
        PiDNet(PiDConfig.from_dict({**cfg, "lq_gate_type": "sigma_aware_per_token_and_dim"}))


def test_copy_of_fixture_dir_loads(tmp_path):
    """Loading never depends on the file's name or folder."""
    dst = tmp_path / "renamed.pth"
    shutil.copy(PARITY / "v15_flux" / "model_ema_bf16.pth", dst)
    net = load_weights(PiDNet(PiDConfig.from_dict(tiny_config("v15_flux"))), dst)
    assert _holds(net, read_state_dict(PARITY / "v15_flux" / "model_ema_bf16.pth"))


def test_random_timing_weights_keep_norms_and_gates_sane():
    """scripts/bench.py's and `pid doctor`'s stand-in weights: unit norms, the gates' log_alpha at 1.6, small
    matmul weights, the same for the same generator."""
    from pid_cli.model.weights import fill_random

    nets = [fill_random(PiDNet(PiDConfig.from_dict(tiny_config("v15_flux"))), 0.05, torch.Generator().manual_seed(3))
            for _ in range(2)]
    params = dict(nets[0].named_parameters())
    assert all(torch.equal(a, b) for a, b in zip(nets[0].parameters(), nets[1].parameters(), strict=True))
    assert all((p == 1).all() for n, p in params.items() if "norm" in n)
    gates = [p for p in params.values() if p.dim() == 0]
    assert gates and all(torch.equal(p, torch.tensor(1.6)) for p in gates)
    weight = params["patch_blocks.0.attn.qkv_x.weight"]
    assert abs(weight.std().item() - 0.05) < 0.01
