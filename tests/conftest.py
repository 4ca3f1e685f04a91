"""Shared test helpers: paths to the bundled upstream parity fixtures."""

from __future__ import annotations

import json
import os
from pathlib import Path

# No test may reach the network: huggingface_hub reads this at import time. Tests of the download
# code talk to their own local server and switch it off explicitly.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import yaml
from helpers import SURROGATE_PROMPT
from safetensors.torch import load_file

from pid_cli.text import save_prompt_embeds

FIXTURES = Path(__file__).parent / "fixtures"
PARITY = FIXTURES / "pid_parity"
TINY_VARIANTS = ("v1_flux", "v1_sdxl", "v15_flux", "v15_flux2")


def tiny_config(variant: str) -> dict:
    return json.loads((PARITY / variant / "config.json").read_text())["tiny_net_config"]


def tiny_fixture(variant: str) -> dict[str, torch.Tensor]:
    """Fixture tensors as float32 (float16 inputs are exact in float32)."""
    return {k: v.float() for k, v in load_file(PARITY / variant / "fixture.safetensors").items()}


def tiny_flux_entry(**fields) -> dict:
    """A user-registry entry for the tiny v1_flux fixture decoder (8 px per latent cell, ×4)."""
    return {"id": "tiny-flux", "base": "flux-2k", "variant": "tiny",
            "path": str(PARITY / "v1_flux" / "model_fp32.safetensors"), "net_config": tiny_config("v1_flux"),
            "output_sizes": {"buckets": ["64x64"], "multiple_of": 16}, **fields}


@pytest.fixture(autouse=True)
def _deterministic_threads():
    torch.set_num_threads(2)
    yield


@pytest.fixture
def tiny_run(tmp_path):
    """The tiny flux decoder in a user registry, prompt embeddings (one of them a lone surrogate), an input folder
    and an output folder: what a `pid decode` test run needs (helpers.args builds its command line)."""
    reg = tmp_path / "registry.yaml"
    reg.write_text(yaml.safe_dump({"version": 1, "entries": [tiny_flux_entry()]}))
    emb = tmp_path / "emb.safetensors"
    save_prompt_embeds(emb, ["", "a red fox", SURROGATE_PROMPT],
                       torch.randn(3, 12, 32, generator=torch.Generator().manual_seed(0)))
    (tmp_path / "in").mkdir()
    return {"reg": reg, "emb": emb, "inputs": tmp_path / "in", "out": tmp_path / "out", "root": tmp_path}
