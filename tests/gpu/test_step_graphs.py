"""Sampler steps replayed from CUDA graphs (`inference.use_cuda_graphs`) on a GPU: bit for bit what the same network
gives without them, eager and compiled, over decodes with new noise, text and latents (the graph's inputs refilled
each time) and a second batch size (a second graph). tests/test_graphs.py checks the bookkeeping around the graphs
on the CPU; only a GPU replays real ones."""

from __future__ import annotations

import pytest
import torch
from conftest import PARITY, tiny_config, tiny_fixture

from pid_cli.model import PiDConfig, PiDNet, inference, load_weights
from pid_cli.model.layers import fast_attention
from pid_cli.sampler import sample

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

VARIANT = "v15_flux2"


@pytest.mark.parametrize("policy", ["bf16", "bf16+compile"])
def test_step_graphs_bit_identical(policy: str, cuda: torch.device, measured):
    """Four decodes of batch sizes 1, 1, 2, 1: two graphs captured, one per batch size."""
    fx = tiny_fixture(VARIANT)
    gen = torch.Generator(device=cuda).manual_seed(0)
    decodes = []
    for batch in (1, 1, 2, 1):
        x, y, lq = (torch.randn(batch, *fx[k].shape[1:], device=cuda, generator=gen)
                    for k in ("chain_x_0", "chain_y", "chain_lq_latent"))
        eps = [torch.randn(x.shape, device=cuda, generator=gen) for _ in range(3)]
        decodes.append((x, y, lq, torch.full((batch,), 0.1, device=cuda), eps))
    outs = []
    for graphed in (False, True):
        net = load_weights(PiDNet(PiDConfig.from_dict(tiny_config(VARIANT))).eval(),
                           PARITY / VARIANT / "model_fp32.safetensors").to(cuda)
        net.pixel_chunk = 5
        net.to_inference_dtype(torch.bfloat16)
        inference.deploy(net, compile=policy.endswith("compile"), cuda_graphs=graphed)
        with torch.inference_mode(), fast_attention():
            outs.append([sample(net, x, y, lq, sigma, eps=eps).cpu() for x, y, lq, sigma, eps in decodes])
    captured = sum(g.graph is not None for g in inference.step_graphs(net).graphs.values())
    worst = max((a - b).abs().max().item() for a, b in zip(*outs, strict=True))
    measured(f"sampler steps from CUDA graphs ({policy}): {captured} graphs captured, max |Δ| {worst:.2e}")
    assert captured == 2
    assert all(torch.equal(a, b) for a, b in zip(*outs, strict=True))
