"""README's first command on a GPU, end to end: the shipped sample, downloads from a Hub, a 2048x2048 PNG.

The Hub is a local one (tests/hubserver.py) serving tiny stand-ins at the registry's own paths: the upstream
fixture decoder in the released .pth format, a random FLUX.2 VAE and a random Gemma-2 with a word-level
tokenizer. A user registry (PID_REGISTRY) gives the flux2 2k entry the tiny network's configuration; the
command itself runs exactly as README writes it, in a fresh process. On a CPU the 2048x2048 decode takes
over ten minutes even for the tiny network, so this runs on the device machine; tests/test_run_feedback.py
checks the same command offline on every CI run."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import PARITY, tiny_config
from PIL import Image
from safetensors.torch import save_file

try:
    from hubserver import fake_hub
except ImportError:  # tests/ imported as a package
    from tests.hubserver import fake_hub

__all__ = ["fake_hub"]
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

REPO = Path(__file__).resolve().parents[2]
DECODER = "checkpoints/PiD_res2k_sr4x_official_flux2_distill_4step/model_ema_bf16.pth"
VAE = "checkpoints/flux2_ae.safetensors"
GEMMA = "Efficient-Large-Model/gemma-2-2b-it"
TINY_KL = {"block_out_channels": [8, 16, 16, 16], "norm_num_groups": 4}


def _tiny_gemma(folder: Path, hidden: int) -> None:
    """A random Gemma-2 of the tiny decoder's text width, and a word-level tokenizer with Gemma's specials."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=64, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16,
                          max_position_embeddings=512, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    Gemma2ForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    tok = Tokenizer(models.WordLevel({"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<bos>", "pad_token": "<pad>"}))


def test_readme_first_command_runs_end_to_end(fake_hub, tmp_path):
    from pid_cli.registry import load_registry
    from pid_cli.vae import build_codec

    block = re.search(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S).group(1)
    argv = shlex.split(block.splitlines()[0].split(" && ", 1)[1])
    assert argv[:2] == ["pid", "decode"]

    net = tiny_config("v15_flux2")
    fake_hub.add("nvidia/PiD", DECODER, (PARITY / "v15_flux2" / "model_ema_bf16.pth").read_bytes())
    torch.manual_seed(0)
    vae = build_codec("flux2", overrides=TINY_KL).model.state_dict()
    save_file({k: v.contiguous() for k, v in vae.items()}, tmp_path / "ae.safetensors")
    fake_hub.add("nvidia/PiD", VAE, (tmp_path / "ae.safetensors").read_bytes())
    gemma = tmp_path / "gemma"
    _tiny_gemma(gemma, net["txt_embed_dim"])
    for f in gemma.iterdir():
        fake_hub.add(GEMMA, f.name, f.read_bytes())
    builtin = load_registry(use_env=False).get("flux2-2k")
    registry = tmp_path / "tiny.yaml"
    registry.write_text(yaml.safe_dump({"version": 1, "entries": [{
        "id": "flux2-2k", "base": "flux2-2kto4k-v1.5", "variant": "2k", "net_config": net,
        "hub": {"repo": "nvidia/PiD", "path": DECODER},
        "vae": {"format": "bfl-flux2-ae", "files": {"weights": {"repo": "nvidia/PiD", "path": VAE}},
                "options": {"model_overrides": TINY_KL}},
        "output_sizes": {"buckets": [f"{w}x{h}" for w, h in builtin.output_sizes.buckets], "multiple_of": 16}}]}))

    work = tmp_path / "work"
    work.mkdir()
    (work / argv[2].rstrip("/")).symlink_to(REPO / argv[2].rstrip("/"))
    env = {**os.environ, "PID_REGISTRY": str(registry), "PYTHONPATH": f"{REPO}{os.pathsep}"
           + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run([sys.executable, "-m", "pid_cli.cli", *argv[1:]], cwd=work, env=env,
                            capture_output=True, text=True, timeout=540)
    assert result.returncode == 0, result.stderr[-4000:]
    png = work / "renders" / "astronaut.png"
    image = Image.open(png)
    assert image.size == (2048, 2048)
    caption = (REPO / "samples" / "astronaut.txt").read_text().strip()
    assert image.text["pid:prompt"] == caption and image.text["pid:variant"] == "2k"
    assert "cuda" not in image.text["pid:runtime"] or "NVIDIA" in image.text["pid:runtime"]
    assert "pid decode: 1 input(s): 1 decoded, 0 failed" in result.stderr
    assert fake_hub.requested("GET", DECODER) and fake_hub.requested("GET", "gemma-2-2b-it")
