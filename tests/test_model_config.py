"""`PiDConfig`: the released configurations are data, and a registry's net_config parses or is refused by name."""

from __future__ import annotations

import dataclasses
import types

import pytest
import torch
import yaml
from conftest import PARITY, TINY_VARIANTS, tiny_config, tiny_flux_entry

from pid_cli.decode.session import _load_decoder
from pid_cli.model import PiDConfig, PiDNet
from pid_cli.model.config import TRAINING_ONLY
from pid_cli.registry import load_registry


def test_every_registry_entry_parses_and_round_trips():
    entries = load_registry().entries
    assert entries
    for entry in entries:
        config = PiDConfig.from_dict(entry.net_config)
        fields = {f.name for f in dataclasses.fields(PiDConfig)}
        # every field the registry names is read, none silently dropped but the training-only ones
        assert {k: getattr(config, k) for k in entry.net_config if k in fields} == {
            k: v for k, v in entry.net_config.items() if k not in TRAINING_ONLY}, entry.id
        assert PiDConfig.from_dict(dataclasses.asdict(config)) == config, entry.id


@pytest.mark.parametrize("variant", TINY_VARIANTS)
def test_tiny_fixture_configs_round_trip(variant):
    config = PiDConfig.from_dict(tiny_config(variant))
    assert PiDConfig.from_dict(dataclasses.asdict(config)) == config


def test_defaults_are_the_released_2k_network():
    """The dataclass's defaults are what the network took when a field was left out: flux-2k's values."""
    released = PiDConfig.from_dict(load_registry().get("flux-2k").net_config)
    assert PiDConfig() == released
    assert PiDConfig().attention_heads == PiDNet.attention_heads({}) == (24, 16)
    assert PiDNet.attention_heads({"num_groups": 6, "pixel_num_groups": None}) == (6, 6)


def test_unknown_keys_are_refused_by_name_and_training_only_ones_ignored():
    cfg = tiny_config("v15_flux")
    assert TRAINING_ONLY & set(cfg)  # the fixture carries upstream's training fields
    assert not {f.name for f in dataclasses.fields(PiDConfig)} & TRAINING_ONLY
    with pytest.raises(TypeError, match=r"unknown configuration field\(s\): bogus, typo_size \("):
        PiDConfig.from_dict({**cfg, "typo_size": 1, "bogus": 2})
    with pytest.raises(ValueError, match="enable_ed"):
        PiDConfig.from_dict({**cfg, "enable_ed": True})
    with pytest.raises(ValueError, match="rope_mode"):
        PiDConfig(rope_mode="yarn")
    with pytest.raises(dataclasses.FrozenInstanceError):
        PiDConfig().hidden_size = 8  # type: ignore[misc]


def test_the_network_holds_its_config():
    config = PiDConfig.from_dict(tiny_config("v1_flux"))
    with torch.device("meta"):
        net = PiDNet(config)
    assert net.config is config
    assert len(net.patch_blocks) == config.patch_depth and len(net.pixel_blocks) == config.pixel_depth


def test_a_bad_registry_key_is_a_configuration_error_naming_the_entry_and_the_key(tmp_path):
    reg = tmp_path / "registry.yaml"
    entry = tiny_flux_entry(net_config={**tiny_config("v1_flux"), "hiden_size": 16})
    reg.write_text(yaml.safe_dump({"version": 1, "entries": [entry]}))
    entry = load_registry([reg]).get("tiny-flux")
    job = types.SimpleNamespace(entry=entry, weights=PARITY / "v1_flux" / "model_fp32.safetensors",
                                devices=[torch.device("cpu")], dtype="fp32", text_encoder=None, attention="bf16",
                                matmul="bf16", check_psnr=None)
    with pytest.raises(ValueError, match=r"registry entry tiny-flux \(.*registry.yaml\): net_config: unknown "
                                         r"configuration field\(s\): hiden_size"):
        _load_decoder(job, compile=False)
