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
from safetensors.torch import load_file

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
