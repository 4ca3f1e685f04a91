"""Sampler steps from CUDA graphs (pid_cli/model/graphs.py): the bookkeeping around the graphs, on the CPU.

A CUDA graph replays the kernels it recorded on the tensors it recorded them with, so what can go wrong is ours:
an input not copied in before a replay, a new decode's conditioning left out, two output sizes sharing a graph.
Here a stand-in graph recomputes the step from the graph's own tensors on replay, as a real one does; the GPU
check that real graphs are bit-identical is `tests/gpu/test_step_graphs.py`."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config, tiny_fixture

from pid_cli.model import PiDConfig, PiDNet, inference
from pid_cli.model import graphs as graphs_mod
from pid_cli.sampler import sample


class ReplayFromStatics:
    """Replays by running the step on the inputs captured (the graph's own tensors)."""

    def __init__(self, step, graph):
        self.step, self.graph = step, graph

    def replay(self):
        self.graph.out.copy_(self.step(self.graph.x, self.graph.t, self.graph.cond))


def stand_in_capture(monkeypatch):
    captured = []

    def capture(self, graph):
        graph.out = self.step(graph.x, graph.t, graph.cond)  # the capture records; the output tensor is the graph's
        graph.graph = ReplayFromStatics(self.step, graph)
        captured.append(graph)

    monkeypatch.setattr(graphs_mod.StepGraphs, "_capture", capture)
    return captured


def decodes(fx, batches, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for batch in batches:
        x, y, lq = (torch.randn(batch, *fx[k].shape[1:], generator=gen)
                    for k in ("chain_x_0", "chain_y", "chain_lq_latent"))
        eps = [torch.randn(x.shape, generator=gen) for _ in range(3)]
        yield x, y, lq, torch.rand(batch, generator=gen) * 0.2, eps


def test_graphed_steps_refill_every_input_and_keep_one_graph_per_signature(monkeypatch):
    captured = stand_in_capture(monkeypatch)
    fx = tiny_fixture("v15_flux2")
    net = PiDNet(PiDConfig.from_dict(tiny_config("v15_flux2"))).eval()
    torch.manual_seed(0)
    for p in net.parameters():
        p.data.normal_(0, 0.05)
    net.pixel_chunk = 5
    steps = graphs_mod.StepGraphs(net.velocity)
    net.velocity = lambda x, t, cond: steps(x, t, cond)  # what inference.use_cuda_graphs does on a GPU
    plain = PiDNet(PiDConfig.from_dict(tiny_config("v15_flux2"))).eval()
    plain.load_state_dict(net.state_dict())
    plain.pixel_chunk = 5
    with torch.inference_mode():
        for x, y, lq, sigma, eps in decodes(fx, (1, 1, 2, 1)):  # new noise, text, latents, σ; a second batch size
            expected = sample(plain, x, y, lq, sigma, eps=eps)
            got = sample(net, x, y, lq, sigma, eps=eps)
            torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert len(captured) == 2 and len(steps.graphs) == 2  # batch 1 and batch 2, each captured once


def test_graphed_output_is_a_fresh_tensor_each_step(monkeypatch):
    stand_in_capture(monkeypatch)
    def step(x, t, cond):
        return x * 2 + t.view(-1, 1)

    cond = make_cond()
    steps = graphs_mod.StepGraphs(step)
    outs = [steps(torch.full((1, 3), float(i)), torch.tensor([10.0 * i]), cond) for i in range(4)]
    assert [o[0, 0].item() for o in outs] == [0.0, 12.0, 24.0, 36.0]  # earlier outputs not overwritten by replays
    assert len({o.data_ptr() for o in outs}) == 4


def test_signature_tells_shapes_dtypes_and_inference_mode_apart():
    cond = make_cond()
    x, t = torch.zeros(1, 3), torch.zeros(1)
    base = graphs_mod.signature(x, t, cond)
    assert graphs_mod.signature(torch.ones(1, 3), torch.ones(1), make_cond()) == base  # values don't matter
    assert graphs_mod.signature(torch.zeros(2, 3), t, cond) != base
    assert graphs_mod.signature(x.double(), t, cond) != base
    with torch.inference_mode():
        assert graphs_mod.signature(x, t, cond) != base


def make_cond():
    from dataclasses import dataclass

    @dataclass
    class Cond:
        table: torch.Tensor
        pair: tuple[torch.Tensor, torch.Tensor] | None
        grid: tuple[int, int]

    return Cond(torch.zeros(4), (torch.zeros(2), torch.ones(2)), (1, 1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_pixel_modulation_is_the_plain_one(dtype):
    """The split form (two Linears of regrouped rows) gives the plain form's values for both parts, and a network
    deployed with it decodes what the plain network decodes."""
    from pid_cli.model.pixel_modulation import POST, PRE, PixelModulation, SplitPixelModulation

    torch.manual_seed(0)
    plain = PixelModulation(24, 4, 9).to(dtype)  # D 24, C 4, P² 9
    s_cond = torch.randn(7, 24).to(dtype)
    with torch.no_grad():
        expected = [plain(s_cond, part).clone() for part in (PRE, POST)]
        split = SplitPixelModulation(plain)
        for part, want in zip((PRE, POST), expected, strict=True):
            got = split(s_cond, part)
            assert got.shape == want.shape == (7, 9, 4 * (2 + 2 * part))
            torch.testing.assert_close(got, want, rtol=0, atol=0)

    fx = tiny_fixture("v15_flux2")
    net = PiDNet(PiDConfig.from_dict(tiny_config("v15_flux2"))).eval()
    for p in net.parameters():
        p.data.normal_(0, 0.05)
    deployed = PiDNet(PiDConfig.from_dict(tiny_config("v15_flux2"))).eval()
    deployed.load_state_dict(net.state_dict())
    inference.deploy(deployed)
    assert all(isinstance(b.adaLN_modulation, SplitPixelModulation) for b in deployed.pixel_blocks)
    args = (fx["x"], fx["t"], fx["y"], fx["lq_latent"], fx["degrade_sigma"])
    with torch.inference_mode():
        torch.testing.assert_close(deployed(*args), net(*args), rtol=1e-6, atol=1e-6)


def test_the_plain_network_traces_as_one_graph():
    """scripts/bench.py's upstream-compiled policy compiles the whole forward, `condition` included, as upstream's
    `--compile` does: the plain network (no deployment) must trace without a graph break."""
    fx = tiny_fixture("v15_flux2")
    net = PiDNet(PiDConfig.from_dict(tiny_config("v15_flux2"))).eval()
    t = torch.full((fx["x"].shape[0],), 999.0)
    with torch.no_grad():
        explained = torch._dynamo.explain(net)(fx["x"], t, fx["y"], fx["lq_latent"], fx["degrade_sigma"])
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


def test_only_the_most_recently_used_signatures_are_kept(monkeypatch):
    captured = stand_in_capture(monkeypatch)
    steps = graphs_mod.StepGraphs(lambda x, t, cond: x + t.view(-1, 1), keep=2)
    cond = make_cond()
    t = torch.zeros(1)
    for width in (3, 3, 4, 4, 3, 5, 5):  # sizes 3, 4, back to 3 (still held), then 5 pushes out 4
        out = steps(torch.ones(1, width), t, cond)
        assert out.shape == (1, width)
    assert [key[0][0] for key in steps.graphs] == [(1, 3), (1, 5)]
    assert len(captured) == 3  # 3 and 4 captured once each, 5 once; 3 was never captured again


@pytest.mark.slow  # a subprocess, signal or compile test: seconds of wall time
def test_compiled_blocks_compile_once_per_output_size_never_per_image():
    """Time to first image stays the first image's: a decode compiles what its output size needs once, and every
    later image of that size (new noise, text, latent, σ, seed) runs what was compiled. A second size compiles its
    own copy of each graph once, and returning to the first compiles nothing."""
    from torch._dynamo.testing import CompileCounter

    fx = tiny_fixture("v15_flux2")
    net = PiDNet(PiDConfig.from_dict(tiny_config("v15_flux2"))).eval()
    counter = CompileCounter()  # counts the graphs Dynamo hands to the compiler, then runs them eagerly
    inference.compile_blocks(net, backend=counter)
    compiled_after = []

    def decode(width: int, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        noise = torch.randn(1, 3, 64, 64 * width, generator=gen)
        latent = torch.randn(1, 128, 1, width, generator=gen)
        text = torch.randn(fx["chain_y"].shape, generator=gen)
        sample(net, noise, text, latent, torch.rand(1, generator=gen) * 0.2, generator=gen)
        compiled_after.append(counter.frame_count)

    torch._dynamo.reset()
    with torch.inference_mode():
        for width, seed in ((1, 0), (1, 1), (1, 2), (2, 3), (2, 4), (1, 5)):
            decode(width, seed)
    first = compiled_after[0]
    assert first > 0
    assert compiled_after == [first] * 3 + [2 * first] * 3
